"""Does a face's output depend on the batch it is computed in? A table per dtype and alignment.

The service batches faces from every caller together, so the same frame can run in a network
pass of 1 face or of 8. In bfloat16 the backend (oneDNN, cuDNN) picks other kernels for other
pass sizes, which round differently; the question for steady video is how far a face's pixels
move with that. Each row enhances face 0 first in a pass of N faces and compares it with face 0
run alone; with face 0 first in a pass of N other faces, which must give the same pixels (the
test of that: tests/test_speed.py::test_in_bfloat16_a_face_never_depends_on_the_faces_beside_it);
and with face 0 last in the pass (a backend may compute the rows past its last full block of
rows with other kernels).

    python scripts/batch_rounding.py WEIGHTS_DIR FACES_DIR [--device cpu] [--sizes 1,2,3,4,8]
                                     [--markdown-out FILE]

WEIGHTS_DIR holds GFPGANv1.4.pth, the detector and ParseNet (real ones, or random-valued ones
from `python scripts/gpu_env.py --make-weights DIR --faces FACES_DIR`); FACES_DIR holds face
crops, read in name order like gfpgan-bench's --faces-from (face 0 is the first).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import server.compat  # noqa: E402,F401  (before gfpgan/basicsr/facexlib)
from contract.types import Alignment, EnhanceOptions  # noqa: E402
from server.bench import faces_from  # noqa: E402
from server.jobs import Job  # noqa: E402
from server.pipeline import build_pipeline  # noqa: E402
from server.settings import Settings  # noqa: E402


def rows(pipeline, faces: np.ndarray, sizes: list[int], alignment: Alignment) -> list[tuple]:
    """Per pass size N: face 0 first in a pass of faces 0..N-1, against face 0 alone (max and
    mean levels), against face 0 first beside other faces (max levels: must be 0), and against
    face 0 last in the pass (max levels)."""
    options = EnhanceOptions(alignment=alignment)

    def face0(order: list[int]) -> np.ndarray:
        result = pipeline.enhance([Job(faces[order], options)])[0]
        return result.faces[order.index(0)].astype(np.int16)

    alone, table = face0([0]), []
    count = len(faces)
    for n in sizes:
        first = face0(list(range(n)))
        others = [1 + (n - 1 + i) % (count - 1) for i in range(n - 1)]  # faces n.. as far as there are
        beside, last = face0([0, *others]), face0([*range(1, n), 0])
        moved = np.abs(first - alone)
        table.append((n, int(moved.max()), float(moved.mean()), int(np.abs(first - beside).max()),
                      int(np.abs(first - last).max())))
    return table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights_dir")
    parser.add_argument("faces_dir")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--alignments", default="aligned,detect")
    parser.add_argument("--sizes", default="1,2,3,4,8")
    parser.add_argument("--markdown-out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    faces = faces_from(args.faces_dir, 256)
    if len(faces) < max(sizes) + 1:
        parser.error(f"{args.faces_dir}: {len(faces)} faces; --sizes up to {max(sizes)} needs "
                     f"{max(sizes) + 1}, so that face 0 can have other faces beside it")
    lines = ["| dtype | alignment | faces in the pass | max levels vs alone | mean levels vs alone | "
             "max levels vs other faces beside it | max levels vs last in the pass |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for dtype in args.dtypes.split(","):
        settings = Settings(model=str(Path(args.weights_dir) / "GFPGANv1.4.pth"), weights_dir=args.weights_dir,
                            device=args.device, dtype=dtype, no_download=True, metrics_port=0)
        pipeline = build_pipeline(settings)
        pipeline.warmup()
        for alignment in args.alignments.split(","):
            for n, worst, mean, beside, last in rows(pipeline, faces, sizes, Alignment(alignment)):
                lines.append(f"| {dtype} | {alignment} | {n} | {worst} | {mean:.3f} | {beside} | {last} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown_out:
        Path(args.markdown_out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
