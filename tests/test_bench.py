"""gfpgan-bench on the small random-valued weights: one table row per method and batch size.

ALIGNED alignment on the CPU with a couple of iterations keeps it to a few seconds.
"""
from __future__ import annotations

import re

from server.bench import METHODS, VARIANTS, main, synthetic_faces


def test_bench_prints_a_row_per_method_and_batch_size_with_positive_throughput(small_weights, tmp_path, capsys):
    out = tmp_path / "bench.md"
    main(["--model", str(small_weights / "GFPGANv1.4.pth"), "--weights-dir", str(small_weights),
          "--device", "cpu", "--no-download", "--alignment", "aligned", "--batch-sizes", "1,2",
          "--iterations", "2", "--faces", "3", "--face-size", "128", "--in-flight", "8",
          "--markdown-out", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert out.read_text().strip() == printed.strip()
    # 8 requests of 2 faces in flight hold two batches of 8: service-overlap is timed at 2 only
    assert "- service-overlap: timed at 2, where 8 requests in flight hold two batches of 8 faces" in printed
    rows = {}
    for line in printed.splitlines():
        match = re.match(r"\| (.+?) \| (\d+) \| ([\d.]+) \| ([\d.]+)x \|", line)
        if match:
            rows[(match[1], int(match[2]))] = (float(match[3]), float(match[4]))
    assert set(rows) == {(method, batch) for method in METHODS[:4] for batch in (1, 2)} | {(METHODS[4], 2)}
    assert all(faces_per_s > 0 for faces_per_s, _ in rows.values())
    # GFPGANer is the baseline of the ratio column.
    assert rows[(METHODS[0], 1)][1] == 1.0 and rows[(METHODS[0], 2)][1] == 1.0
    assert "- device: CPU" in printed and "- command: `gfpgan-bench --model" in printed
    # The service's batches, per client and request size: every timed face went through them,
    # none twice, and none of the other client's (its client in this process, then in a child)
    tables = {}
    for method, table in re.findall(r"(?ms)^### Service batches \((.+?)\)\n(.*?)(?=^### |\Z)", printed):
        tables[method] = {int(m[1]): (int(m[2]), float(m[3]), float(m[4]), int(m[5])) for m in re.finditer(
            r"^\| (\d+) \| (\d+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| (\d+)% \|$", table, flags=re.M)}
    assert set(tables) == {METHODS[2], METHODS[3], METHODS[4]}
    for method, batches in tables.items():
        assert set(batches) == ({2} if method == METHODS[4] else {1, 2}), method
        for size, (count, per_batch, per_face_ms, busy) in batches.items():
            assert round(count * per_batch) == 2 * size  # 2 iterations of `size` faces
            assert per_face_ms > 0 and 0 < busy <= 100
    # ... and in the log as soon as each size is measured, the same figures: a bench step stopped
    # before its table is written still tells the device from the transport
    for label, method in (("", METHODS[2]), (", client process", METHODS[3]), (", overlap", METHODS[4])):
        logged = {int(m[1]): (int(m[2]), float(m[3]), float(m[4]), int(m[5])) for m in re.finditer(
            rf"^service batches{label}: request (\d+): (\d+) batches of ([\d.]+) faces and [\d.]+ jobs, "
            r"[\d.]+ ms a batch \(([\d.]+) ms a face\), pipeline busy (\d+)%$", captured.err, flags=re.M)}
        assert logged == tables[method], method


def test_synthetic_faces_are_distinct_square_crops():
    faces = synthetic_faces(3, 96, seed=1)
    assert faces.shape == (3, 96, 96, 3) and faces.dtype.name == "uint8"
    assert not (faces[0] == faces[1]).all()


def test_bench_gives_a_table_per_model_each_against_gfpganer_with_that_arch(small_weights, tmp_path, capsys):
    """Issue 10: --model a,b gives one report per restorer; GFPGANer is built with each file's
    own architecture (RestoreFormer here), so the baseline is the same network."""
    import os

    from tests.checkpoints import DETECTION_FILE, GFPGAN_FILE, PARSING_FILE, build_restoreformer, make_checkpoint

    for name in (GFPGAN_FILE, DETECTION_FILE, PARSING_FILE):
        os.symlink(small_weights / name, tmp_path / name)
    make_checkpoint(tmp_path / "RestoreFormer.pth", build_restoreformer(seed=2))
    main(["--model", "gfpgan-1.4,restoreformer", "--weights-dir", str(tmp_path), "--device", "cpu",
          "--no-download", "--alignment", "aligned", "--batch-sizes", "1", "--iterations", "1",
          "--faces", "1", "--face-size", "64", "--methods", "gfpganer,pipeline"])
    printed = capsys.readouterr().out
    titles = re.findall(r"^## (\S+): (\S+) \((\w+)\)$", printed, flags=re.M)
    assert titles == [("gfpgan-1.4", "GFPGANv1.4", "clean"), ("restoreformer", "RestoreFormer", "RestoreFormer")]
    rows = re.findall(r"^\| (.+?) \| 1 \| ([\d.]+) \|", printed, flags=re.M)
    assert len(rows) == 4 and all(float(speed) > 0 for _, speed in rows)



def test_gfpganer_timed_at_some_batch_sizes_is_the_baseline_of_the_larger_ones(small_weights, capsys):
    """--gfpganer-batch-sizes: GFPGANer's one-face loop is timed at the sizes given; a larger
    batch is compared with its rate at the largest of them below, and says which; sizes that are
    not some of --batch-sizes (the smallest included) are refused."""
    import pytest

    from server.bench import Measurement, markdown_table

    table = markdown_table([Measurement(METHODS[0], 1, 10.0, [100.0]), Measurement(METHODS[0], 8, 8.0, [1000.0]),
                            *(Measurement(METHODS[1], b, rate, [1.0]) for b, rate in ((1, 30.0), (8, 80.0), (32, 96.0)))])
    ratios = dict(re.findall(r"^\| FacePipeline, in-process \| (\d+) \| [\d.]+ \| ([^|]+) \|", table, flags=re.M))
    assert ratios == {"1": "3.00x", "8": "10.00x", "32": "12.00x (at 8)"}
    assert "GFPGANer, one face at a time | 32" not in table
    main(["--model", str(small_weights / "GFPGANv1.4.pth"), "--weights-dir", str(small_weights), "--device", "cpu",
          "--no-download", "--alignment", "aligned", "--batch-sizes", "1,2", "--gfpganer-batch-sizes", "1",
          "--iterations", "1", "--faces", "2", "--face-size", "64", "--methods", "gfpganer,pipeline"])
    ratios = {(method, int(batch)): ratio for method, batch, ratio in re.findall(
        r"^\| (.+?) \| (\d) \| [\d.]+ \| ([^|]+?) \|", capsys.readouterr().out, flags=re.M)}
    assert set(ratios) == {(METHODS[0], 1), (METHODS[1], 1), (METHODS[1], 2)}
    assert ratios[METHODS[0], 1] == "1.00x" and re.fullmatch(r"[\d.]+x", ratios[METHODS[1], 1])
    assert re.fullmatch(r"[\d.]+x \(at 1\)", ratios[METHODS[1], 2])
    for bad in ("8,16", "2", "1,3"):  # not the smallest / not among --batch-sizes
        with pytest.raises(SystemExit):
            main(["--batch-sizes", "1,8,16", "--gfpganer-batch-sizes", bad, "--device", "cpu", "--no-download"])
    assert "--gfpganer-batch-sizes" in capsys.readouterr().err


def test_every_speed_variant_is_chosen_by_its_flags(monkeypatch):
    """The GPU check reruns the fastest variant through gfpgan-bench's flags: each variant's flags
    must give exactly that variant's forms."""
    from server.bench import VARIANTS
    from server.settings import Settings

    monkeypatch.setattr("server.speed.compile_toolchain_problem", lambda: None)  # as on the GPU image

    for name, speed in VARIANTS.items():
        for device in ("cuda", "cpu"):  # every form named, none left to a device's auto
            assert Settings.from_args(speed.serve_flags(), environ={}).speed_options(device) == speed, name
    assert VARIANTS["defaults"] == Settings().speed_options("cuda")  # what the service runs on CUDA
    assert VARIANTS["eager"] == Settings(compile="off").speed_options("cuda")  # ... uncompiled
    # a name says whether its form compiles (the GPU check's summary reads warm-ups by it)
    for name, speed in VARIANTS.items():
        assert speed.compile == (name.endswith("+compile") or name.split("+")[0] == "defaults"), name
    assert VARIANTS["cpu"] == Settings().speed_options("cpu")  # ... and on the CPU


def test_a_variant_whose_compiled_form_did_not_take_effect_is_reported_failed_not_timed(capsys):
    """gfpgan-bench --variants times what a form runs: a compile that fell back at warm-up, or
    compiled passes that ran eagerly while being timed, make the row a failure, not a number;
    off CUDA a variant's CUDA graphs are off, and its row's name says so."""
    import dataclasses

    import torch

    from contract.types import Alignment, FaceStatus
    from server.bench import bench_variants
    from server.jobs import JobResult

    class Stub:  # the pipeline's door as bench_variants uses it
        device = torch.device("cuda")  # the compiled variants also capture CUDA graphs

        def __init__(self):
            self.speed, self.fallbacks, self.eager = VARIANTS["plain"], [], 0

        def set_speed(self, speed):
            self.speed = speed
            self.fallbacks = ["compile of parse: RuntimeError: no compiler"] if speed.resample == "fast" \
                and speed.compile else []

        def warmup(self):
            pass

        def compiled_eager_calls(self):
            return self.eager

        def enhance(self, jobs):
            self.eager += self.speed.compile  # every compiled pass fell back
            return [JobResult(job.faces, [FaceStatus.ENHANCED] * len(job.faces)) for job in jobs]

    stub = Stub()
    faces = synthetic_faces(2, 256)
    table = bench_variants(stub, faces, [2], [Alignment.ALIGNED], ["plain", "defaults", "all-forms+compile"],
                           iterations=1, seconds=None, sync=lambda: None)
    assert re.search(r"^\| plain \| aligned \| 2 \| [\d.]+ \| 1.00x \|", table, flags=re.M)
    assert "| defaults | failed: RuntimeError: compiled passes ran eagerly 2 times" in table
    assert "| all-forms+compile | failed: RuntimeError: compile of parse: RuntimeError: no compiler" in table
    # each form's warm-up time (graphs, a compiled form's build) is in the log, for the GPU check
    warmed = re.findall(r"^warmed up: variant ([\w+-]+) in [\d.]+ s$", capsys.readouterr().err, flags=re.M)
    assert warmed == ["plain", "defaults", "all-forms+compile"]
    assert stub.speed == VARIANTS["plain"]  # put back as it was
    assert dataclasses.replace(VARIANTS["eager"], compile=True) == VARIANTS["defaults"]
    # without plain the ratios are against the first variant named; a failed one leaves "-"
    table = bench_variants(stub, faces, [2], [Alignment.ALIGNED], ["fold-norms+lean", "cpu"],
                           iterations=1, seconds=None, sync=lambda: None)
    assert "| vs fold-norms+lean |" in table.splitlines()[0]
    assert re.search(r"^\| cpu \| aligned \| 2 \| [\d.]+ \| [\d.]+x \|", table, flags=re.M)
    table = bench_variants(stub, faces, [2], [Alignment.ALIGNED], ["all-forms+compile", "cpu"],
                           iterations=1, seconds=None, sync=lambda: None)
    assert re.search(r"^\| cpu \| aligned \| 2 \| [\d.]+ \| - \|", table, flags=re.M) and "nan" not in table
    # off CUDA a variant with CUDA graphs runs its network forms without them, and says so
    stub.device = torch.device("cpu")
    speeds = []
    stub.set_speed = lambda speed: speeds.append(speed) or setattr(stub, "speed", speed)
    table = bench_variants(stub, faces, [2], [Alignment.ALIGNED], ["plain", "eager+gfpgan-phases"],
                           iterations=1, seconds=None, sync=lambda: None)
    assert re.search(r"^\| eager\+gfpgan-phases \(no CUDA graphs off CUDA\) \| aligned \| 2 \| [\d.]+ \| "
                     r"[\d.]+x \|", table, flags=re.M), table
    assert speeds[1] == dataclasses.replace(VARIANTS["eager+gfpgan-phases"], cuda_graphs=False)


def test_memory_off_cuda_is_the_counted_peak_of_a_batch_s_tensors(small_weights, capsys):
    """gfpgan-bench --memory on the CPU: the peak bytes of the tensors each batch makes (as a
    GPU would cast them), growing with the batch, and the batch a card could take at that rate."""
    main(["--model", str(small_weights / "GFPGANv1.4.pth"), "--weights-dir", str(small_weights),
          "--device", "cpu", "--dtype", "bfloat16", "--no-download", "--alignment", "aligned",
          "--batch-sizes", "1,3", "--iterations", "1", "--faces", "3", "--face-size", "128",
          "--methods", "", "--memory", "4"])
    printed = capsys.readouterr().out
    section = printed[printed.index("### Device memory"):]
    rows = {int(m[1]): (int(m[2]), int(m[3]))
            for m in re.finditer(r"^\| (\d+) \| (\d+) \| (\d+) \|$", section, flags=re.M)}
    assert set(rows) == {1, 3}  # the given sizes only: no doubling probe off CUDA
    assert rows[3][0] > rows[1][0] > 0
    face = int(re.search(r"a face adds (\d+) MiB", section)[1])
    assert abs(face - (rows[3][0] - rows[1][0]) / 2) <= 1
    assert re.search(r"about \d+ faces on 80 GiB, \d+ faces on 24 GiB, \d+ faces on 12 GiB \(aligned, modconv=",
                     section)
    # and what --max-batch-faces auto would take on those cards, from the networks' passes alone
    auto = re.search(r"--max-batch-faces auto by the networks' passes counted the same way \((\d+) MiB a face "
                     r"and \d+ MiB more(?:; the graphs' buffers [\d.]+ MiB a face of every bucket)?\): (\d+) faces on 80 GiB, (\d+) faces on 24 GiB, (\d+) faces on 12 GiB",
                     section)
    assert auto, section
    assert 0 < int(auto[1]) and 32 >= int(auto[2]) >= int(auto[3]) >= int(auto[4]) >= 1
    assert "counted on cpu" in section


def test_a_client_process_that_cannot_reach_the_service_fails_the_method_with_its_reason():
    """The service-process method's child reports what stopped it; a fallback is no measurement."""
    import socket

    import pytest

    from contract.types import EnhanceOptions
    from server.bench import bench_service_process

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RuntimeError, match=r"the client process failed: RuntimeError: the loopback "
                                           r"service did not answer: unavailable"):
        bench_service_process(f"127.0.0.1:{port}", synthetic_faces(2, 64), [1], EnhanceOptions(), 2, None, 1,
                              timeout_s=120)


def test_the_client_probe_times_both_clients_against_a_device_that_holds_the_gil(capsys):
    """scripts/service_client_probe.py: a row per held time, client and request size, each at
    most the fake device's own rate (every face costs face-ms, whoever asks)."""
    from tests.helpers import load_script

    table = load_script("service_client_probe").main(["--held-ms", "0,2", "--face-ms", "4", "--sizes", "2,4",
                                                      "--iterations", "3"])
    rows = re.findall(r"^\| ([\d.]+) \| (gRPC service, [^|]+) \| (\d+) \| ([\d.]+) \| ([\d.]+)x \|", table, re.M)
    assert {(held, method, int(size)) for held, method, size, _, _ in rows} == \
        {(held, method, size) for held in ("0", "2") for method in METHODS[2:4] for size in (2, 4)}
    assert all(0 < float(ratio) <= 1.05 for *_, ratio in rows)


def test_the_overlap_probe_times_the_service_with_and_without_overlap_on_an_asynchronous_device(capsys):
    """scripts/overlap_probe.py: a row per host time, overlap and request size, none faster than
    the fake device itself (it computes one batch at a time)."""
    from tests.helpers import load_script

    for waited in ("0", "1"):  # (1: host work after a wait for the batch before, as DETECT's)
        table = load_script("overlap_probe").main(["--host-ms", "0,1", "--device-ms", "2", "--waited-ms", waited,
                                                    "--sizes", "8,16", "--iterations", "4"])
        rows = re.findall(r"^\| ([\d.]+) \| ([\d.]+) \| (on|off) \| (\d+) \| ([\d.]+) \| ([\d.]+)x \| "
                          r"([\d.]+)x \| (\d+) \|", table, re.M)
        assert {(host, after, overlap, int(size)) for host, after, overlap, size, *_ in rows} == \
            {(host, waited, overlap, size) for host in ("0", "1") for overlap in ("off", "on") for size in (8, 16)}
        assert all(0 < float(vs_overlapped) <= 1.05 for *_, vs_overlapped, _ in rows)


def test_steady_video_benches_one_stream_s_frames():
    """--steady-video: the in-process pipeline's and the profile's batches are the next frames
    of one stream (steady_video needs the stream's filter); without it, no filter."""
    import numpy as np

    from contract.types import EnhanceOptions
    from server.bench import _jobs, build_parser
    from server.steady import VideoState

    assert build_parser().parse_args(["--steady-video"]).steady_video
    batch, video = np.zeros((2, 256, 256, 3), np.uint8), VideoState()
    [job] = _jobs(batch, EnhanceOptions(steady_video=True), video)
    assert job.video is video and job.options.steady_video
    assert _jobs(batch, EnhanceOptions(), video)[0].video is None


def test_split_jobs_times_the_same_faces_as_one_two_and_four_requests_in_one_batch(capsys):
    """--split-jobs: each cell's batches hold the same faces, in order, as 1, 2 and 4 equal jobs
    (a split that does not divide the batch is left out); steady video is off, since a stream's
    frames are one request's; the table and the log line give each split's rate against one job."""
    import numpy as np

    from contract.types import EnhanceOptions, FaceStatus
    from server.bench import bench_split_jobs, build_parser
    from server.jobs import JobResult

    class Recording:  # the pipeline's door as bench_split_jobs uses it
        def __init__(self):
            self.batches = []

        def enhance(self, jobs):
            self.batches.append(jobs)
            return [JobResult(job.faces, [FaceStatus.ENHANCED] * len(job.faces)) for job in jobs]

    assert build_parser().parse_args(["--split-jobs"]).split_jobs
    faces = np.arange(8).reshape(8, 1, 1, 1).repeat(3, axis=3).astype(np.uint8)
    for size, splits in ((8, (1, 2, 4)), (6, (1, 2))):
        pipeline = Recording()
        table = bench_split_jobs(pipeline, faces, size, EnhanceOptions(steady_video=True),
                                 iterations=2, seconds=None, sync=lambda: None)
        # a warm-up batch and 2 timed ones per split
        assert [len(jobs) for jobs in pipeline.batches] == [n for n in splits for _ in range(3)]
        for jobs in pipeline.batches:
            assert len({job.faces.shape[0] for job in jobs}) == 1
            assert all(not job.options.steady_video and job.video is None for job in jobs)
            together = np.concatenate([job.faces for job in jobs])
            assert together.shape[0] == size and (np.diff(together[:, 0, 0, 0].astype(int)) % 8 == 1).all()
        rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
        assert [(int(j), int(f)) for j, f in rows] == [(n, size // n) for n in splits]
        assert "| 1.00x |" in table.splitlines()[2]
        log = capsys.readouterr().err
        assert f"split jobs: batch {size}: 1 x {size} " in log and f"{splits[-1]} x {size // splits[-1]} " in log
