#!/usr/bin/env python3
"""The GPU check: every GPU figure and check this project needs, in one command, one run.

    python scripts/gpu_check.py [OUT] [--device cuda] [--narrow 1] [--quick]

On a lent GPU machine, after the kit is installed (scripts/gpu_device.sh does both); in the
CPU rehearsal (`make gpu-rehearsal`) with `--device cpu --narrow 0.0625 --quick`. Writes logs,
Markdown and a summary JSON into OUT (default: $OUT, else ./gpu-check-out) and prints a short
table last. Steps, each in its own process with its own time limit, so that one failing or
slow step still leaves the others' results:

  env        the GPU, driver, torch and package versions
  weights    random-valued checkpoints of the real architectures (tests/checkpoints.py), full
             width on the GPU, and drawn test faces; nothing is downloaded
  tests      pipeline, image-op, speed, model and end-to-end tests on the device
             (GFPGAN_TEST_DEVICE), bf16 against fp32 on the same weights included
  tests-compile  the tests marked `compiles` (torch.compile through Inductor on CUDA), apart,
             so that a slow build cannot cost the other tests their results
  bench-*    gfpgan-bench: GFPGANer one face at a time vs our pipeline vs our service over
             loopback, ALIGNED and DETECT, bf16; fp32 at one batch size; the realtime batch
  compile    torch.compile's forms beside the defaults (gfpgan-bench --variants)
  variants   each speed form on and off, side by side, in one process
  profile-*  time per stage (CUDA events), operators and host syncs per batch
  memory     peak device memory per batch size and the largest batch that fits
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
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
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    weights, faces = work / "weights", work / "faces"

    if args.quick:
        sizes, big, iters, secs, rt, variant_sizes = "1,2", "2", 1, 30, "2", "1,2"
    else:
        sizes, big, iters, secs, rt, variant_sizes = "1,8,16,32,64", "16", 5, 3, "20", "8,32"
    bench = [sys.executable, "-m", "server.bench", "--model", str(weights / "GFPGANv1.4.pth"),
             "--weights-dir", str(weights), "--device", args.device, "--no-download",
             "--faces-from", str(faces), "--seconds", str(secs)]
    test_files = ["tests/test_imageops.py", "tests/test_speed.py", "tests/test_pipeline.py",
                  "tests/test_model.py", "tests/test_end_to_end.py"]

    def tests_step(name: str, marker: str):
        """pytest over test_files with the tests `marker` selects, results in OUT/<name>.xml."""
        return (name, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=240",
                       "-m", marker, f"--junitxml={out / (name + '.xml')}", "-rfE", *test_files], 240)

    # Steps run in order of value (`order` below): a step not started within the budget can be
    # run by a second call with --only. "BEST" is replaced by the flags of the fastest variant the
    # variants step found, "PLAIN" by those of GFPGAN's own forms.
    steps = [
        ("env", [sys.executable, str(ROOT / "scripts" / "gpu_env.py")], 60),
        ("weights", [sys.executable, str(ROOT / "scripts" / "gpu_env.py"), "--make-weights",
                     str(weights), "--faces", str(faces), "--narrow", str(args.narrow)], 120),
        # The tests that build networks with Inductor run in a step of their own: a slow build
        # that hits the time limit cannot cost the other tests their results.
        tests_step("tests", "not compiles"),
        tests_step("tests-compile", "compiles"),
        ("kernels", [sys.executable, str(ROOT / "scripts" / "gpu_kernels.py"), str(weights),
                     "--device", args.device, "--batch", big], 150),
        ("bench-detect", [*bench, "--alignment", "detect", "--batch-sizes", sizes,
                          "--iterations", str(iters), "--markdown-out", str(out / "bench-detect.md")], 240),
        ("bench-aligned", [*bench, "--alignment", "aligned", "--batch-sizes", sizes,
                           "--iterations", str(iters), "--markdown-out", str(out / "bench-aligned.md")], 180),
        ("compile", [*bench, "--methods", "", "--alignment", "detect", "--batch-sizes", variant_sizes,
                     "--iterations", str(iters), "--variants",
                     ",".join(QUICK_COMPILE_VARIANTS if args.quick else COMPILE_VARIANTS),
                     "--variant-alignments", "aligned,detect", "--markdown-out", str(out / "compile.md")], 240),
        ("variants", [*bench, "--methods", "", "--alignment", "detect", "--batch-sizes", variant_sizes,
                      "--iterations", str(iters), "--variants",
                      "plain,fast-resample,defaults,plain+box" if args.quick else ",".join(STEP_VARIANTS),
                      "--variant-alignments", "aligned,detect", "--markdown-out", str(out / "variants.md")], 240),
        ("profile-plain", [*bench, "PLAIN", "--methods", "", "--alignment", "detect", "--batch-sizes", f"1,{big}",
                           "--iterations", "3", "--profile", "--markdown-out", str(out / "profile-plain.md")], 60),
        ("profile-best", [*bench, "BEST", "--methods", "", "--alignment", "detect",
                          "--batch-sizes", f"1,{big}", "--iterations", "3", "--profile",
                          "--markdown-out", str(out / "profile-best.md")], 60),
        ("memory", [*bench, "BEST", "--methods", "", "--alignment", "detect", "--batch-sizes", sizes,
                    "--iterations", "1", "--memory", "8" if args.quick else "1024",
                    "--markdown-out", str(out / "memory.md")], 90),
        ("realtime", [*bench, "BEST", "--methods", "service", "--alignment", "detect", "--batch-sizes", rt,
                      "--in-flight", "1", "--iterations", "5" if args.quick else "100",
                      "--markdown-out", str(out / "realtime.md")], 60),
        ("bench-best", [*bench, "BEST", "--methods", "pipeline,service", "--alignment", "detect",
                        "--batch-sizes", sizes, "--iterations", str(iters),
                        "--markdown-out", str(out / "bench-best.md")], 90),
        ("bench-best-aligned", [*bench, "BEST", "--methods", "pipeline,service", "--alignment", "aligned",
                                "--batch-sizes", sizes, "--iterations", str(iters),
                                "--markdown-out", str(out / "bench-best-aligned.md")], 90),
        ("bench-fp32", [*bench, "--dtype", "float32", "--methods", "gfpganer,pipeline,service",
                        "--alignment", "detect", "--batch-sizes", big, "--iterations", str(iters),
                        "--markdown-out", str(out / "bench-fp32.md")], 90),
    ]
    order = ["env", "weights", "tests", "tests-compile", "compile", "variants", "kernels", "bench-detect",
             "profile-plain", "profile-best", "bench-aligned", "memory", "realtime", "bench-best",
             "bench-best-aligned", "bench-fp32"]
    steps.sort(key=lambda step: order.index(step[0]))
    if args.quick:  # the CPU rehearsal: same steps, CPU speed (ParseNet alone is ~4 s a face)
        steps = [(name, command, limit * 10) for name, command, limit in steps]
    only = {s for s in args.only.split(",") if s}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR",
           "GFPGAN_TEST_DEVICE": args.device, "PYTHONPATH": os.pathsep.join(
               [p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p])}
    summary, started = [], time.monotonic()
    for name, command, limit in steps:
        if only and name not in only:
            continue
        spent = time.monotonic() - started
        if spent > args.budget_s:
            summary.append({"step": name, "status": "not run (budget spent)", "seconds": 0})
            continue
        if "PLAIN" in command:  # GFPGAN's own forms, whatever the service's defaults are
            at = command.index("PLAIN")
            command = command[:at] + variant_flags()["plain"] + command[at + 1:]
        if "BEST" in command:
            best = _best_variant([out / "variants.md", out / "compile.md"], args.device)
            at = command.index("BEST")
            flags = variant_flags()[best]
            command = command[:at] + flags + command[at + 1:]
            if _compiles(flags):  # each step is a process of its own: it compiles again at warm-up
                limit += COMPILE_ALLOWANCE_S
            print(f"   (fastest variant so far: {best})", flush=True)
        t0 = time.monotonic()
        log = out / f"{name}.log"
        print(f"== {name}: {shlex.join(command[1:])[:200]}", flush=True)
        with open(log, "w") as handle:
            try:
                code = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                      timeout=limit).returncode
                status = "ok" if code == 0 else f"exit {code}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit} s"
        seconds = time.monotonic() - t0
        entry = {"step": name, "status": status, "seconds": round(seconds, 1)}
        entry.update(_highlights(name, out, log))
        summary.append(entry)
        print(f"   {status} in {seconds:.0f} s {_brief(entry)}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
    for entry in summary:
        print(f"| {entry['step']} | {entry['status']} | {entry['seconds']} | {_brief(entry)} |")
    return 0 if all(e["status"] == "ok" for e in summary) else 1


#: The variants step on the GPU: the forms not measured on a GPU yet, and the references they are
#: compared with (the second H200 run measured the others: BENCHMARKS.md).
STEP_VARIANTS = ["plain", "defaults", "defaults+parse-channels-last+fast-resample", "all-forms",
                 "defaults+box"]
#: The compile step: torch.compile's forms beside the defaults, in a process of their own (the
#: compiler's time must not cost the variants step its table).
COMPILE_VARIANTS = ["plain", "defaults", "defaults+compile", "all-forms+compile"]
#: ... and in the CPU rehearsal, where CUDA graphs cannot run: the compiled form without them.
QUICK_COMPILE_VARIANTS = ["plain", "lean+compile"]


#: Seconds more for a step that runs a compiled variant: its own process compiles again at
#: warm-up (from Inductor's on-disk cache after the compile step, but the trace is redone).
COMPILE_ALLOWANCE_S = 90


def _compiles(flags: list[str]) -> bool:
    return any(a == "--compile" and b == "on" for a, b in zip(flags, flags[1:]))


#: gfpgan-bench's --variants names (server/bench.py VARIANTS) and the flags that choose each.
def variant_flags() -> dict[str, list[str]]:
    """gfpgan-bench's speed variants (server.bench.VARIANTS), as the flags that choose them."""
    sys.path.insert(0, str(ROOT))
    from server.bench import VARIANTS

    return {name: speed.serve_flags() for name, speed in VARIANTS.items()}


def _best_variant(tables: list[Path], device: str) -> str:
    """The variant with the most DETECT faces/s at the largest batch measured in the variants
    tables that exist, with the ParseNet mask (the box mask changes the pixels, so it is not
    picked as a default); "plain" if none."""
    text = "\n".join(path.read_text() for path in tables if path.exists())
    rows = re.findall(r"\| ([\w+-]+) \| detect \| (\d+) \| ([\d.e+]+) \|", text)
    rows = [(int(b), float(rate), name) for name, b, rate in rows if "box" not in name]
    if not rows:
        return "plain"
    largest = max(b for b, _, _ in rows)
    return max((rate, name) for b, rate, name in rows if b == largest)[1]


def _brief(entry: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in entry.items() if k not in ("step", "status", "seconds"))


def _highlights(name: str, out: Path, log: Path) -> dict:
    """A few numbers per step for the closing table; the full tables are in OUT."""
    text = log.read_text(errors="replace")
    found: dict = {}
    if name.startswith("tests"):
        match = re.search(r"(\d+ (?:passed|failed)[^\n]*) in [\d.]+s", text)
        if match:
            found["result"] = match.group(1)
    elif name.startswith(("bench", "realtime")):
        rows = re.findall(r"\| (GFPGANer[^|]*|FacePipeline[^|]*|gRPC[^|]*) \| (\d+) \| ([\d.]+) \| ([^|]*) \|"
                          r" [\d.]+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|", text)
        for method, batch, rate, _ratio, p50, p99 in rows:
            key = {"G": "gfpganer", "F": "pipeline", "g": "service"}[method[0]] + f"@{batch}"
            found[key] = f"{float(rate):.0f}/s" + (f" p99 {p99} ms" if name == "realtime" else "")
        # the service's batches: is a slow service row the device or the transport?
        for size, per_batch, ms, busy in re.findall(
                r"(?m)^\| (\d+) \| \d+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \| [\d.]+ \| (\d+%) \|$", text):
            found[f"service batches@{size}"] = f"{float(per_batch):.0f} faces, {float(ms):.0f} ms, busy {busy}"
    elif name == "memory":
        match = re.search(r"largest batch that ran: (\d+)", text)
        if match:
            found["largest batch"] = match.group(1)
    elif name.startswith("profile"):
        totals = re.findall(r"\| \*\*total\*\* \| ([\d.]+) \| (\d+) \| (\d+) \|", text)
        for (ms, ops, syncs), label in zip(totals, ("first", "second")):
            found[label] = f"{ms} ms, {ops} ops, {syncs} syncs"
    elif name == "kernels":
        for network, form, tflops in re.findall(r"\| (gfpgan|parse) \| ([\w+-]+) \| [\d.]+ \| [\d.]+ \| (\d+) \|", text):
            found[f"{network} {form}"] = f"{tflops} TF/s"
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
