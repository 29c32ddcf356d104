#!/usr/bin/env python3
"""Where the networks' time goes on the GPU: achieved TFLOP/s and the top kernels of one pass.

    python scripts/gpu_kernels.py WEIGHTS_DIR [--batch 16] [--device cuda]

For GFPGAN (395.5 GFLOP a face) and ParseNet (469 GFLOP a face at 512), in GFPGAN's own forms,
the service's CUDA defaults, those resampling bf16 maps in float32 as autocast does and those
writing the style-scaled float32 maps in float32 for autocast to cast (the defaults before
--resample-dtype and --modulate-dtype), those with the StyleGAN decoder channels-last too, those with
ParseNet channels-last and padding from slices, ParseNet without padding passes (border_conv2d),
with its x2 layers as 2x2 convolutions (upsample_conv2d), and with both and channels-last, and
those compiled by torch.compile (the gfpgan-bench variants of those names), bf16: the time of
one pass from CUDA events (median of 5), the TFLOP/s that makes, torch.profiler's kernels by
device time, and that time by kernel family (convolutions, layout changes and copies,
resampling, padding, compiled fusions, the rest): how far each form is from spending its time on
the matrix work. `--trace-dir` also keeps each pass's profile as a Chrome trace (gzip), for
reading after the lease. scripts/gpu_check.py runs it.

Each pass's floor: every launch at its roofline, the longer of its FLOPs at the matrix rate and
the bytes it reads and writes (server.profiling.Traffic) at the memory rate, both rates measured
on this device first (a large matrix product in the dtype, a large copy) unless `--rates` gives
another card's. A pass near its floor can only get faster by moving fewer bytes (fusing its
elementwise work: --compile); one far from it has slow kernels. `--counts-only` skips the
timing: it counts each form's bytes and gives its floor at `--rates`, on any device.
"""
from __future__ import annotations

import argparse
import gzip
import re
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GFLOP_PER_FACE = {"gfpgan": 395.5, "parse": 469.0}
#: The third H200 run (2026-11-30, BENCHMARKS.md) profiled the dtype, layout, padding and
#: resampling forms one by one; what is left: GFPGAN's own forms, the CUDA forms uncompiled
#: before and after it, the fast resampling rebuilt since and GFPGAN's x2 layers as phases (each
#: alone, and together with bf16 activations), and the service's defaults, compiled, alone and
#: with the phases (`--forms` takes any of gfpgan-bench's variants)
FORMS = ["plain", "eager-before", "eager", "eager+fast-resample", "eager+gfpgan-phases",
         "all-forms+gfpgan-phases", "defaults", "defaults+gfpgan-phases"]
#: Kernel families by name, the first that matches: CUDA kernels as torch.profiler names them on
#: the GPU, ATen operators on the CPU.
FAMILIES = [
    ("convolutions", re.compile(r"conv|gemm|xmma|cutlass|fprop|wgmma|winograd|triton_tem|aten::(?:a?dd)?b?mm\b|matmul", re.I)),
    ("layout+copies", re.compile(r"nchwToNhwc|nhwcToNchw|copy|contiguous|clone|aten::cat\b|CatArray", re.I)),
    ("resampling", re.compile(r"upsample|interpolat|grid_sampl", re.I)),
    ("padding", re.compile(r"pad", re.I)),
    ("compiled", re.compile(r"^triton_|cpp_fused")),  # Inductor's kernels: CUDA, CPU
]
OTHER = "elementwise+other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--forms", default=",".join(FORMS),
                        help="comma-separated gfpgan-bench variants (default: %(default)s)")
    parser.add_argument("--networks", default="gfpgan,parse", help="of gfpgan and parse (default: both)")
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="also write each pass's profile there as NETWORK-FORM.json.gz (a Chrome trace)")
    parser.add_argument("--rates", default=None, metavar="TFLOPS,GBS",
                        help="the matrix rate (TFLOP/s) and memory rate (GB/s) the floors are given at, "
                             "e.g. 989,3350 for an H100 SXM's data sheet (default: measured on --device)")
    parser.add_argument("--counts-only", action="store_true",
                        help="time nothing: count each pass's operators, bytes and FLOPs and give its floor")
    args = parser.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    networks = [n for n in args.networks.split(",") if n]
    if not set(networks) <= set(GFLOP_PER_FACE):
        parser.error(f"--networks takes {', '.join(GFLOP_PER_FACE)}")
    try:
        given = tuple(float(r) for r in args.rates.split(",")) if args.rates else None
    except ValueError:
        given = ()
    if given is not None and (len(given) != 2 or min(given) <= 0):
        parser.error(f"--rates takes two positive numbers, TFLOP/s,GB/s; got {args.rates!r}")

    import server.compat  # noqa: F401
    import torch
    from torch.profiler import ProfilerActivity, profile

    from server.model import load_models
    from server.pipeline import FacePipeline
    from server.bench import VARIANTS
    from server.weights import WeightPaths

    unknown = [form for form in forms if form not in VARIANTS]
    if unknown:
        parser.error(f"unknown forms {unknown}; gfpgan-bench's variants are {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    models = load_models(WeightPaths(gfpgan=args.weights / "GFPGANv1.4.pth",
                                     detection=args.weights / "detection_Resnet50_Final.pth",
                                     parsing=args.weights / "parsing_parsenet.pth"), device)
    dtype = getattr(torch, args.dtype)
    crops = torch.rand(args.batch, 3, 512, 512, device=device) * 255
    rates = given or card_rates(device, dtype)
    print(f"floors at {_rate(rates[0])} TFLOP/s and {_rate(rates[1])} GB/s "
          f"({'given' if given else f'measured on {device.type}'})")
    rows = []
    replayed: dict[tuple[str, str], float | None] = {}  # (form, network) -> ms a pass from a CUDA graph
    for form in forms:
        pipeline = FacePipeline(models.gfpgan.net, models.detector, models.parser, device=device,
                                dtype=dtype, speed=VARIANTS[form])
        for name in networks:
            run = pipeline._fixed[name]  # the pass as a batch runs it (compiled, with --compile)
            traffic = pass_traffic(run, crops, compiled=VARIANTS[form].compile, inductor=args.counts_only)
            floor = traffic and traffic.floor_ms(args.batch, *rates)
            if args.counts_only:
                rows.append((form, name, None, None, None, traffic, floor, {}))
                continue
            with torch.no_grad():
                for _ in range(2):
                    run(crops)
                ms = statistics.median(_timed(run, crops, device) for _ in range(5))
                with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                    run(crops)
                    if cuda:
                        torch.cuda.synchronize(device)
            tflops = GFLOP_PER_FACE[name] * args.batch / ms  # GFLOP per ms is TFLOP/s
            families = kernel_families(prof.key_averages(), cuda)
            rows.append((form, name, ms, ms / args.batch, tflops, traffic, floor, families))
            print(f"\n### {name}, {form}, batch {args.batch}, {args.dtype}: {ms:.2f} ms "
                  f"({ms / args.batch:.2f} ms a face, {tflops:.0f} TFLOP/s)\n")
            if cuda:
                replayed[form, name] = graph_replay_ms(run, crops, device)
                print(f"graph replay: {name}, {form}, batch {args.batch}: {_cell(replayed[form, name])} ms "
                      f"a pass (launched from the host: {ms:.2f})")
            print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                            row_limit=14, max_name_column_width=70))
            print("by family: " + families_line(families))
            if args.trace_dir is not None:
                write_trace(prof, args.trace_dir / f"{name}-{form}.json.gz")
    print("\n| network | form | ms per pass | ms per face | TFLOP/s | GB a face | GB a pass | floor ms a face "
          "| of floor | device time by kernel family |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for form, name, ms, per_face, tflops, traffic, floor, families in rows:
        face_gb, pass_gb = (traffic.face_bytes / 1e9, traffic.pass_bytes / 1e9) if traffic else (None, None)
        print(f"| {name} | {form} | {_cell(ms)} | {_cell(per_face)} | {_cell(tflops, '.0f')} | {_cell(face_gb)} "
              f"| {_cell(pass_gb)} | {_cell(floor)} | {_cell(floor and per_face and 100 * floor / per_face, '.0f', '%')} "
              f"| {families_line(families)} |")
    print(f"\nGB a face: what the operators read and write grows by that for every face; GB a pass: what "
          f"they move once a pass (the weights' casts). floor: a face of a pass of {args.batch} if each "
          f"launch took the longer of its FLOPs at {_rate(rates[0])} TFLOP/s and its bytes at {_rate(rates[1])} "
          f"GB/s; of floor: the floor as a share of the measured time. On the CPU the operators cast as "
          f"CUDA autocast would (server.profiling.cuda_autocast_policy). A compiled form's bytes are "
          f"its convolutions' and Inductor's own count of its fused kernels as it compiles "
          f"(--counts-only), not counted in a timed run (its fused kernels are not operators)")
    if replayed:
        print("\n| network | form | ms a pass, launched from the host | ms a pass, CUDA graph replay |\n"
              "|---|---|---:|---:|")
        for form, name, ms, *_ in rows:
            print(f"| {name} | {form} | {_cell(ms)} | {_cell(replayed.get((form, name)))} |")
        print("\nThe service replays each pass from a CUDA graph (--cuda-graphs), with no host launches "
              "in it: the replayed time is the pass's time in a batch, the launched one adds what "
              "launching each kernel from Python costs (the rows above, and the profiles, are that).")


def graph_replay_ms(run, crops, device) -> float | None:
    """Milliseconds of one pass of `run` replayed from a CUDA graph captured for this batch
    (server.speed.GraphedForward, as the service runs it, a copy in and a copy out included),
    median of 5; None, and a line saying why, where the capture fails."""
    import torch

    from server.speed import GraphedForward

    graph = GraphedForward(run, tuple(crops.shape[1:]), [crops.shape[0]], device)
    try:
        with torch.no_grad():
            graph.capture()
            graph(crops)
            return statistics.median(_timed(graph, crops, device) for _ in range(5))
    except Exception as error:  # noqa: BLE001 - the launched time still stands
        print(f"graph capture failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return None
    finally:
        del graph
        torch.cuda.empty_cache()


def card_rates(device, dtype) -> tuple[float, float]:
    """(TFLOP/s of a large matrix product in dtype, GB/s of a large copy) on device, median of 5."""
    import torch

    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(2**30 if cuda else 2**26, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    with torch.no_grad():
        for run in (lambda _: a @ b, lambda _: target.copy_(source)):
            run(None)  # warm: the library picks its kernel, the pages are touched
        matrix_ms = statistics.median(_timed(lambda _: a @ b, None, device) for _ in range(5))
        copy_ms = statistics.median(_timed(lambda _: target.copy_(source), None, device) for _ in range(5))
    return 2 * n**3 / matrix_ms / 1e9, 2 * source.numel() / copy_ms / 1e6


def pass_traffic(run, crops, compiled: bool, inductor: bool):
    """run's server.profiling.Traffic, or, for a compiled pass when `inductor`, that of its
    eager form's matrix launches (the same library kernels compiled) and one more for its
    fused kernels: Inductor's bytes at two and four rows less those launches'. None for a
    compiled pass without `inductor`: its fused kernels are not operators to count."""
    import contextlib

    from server.profiling import Traffic, cuda_autocast_policy, pass_traffic as counted

    if compiled and not inductor:
        return None
    # on the CPU, cast as CUDA autocast does: the bytes a GPU would move
    with cuda_autocast_policy() if crops.device.type == "cpu" else contextlib.nullcontext():
        traffic = counted(run.fn if compiled else run, crops[:1])
    if not compiled:
        return traffic
    matrix = [launch for launch in traffic.launches if launch[1] > 0]
    small, large = inductor_bytes(run, 2, crops[:1]), inductor_bytes(run, 4, crops[:1])
    face = (large - small) / 2
    fused = ("fused", 0.0, face - sum(b for _, _, b, _ in matrix), small - 2 * face - sum(p for *_, p in matrix))
    return Traffic(matrix + [fused])


def inductor_bytes(run, rows: int, one) -> int:
    """Bytes Inductor's kernels read and write for `rows` faces, by its own count as it compiles
    run's function (server.speed.CompiledForward) with a dynamic batch: it counts at the batch it
    compiles on. Compiles afresh, its graph cache off (a cached graph is not counted again)."""
    import logging

    import torch
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics

    # compile_fx counts only while its metrics log takes INFO; keep the log's own output quiet
    counting = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    level, propagate = counting.level, counting.propagate
    counting.setLevel(logging.INFO)
    counting.propagate = False
    handler = logging.NullHandler()
    counting.addHandler(handler)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(run.fn, fullgraph=True, dynamic=None)
        x = one.expand(rows, -1, -1, -1).contiguous()
        torch._dynamo.mark_dynamic(x, 0)
        metrics.reset()
        with inductor_config.patch(fx_graph_cache=False), torch.no_grad(), run.context():
            compiled(x)
        return metrics.num_bytes_accessed
    finally:
        counting.removeHandler(handler)
        counting.setLevel(level)
        counting.propagate = propagate
        torch._dynamo.reset()


def _rate(value: float) -> str:
    """989 -> "989", 3350 -> "3,350", 0.114 -> "0.114": a rate as read, the CPU's small ones too."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cell(value, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def kernel_families(events, cuda: bool) -> dict[str, float]:
    """Milliseconds of self time (device time on the GPU, host time on the CPU) per kernel
    family (FAMILIES, else OTHER), from torch.profiler's key_averages(); largest first."""
    totals: dict[str, float] = {}
    for event in events:
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if not us:
            continue
        family = next((name for name, pattern in FAMILIES if pattern.search(event.key)), OTHER)
        totals[family] = totals.get(family, 0.0) + us / 1000
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def families_line(families: dict[str, float]) -> str:
    total = sum(families.values()) or 1.0
    return ", ".join(f"{name} {ms / total:.0%}" for name, ms in families.items())


def write_trace(prof, path: Path) -> None:
    """prof as a gzipped Chrome trace at path (chrome://tracing or ui.perfetto.dev read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_suffix("")  # NAME.json
    prof.export_chrome_trace(str(plain))
    with open(plain, "rb") as source, gzip.open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    plain.unlink()


def _timed(run, crops, device) -> float:
    """Milliseconds of one run: CUDA events on the GPU, the host clock on the CPU."""
    import time

    import torch

    if device.type != "cuda":
        t0 = time.perf_counter()
        run(crops)
        return (time.perf_counter() - t0) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run(crops)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


if __name__ == "__main__":
    main()
