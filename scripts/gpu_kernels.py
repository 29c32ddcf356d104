#!/usr/bin/env python3
"""Where the networks' time goes on the GPU: achieved TFLOP/s and the top kernels of one pass.

    python scripts/gpu_kernels.py WEIGHTS_DIR [--batch 16] [--device cuda]

For GFPGAN (395.5 GFLOP a face) and ParseNet (469 GFLOP a face at 512), in GFPGAN's own forms,
the service's CUDA defaults, those with the StyleGAN decoder channels-last too, those with
ParseNet channels-last and padding from slices, ParseNet without padding passes (border_conv2d),
with its x2 layers as 2x2 convolutions (upsample_conv2d), and with both and channels-last, and
those compiled by torch.compile (the gfpgan-bench variants of those names), bf16: the time of
one pass from CUDA events (median of 5), the TFLOP/s that makes, torch.profiler's kernels by
device time, and that time by kernel family (convolutions, layout changes and copies,
resampling, padding, compiled fusions, the rest): how far each form is from spending its time on
the matrix work. `--trace-dir` also keeps each pass's profile as a Chrome trace (gzip), for
reading after the lease. scripts/gpu_check.py runs it.
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
FORMS = ["plain", "defaults", "defaults+decoder-channels-last", "defaults+parse-channels-last+fast-resample",
         "defaults+parse-border", "defaults+parse-phases", "defaults+parse-channels-last+border+phases",
         "defaults+compile"]
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
    args = parser.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    networks = [n for n in args.networks.split(",") if n]
    if not set(networks) <= set(GFLOP_PER_FACE):
        parser.error(f"--networks takes {', '.join(GFLOP_PER_FACE)}")

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
    rows = []
    for form in forms:
        pipeline = FacePipeline(models.gfpgan.net, models.detector, models.parser, device=device,
                                dtype=dtype, speed=VARIANTS[form])
        for name in networks:
            run = pipeline._fixed[name]  # the pass as a batch runs it (compiled, with --compile)
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
            rows.append((form, name, ms, ms / args.batch, tflops, families))
            print(f"\n### {name}, {form}, batch {args.batch}, {args.dtype}: {ms:.2f} ms "
                  f"({ms / args.batch:.2f} ms a face, {tflops:.0f} TFLOP/s)\n")
            print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                            row_limit=14, max_name_column_width=70))
            print("by family: " + families_line(families))
            if args.trace_dir is not None:
                write_trace(prof, args.trace_dir / f"{name}-{form}.json.gz")
    print("\n| network | form | ms per pass | ms per face | TFLOP/s | device time by kernel family |"
          "\n|---|---|---:|---:|---:|---|")
    for form, name, ms, per_face, tflops, families in rows:
        print(f"| {name} | {form} | {ms:.2f} | {per_face:.2f} | {tflops:.0f} | {families_line(families)} |")


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
