#!/usr/bin/env python3
"""The GPU check: every GPU figure and check this project needs, in one command, one run.

    python scripts/gpu_check.py [OUT] [--device cuda] [--narrow 1] [--quick]

On a lent GPU machine, after the kit is installed (scripts/gpu_device.sh does both); in the
CPU rehearsal (`make gpu-rehearsal`) with `--device cpu --narrow 0.0625 --quick`. Writes logs,
Markdown and a summary JSON into OUT (default: $OUT, else ./gpu-check-out) and prints a short
table last. Each step has its own time limit, so that one failing or slow step still leaves the
others' results. One step runs at a time: on the third H200 run (2026-11-30) the tests' 4
workers, the compile tests, two compiler builds and batch-rounding ran side by side, ran the
card out of memory (processes of 16-42 GiB, graph captures failing) and all five steps timed out.
Steps other than gfpgan-bench's run as processes of their own; gfpgan-bench's as sections of one
process on networks loaded once (server/bench_plan.py), each held to its limit, the rest going
on in a fresh process after one that fails the device. In order of value, so that a call cut
short has the issue's figures first:

  env        the GPU, driver, torch and package versions
  weights    random-valued checkpoints of the real architectures (tests/checkpoints.py), full
             width on the GPU, and drawn test faces; nothing is downloaded
  bench-*    gfpgan-bench: GFPGANer one face at a time vs our pipeline vs our service over
             loopback, DETECT and ALIGNED, bf16, the service's defaults; the realtime batch;
             later the fastest forms found, and fp32 at one batch size
  memory     peak device memory per batch size and the largest batch that fits
  tests      pipeline, image-op, speed, model, end-to-end, out-of-memory and steady-video tests
             on the device (GFPGAN_TEST_DEVICE), bf16 against fp32 on the same weights included
  steady     steady video's two savings on the device (scripts/bench_jitter.py)
  tests-compile  the tests marked `compiles` (torch.compile through Inductor on CUDA), apart,
             so that a slow build cannot cost the other tests their results
  compile    torch.compile's forms beside the defaults (gfpgan-bench --variants)
  variants   the defaults against those before and each speed form on and off, in one process
  profile-*  time per stage (CUDA events), operators and host syncs per batch
  kernels    the top kernels of each network's pass, by family, against the card's floor
  batch-rounding  how far bf16 moves a face with its network pass's size and its place in it
             (scripts/batch_rounding.py)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or str(ROOT / "gpu-check-out"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--narrow", type=float, default=1.0,
                        help="GFPGAN width of the benchmark weights (1 = the published size)")
    parser.add_argument("--quick", action="store_true",
                        help="small batches and few iterations: the CPU rehearsal of every step")
    parser.add_argument("--only", default="", help="comma-separated step names to run (default all)")
    parser.add_argument("--pack", default=None, metavar="DIR",
                        help="also write report.md, summary.json and gpu-check.tar.gz (every log "
                             "and table) into DIR: the device tool brings back 8 files at most")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="stop starting steps once this much wall time is spent (default 330)")
    parser.add_argument("--end-s", type=float, default=None,
                        help="stop whatever still runs once this much wall time is spent, then write "
                             "the reports: a call held to a time limit (the device tool's 600 s) "
                             "still brings back every finished step (default: none)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    weights, faces = work / "weights", work / "faces"

    if args.quick:
        sizes, big, iters, secs, rt, variant_sizes = "1,2", "2", 1, 30, "2", "1,2"
    else:
        # A cell is 5 batches, or fewer once 1.5 s have passed (at least one): on the H200 a
        # cell's batch latencies were within 1-2% of each other (p50 against p99 at batch >= 8),
        # so the 3 s before bought no precision. Only cells of over 0.3 s a batch stop early.
        sizes, big, iters, secs, rt, variant_sizes = "1,8,16,32,64", "16", 5, 1.5, "20", "8,32"
    # GFPGANer's loop is one face at a time: its rate is the same at every batch size (9.2-9.6
    # faces/s from 1 to 64 on the H200), and its batches of 16, 32 and 64 took about 12 s of each
    # bench step there. The larger sizes are compared with its rate at 8.
    gfpganer_sizes = [] if args.quick else ["--gfpganer-batch-sizes", "1,8"]
    # service-overlap runs where the requests in flight hold two batches: 32 and 64 with the
    # default 4 in flight; the rehearsal's requests of 2 faces need 8 in flight for that
    overlap_in_flight = ["--in-flight", "8"] if args.quick else []
    # gfpgan-bench's arguments: the steps that start with BENCH run as sections of one process
    # (server/bench_plan.py) on networks loaded once, not a process each.
    bench = [BENCH, "--model", str(weights / "GFPGANv1.4.pth"),
             "--weights-dir", str(weights), "--device", args.device, "--no-download",
             "--faces-from", str(faces), "--seconds", str(secs)]
    compile_variants = QUICK_COMPILE_VARIANTS if args.quick else COMPILE_VARIANTS
    test_files = ["tests/test_imageops.py", "tests/test_speed.py", "tests/test_pipeline.py",
                  "tests/test_model.py", "tests/test_end_to_end.py", "tests/test_out_of_memory.py",
                  "tests/test_memory.py", "tests/test_steady.py", "tests/test_detection.py"]

    def tests_step(name: str, marker: str, workers: int = 0):
        """pytest over test_files with the tests `marker` selects, results in OUT/<name>.xml, in
        `workers` processes (pytest-xdist, from the kit) when more than one."""
        spread = ["-n", str(workers)] if workers > 1 else []
        # A test's limit: in the CPU rehearsal the compiled-pass test builds Inductor's C++ on
        # 2 cores (187-292 s there)
        per_test = 720 if args.quick else 240
        # -v: a line per test as it ends, so that a step stopped at its limit still names its
        # failures (the third H200 run's killed step left five Fs among dots, and no junit file)
        return (name, [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", f"timeout={per_test}",
                       "-m", marker, f"--junitxml={out / (name + '.xml')}", "-rfE",
                       "--durations=15", *spread, *test_files], 240)

    # Steps run in order of value (`order` below): a step not started within the budget can be
    # run by a second call with --only. In a bench step, "BEST" becomes the flags of the fastest
    # variant the variants and compile steps found (the defaults before they ran), "PLAIN" those
    # of GFPGAN's own forms (server/bench_plan.py); a step with neither runs the service's
    # defaults for the device.
    steps = [
        ("env", [sys.executable, str(ROOT / "scripts" / "gpu_env.py")], 60),
        ("weights", [sys.executable, str(ROOT / "scripts" / "gpu_env.py"), "--make-weights",
                     str(weights), "--faces", str(faces), "--narrow", str(args.narrow)], 120),
        # The tests that build networks with Inductor run in a step of their own: a slow build
        # that hits the time limit cannot cost the other tests their results.
        tests_step("tests", "not compiles", pytest_workers()),
        tests_step("tests-compile", "compiles"),
        # How far bf16 moves a face with the size of its network pass and its place in it, on
        # cuDNN and the CUDA-graph buckets (pixels, not time)
        ("batch-rounding", [sys.executable, str(ROOT / "scripts" / "batch_rounding.py"), str(weights),
                            str(faces), "--device", args.device, "--sizes", "1,2" if args.quick else "1,2,3,4,6,8",
                            "--markdown-out", str(out / "batch-rounding.md")], 120),
        ("kernels", [sys.executable, str(ROOT / "scripts" / "gpu_kernels.py"), str(weights),
                     "--device", args.device, "--batch", big, "--trace-dir", str(out / "traces")], 240),
        # --split-jobs: the largest batch in process as 1, 2 and 4 requests, beside the
        # service's rows (its 32-face requests, two to a batch, ran at half the rate three times)
        ("bench-detect", [*bench, "--alignment", "detect", "--batch-sizes", sizes, *gfpganer_sizes,
                          *overlap_in_flight, "--split-jobs", "--iterations", str(iters),
                          "--markdown-out", str(out / "bench-detect.md")], 240),
        ("bench-aligned", [*bench, "--alignment", "aligned", "--batch-sizes", sizes, *gfpganer_sizes,
                           *overlap_in_flight, "--iterations", str(iters),
                           "--markdown-out", str(out / "bench-aligned.md")], 180),
        ("compile", [*bench, "--methods", "", "--alignment", "detect", "--batch-sizes", variant_sizes,
                     "--iterations", str(iters), "--variants", ",".join(compile_variants),
                     "--variant-alignments", "aligned,detect", "--markdown-out", str(out / "compile.md")], 240),
        ("variants", [*bench, "--methods", "", "--alignment", "detect", "--batch-sizes", variant_sizes,
                      "--iterations", str(iters), "--variants",
                      "plain,fast-resample,eager,eager+waiting-detection,eager+gfpgan-phases,plain+box" if args.quick else ",".join(STEP_VARIANTS),
                      "--variant-alignments", "aligned,detect", "--markdown-out", str(out / "variants.md")], 240),
        ("profile-plain", [*bench, "PLAIN", "--methods", "", "--alignment", "detect", "--batch-sizes", f"1,{big}",
                           "--iterations", "3", "--profile", "--markdown-out", str(out / "profile-plain.md")], 60),
        ("profile-best", [*bench, "BEST", "--methods", "", "--alignment", "detect",
                          "--batch-sizes", f"1,{big}", "--iterations", "3", "--profile",
                          "--markdown-out", str(out / "profile-best.md")], 60),
        # MuseTalk's batches as the service gets them: steady video (the adapter's default), each
        # batch the next frames of one stream, on the service's defaults
        ("profile-steady", [*bench, "--methods", "", "--alignment", "detect", "--batch-sizes", f"1,{big}",
                            "--iterations", "3", "--profile", "--steady-video",
                            "--markdown-out", str(out / "profile-steady.md")], 60),
        ("memory", [*bench, "--methods", "", "--alignment", "detect", "--batch-sizes", sizes,
                    "--iterations", "1", "--memory", "8" if args.quick else "1024",
                    "--markdown-out", str(out / "memory.md")], 90),
        # the realtime batch as a caller's program sees it (a client process) and as the bench's
        # own process does (the figure of the runs before)
        ("realtime", [*bench, "--methods", "service,service-process", "--alignment", "detect",
                      "--batch-sizes", rt, "--in-flight", "1", "--iterations", "5" if args.quick else "100",
                      "--markdown-out", str(out / "realtime.md")], 90),
        ("bench-best", [*bench, "BEST", "--methods", "pipeline,service", "--alignment", "detect",
                        "--batch-sizes", sizes, "--iterations", str(iters),
                        "--markdown-out", str(out / "bench-best.md")], 90),
        ("bench-best-aligned", [*bench, "BEST", "--methods", "pipeline,service", "--alignment", "aligned",
                                "--batch-sizes", sizes, "--iterations", str(iters),
                                "--markdown-out", str(out / "bench-best-aligned.md")], 90),
        ("bench-fp32", [*bench, "--dtype", "float32", "--methods", "gfpganer,pipeline,service",
                        "--alignment", "detect", "--batch-sizes", big, "--iterations", str(iters),
                        "--markdown-out", str(out / "bench-fp32.md")], 90),
        # Steady video's two savings on the device, with the service's pipeline for it: the
        # detector on every N-th frame (detect_every) and the paste mask on every N-th frame
        # (mask_every, ParseNet's 469 GFLOP a face), faces/s against every frame, MuseTalk's 8
        # frames a request. It needs no other step's results.
        ("steady", [sys.executable, str(ROOT / "scripts" / "bench_jitter.py"), "--weights-dir", str(weights),
                    "--device", args.device, "--skip-detection", "--reuse-mask",
                    *(["--frames", "4", "--batch", "2"] if args.quick else ["--frames", "40"]),
                    "--markdown-out", str(out / "steady.md")], 120),
    ]
    # The figures first (DETECT, ALIGNED, realtime and memory with the service's
    # defaults: one bench process), then the tests, steady video, the compiled forms' tests and
    # figures and what the compile and variants steps pick (a second bench process, which
    # compiles a compiled BEST once), then the kernels and bf16's rounding. On the third H200 run
    # the first call's budget was spent before the bench steps that came after the tests, the
    # kernels, compile and variants, and the second call's before it reached bench-detect.
    order = ["env", "weights", "bench-detect", "bench-aligned", "realtime", "memory", "tests", "steady",
             "tests-compile", "compile", "variants", "profile-plain", "profile-best", "profile-steady", "bench-best",
             "bench-best-aligned", "bench-fp32", "kernels", "batch-rounding"]
    steps.sort(key=lambda step: order.index(step[0]))
    if args.quick:  # the CPU rehearsal: same steps, CPU speed (ParseNet alone is ~4 s a face)
        steps = [(name, command, limit * 10) for name, command, limit in steps]
    only = {s for s in args.only.split(",") if s}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR",
           "GFPGAN_TEST_DEVICE": args.device, "PYTHONPATH": os.pathsep.join(
               [p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p])}
    started = time.monotonic()
    summary = run_steps([step for step in steps if not only or step[0] in only], out, env, args.budget_s,
                        end_s=args.end_s)
    # the call's own length, first step to last (the issue asks for one run under 8 minutes)
    whole = {"step": "whole call", "status": "-", "seconds": round(time.monotonic() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary + [whole], indent=2))
    report = [f"## {path.stem}\n\n{path.read_text()}" for path in sorted(out.glob("*.md"))
              if path.name != "report.md"]
    (out / "report.md").write_text("\n\n".join(report))
    if args.pack:
        import shutil
        import tarfile
        pack = Path(args.pack)
        pack.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "summary.json"):
            shutil.copy(out / name, pack / name)
        with tarfile.open(pack / "gpu-check.tar.gz", "w:gz") as tar:
            tar.add(out, arcname="gpu-check")
    print()
    print("| step | status | s | highlights |")
    print("|---|---|---:|---|")
    for entry in summary + [whole]:
        print(f"| {entry['step']} | {entry['status']} | {entry['seconds']} | {_brief(entry)} |")
    left = left_for_a_second_call(summary)
    if left:
        print(f"\nnot run, or stopped, for lack of time: bash scripts/gpu_device.sh --only {','.join(left)}")
    return 0 if all(e["status"] == "ok" for e in summary) else 1


def pytest_workers() -> int:
    """Processes for the tests step (96 s in one process on the second H200 run, with half the
    tests of now): 2, which the card's memory holds (on the third run 4 of them, beside 4 other
    processes, ran it out: they capture CUDA graphs of full-size networks, up to 42 GiB a
    process), and the rehearsal's 2 cores run the same way. 1 (one process) where pytest-xdist
    is not installed (a development environment's own run: the kit carries it to the GPU
    machine)."""
    return 1 if importlib.util.find_spec("xdist") is None else 2


def left_for_a_second_call(summary: list[dict]) -> list[str]:
    """What a second call on the warm machine runs: the steps not started and those cut short by
    the call's end (not the bench processes' own entries)."""
    return [entry["step"] for entry in summary if not entry["step"].startswith("bench process ")
            and entry["status"] in (NOT_RUN, STOPPED_AT_END)]


def run_steps(todo: list, out: Path, env: dict, budget_s: float,
              plan_module: str = "server.bench_plan", end_s: float | None = None) -> list[dict]:
    """Run steps (name, command, limit) in order while the budget lasts; their summary entries.
    A command that starts with BENCH is gfpgan-bench's arguments: a section of a bench process
    (`plan_module`). A step still running `end_s` seconds after the start is stopped."""
    summary, started = [], time.monotonic()
    end_at = None if end_s is None else started + end_s
    deadline = time.time() + budget_s  # for the bench processes: no section starts after it
    processes = 0
    while todo:
        name, command, limit = todo[0]
        if time.monotonic() - started > budget_s or _ended(end_at):
            summary.append({"step": name, "status": NOT_RUN, "seconds": 0})
            todo.pop(0)
            continue
        if command[0] != BENCH:
            summary.append(_run_process(*todo.pop(0), out, env, end_at))
            continue
        # the bench steps from here up to the next other step, in one process; what it did not
        # finish (a section over its time limit, a crash) goes on in a fresh one
        group = [todo[0]]
        for step in todo[1:]:
            if step[1][0] != BENCH:
                break
            group.append(step)
        processes += 1
        entries = _run_bench_process(group, processes, out, env, deadline, plan_module, end_at)
        summary += entries
        done = {entry["step"] for entry in entries}
        todo = [step for step in todo if step[0] not in done]
    return summary


#: The variants step on the GPU: the service's CUDA forms uncompiled ("eager", the defaults of
#: the H200 runs until 2026-11-30) against those before the third H200 run, against detection
#: with its two waits for the device (wait-free since 2026-12-01), and against each of
#: that run's two changes undone, the fast resampling (rebuilt since to keep channels-last maps
#: channels-last) and bf16 activations each alone and together (all-forms), GFPGAN's x2 layers
#: as phases (alone and with all-forms), with plain and the box mask for reference (the second
#: and third runs measured the others: BENCHMARKS.md). Eager, so that the compiler's build
#: does not take the step's time; what they are worth compiled is the compile step's.
STEP_VARIANTS = ["plain", "eager-before", "eager", "eager+waiting-detection", "eager+decoder-nchw", "eager+parse-own-forms",
                 "eager+fast-resample", "eager+bf16-activations", "all-forms", "eager+gfpgan-phases",
                 "all-forms+gfpgan-phases", "eager+box"]
#: The compile step: the service's defaults (compiled) against the same forms eager, the ratio
#: that decided them, with GFPGAN's x2 layers as phases compiled (no upsampled map for Inductor
#: to write either), with ParseNet in its own forms compiled (the eager runs chose its border and
#: phases; Inductor fuses padding and copies itself) and the box mask, the compiled form of
#: DETECT's other target, and with RetinaFace compiled too (--compile-detector, off until this
#: step times it). On the third H200 run its section took 103 s, 29 s and 7 s of it two
#: compiled forms' warm-ups. Not all-forms+compile: compiled, `--activations compute` moves the same bytes as the defaults
#: and `--resample fast` twice as many (its slices and concatenations are not fused:
#: scripts/gpu_kernels.py --counts-only, BENCHMARKS.md "The floor").
COMPILE_VARIANTS = ["eager", "defaults", "defaults+gfpgan-phases", "defaults+parse-own-forms", "defaults+box",
                    "defaults+compiled-detector"]
#: ... and in the CPU rehearsal, where CUDA graphs cannot run: the CPU defaults, which are the
#: CUDA defaults' network forms without the graphs, plain and compiled (ParseNet's border and
#: phases, as the GPU compiles them), and compiled with RetinaFace.
QUICK_COMPILE_VARIANTS = ["cpu", "cpu+compile", "cpu+compiled-detector+compile"]


#: Seconds more for a bench section that runs a compiled variant: it compiles at warm-up (from
#: Inductor's on-disk cache when an earlier section built the same form, but the trace is redone).
COMPILE_ALLOWANCE_S = 90

#: pytest -v's outcome words on a test's line.
_OUTCOMES = "PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS"

#: A step's status when the budget was spent before it started, and when the call's end
#: (--end-s) stopped it: both are what a second call runs.
NOT_RUN = "not run (budget spent)"
STOPPED_AT_END = "stopped at the call's end"
#: The first argument of a step that is a gfpgan-bench report (a section of a bench process).
BENCH = "gfpgan-bench"


def _ended(end_at: float | None) -> bool:
    """Whether the call's end (run_steps' end_s) has come."""
    return end_at is not None and time.monotonic() >= end_at


def _run_process(name: str, command: list, limit: float, out: Path, env: dict,
                 end_at: float | None = None) -> dict:
    """A step as a process of its own, held to its limit and to the call's end (`end_at`,
    monotonic); its summary entry."""
    print(f"== {name}: {shlex.join(command[1:])[:200]}", flush=True)
    t0 = time.monotonic()
    with open(out / f"{name}.log", "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # a group: its workers go with it
        while (code := process.poll()) is None and time.monotonic() - t0 <= limit and not _ended(end_at):
            time.sleep(0.2)
        if code is None:
            status = f"timed out after {limit} s" if time.monotonic() - t0 > limit else STOPPED_AT_END
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        else:
            status = "ok" if code == 0 else f"exit {code}"
    entry = {"step": name, "status": status, "seconds": round(time.monotonic() - t0, 1)}
    entry.update(_highlights(name, out, out / f"{name}.log"))
    print(f"   {name}: {status} in {entry['seconds']:.0f} s {_brief(entry)}", flush=True)
    return entry


def _run_bench_process(group: list, number: int, out: Path, env: dict, deadline: float,
                       plan_module: str, end_at: float | None = None) -> list[dict]:
    """Bench steps (name, [BENCH, *gfpgan-bench args], limit) as sections of one process
    (server/bench_plan.py), each held to its own time limit: the summary entries of the steps it
    finished or that ended it, then one for the process (its time outside the sections: imports,
    loading). A step it did not reach has no entry and goes on in the next process."""
    plan, status = out / f"bench-process-{number}.json", out / f"bench-process-{number}.status.jsonl"
    current, log = out / f"bench-process-{number}.current.json", out / f"bench-process-{number}.log"
    plan.write_text(json.dumps({"sections": [{"name": name, "args": command[1:]}
                                             for name, command, _ in group]}, indent=1))
    limits = {name: limit for name, _, limit in group}
    command = [sys.executable, "-m", plan_module, str(plan), str(out), "--deadline", str(deadline),
               "--status", str(status), "--current", str(current)]
    print(f"== bench process {number}: {', '.join(limits)}", flush=True)
    entries: list[dict] = []
    announced, killed, ended, t0 = None, None, None, time.monotonic()

    def collect() -> None:
        lines = status.read_text().splitlines() if status.exists() else []
        for line in lines[len(entries):]:
            entry = json.loads(line)
            entry.update(_highlights(entry["step"], out, out / f"{entry['step']}.log"))
            entries.append(entry)
            print(f"   {entry['step']}: {entry['status']} in {entry['seconds']:.0f} s {_brief(entry)}", flush=True)

    def running() -> dict | None:
        try:
            section = json.loads(current.read_text())
        except (OSError, ValueError):
            return None
        return None if section["step"] in {e["step"] for e in entries} else section

    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while process.poll() is None:
            collect()
            section = running()
            if section is not None:
                if section["step"] != announced:
                    announced = section["step"]
                    print(f"== {announced}" + (f" (fastest variant so far: {section['best']})"
                                              if section.get("best") else ""), flush=True)
                allowed = limits[section["step"]] + (COMPILE_ALLOWANCE_S if section["compiles"] else 0)
                if time.time() - section["started"] > allowed:
                    killed = allowed
            if not killed and _ended(end_at):  # in a section, between two, or before the first
                ended = STOPPED_AT_END
            if killed or ended:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.5)
        code = process.wait()
    collect()
    section = running()
    if section is not None:  # the section the process ended in
        entry = {"step": section["step"], "seconds": round(time.time() - section["started"], 1),
                 "status": ended or (f"timed out after {killed} s" if killed else f"bench process exit {code}")}
        entry.update(_highlights(section["step"], out, out / f"{section['step']}.log"))
        entries.append(entry)
        print(f"   {entry['step']}: {entry['status']} {_brief(entry)}", flush=True)
    elif not entries and ended:  # stopped before its first section: its steps were not run
        pass
    elif not entries:  # it ended before its first section: the next process would too
        entries = [{"step": name, "status": f"bench process exit {code} before its first section "
                    f"(see {log.name})", "seconds": 0} for name in limits]
    wall = time.monotonic() - t0
    outside = wall - sum(entry["seconds"] for entry in entries)
    entries.append({"step": f"bench process {number}", "seconds": round(wall, 1),
                    "status": "ok" if code == 0 else ("killed" if killed else
                                                      STOPPED_AT_END if ended else f"exit {code}"),
                    "sections": sum(1 for e in entries if e["step"] in limits),
                    "outside sections": f"{outside:.0f} s"})
    return entries


def _brief(entry: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in entry.items() if k not in ("step", "status", "seconds"))


def _highlights(name: str, out: Path, log: Path) -> dict:
    """A few numbers per step for the closing table; the full tables are in OUT."""
    text = log.read_text(errors="replace") if log.exists() else ""  # none for a step not run
    found: dict = {}
    if name.startswith("tests"):
        match = re.search(r"(\d+ (?:passed|failed)[^\n]*) in [\d.]+s", text)
        if match:
            found["result"] = match.group(1)
        # -v's line per test, also there when the step was stopped before pytest's summary:
        # "[gw0] [ 50%] FAILED tests/x.py::y" with xdist, else "tests/x.py::y FAILED [ 50%]"
        ended: dict[str, str] = {}  # test -> its outcome
        for xdist_outcome, xdist_test, test, outcome in re.findall(
                rf"(?m)^(?:\[gw\d+\] \[ *\d+%\] ({_OUTCOMES}) (\S+::\S+)|(\S+::\S+) ({_OUTCOMES})\b)", text):
            ended[xdist_test or test] = xdist_outcome or outcome
        failed = [test.split("::", 1)[1] for test, outcome in ended.items() if outcome in ("FAILED", "ERROR")]
        if failed:
            found["failed"] = f"{len(failed)}: " + ", ".join(t[:60] for t in failed[:5]) + \
                (", ..." if len(failed) > 5 else "")
        if ended and not match:  # stopped before its summary: how far it got
            found["ended"] = f"{len(ended)} tests"
        # pytest --durations: where the step's time went (its share of the plan's critical path)
        slowest = re.search(r"(?m)^([\d.]+)s (?:call|setup|teardown) +\S*::(\S+)", text)
        if slowest:
            found["slowest"] = f"{slowest.group(2)[:60]} {float(slowest.group(1)):.0f} s"
    elif name.startswith(("bench", "realtime")):
        rows = re.findall(r"\| (GFPGANer[^|]*|FacePipeline[^|]*|gRPC[^|]*) \| (\d+) \| ([\d.]+) \| ([^|]*) \|"
                          r" [\d.]+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|", text)
        for method, batch, rate, _ratio, p50, p99 in rows:
            key = ("gfpganer" if method.startswith("GFPGANer") else "pipeline" if method.startswith("FacePipeline")
                   else "service-process" if "client process" in method
                   else "service-overlap" if method.endswith("overlap") else "service") + f"@{batch}"
            found[key] = f"{float(rate):.0f}/s" + (f" p99 {p99} ms" if name == "realtime" else "")
        # the service's batches: is a slow service row the device or the transport? (the line
        # gfpgan-bench logs per method and size as soon as it is measured: a step stopped
        # before its tables has them too)
        for label, size, per_batch, ms, busy in re.findall(
                r"(?m)^service batches(, client process|, overlap)?: request (\d+): \d+ batches of ([\d.]+) "
                r"faces and [\d.]+ jobs, ([\d.]+) ms a batch .*pipeline busy (\d+%)$", text):
            key = f"service{'-' + label.split()[-1] if label else ''} batches@{size}"
            found[key] = f"{float(per_batch):.0f} faces, {float(ms):.0f} ms, busy {busy}"
        # the largest batch as 1, 2 and 4 requests in process (--split-jobs' log line)
        for size, cells in re.findall(r"(?m)^split jobs: batch (\d+): (.*)$", text):
            for jobs, rate in re.findall(r"(\d+) x \d+ ([\d.]+) faces/s", cells):
                found[f"split {jobs} jobs@{size}"] = f"{float(rate):.0f}/s"
    # what each compiled pass's check against the eager passes measured at warm-up (gfpgan-bench
    # logs a line per pass, kept or not: a pass that failed it is also in the variant's failure)
    for what, network, mean, high, eager_mean, eager_high in re.findall(
            r"(?m)^compile check: (?:variant )?([^,]+), (\w+): ([\d.]+) levels from float32 on average "
            r"and ([\d.]+) at the 99.9th percentile, where the eager pass is ([\d.]+) and ([\d.]+)", text):
        subject = "" if what == "the service's forms" else f" {what}"
        found[f"compile check{subject} {network}"] = \
            f"{mean}/{high} levels from float32 (eager {eager_mean}/{eager_high})"
    # ... and the compiled detector's, in pixels and scores (--compile-detector)
    for what, mean, high, score in re.findall(
            r"(?m)^compile check: (?:variant )?([^,]+), detect: anchors ([\d.]+) px from the eager pass's on "
            r"average and ([\d.]+) at the 99.9th percentile, scores ([\d.]+) at most", text):
        subject = "" if what == "the service's forms" else f" {what}"
        found[f"compile check{subject} detect"] = f"{mean}/{high} px, scores {score} from eager"
    if name in ("compile", "variants", "bench-best"):
        # how long each form took to warm up: graphs captured, and for a compiled form its build
        # (or its load from Inductor's cache, where an earlier process built it)
        for variant, seconds in re.findall(r"(?m)^warmed up: variant ([\w+-]+) in ([\d.]+) s", text):
            # (compiled: the service's defaults, "defaults+X", and "X+compile": server.bench.VARIANTS)
            if variant.endswith("+compile") or variant.split("+")[0] == "defaults":
                found[f"warm-up {variant}"] = f"{float(seconds):.0f} s"
    if name == "batch-rounding":  # per dtype and alignment, the most a face moved with each
        moved: dict = {}
        for dtype, alignment, alone, beside, place in re.findall(
                r"(?m)^\| (\w+) \| (\w+) \| \d+ \| (\d+) \| [\d.]+ \| (\d+) \| (\d+) \|$", text):
            worst = moved.setdefault(f"{dtype} {alignment}", [0, 0, 0])
            for i, value in enumerate((alone, place, beside)):
                worst[i] = max(worst[i], int(value))
        for key, (alone, place, beside) in moved.items():
            found[key] = f"pass size {alone}, place {place}, faces beside {beside} levels"
    if name == "memory":
        match = re.search(r"largest batch that ran: (\d+)", text)
        if match:
            found["largest batch"] = match.group(1)
        counted = re.search(r"a face adds (\d+) MiB", text)  # off CUDA: the counted peak
        if counted:
            found["counted"] = f"{counted.group(1)} MiB a face"
        # what --max-batch-faces auto takes: on the card, or off CUDA for the cards named
        auto = re.search(r"--max-batch-faces auto here: (\d+) faces: a batch takes (\d+) MiB a face", text)
        if auto:
            found["auto"] = f"{auto.group(1)} faces ({auto.group(2)} MiB a face)"
        auto = re.search(r"--max-batch-faces auto by .*?: (\d+ faces on \d+ GiB(?:, \d+ faces on \d+ GiB)*)", text)
        if auto:
            found["auto"] = auto.group(1)
    elif name.startswith("profile"):
        totals = re.findall(r"\| \*\*total\*\* \| ([\d.]+) \| (\d+) \| (\d+) \|", text)
        for (ms, ops, syncs), label in zip(totals, ("first", "second")):
            found[label] = f"{ms} ms, {ops} ops, {syncs} syncs"
    elif name == "kernels":
        for network, form, tflops, of_floor, families in re.findall(
                r"(?m)^\| (gfpgan|parse) \| ([\w+-]+) \| [\d.]+ \| [\d.]+ \| (\d+) \| [\d.-]+ \| [\d.-]+ \| [\d.-]+ "
                r"\| (\d+%|-) \|([^|\n]*)", text):
            share = re.search(r"convolutions (\d+%)", families)
            found[f"{network} {form}"] = (f"{tflops} TF/s" + (f", {of_floor} of floor" if of_floor != "-" else "")
                                          + (f", convolutions {share.group(1)}" if share else ""))
        # each pass as the service runs it, replayed from a CUDA graph, beside launched from the host
        for network, form, replay, launched in re.findall(
                r"(?m)^graph replay: (gfpgan|parse), ([\w+-]+), batch \d+: ([\d.]+) ms a pass "
                r"\(launched from the host: ([\d.]+)\)", text):
            found[f"{network} {form} replayed"] = f"{replay} ms a pass (launched {launched})"
    elif name == "steady":  # faces/s against every frame at N = 5, per saving
        ratios = re.findall(r"(?m)^\| 5 \| \d+/\d+ \| [\d.]+ \| [\d.]+ \| ([\d.]+x) \|", text)
        found.update(zip(("detect_every 5", "mask_every 5"), ratios))  # the tables' order
    elif name == "env":
        match = re.search(r"device: ([^\n]+)", text)
        if match:
            found["device"] = match.group(1)[:80]
    errors = re.findall(r"(?m)^(?:E  +|\w*Error: )(.{0,160})", text)
    if errors and not name.startswith("tests"):
        found["error"] = errors[-1]
    return found


if __name__ == "__main__":
    sys.exit(main())
