"""gfpgan-bench on the small random-valued weights: one table row per method and batch size.

ALIGNED alignment on the CPU with a couple of iterations keeps it to a few seconds.
"""
from __future__ import annotations

import re

from server.bench import METHODS, main, synthetic_faces


def test_bench_prints_a_row_per_method_and_batch_size_with_positive_throughput(small_weights, tmp_path, capsys):
    out = tmp_path / "bench.md"
    main(["--model", str(small_weights / "GFPGANv1.4.pth"), "--weights-dir", str(small_weights),
          "--device", "cpu", "--no-download", "--alignment", "aligned", "--batch-sizes", "1,2",
          "--iterations", "2", "--faces", "3", "--face-size", "128", "--markdown-out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text().strip() == printed.strip()
    rows = {}
    for line in printed.splitlines():
        match = re.match(r"\| (.+?) \| (\d+) \| ([\d.]+) \| ([\d.]+)x \|", line)
        if match:
            rows[(match[1], int(match[2]))] = (float(match[3]), float(match[4]))
    assert set(rows) == {(method, batch) for method in METHODS for batch in (1, 2)}
    assert all(faces_per_s > 0 for faces_per_s, _ in rows.values())
    # GFPGANer is the baseline of the ratio column.
    assert rows[(METHODS[0], 1)][1] == 1.0 and rows[(METHODS[0], 2)][1] == 1.0
    assert "- device: CPU" in printed and "- command: `gfpgan-bench --model" in printed


def test_synthetic_faces_are_distinct_square_crops():
    faces = synthetic_faces(3, 96, seed=1)
    assert faces.shape == (3, 96, 96, 3) and faces.dtype.name == "uint8"
    assert not (faces[0] == faces[1]).all()
