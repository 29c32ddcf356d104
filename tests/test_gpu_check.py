"""The GPU check's driver (scripts/gpu_check.py) and its bench process (server/bench_plan.py).

The bench steps run as sections of one process on networks loaded once; each section is still
held to its own time limit, and what a process did not finish goes on in a fresh one. The
driver's tests use a stand-in report (tests/fake_bench_plan.py) in real processes; the plan's own
tests run real gfpgan-bench reports on the small CPU weights.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

from server.bench import VARIANTS
from server.bench_plan import best_variant, compiles, resolve, run_plan, variant_flags
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_bench_steps_share_a_process_each_held_to_its_limit_and_the_rest_go_on_in_a_fresh_one(gpu_check, tmp_path):
    B = gpu_check.BENCH
    steps = [("env", [sys.executable, "-c", "print('device: a test')"], 30),
             ("bench-a", [B, "ok"], 30), ("hang", [B, "hang"], 2), ("bench-b", [B, "ok"], 30),
             ("lose", [B, "lose-device"], 30), ("bench-c", [B, "ok"], 30), ("crash", [B, "crash"], 30),
             ("bench-d", [B, "ok"], 30), ("compile", [B, "ok"], 30), ("bench-e", [B, "ok"], 30)]
    summary = gpu_check.run_steps(steps, tmp_path, _env(), budget_s=300, plan_module="tests.fake_bench_plan")
    status = {entry["step"]: entry["status"] for entry in summary}
    assert status == {
        "env": "ok",
        "bench-a": "ok", "hang": "timed out after 2 s", "bench process 1": "killed",
        "bench-b": "ok", "lose": "failed: RuntimeError: CUDA error: an illegal memory access was encountered",
        "bench process 2": "exit 3",
        "bench-c": "ok", "crash": "bench process exit 9", "bench process 3": "exit 9",
        "bench-d": "ok", "compile": "ok", "bench-e": "ok", "bench process 4": "ok",
    }
    names = [name for name, _, _ in steps]
    assert [e["step"] for e in summary if e["step"] in names] == names
    entries = {entry["step"]: entry for entry in summary}
    # each section's numbers come from its own log
    assert entries["bench-a"]["pipeline@8"] == "100/s" and entries["bench-e"]["pipeline@8"] == "100/s"
    assert "pipeline@8" not in entries["hang"]
    assert 2 <= entries["hang"]["seconds"] < 10
    assert "CUDA error" in (tmp_path / "lose.log").read_text()
    assert entries["bench process 1"]["sections"] == 2 and entries["bench process 4"]["sections"] == 3


def test_steps_run_one_at_a_time_and_a_step_past_its_limit_is_stopped(gpu_check, tmp_path):
    # "second" passes only if "first" had ended before it started: on a GPU, steps side by side
    # ran the card out of memory (the third H200 run)
    ended = tmp_path / "first-ended"
    steps = [("first", [sys.executable, "-c", f"import pathlib, time; time.sleep(0.5); "
                                              f"pathlib.Path({str(ended)!r}).touch()"], 30),
             ("second", [sys.executable, "-c", f"import pathlib, sys; "
                                               f"sys.exit(0 if pathlib.Path({str(ended)!r}).exists() else 1)"], 30),
             ("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1)]
    summary = gpu_check.run_steps(steps, tmp_path, _env(), budget_s=300)
    assert [(e["step"], e["status"]) for e in summary] == [
        ("first", "ok"), ("second", "ok"), ("slow", "timed out after 1 s")]
    assert summary[2]["seconds"] < 10


def test_the_plan_runs_the_issue_s_figures_first_then_the_tests_then_the_compiled_forms(gpu_check, tmp_path,
                                                                                       monkeypatch):
    """A call cut short keeps what matters most: DETECT, ALIGNED, the realtime batch and memory
    with the service's own defaults (one bench process, compiled once on CUDA as the service
    compiles), then the tests, steady video, and only then the compiled forms' tests, the
    variants beside them and what the variants pick."""
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    monkeypatch.setattr(gpu_check, "run_steps", lambda todo, *a, **k: captured.extend(todo) or [])
    for quick, listed in ((False, gpu_check.COMPILE_VARIANTS), (True, gpu_check.QUICK_COMPILE_VARIANTS)):
        captured: list = []
        monkeypatch.setattr(sys, "argv", ["gpu_check.py", str(tmp_path / "out"), *(["--quick"] if quick else [])])
        gpu_check.main()
        names = [name for name, _, _ in captured]
        assert names == ["env", "weights", "bench-detect", "bench-aligned", "realtime", "memory", "tests",
                         "steady", "tests-compile", "compile", "variants", "profile-plain", "profile-best",
                         "profile-steady", "bench-best", "bench-best-aligned", "bench-fp32", "kernels", "batch-rounding"]
        steps = {name: command for name, command, _ in captured}
        # the first four are sections of one bench process, on the defaults (no PLAIN, no BEST)
        first = names[2:6]
        assert all(steps[name][0] == gpu_check.BENCH for name in first)
        assert not any({"BEST", "PLAIN"} & set(steps[name]) for name in first)
        # ... which compile on CUDA, as the service does (--compile auto), once for the four
        assert all(compiles(steps[name][1:]) for name in first)
        assert steps["tests"][0] != gpu_check.BENCH  # ... which the tests end
        assert "BEST" in steps["bench-best"] and "PLAIN" in steps["profile-plain"]
        # the realtime batch from both clients: the bench's process and a caller's own
        realtime = steps["realtime"]
        assert realtime[realtime.index("--methods") + 1] == "service,service-process"
        # the compile section times exactly the compiled forms listed, beside the defaults
        variants = steps["compile"][steps["compile"].index("--variants") + 1].split(",")
        assert variants == listed and any(VARIANTS[name].compile for name in variants)
        assert steps["compile"][0] == gpu_check.BENCH and compiles(steps["compile"][1:])
        # the summary ends with the call's own length
        whole = json.loads((tmp_path / "out" / "summary.json").read_text())[-1]
        assert whole["step"] == "whole call" and 0 <= whole["seconds"] < 60
    assert not compiles(["--variants", "plain,eager"]) and compiles(["--variants", "plain,lean+compile"])
    # the service's defaults compile on CUDA only, and not when turned off or with the fused form
    assert compiles(["--device", "cuda"]) and not compiles(["--device", "cpu"])
    assert not compiles(["--device", "cuda", "--compile", "off"]) and compiles(["--device", "cpu", "--compile", "on"])
    assert not compiles(["--device", "cuda", "--modconv", "fused"])


def test_the_tests_step_runs_in_two_processes_where_the_kit_brings_xdist(gpu_check, tmp_path, monkeypatch):
    """2 pytest-xdist workers, which an H200's memory holds (4 beside 4 other processes did not);
    one process where xdist is not installed; the compile tests (long builds) stay in one."""
    real = importlib.util.find_spec
    present = {"xdist": True}
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: (object() if present["xdist"] else None) if name == "xdist" else real(name, *a))
    monkeypatch.setenv("GPU_CHECK_WORK", str(tmp_path / "work"))
    for installed, spread in ((True, ["-n", "2"]), (False, [])):
        present["xdist"] = installed
        assert gpu_check.pytest_workers() == (2 if installed else 1)
        captured: list = []
        monkeypatch.setattr(gpu_check, "run_steps", lambda todo, *a, **k: captured.extend(todo) or [])
        monkeypatch.setattr(sys, "argv", ["gpu_check.py", str(tmp_path / "out")])
        gpu_check.main()
        steps = {name: command for name, command, _ in captured}
        tests, compiled = steps["tests"], steps["tests-compile"]
        assert "-n" not in compiled
        assert ([tests[tests.index("-n")], tests[tests.index("-n") + 1]] if "-n" in tests else []) == spread
        files = [part for part in tests if part.startswith("tests/")]  # the same files in both
        assert files == [part for part in compiled if part.startswith("tests/")]
        assert {"tests/test_steady.py", "tests/test_detection.py", "tests/test_pipeline.py"} <= set(files)


#: (step, its log, what the summary says of it)
SUMMARY_LINES = [
    # pytest --durations: the slowest test (the tests step is on the run's critical path)
    ("tests", "....\n============ slowest 15 durations ============\n"
              "21.07s call     tests/test_end_to_end.py::test_served_faces_match_gfpganer[detect]\n"
              "4.50s setup    tests/test_pipeline.py::test_batches\n"
              "113 passed, 2 skipped in 96.12s (0:01:36)\n",
     {"result": "113 passed, 2 skipped", "slowest": "test_served_faces_match_gfpganer[detect] 21 s"}),
    # -v's line per test names the failures, also when the step was stopped before its summary
    # (pytest-xdist's form; a test that failed at teardown after passing counts as failed)
    ("tests", "[gw1] [ 20%] SKIPPED tests/test_s.py::test_c \n[gw0] [ 40%] PASSED tests/test_s.py::test_a \n"
              "[gw1] [ 60%] FAILED tests/test_s.py::test_d[2] \n[gw0] [ 80%] PASSED tests/test_s.py::test_b \n"
              "[gw0] [ 80%] ERROR tests/test_s.py::test_b \n",
     {"failed": "2: test_d[2], test_b", "ended": "4 tests"}),
    # ... and pytest's own form without xdist, with its summary
    ("tests", "tests/test_s.py::test_a PASSED                                                 [ 20%]\n"
              "tests/test_s.py::test_b FAILED                                                 [ 40%]\n"
              "tests/test_s.py::test_c SKIPPED (unconditional skip)                           [ 60%]\n"
              "FAILED tests/test_s.py::test_b - assert False\n"
              "==================== 1 failed, 1 passed, 1 skipped in 0.02s ====================\n",
     {"result": "1 failed, 1 passed, 1 skipped", "failed": "1: test_b"}),
    # a bench step stopped before its table: the service's batches from the line logged per size
    ("bench-detect", "measured: gRPC service, loopback, batch 32: 46.15 faces/s, p50 2508.3 ms\n"
                     "service batches: request 32: 10 batches of 64.0 faces and 2.0 jobs, 1300.0 ms a batch "
                     "(20.31 ms a face), pipeline busy 98%\n",
     {"service batches@32": "64 faces, 1300 ms, busy 98%"}),
    # ... both clients': in the bench's own process, and in a child process (the rows of each)
    ("bench-detect", "| gRPC service, loopback | 32 | 46.15 | 6.0x | 2500.0 | 2508.3 | 2600.0 | 2700.0 |\n"
                     "| gRPC service, client process | 32 | 95.00 | 12.3x | 1300.0 | 1290.0 | 1400.0 | 1450.0 |\n"
                     "service batches: request 32: 10 batches of 64.0 faces and 2.0 jobs, 1300.0 ms a batch "
                     "(20.31 ms a face), pipeline busy 48%\n"
                     "service batches, client process: request 32: 10 batches of 64.0 faces and 2.0 jobs, "
                     "650.0 ms a batch (10.16 ms a face), pipeline busy 97%\n",
     {"service@32": "46/s", "service-process@32": "95/s", "service batches@32": "64 faces, 1300 ms, busy 48%",
      "service-process batches@32": "64 faces, 650 ms, busy 97%"}),
    # ... and the largest batch in process as 1, 2 and 4 requests (--split-jobs)
    ("bench-detect", "split jobs: batch 64: 1 x 64 106.0 faces/s (1.00x), p50 604.0 ms; 2 x 32 53.1 faces/s "
                     "(0.50x), p50 1205.0 ms; 4 x 16 105.2 faces/s (0.99x), p50 608.0 ms\n",
     {"split 1 jobs@64": "106/s", "split 2 jobs@64": "53/s", "split 4 jobs@64": "105/s"}),
    # ... and the server that queues the next batch while the last one computes (overlap)
    ("bench-aligned", "| gRPC service, loopback | 32 | 90.00 | 6.0x | 700.0 | 711.1 | 720.0 | 730.0 |\n"
                      "| gRPC service, loopback, overlap | 32 | 99.00 | 6.6x | 640.0 | 644.4 | 650.0 | 660.0 |\n"
                      "service batches, overlap: request 32: 10 batches of 64.0 faces and 2.0 jobs, 640.0 ms "
                      "a batch (10.00 ms a face), pipeline busy 99%\n",
     {"service@32": "90/s", "service-overlap@32": "99/s",
      "service-overlap batches@32": "64 faces, 640 ms, busy 99%"}),
    # how long a compiled form took to warm up (its build, or its load from Inductor's cache)
    # ... and what its faces' check against the eager passes measured at warm-up
    ("compile", "warmed up: variant eager in 4.2 s\nwarmed up: variant defaults in 97.6 s\n"
                "compile check: variant defaults, gfpgan: 0.31 levels from float32 on average and 3.0 at "
                "the 99.9th percentile, where the eager pass is 0.62 and 5.0 (allowed: 1.74 and 14.0)\n"
                "measured: variant defaults, aligned, batch 8: 250.00 faces/s\n",
     {"warm-up defaults": "98 s", "compile check defaults gfpgan": "0.31/3.0 levels from float32 (eager 0.62/5.0)"}),
    # ... the compiled detector's, in pixels and scores
    ("compile", "warmed up: variant defaults+compiled-detector in 31.0 s\n"
                "compile check: variant defaults+compiled-detector, detect: anchors 0.0021 px from the eager "
                "pass's on average and 0.040 at the 99.9th percentile, scores 0.00120 at most (allowed: 0.05, "
                "0.5 and 0.01)\n",
     {"warm-up defaults+compiled-detector": "31 s",
      "compile check defaults+compiled-detector detect": "0.0021/0.040 px, scores 0.00120 from eager"}),
    ("bench-detect", "compile check: the service's forms, parse: 1.20 levels from float32 on average and 40.0 "
                     "at the 99.9th percentile, where the eager pass is 1.00 and 35.0 (allowed: 2.50 and 74.0)\n",
     {"compile check parse": "1.20/40.0 levels from float32 (eager 1.00/35.0)"}),
    # the most a face moved with its pass's size, its place in the pass, the faces beside it
    ("batch-rounding", "| dtype | alignment | faces in the pass | max levels vs alone | mean levels vs alone | "
                       "max levels vs other faces beside it | max levels vs last in the pass |\n"
                       "|---|---|---:|---:|---:|---:|---:|\n| float32 | aligned | 1 | 0 | 0.000 | 0 | 0 |\n"
                       "| bfloat16 | aligned | 1 | 0 | 0.000 | 0 | 0 |\n| bfloat16 | aligned | 3 | 15 | 0.244 | 0 | 15 |\n"
                       "| bfloat16 | aligned | 4 | 14 | 0.250 | 0 | 0 |\n",
     {"float32 aligned": "pass size 0, place 0, faces beside 0 levels",
      "bfloat16 aligned": "pass size 15, place 15, faces beside 0 levels"}),
    # each form's rate, how near its floor it runs, and its convolutions' share of the device time
    ("kernels", "| network | form | ms per pass | ms per face | TFLOP/s | GB a face | GB a pass | floor ms a face "
                "| of floor | device time by kernel family |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
                "graph replay: gfpgan, defaults, batch 16: 21.40 ms a pass (launched from the host: 40.00)\n"
                "| gfpgan | eager | 81.20 | 5.08 | 78 | 5.28 | 0.70 | 1.62 | 32% "
                "| elementwise+other 40%, convolutions 35%, padding 25% |\n"
                "| parse | eager | 75.90 | 4.74 | 99 | 7.63 | 0.17 | 2.19 | 46% | |\n"
                "| gfpgan | defaults | 40.00 | 2.50 | 158 | - | - | - | - | compiled 60%, convolutions 40% |\n",
     {"gfpgan eager": "78 TF/s, 32% of floor, convolutions 35%", "parse eager": "99 TF/s, 46% of floor",
      "gfpgan defaults": "158 TF/s, convolutions 40%",
      "gfpgan defaults replayed": "21.40 ms a pass (launched 40.00)"}),
    # the largest batch that ran on the card; off CUDA (the rehearsal), the counted share of a face
    ("memory", "| 64 | 30000 | 29000 | 31000 |\n| 128 | out of memory | | |\n\n"
               "largest batch that ran: 64 faces (detect, ...)\n"
               "--max-batch-faces auto here: 32 faces: a batch takes 402 MiB a face and 120 MiB more (measured), "
               "16228 MiB at 32 with 25% headroom; 69.1 GiB for batches: ...\n",
     {"largest batch": "64", "auto": "32 faces (402 MiB a face)"}),
    ("memory", "| 2 | 781 | 390 |\n\na face adds 390 MiB; with the weights (518 MiB), a batch at that rate "
               "takes about 208 faces on 80 GiB, 61 faces on 24 GiB (detect, ...)\n"
               "--max-batch-faces auto by the networks' passes counted the same way (384 MiB a face and 0 MiB "
               "more; the graphs' buffers 10.9 MiB a face of every bucket): 32 faces on 80 GiB, 20 faces on "
               "24 GiB, 8 faces on 12 GiB\n",
     {"counted": "390 MiB a face", "auto": "32 faces on 80 GiB, 20 faces on 24 GiB, 8 faces on 12 GiB"}),
    # steady video's two savings at N = 5, in the order bench_jitter prints its tables
    ("steady", "| detect_every | frames detected | detector ms/frame | faces/s | faces/s vs every frame |\n"
               "| --- | --- | --- | --- | --- |\n| 1 | 40/40 | 2.1 | 90.00 | 1.00x |\n"
               "| 5 | 15/40 | 0.9 | 99.00 | 1.10x |\n\n"
               "| mask_every | masks computed | mask ms/frame | faces/s | faces/s vs every frame | "
               "levels vs every frame: mean, max | cuts |\n| --- | --- | --- | --- | --- | --- | --- |\n"
               "| 1 | 40/40 | 4.3 | 90.00 | 1.00x | 0.000, 0 | 0 |\n"
               "| 5 | 8/40 | 0.9 | 135.00 | 1.50x | 0.120, 9 | 0 |\n",
     {"detect_every 5": "1.10x", "mask_every 5": "1.50x"}),
]


@pytest.mark.parametrize("step, log, expected", SUMMARY_LINES,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(SUMMARY_LINES)])
def test_the_summary_picks_each_steps_numbers_from_its_log(gpu_check, tmp_path, step, log, expected):
    path = tmp_path / f"{step}.log"
    path.write_text(log)
    assert gpu_check._highlights(step, tmp_path, path) == expected


def test_the_steady_step_times_both_savings_on_the_service_pipeline_for_its_device(tmp_path, capsys,
                                                                                   monkeypatch):
    """scripts/bench_jitter.py as the steady step runs it (--device: the pipeline the service
    builds for that device), on the CPU with its own small weights. Counted, not timed: the
    first request of a stream detects every frame, then every N-th. (The mask table's counts:
    the rehearsal's steady step, with ParseNet at full size; tests/test_steady.py checks which
    frames compute their masks.)"""
    jitter = load_script("bench_jitter")
    out = tmp_path / "steady.md"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cwd = os.getcwd()
    assert jitter.main(["--skip-detection", "--device", "cpu", "--paste-mask", "box", "--frames", "6",
                        "--batch", "2", "--markdown-out", str(out)]) == 0
    table = out.read_text()
    assert table.startswith("cpu, torch.") and "(the service's pipeline for it)" in table
    detected = re.findall(r"(?m)^\| (\d+) \| (\d+)/6 \| [\d.]+ \| [\d.]+ \| ([\d.]+)x \|$", table)
    assert [(n, d) for n, d, _ in detected] == [("1", "6"), ("2", "4"), ("5", "3"), ("10", "2")]
    assert detected[0][2] == "1.00"
    assert table in capsys.readouterr().out
    assert list(scratch.iterdir()) == [] and os.getcwd() == cwd  # its made weights (300 MB) are gone
    with pytest.raises(SystemExit):  # the mask table is ParseNet's: a box mask is refused
        jitter.main(["--reuse-mask", "--paste-mask", "box"])


def test_no_section_starts_after_the_budget(gpu_check, tmp_path):
    B = gpu_check.BENCH
    steps = [("bench-slow", [B, "sleep"], 30), ("bench-late", [B, "ok"], 30), ("after", [sys.executable, "-c", ""], 30)]
    summary = gpu_check.run_steps(steps, tmp_path, _env(), budget_s=1.0, plan_module="tests.fake_bench_plan")
    status = {entry["step"]: entry["status"] for entry in summary}
    assert status["bench-slow"] == "ok"
    assert status["bench-late"] == status["after"] == "not run (budget spent)"


def test_the_calls_end_stops_what_runs_and_leaves_it_for_a_second_call(gpu_check, tmp_path):
    """--end-s: a call held to a time limit (the device tool's) stops the step or section that
    still runs, writes its reports, and names what a second call should run."""
    B = gpu_check.BENCH
    steps = [("bench-a", [B, "ok"], 30), ("bench-hang", [B, "hang"], 100), ("bench-c", [B, "ok"], 30),
             ("after", [sys.executable, "-c", ""], 30)]
    t0 = time.monotonic()
    summary = gpu_check.run_steps(steps, tmp_path, _env(), budget_s=300,
                                  plan_module="tests.fake_bench_plan", end_s=8)
    assert time.monotonic() - t0 < 30
    status = {entry["step"]: entry["status"] for entry in summary}
    assert status["bench-a"] == "ok"
    assert status["bench-hang"] == "stopped at the call's end"
    assert status["bench-c"] == status["after"] == "not run (budget spent)"
    assert status["bench process 1"] == "stopped at the call's end"
    assert gpu_check.left_for_a_second_call(summary) == ["bench-hang", "bench-c", "after"]
    # a step of its own, stopped the same way
    steps = [("tests", [sys.executable, "-c", "import time; time.sleep(60)"], 100), ("next", [B, "ok"], 30)]
    summary = gpu_check.run_steps(steps, tmp_path, _env(), budget_s=300,
                                  plan_module="tests.fake_bench_plan", end_s=1)
    assert [(e["step"], e["status"]) for e in summary] == [
        ("tests", "stopped at the call's end"), ("next", "not run (budget spent)")]
    assert summary[0]["seconds"] < 10


def test_a_process_that_dies_before_its_first_section_fails_its_steps_once(gpu_check, tmp_path):
    B = gpu_check.BENCH
    steps = [("bench-a", [B, "ok"], 30), ("bench-b", [B, "ok"], 30)]
    summary = gpu_check.run_steps(steps, tmp_path, _env(), budget_s=60, plan_module="tests.no_such_module")
    assert [e["step"] for e in summary] == ["bench-a", "bench-b", "bench process 1"]
    assert summary[0]["status"].startswith("bench process exit 1 before its first section")


def test_the_plan_picks_the_fastest_parse_mask_variant_at_the_largest_batch(tmp_path):
    table = tmp_path / "variants.md"
    table.write_text("| variant | alignment | batch | faces/s | vs plain | p50 ms |\n|---|---|---:|---:|---:|---:|\n"
                     "| plain | detect | 8 | 60.0 | 1.00x | 1 |\n| plain | detect | 32 | 70.0 | 1.00x | 1 |\n"
                     "| eager+fast-resample | detect | 32 | 95.5 | 1.36x | 1 |\n"
                     "| defaults | detect | 32 | 90.0 | 1.29x | 1 |\n| defaults | aligned | 32 | 300.0 | 4x | 1 |\n"
                     "| unfused+graphs+box | detect | 32 | 150.0 | 2.14x | 1 |\n"
                     "| fold-norms | detect | 8 | 99.0 | 1.65x | 1 |\n")
    assert best_variant([table]) == "eager+fast-resample"
    assert best_variant([tmp_path / "missing.md"]) == "defaults"
    # the compile step's table counts too, when it ran
    compiled = tmp_path / "compile.md"
    compiled.write_text("| defaults | detect | 32 | 180.0 | 2.57x | 1 |\n")
    assert best_variant([table, compiled]) == "defaults"
    # a compile step stopped at its limit left no table, but its log has the cells it measured
    compiled.unlink()
    (tmp_path / "compile.log").write_text(
        "measured: variant defaults, aligned, batch 32: 400.00 faces/s\n"
        "measured: variant defaults, detect, batch 32: 170.00 faces/s\n"
        "measured: variant all-forms+compile, detect, batch 8: 999.00 faces/s\n")  # cut short
    assert best_variant([table, compiled]) == "defaults"
    flags = variant_flags()
    compiled.write_text("| defaults | detect | 32 | 180.0 | 2.57x | 1 |\n")
    args, best = resolve(["--x", "BEST", "--y", "PLAIN"], tmp_path)
    assert best == "defaults" and args == ["--x", *flags["defaults"], "--y", *flags["plain"]]
    assert compiles(flags["defaults"]) and not compiles(flags["eager"])
    assert set(VARIANTS) == set(flags)


def test_the_check_names_only_known_variants_and_cpu_ones_in_the_rehearsal(gpu_check):
    names = set(gpu_check.STEP_VARIANTS) | set(gpu_check.COMPILE_VARIANTS) | set(gpu_check.QUICK_COMPILE_VARIANTS)
    assert names <= set(VARIANTS)
    assert not any(VARIANTS[name].cuda_graphs for name in gpu_check.QUICK_COMPILE_VARIANTS)  # run on a CPU


def test_sections_share_the_loaded_networks_and_report_like_their_own_runs(small_weights, tmp_path, monkeypatch):
    """Real gfpgan-bench reports as plan sections: the pipeline and GFPGANer load once, a
    section keeps the speed forms it shares with the one before (a compiled form would not
    compile again), BEST takes the fastest variant's forms, and a refused section does not stop
    the next."""
    import server.bench as bench
    import server.pipeline as pipeline_module

    built, gfpganers, switches = [], [], []
    build = pipeline_module.build_pipeline
    monkeypatch.setattr(pipeline_module, "build_pipeline", lambda s: built.append(s) or build(s))
    make_gfpganer = bench._gfpganer
    monkeypatch.setattr(bench, "_gfpganer", lambda *a: gfpganers.append(a) or make_gfpganer(*a))
    set_speed = pipeline_module.FacePipeline.set_speed
    monkeypatch.setattr(pipeline_module.FacePipeline, "set_speed",
                        lambda self, speed: switches.append(speed) or set_speed(self, speed))
    (tmp_path / "variants.md").write_text("| fold-norms | detect | 2 | 9.0 | 1.5x | 1 |\n"
                                          "| plain | detect | 2 | 6.0 | 1.00x | 1 |\n")
    common = ["--model", str(small_weights / "GFPGANv1.4.pth"), "--weights-dir", str(small_weights),
              "--device", "cpu", "--no-download", "--alignment", "aligned", "--iterations", "1",
              "--faces", "2", "--face-size", "64"]
    sections = [
        {"name": "bench-first", "args": [*common, "--batch-sizes", "1", "--methods", "gfpganer,pipeline",
                                         "--markdown-out", str(tmp_path / "bench-first.md")]},
        {"name": "refused", "args": [*common, "--batch-sizes", "0"]},
        {"name": "bench-same", "args": [*common, "--batch-sizes", "2", "--methods", "gfpganer,pipeline",
                                        "--markdown-out", str(tmp_path / "bench-same.md")]},
        {"name": "bench-best", "args": [*common, "BEST", "--batch-sizes", "1", "--methods", "pipeline",
                                        "--markdown-out", str(tmp_path / "bench-best.md")]},
    ]
    status, current = tmp_path / "status.jsonl", tmp_path / "current.json"
    assert run_plan(sections, tmp_path, status, current) == 0
    entries = [json.loads(line) for line in status.read_text().splitlines()]
    assert [(e["step"], e["status"]) for e in entries] == [
        ("bench-first", "ok"), ("refused", "exit 2"), ("bench-same", "ok"), ("bench-best", "ok")]
    assert entries[3]["variant"] == "fold-norms"
    assert len(built) == 1 and len(gfpganers) == 1
    # built in the first section's forms (the construction's own switch), kept by the second,
    # switched once for BEST
    assert len(switches) == 2 and switches[-1] == VARIANTS["fold-norms"]
    for name, batches in (("bench-first", [1]), ("bench-same", [2])):
        report = (tmp_path / f"{name}.md").read_text()
        assert (tmp_path / f"{name}.log").read_text().strip().endswith(report.strip().splitlines()[-1])
        rows = re.findall(r"^\| (GFPGANer|FacePipeline)[^|]* \| (\d+) \| ([\d.]+) \|", report, flags=re.M)
        assert sorted((m, int(b)) for m, b, _ in rows) == sorted((m, b) for m in ("FacePipeline", "GFPGANer")
                                                                 for b in batches)
        assert all(float(rate) > 0 for _, _, rate in rows)
    best = (tmp_path / "bench-best.md").read_text()
    assert "fold_norms=on" in best and "fastest variant so far: fold-norms" in (tmp_path / "bench-best.log").read_text()
    assert "--batch-sizes: expected positive numbers" in (tmp_path / "refused.log").read_text()


def test_a_new_largest_batch_drops_the_graphs_only_when_their_buckets_change():
    """bench.Loaded reuses a pipeline across sections of other batch sizes: its graphs are made
    again only for other buckets (a batch beyond MAX_NETWORK_FACES runs in passes of that many)."""
    from server.detection import FaceDetector
    from server.pipeline import MAX_NETWORK_FACES, FacePipeline

    pipeline = object.__new__(FacePipeline)  # the state the method reads, nothing loaded
    pipeline.detector = FaceDetector(None)

    def captured(largest: int, graphs: dict) -> None:
        pipeline.graph_max_batch, pipeline._graphs = largest, graphs
        pipeline.detector.graphed = {"256": "graph"}
        pipeline.detector.graphed_centre = {"256": "graph"}

    captured(8, {"gfpgan": "graph"})
    pipeline.set_graph_max_batch(8)
    assert pipeline._graphs == {"gfpgan": "graph"} and pipeline.detector.graphed
    pipeline.set_graph_max_batch(12)  # a bucket of 12 more: captured again at the next warm-up
    assert pipeline._graphs == {} and pipeline.graph_max_batch == 12
    assert pipeline.detector.graphed == {} and pipeline.detector.graphed_centre == {}
    captured(MAX_NETWORK_FACES + 8, {"gfpgan": "graph"})
    pipeline.set_graph_max_batch(4 * MAX_NETWORK_FACES)
    assert pipeline._graphs == {"gfpgan": "graph"} and pipeline.graph_max_batch == 4 * MAX_NETWORK_FACES


@pytest.fixture(scope="module")
def gpu_kernels():
    return load_script("gpu_kernels")


def test_the_kernels_step_splits_device_time_by_kernel_family(gpu_kernels):
    """The kernel names the H200 runs profiled (BENCHMARKS.md), each in its family."""
    from types import SimpleNamespace

    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolutions",
        "void cudnn::winograd_nonfused::winogradForwardData4x4<float, __half>(...)": "convolutions",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>(...)": "layout+copies",
        "void at::native::(anonymous namespace)::upsample_bilinear2d_out_frame<c10::BFloat16, float>(...)": "resampling",
        "void at::native::(anonymous namespace)::reflection_pad2d_out_kernel<c10::BFloat16>(...)": "padding",
        "triton_poi_fused_add_leaky_relu_mul_0": "compiled",
        "cpp_fused_add_leaky_relu_mul_2": "compiled",  # Inductor on the CPU
        "triton_tem_fused_convolution_1": "convolutions",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>(...)":
            "elementwise+other",
    }
    events = [SimpleNamespace(key=name, self_device_time_total=1000.0 * (i + 1)) for i, name in enumerate(names)]
    events.append(SimpleNamespace(key="aten::conv2d", self_device_time_total=0.0))  # an operator, no kernel time
    families = gpu_kernels.kernel_families(events, cuda=True)
    expected: dict = {}
    for i, family in enumerate(names.values()):
        expected[family] = expected.get(family, 0.0) + (i + 1)
    assert families == expected and list(families) == sorted(expected, key=lambda f: -expected[f])
    assert gpu_kernels.families_line({"convolutions": 3.0, "padding": 1.0}) == "convolutions 75%, padding 25%"


def test_the_kernels_script_profiles_a_pass_by_family_and_keeps_its_trace(gpu_kernels, tmp_path):
    """On the CPU (ATen operators), a reflection-padded convolution, a x2 bilinear resize and a
    channels-last copy fall in their families, and the trace is a gzipped Chrome trace."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
                              torch.nn.Upsample(scale_factor=2, mode="bilinear"), torch.nn.LeakyReLU(0.2))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        net(torch.rand(2, 3, 32, 32)).contiguous(memory_format=torch.channels_last)
    families = gpu_kernels.kernel_families(prof.key_averages(), cuda=False)
    assert {"convolutions", "padding", "resampling", "layout+copies"} <= set(families)
    assert all(ms > 0 for ms in families.values())
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
    assert sum(families.values()) == pytest.approx(total)
    gpu_kernels.write_trace(prof, tmp_path / "traces" / "net-plain.json.gz")
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["net-plain.json.gz"]
    trace = json.loads(gzip.open(tmp_path / "traces" / "net-plain.json.gz").read())
    assert any("conv" in event.get("name", "") for event in trace["traceEvents"])


def test_a_pass_that_cannot_be_captured_keeps_its_launched_time_and_says_why(gpu_kernels, capsys):
    """The kernels step also times each pass replayed from a CUDA graph (as the service runs it,
    with no host launches); where the capture fails (here: no CUDA) it gives no figure and a
    line saying why, and the launched time still stands."""
    import torch

    assert gpu_kernels.graph_replay_ms(lambda x: x * 2, torch.rand(2, 3, 8, 8), torch.device("cpu")) is None
    assert "graph capture failed: " in capsys.readouterr().out


def test_the_kernels_step_splits_a_pass_s_bytes_into_those_of_a_face_and_those_of_the_pass(gpu_kernels):
    """A pass that casts its weight once and its input per face: the bytes of each launch split
    into a face's and the pass's; the floor takes each launch at its roofline."""
    import torch

    weight = torch.rand(4, 3, 3, 3)  # 432 bytes in float32, 216 in bfloat16

    def run(x):
        return torch.nn.functional.conv2d(x.to(torch.bfloat16), weight.to(torch.bfloat16))

    traffic = gpu_kernels.pass_traffic(run, torch.rand(3, 3, 8, 8), compiled=False, inductor=False)
    conv_flops = 2 * (4 * 3 * 9) * 36
    assert traffic.launches == [
        ("aten::_to_copy", 0, 768 + 384, 0),  # the input's cast, a face's
        ("aten::_to_copy", 0, 0, 432 + 216),  # the weight's, once a pass
        # the convolution: its input (384) and output (144 x 2) a face, its weight (216) a pass
        ("aten::convolution", conv_flops, 384 + 288, 216)]
    assert traffic.flops == conv_flops and traffic.face_bytes == 768 + 384 + 384 + 288
    assert traffic.pass_bytes == 432 + 216 + 216
    # at 1 TFLOP/s and 1 GB/s, a pass of 2: the casts are bound by their bytes, the convolution
    # too (its 2 x 7,776 FLOPs take 0.0156 us, its 1,560 bytes 1.56 us)
    assert traffic.floor_ms(2, 1.0, 1.0) == pytest.approx((2 * 1152 + 648 + 2 * 672 + 216) / 1e6 / 2)
    # ... and at 1 GFLOP/s the convolution is bound by its FLOPs (15.6 us a pass)
    assert traffic.floor_ms(2, 0.001, 1.0) == pytest.approx((2 * 1152 + 648) / 1e6 / 2 + 2 * conv_flops / 1e6 / 2)
    assert gpu_kernels.pass_traffic(run, torch.rand(1, 3, 8, 8), compiled=True, inductor=False) is None
    # a pass that makes something once and keeps it (ParseNet's x2 phases, their weights) is
    # counted as served: after warm-up, the same launches for one face and for two
    from server.speed import upsample_conv2d
    up = torch.nn.Conv2d(3, 2, 3)
    traffic = gpu_kernels.pass_traffic(lambda x: upsample_conv2d(x, up), torch.rand(1, 3, 8, 8),
                                       compiled=False, inductor=False)
    assert [name for name, *_ in traffic.launches] == ["aten::replication_pad2d", "aten::convolution", "aten::copy_"]
    matrix, memory = gpu_kernels.card_rates(torch.device("cpu"), torch.float32)
    assert matrix > 0 and memory > 0
    # the rates as the table's note gives them: a CPU's fraction of a TFLOP/s is not "0"
    assert [gpu_kernels._rate(r) for r in (989, 3350, 0.1142)] == ["989", "3,350", "0.114"]


def test_a_compiled_pass_s_bytes_are_inductor_s_own_count_at_the_batch_it_compiles(gpu_kernels):
    """inductor_bytes compiles the pass's function afresh with a dynamic batch and reads
    Inductor's count: one fused kernel reads each row once and writes it once."""
    import contextlib
    import shutil
    from types import SimpleNamespace

    import torch

    if not shutil.which("g++") and not torch.cuda.is_available():
        pytest.fail("Inductor builds C++ on the CPU: this test needs g++")
    run = SimpleNamespace(fn=lambda x: torch.relu(x) * 2 + 1, context=contextlib.nullcontext)
    one = torch.rand(1, 3, 8, 8)  # 768 bytes a row
    assert gpu_kernels.inductor_bytes(run, 2, one) == 2 * 2 * 768
    assert gpu_kernels.inductor_bytes(run, 4, one) == 4 * 2 * 768
