"""How many faces a batch may hold: `--max-batch-faces auto`, sized on the device at start.

On a GPU a batch's memory grows with its faces: GFPGAN's pass of one face holds about 384 MiB
of tensors at its peak (bf16, BENCHMARKS.md "Memory a batch takes"), and the CUDA graphs
captured at warm-up keep the largest bucket's memory for as long as the service runs. Larger
batches are also faster there: on the H200 a compiled batch of 32 gave 1.32-1.36x the faces/s of
a batch of 8. And a lip-sync client sends MuseTalk's realtime batch of 20 faces, which a limit of 8
runs as three batches, one after the other.

So on CUDA `auto` measures the card before the graphs are captured:
- **The passes.** Each network's eager pass whose memory grows with the faces (the restorer,
  ParseNet, RetinaFace) runs at two batch sizes, and a line goes through the largest peak at
  each: a face's bytes, and what a pass takes whatever its size. The passes take turns, and a
  pipeline's graphs share one pool. Each resident model's pipeline has a pool of its own, so a
  ModelRouter adds its models' lines.
- **The graphs' buffers.** The static input and output each graph keeps, for every face of
  every bucket up to the limit, are added to the line.
- **The limit** is the largest graph bucket, at most MAX_NETWORK_FACES, whose line times
  HEADROOM fits in what this process may use: SHARE of the card, less what it already holds
  (the weights), and never more than is free now. Half the card, because a lip-sync GPU also
  runs the lip-sync model, often started after this service.

On the CPU, `auto` is AUTO_CPU, the limit the service always had there: a batch of 8 already
takes seconds on a CPU, and a larger one only comes back later.

Nothing here imports torch at module level: the app imports it with fake pipelines too.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

#: `auto` off CUDA, or for a pipeline that cannot say what its batches take.
AUTO_CPU = 8
#: The most `auto` picks: the networks run in passes of at most this many faces
#: (server.pipeline.MAX_NETWORK_FACES), so past it a batch takes no more memory a pass, and is
#: no faster a face, only later back.
AUTO_MOST = 32
#: The share of the card's memory this process's weights and batches may take at most.
SHARE = 0.5
#: On the measured line: the allocator's rounding, cuDNN's workspaces at the sizes not
#: measured, and the work around the networks (crops, masks, the paste) that the passes don't
#: see. (The graphs' static inputs and outputs are counted, BatchMemory.graph_face.)
HEADROOM = 1.25
#: The batch sizes measured (two points of the line; a batch of 1 is special to torch.compile
#: and to cuDNN's heuristics, so it is not one of them).
MEASURED_SIZES = (2, 4)


@dataclass(frozen=True)
class BatchMemory:
    """What batches of up to `faces` (at most MAX_NETWORK_FACES) take on the device beyond what
    is resident, at their peak: `fixed + per_face * faces`, and, with CUDA graphs captured up to
    that limit, each graph's static input and output: `graph_face` bytes for every face of
    every bucket (graph_buckets(faces): 153 faces of them at a limit of 32)."""

    per_face: float
    fixed: float
    graph_face: float = 0.0

    def at(self, faces: int) -> float:
        from server.speed import graph_buckets

        graphs = self.graph_face * sum(graph_buckets(faces)) if self.graph_face else 0.0
        return self.fixed + self.per_face * faces + graphs

    def __add__(self, other: "BatchMemory") -> "BatchMemory":
        """Two pipelines' batches, each model's graphs in a memory pool of their own (ModelRouter)."""
        return BatchMemory(self.per_face + other.per_face, self.fixed + other.fixed,
                           self.graph_face + other.graph_face)


def choose(need: BatchMemory, budget: float, sizes: list[int]) -> int:
    """The largest of `sizes` (ascending) whose batch, with HEADROOM, fits in `budget` bytes;
    the smallest when none does (a batch of one face must be possible: the batcher halves a
    batch that does not fit, down to one face)."""
    fitting = [b for b in sizes if need.at(b) * HEADROOM <= budget]
    return fitting[-1] if fitting else sizes[0]


def measure_passes(passes: dict[str, Callable[[int], object]], peak_of: Callable[[Callable[[], object]], int],
                   sizes: tuple[int, ...] = MEASURED_SIZES) -> BatchMemory:
    """The line through the largest of the passes' peaks at the smallest and at the largest
    size: the passes take turns, eagerly and as CUDA graph replays alike (a pipeline's graphs
    share one memory pool, FacePipeline._capture_graphs). `passes[name](n)` runs that
    network on n faces; `peak_of(fn)` is the peak bytes fn's tensors took beyond what existed
    before."""
    low, high = min(sizes), max(sizes)
    peaks = {n: max(peak_of(lambda n=n, run=run: run(n)) for run in passes.values()) for n in (low, high)}
    per_face = max(0.0, (peaks[high] - peaks[low]) / (high - low))
    return BatchMemory(per_face=per_face, fixed=max(0.0, peaks[low] - per_face * low))


def peak_meter(device) -> Callable[[Callable[[], object]], int]:
    """How `measure_passes` reads a pass's peak on `device`: the CUDA allocator's own peak
    (each pass run twice, the second measured: the first at a shape also tries cuDNN's
    algorithms, with workspaces it then lets go); elsewhere the tensors the operators make,
    alive at once, cast as CUDA autocast casts (server.profiling.LiveTensors): what a GPU's
    allocator would have to hold for them at the least."""
    import torch

    if device.type == "cuda":
        def cuda_peak(fn) -> int:
            fn()
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - held
        return cuda_peak

    from server.profiling import LiveTensors, cuda_autocast_policy

    def counted_peak(fn) -> int:
        policy = cuda_autocast_policy if device.type == "cpu" else contextlib.nullcontext
        with torch.no_grad(), policy(), LiveTensors() as live:
            fn()
        return live.peak
    return counted_peak


def cuda_budget(device) -> tuple[float, str]:
    """Bytes this process may give its batches on a CUDA device, and how that was worked out."""
    import torch

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    resident = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - resident
    budget = min(SHARE * total - resident, free + cached)
    gib = 2 ** 30
    return budget, (f"{budget / gib:.1f} GiB for batches: {SHARE:.0%} of the card's {total / gib:.1f} GiB "
                    f"less {resident / gib:.1f} GiB resident, {free / gib:.1f} GiB free")


def fit_batch_faces(need: BatchMemory, budget: float, how: str) -> tuple[int, str]:
    """The graph bucket (at most AUTO_MOST) a batch that takes `need` may reach in `budget`
    bytes (worked out as `how` says), and a sentence saying why."""
    from server.speed import graph_buckets

    faces = choose(need, budget, graph_buckets(AUTO_MOST))
    mib = 2 ** 20
    graphs = (f", the graphs' buffers {need.graph_face / mib:.1f} MiB a face of every bucket"
              if need.graph_face else "")
    return faces, (f"{faces} faces: a batch takes {need.per_face / mib:.0f} MiB a face and "
                   f"{need.fixed / mib:.0f} MiB more (measured){graphs}, "
                   f"{need.at(faces) * HEADROOM / mib:.0f} MiB at {faces} with {HEADROOM - 1:.0%} headroom; {how}")


def auto_max_batch_faces(pipeline) -> tuple[int, str]:
    """`--max-batch-faces auto` for `pipeline`: the number, and a sentence saying why. A CUDA
    pipeline with `batch_memory()` (FacePipeline, ModelRouter) is measured on its card."""
    device = getattr(pipeline, "device", None)
    kind = getattr(device, "type", None)
    measure = getattr(pipeline, "batch_memory", None)
    if kind != "cuda" or measure is None:
        where = {"cpu": "the CPU", None: "a pipeline that does not measure its batches"}.get(kind, str(device))
        return AUTO_CPU, f"{AUTO_CPU} faces, auto's value on {where}"
    from server.jobs import DeviceOutOfMemory

    try:
        need = measure()
    except DeviceOutOfMemory as error:
        return 1, f"1 face: {error}"
    return fit_batch_faces(need, *cuda_budget(device))
