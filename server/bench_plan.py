"""Many gfpgan-bench reports in one process: the GPU check's benchmark steps.

    python -m server.bench_plan PLAN.json OUT [--deadline EPOCH_S] [--status FILE] [--current FILE]

PLAN.json is {"sections": [{"name": "bench-detect", "args": [gfpgan-bench's arguments]}, ...]}.
Each section is one gfpgan-bench report, run in order on networks loaded once (bench.Loaded): on
the H200, a step in a process of its own spent about half its time importing, loading the
weights and capturing graphs again (realtime: 56 s for 22 s of timed batches). Per section:

- its output, the C libraries' included, goes to OUT/<name>.log, its report to wherever its
  --markdown-out says;
- "BEST" among its args becomes the flags of the fastest variant that OUT/variants.md and
  OUT/compile.md hold by then (best_variant), "PLAIN" those of GFPGAN's own forms;
- the --current file says which section runs and since when (scripts/gpu_check.py holds each
  section to its time limit by it), and the --status file gets a JSON line when it ends: ok,
  failed (one broken section does not stop the others) or not run (none starts after
  --deadline);
- an error that leaves the device unusable (a CUDA error) ends the process with status 3, so
  that the sections after it run in a fresh process.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

#: Status of a process ended by a CUDA error: the sections after it need a fresh process.
DEVICE_LOST = 3


def variant_flags() -> dict[str, list[str]]:
    """gfpgan-bench's speed variants (server.bench.VARIANTS), as the flags that choose each."""
    from server.bench import VARIANTS

    return {name: speed.serve_flags() for name, speed in VARIANTS.items()}


def compiles(flags: list[str]) -> bool:
    """Whether gfpgan-bench `flags` choose the compiled form, or name a compiled variant among
    their --variants (a warm-up then compiles). On CUDA the service's defaults compile
    (--compile auto), so a section there compiles unless its flags turn compile off or pick the
    fused convolution, which auto does not compile."""
    pairs = dict(zip(flags, flags[1:]))
    named = [name for name in pairs.get("--variants", "").split(",") if name]
    if named:
        from server.bench import VARIANTS

        return any(VARIANTS[name].compile for name in named if name in VARIANTS)
    setting = pairs.get("--compile", "auto")
    if setting == "auto":
        return pairs.get("--device") == "cuda" and pairs.get("--modconv") != "fused"
    return setting == "on"


def best_variant(tables: list[Path]) -> str:
    """The variant with the most DETECT faces/s at the largest batch measured in the variants
    tables that exist (gfpgan-bench --variants), with the ParseNet mask (the box mask changes the
    pixels, so it is not picked as a default); the service's CUDA defaults ("defaults") if none. A table that is missing because
    its step was stopped at its time limit is read from the step's log instead (NAME.log beside
    NAME.md), which has a line per cell measured before that."""
    text = ""
    for path in tables:
        if path.exists():
            text += path.read_text() + "\n"
        elif path.with_suffix(".log").exists():
            text += "\n".join(f"| {name} | {alignment} | {b} | {rate} |" for name, alignment, b, rate in re.findall(
                r"(?m)^measured: variant ([\w+-]+), (\w+), batch (\d+): ([\d.e+]+) faces/s",
                path.with_suffix(".log").read_text(errors="replace"))) + "\n"
    rows = re.findall(r"\| ([\w+-]+) \| detect \| (\d+) \| ([\d.e+]+) \|", text)
    rows = [(int(b), float(rate), name) for name, b, rate in rows if "box" not in name]
    if not rows:
        return "defaults"
    largest = max(b for b, _, _ in rows)
    return max((rate, name) for b, rate, name in rows if b == largest)[1]


def resolve(args: list[str], out: Path) -> tuple[list[str], str | None]:
    """`args` with PLAIN and BEST replaced by their variants' flags; the BEST variant's name."""
    if "PLAIN" not in args and "BEST" not in args:
        return list(args), None
    flags, best = variant_flags(), None
    resolved: list[str] = []
    for arg in args:
        if arg == "PLAIN":
            resolved += flags["plain"]
        elif arg == "BEST":
            best = best_variant([out / "variants.md", out / "compile.md"])
            resolved += flags[best]
        else:
            resolved.append(arg)
    return resolved, best


def _leaves_device_unusable(error: BaseException) -> bool:
    import torch

    from server.jobs import DeviceOutOfMemory

    if isinstance(error, (torch.OutOfMemoryError, DeviceOutOfMemory)):
        return False  # the caching allocator recovers; the memory step expects it
    accelerator = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator) or "CUDA error" in str(error)


@contextlib.contextmanager
def _output_to(path: Path):
    """stdout and stderr, Python's and the file descriptors' (what C libraries print), into
    `path` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    path.write_text("")
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as raw, open(path, "a", buffering=1) as text:
        os.dup2(raw.fileno(), 1)
        os.dup2(raw.fileno(), 2)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_plan(sections: list[dict], out: Path, status: Path, current: Path,
             deadline: float | None = None, report: Callable | None = None, loaded=None) -> int:
    """Run `sections` in order (see the module's text); 0, or DEVICE_LOST after a CUDA error.
    `report(args, loaded)` makes a section's report: gfpgan-bench's run() unless given."""
    if report is None:
        from server.bench import Loaded, run

        report, loaded = run, loaded or Loaded()

    def record(entry: dict) -> None:
        with open(status, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    try:
        for section in sections:
            name = section["name"]
            if deadline is not None and time.time() > deadline:
                record({"step": name, "status": "not run (budget spent)", "seconds": 0})
                continue
            args, best = resolve(section["args"], out)
            current.write_text(json.dumps({"step": name, "started": time.time(),
                                           "compiles": compiles(args), "best": best}))
            print(f"== {name}" + (f" (fastest variant so far: {best})" if best else ""), flush=True)
            started, lost = time.monotonic(), False
            with _output_to(out / f"{name}.log"):
                try:
                    if best:
                        print(f"fastest variant so far: {best}", flush=True)
                    report(args, loaded)
                    outcome = "ok"
                except SystemExit as error:  # gfpgan-bench's own refusal of its arguments
                    outcome = f"exit {error.code}"
                except Exception as error:  # noqa: BLE001 - one broken section, not the plan
                    traceback.print_exc()
                    first_line = str(error).splitlines()[0][:160] if str(error) else ""
                    outcome = f"failed: {type(error).__name__}: {first_line}"
                    lost = _leaves_device_unusable(error)
            entry = {"step": name, "status": outcome, "seconds": round(time.monotonic() - started, 1)}
            if best:
                entry["variant"] = best
            record(entry)
            print(f"   {outcome} in {entry['seconds']} s", flush=True)
            if lost:
                print("   the device is unusable after that error: the rest need a fresh process",
                      flush=True)
                return DEVICE_LOST
        return 0
    finally:
        if loaded is not None:
            loaded.close()


def main(argv: list[str] | None = None, report: Callable | None = None) -> int:
    """The command line; `report` as run_plan's (a stand-in's in the GPU check's tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="JSON: {\"sections\": [{\"name\": ..., \"args\": [...]}]}")
    parser.add_argument("out", help="folder of the sections' logs and of the variants tables BEST reads")
    parser.add_argument("--deadline", type=float, default=None,
                        help="time.time() after which no section starts")
    parser.add_argument("--status", default=None, help="JSON lines, one per section (default OUT/plan-status.jsonl)")
    parser.add_argument("--current", default=None, help="the running section (default OUT/plan-current.json)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = json.loads(Path(args.plan).read_text())["sections"]
    return run_plan(sections, out, Path(args.status or out / "plan-status.jsonl"),
                    Path(args.current or out / "plan-current.json"), args.deadline, report)


if __name__ == "__main__":
    sys.exit(main())
