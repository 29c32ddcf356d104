"""gfpgan-bench: faces/s and per-batch latency of GFPGANer, our pipeline, and our gRPC service.

Same weights, same faces, one process; prints a Markdown table (optionally to --markdown-out).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import inspect
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

import server.compat  # noqa: F401  (must precede gfpgan/basicsr/facexlib)
import torch

from contract.types import OUTPUT_SIZES, Alignment, EnhanceOptions
from server.jobs import DeviceOutOfMemory, Job
from server.settings import Settings, default_weights_dir
from server.speed import SpeedOptions
from server.steady import VideoState

METHODS = ("GFPGANer, one face at a time", "FacePipeline, in-process", "gRPC service, loopback",
           "gRPC service, client process", "gRPC service, loopback, overlap")
#: --methods' names, in METHODS' order: the service's loopback client runs in the bench's own
#: process (its threads share the interpreter with the server's event loop and the device
#: thread); "service-process" runs it in a child process, as a caller's program would;
#: "service-overlap" is "service" against a server with --overlap-batches on (the others
#: serve with --overlap-batches as given).
METHOD_NAMES = ("gfpganer", "pipeline", "service", "service-process", "service-overlap")
#: The log's label of each service method's batches (METHODS[2:]).
_BATCH_LABELS = {METHODS[2]: "", METHODS[3]: ", client process", METHODS[4]: ", overlap"}


@dataclass
class Measurement:
    method: str
    batch_size: int
    faces_per_s: float
    latencies_ms: list[float]

    def __post_init__(self):
        # One line per cell as soon as it is measured, so a run cut short still leaves numbers.
        print(f"measured: {self.method}, batch {self.batch_size}: {self.faces_per_s:.2f} faces/s, "
              f"p50 {self.percentile(50):.1f} ms", file=sys.stderr, flush=True)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def synthetic_faces(count: int, size: int, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 BGR cartoon faces: skin oval, dark eyes, nose, red mouth."""
    rng = np.random.default_rng(seed)
    faces = np.empty((count, size, size, 3), np.uint8)
    for index in range(count):
        face = np.empty((size, size, 3), np.uint8)
        face[:] = rng.integers(30, 220, size=3)
        centre = np.array([size / 2, size * 0.55]) + rng.uniform(-0.03, 0.03, 2) * size
        cx, cy = (int(v) for v in centre)
        skin = (rng.uniform(90, 150), rng.uniform(130, 180), rng.uniform(180, 230))
        cv2.ellipse(face, (cx, cy), (int(size * 0.3), int(size * 0.4)), 0, 0, 360, skin, -1)
        eye_dx, eye_y = int(size * 0.12), cy - int(size * 0.08)
        for x in (cx - eye_dx, cx + eye_dx):
            cv2.ellipse(face, (x, eye_y), (int(size * 0.05), int(size * 0.022)), 0, 0, 360, (40, 30, 30), -1)
        cv2.circle(face, (cx, cy + int(size * 0.05)), int(size * 0.025), tuple(0.7 * c for c in skin), -1)
        cv2.line(face, (cx - int(size * 0.09), cy + int(size * 0.17)),
                 (cx + int(size * 0.09), cy + int(size * 0.17)), (60, 50, 160), max(2, size // 60))
        noisy = face + rng.normal(0, 3, face.shape)
        faces[index] = cv2.GaussianBlur(np.clip(noisy, 0, 255).astype(np.uint8), (0, 0), 1.0)
    return faces


def faces_from(folder: str, size: int) -> np.ndarray:
    """Every readable image in a folder, resized to size x size (square crops expected)."""
    images = []
    for path in sorted(Path(folder).iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            images.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
    if not images:
        raise SystemExit(f"--faces-from {folder}: no readable images there")
    return np.stack(images)


def _batch(faces: np.ndarray, start: int, size: int) -> np.ndarray:
    """size faces starting at start, wrapping round the pool."""
    return faces[np.arange(start, start + size) % len(faces)]


def _time_batches(run_batch: Callable[[np.ndarray], None], faces: np.ndarray, batch_size: int,
                  iterations: int, seconds: float | None, sync: Callable[[], None],
                  warmup_faces: int | None = None) -> tuple[float, list[float]]:
    """Run batches one after the other; (faces/s, per-batch latencies in ms). The warm-up batch
    (first-call costs are not measured) is `warmup_faces` faces, else a whole batch."""
    run_batch(_batch(faces, 0, warmup_faces or batch_size))
    sync()
    latencies, started = [], time.perf_counter()
    for index in range(iterations):
        t0 = time.perf_counter()
        run_batch(_batch(faces, index * batch_size, batch_size))
        sync()
        latencies.append((time.perf_counter() - t0) * 1000)
        if seconds is not None and time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started
    return len(latencies) * batch_size / elapsed, latencies


# -- (a) GFPGAN's own integration -----------------------------------------------------------------

#: The architectures GFPGANer itself can build (its `arch` argument).
GFPGANER_ARCHS = ("clean", "bilinear", "original", "RestoreFormer")


@contextlib.contextmanager
def _gfpganer(model: str, weights_dir: str, device: torch.device):
    """GFPGANer as usually integrated, on our files, with the checkpoint's own architecture
    (clean, original or RestoreFormer): facexlib reads its weights from ./gfpgan/weights, so it
    is built in a temporary directory of symlinks. GFPGANer always builds the published sizes,
    so a checkpoint of other sizes (the tests' narrow ones) gets its sizes passed to GFPGAN's
    own class."""
    import gfpgan.archs.restoreformer_arch as restoreformer_arch
    import gfpgan.utils

    from server.model import load_restorer
    from server.weights import DETECTION_FILE, PARSING_FILE

    loaded = load_restorer(model, "cpu")
    arch, config = loaded.arch, loaded.config
    saved = {name: getattr(gfpgan.utils, name) for name in ("GFPGANv1Clean", "GFPGANv1")}
    init = restoreformer_arch.RestoreFormer.__init__
    saved_defaults, original_cwd = init.__defaults__, os.getcwd()
    with tempfile.TemporaryDirectory(prefix="gfpgan-bench-") as workdir:
        links = Path(workdir) / "gfpgan" / "weights"
        links.mkdir(parents=True)
        for name in (DETECTION_FILE, PARSING_FILE):
            os.symlink(Path(weights_dir).resolve() / name, links / name)
        try:
            os.chdir(workdir)
            narrow = config.get("narrow", 1)
            for name in ("GFPGANv1Clean", "GFPGANv1"):
                if narrow != 1:
                    cls = saved[name]
                    setattr(gfpgan.utils, name, lambda cls=cls, **kw: cls(**{**kw, "narrow": narrow}))
            if arch == "RestoreFormer":  # GFPGANer calls RestoreFormer() with no arguments
                names = list(inspect.signature(init).parameters)[1:]
                init.__defaults__ = tuple(config.get(n, d) for n, d in zip(names, saved_defaults))
            restorer = gfpgan.utils.GFPGANer(model_path=str(Path(model).resolve()), upscale=1, arch=arch,
                                             channel_multiplier=config.get("channel_multiplier", 2),
                                             device=device)
        finally:
            for name, value in saved.items():
                setattr(gfpgan.utils, name, value)
            init.__defaults__ = saved_defaults
            os.chdir(original_cwd)
        yield restorer


def bench_gfpganer(restorer, faces, batch_sizes, alignment, iterations, seconds, sync) -> list[Measurement]:
    aligned = alignment is Alignment.ALIGNED

    def run_batch(batch):
        for face in batch:  # the usual integration: one face per call
            restorer.enhance(face, has_aligned=aligned, only_center_face=True, paste_back=True)

    # One face warms it: every call is one face, so a batch's first-call costs are the first
    # face's (a whole warm-up batch of 64 was 7 s of an H200 run's budget, measuring nothing).
    return [Measurement(METHODS[0], b, *_time_batches(run_batch, faces, b, iterations, seconds, sync,
                                                      warmup_faces=1))
            for b in batch_sizes]


# -- (b) our pipeline in-process ------------------------------------------------------------------

def _jobs(batch: np.ndarray, options: EnhanceOptions, video) -> list[Job]:
    """One job of `batch`; with steady_video, the next frames of the stream `video`."""
    return [Job(batch, options, video=video if options.steady_video else None)]


def bench_pipeline(pipeline, faces, batch_sizes, options, iterations, seconds, sync) -> list[Measurement]:
    video = VideoState()  # steady_video: the batches are one stream's frames

    def run_batch(batch):
        pipeline.enhance(_jobs(batch, options, video))

    return [Measurement(METHODS[1], b, *_time_batches(run_batch, faces, b, iterations, seconds, sync))
            for b in batch_sizes]


#: --split-jobs: the largest batch as this many jobs of equal parts (those that divide it).
SPLIT_JOBS = (1, 2, 4)


def bench_split_jobs(pipeline, faces, batch_size, options, iterations, seconds, sync) -> str:
    """The same `batch_size` faces as one job, then as 2 and 4 jobs of equal parts (requests
    the batcher put in one device batch), in process: the table, and a log line at once.

    Whether a device batch costs more when it holds several requests. On three H200 runs the
    loopback service's batches of two 32-face requests ran at half the in-process rate of one
    64-face job, while four 16-face requests ran at its rate; the CPU counts the same operators
    and waits for all three splits. Each job is its own request without steady video (a stream's
    frames are one job's)."""
    options = dataclasses.replace(options, steady_video=False)
    rows, cells, base = [], [], None
    for jobs in SPLIT_JOBS:
        if batch_size % jobs:
            continue
        part = batch_size // jobs

        def run_batch(batch, part=part, jobs=jobs):
            pipeline.enhance([Job(batch[k * part:(k + 1) * part], options) for k in range(jobs)])

        rate, latencies = _time_batches(run_batch, faces, batch_size, iterations, seconds, sync)
        base = base or rate
        p50 = float(np.percentile(latencies, 50))
        rows.append(f"| {jobs} | {part} | {rate:.1f} | {rate / base:.2f}x | {p50:.1f} |")
        cells.append(f"{jobs} x {part} {rate:.1f} faces/s ({rate / base:.2f}x), p50 {p50:.1f} ms")
    print(f"split jobs: batch {batch_size}: " + "; ".join(cells), file=sys.stderr, flush=True)
    return "\n".join(["| jobs | faces per job | faces/s | vs one job | p50 ms |", "|---:|---:|---:|---:|---:|",
                      *rows])


# -- (c) our service over loopback gRPC -----------------------------------------------------------

@contextlib.contextmanager
def _loopback_service(pipeline, max_batch_faces: int, overlap_batches: str = "off"):
    """The real server on 127.0.0.1:<free port>, on its own event loop thread, serving `pipeline`."""
    from server.app import FaceEnhanceServer

    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, warmup=False,
                        max_batch_faces=max_batch_faces, max_faces_per_request=max(32, max_batch_faces),
                        max_queue_faces=max(256, 8 * max_batch_faces), drain_grace_s=5.0,
                        overlap_batches=overlap_batches)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-server", daemon=True)
    thread.start()
    app = FaceEnhanceServer(settings, pipeline_factory=lambda _settings: pipeline)

    async def start():
        await app.start()
        await asyncio.wait_for(app.ready.wait(), timeout=60)

    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(90)
        yield f"127.0.0.1:{app.port}"
    finally:
        asyncio.run_coroutine_threadsafe(app.shutdown(grace=1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class _BatchLog:
    """The pipeline as the loopback service sees it, logging each batch the batcher formed: its
    faces, its jobs (requests or parts of them) and the seconds enhance() took (the device work
    and the one download wait). Whether a slow service row is the device or the transport."""

    def __init__(self, pipeline):
        self._pipeline = pipeline
        self.batches: list[tuple[int, int, float]] = []  # (faces, jobs, seconds)
        self.started: list[float] = []  # each batch's time.monotonic() at its start
        #: per method and measured request size: (method, size, its batches, the wall seconds)
        self.per_size: list[tuple[str, int, list[tuple[int, int, float]], float]] = []
        self._last_end = 0.0  # time.perf_counter() when the last batch's results were read

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def enhance(self, jobs):
        return self.start(jobs).result()

    def start(self, jobs):
        """The batch queued (server.jobs.start_batch), its time logged when its results are
        read: from its start, or from the end of the batch before it where it was queued while
        that one computed (overlap), so that no device time counts twice."""
        from server.jobs import start_batch

        at, started = time.monotonic(), time.perf_counter()
        handle = start_batch(self._pipeline, jobs)  # (a batch that raises, as out of memory, is not logged)
        return _LoggedBatch(self, handle, sum(job.faces.shape[0] for job in jobs), len(jobs), at, started)

    def _logged(self, faces: int, jobs: int, at: float, started: float) -> None:
        end = time.perf_counter()
        self.batches.append((faces, jobs, end - max(started, self._last_end)))
        self.started.append(at)
        self._last_end = end

    def measured(self, method: str, size: int, since: float, until: float) -> None:
        """The batches that started between two time.monotonic() readings (the clock is the
        machine's, so a child process's readings work too) were `size`'s, measured by `method`:
        kept for the table, and logged at once, so that a bench step stopped later still tells
        the device from the transport for the sizes it finished."""
        batches = [batch for batch, at in zip(self.batches, self.started) if since <= at <= until]
        self.per_size.append((method, size, batches, until - since))
        if batches:
            _, count, faces_each, jobs_each, ms_batch, ms_face, busy = _batch_row(size, batches, until - since)
            label = _BATCH_LABELS[method]
            print(f"service batches{label}: request {size}: {count} batches of {faces_each} faces "
                  f"and {jobs_each} jobs, {ms_batch} ms a batch ({ms_face} ms a face), "
                  f"pipeline busy {busy}", file=sys.stderr, flush=True)


class _LoggedBatch:
    """_BatchLog.start's handle: the pipeline's, logging the batch when its results are read."""

    def __init__(self, log: _BatchLog, handle, faces: int, jobs: int, at: float, started: float):
        self._log, self._handle = log, handle
        self._batch = (faces, jobs, at, started)

    def result(self):
        results = self._handle.result()
        self._log._logged(*self._batch)
        return results


def service_batches_table(rows: list[tuple[int, list[tuple[int, int, float]], float]]) -> str:
    """rows: (request size, the batches run while it was measured, elapsed seconds)."""
    lines = ["| request faces | batches | faces per batch | jobs per batch | ms per batch | "
             "ms per face | pipeline busy |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for size, batches, elapsed in rows:
        if batches:
            lines.append("| " + " | ".join(_batch_row(size, batches, elapsed)) + " |")
    return "\n".join(lines)


def _batch_row(size: int, batches: list[tuple[int, int, float]], elapsed: float) -> list[str]:
    """One row of the service batches table: the request size, how many batches, faces and
    jobs a batch, ms a batch and a face, and the share of the wall time enhance() was busy."""
    faces = sum(f for f, _, _ in batches)
    busy = sum(s for _, _, s in batches)
    return [str(size), str(len(batches)), f"{faces / len(batches):.1f}",
            f"{sum(j for _, j, _ in batches) / len(batches):.1f}", f"{busy / len(batches) * 1000:.1f}",
            f"{busy / faces * 1000:.2f}", f"{min(1.0, busy / elapsed):.0%}"]


def _time_service(client, faces, size, iterations, seconds, in_flight) -> tuple[float, list[float], float, float]:
    """`iterations` requests of `size` faces (fewer once `seconds` passed), `in_flight` on the
    wire at once, after one untimed; (faces/s, latencies in ms, time.monotonic() at the start
    and at the end)."""
    outcome = client.enhance(_batch(faces, 0, size))  # warm-up, and a check that it is served
    if outcome.fell_back:
        raise RuntimeError(f"the loopback service did not answer: {outcome.fallback_reason} "
                           f"{outcome.extra.get('fallback_detail', '')}")
    latencies, window = [], threading.Semaphore(in_flight)
    lock = threading.Lock()
    fell_back = []

    def done(future, t0):
        with lock:
            latencies.append((time.perf_counter() - t0) * 1000)
            fell_back.append(future.result().fell_back)
        window.release()

    since, started, futures = time.monotonic(), time.perf_counter(), []
    for index in range(iterations):
        window.acquire()  # keep `in_flight` batches on the wire, no more
        t0 = time.perf_counter()
        future = client.submit(_batch(faces, index * size, size))
        future.add_done_callback(lambda f, t0=t0: done(f, t0))
        futures.append(future)
        if seconds is not None and time.perf_counter() - started >= seconds:
            break
    for future in futures:
        future.result()
    elapsed, until = time.perf_counter() - started, time.monotonic()
    if any(fell_back):
        raise RuntimeError("the loopback service fell back during the run; raise --timeout")
    return len(futures) * size / elapsed, list(latencies), since, until


def bench_service(address, faces, batch_sizes, options, iterations, seconds, in_flight,
                  log: _BatchLog | None = None, method: str = METHODS[2]) -> list[Measurement]:
    """The client in this process; `log`: the service's pipeline, wrapped (each size's batches
    go into its `per_size` and the log); `method`: the rows' name (METHODS[4]: the server
    overlaps batches)."""
    from client.sync import FaceEnhanceClient

    results = []
    with FaceEnhanceClient(address, options=options, timeout_ms=600_000, max_in_flight=in_flight) as client:
        for b in batch_sizes:
            rate, latencies, since, until = _time_service(client, faces, b, iterations, seconds, in_flight)
            if log is not None:
                log.measured(method, b, since, until)
            results.append(Measurement(method, b, rate, latencies))
    return results


def _client_process(connection, address, faces, batch_sizes, options, iterations, seconds, in_flight) -> None:
    """The child process of bench_service_process: each size's (faces/s, latencies, start,
    end), or the error that stopped it, sent back over `connection`."""
    try:
        from client.sync import FaceEnhanceClient

        with FaceEnhanceClient(address, options=options, timeout_ms=600_000, max_in_flight=in_flight) as client:
            connection.send([(b, *_time_service(client, faces, b, iterations, seconds, in_flight))
                             for b in batch_sizes])
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        connection.send(f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


def bench_service_process(address, faces, batch_sizes, options, iterations, seconds, in_flight,
                          log: _BatchLog | None = None, timeout_s: float = 1800.0) -> list[Measurement]:
    """The same requests as bench_service, from a client in a child process (spawned: a fresh
    interpreter, as a caller's program is). Its rows beside bench_service's tell what sharing
    one interpreter with the server costs the loopback rows."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_client_process, name="bench-client",
                            args=(send, address, faces, list(batch_sizes), options, iterations, seconds,
                                  in_flight), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise RuntimeError(f"the client process sent nothing in {timeout_s:.0f} s")
        answer = receive.recv()
    except EOFError:
        answer = f"the client process ended (exit {child.exitcode}) without an answer"
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    if isinstance(answer, str):
        raise RuntimeError(f"the client process failed: {answer}")
    results = []
    for b, rate, latencies, since, until in answer:
        if log is not None:
            log.measured(METHODS[3], b, since, until)
        results.append(Measurement(METHODS[3], b, rate, latencies))
    return results


# -- (d) where the time goes, speed variants, memory ---------------------------------------------

_CPU_DEFAULTS = SpeedOptions(modconv="unfused", channels_last=True, decoder_channels_last=True, fold_norms=True,
                             gfpgan_forward="lean", parse_channels_last=True, parse_padding="border",
                             parse_upsample="phases", resample_dtype="compute", modulate_dtype="compute")
#: The service's CUDA forms run eagerly: the CPU's forms, with CUDA graphs, fixed-size
#: selection and wait-free detection (the CUDA defaults until 555f2d3, 2026-11-30, when the
#: defaults began compiling them; wait-free detection since 2026-12-01)
_CUDA_EAGER = dataclasses.replace(_CPU_DEFAULTS, cuda_graphs=True, fixed_selection=True, fixed_detection=True)
#: The service's CUDA defaults: those forms compiled by torch.compile, inside the graphs
_CUDA_DEFAULTS = dataclasses.replace(_CUDA_EAGER, compile=True)
#: ... and before 2026-11-30, what every H200 run until then called "defaults": the decoder and
#: ParseNet in their own NCHW forms, ParseNet with its padding passes and upsampled copies
_CUDA_BEFORE = dataclasses.replace(_CUDA_EAGER, decoder_channels_last=False, parse_channels_last=False,
                                   parse_padding="reflect", parse_upsample="nearest", fixed_detection=False)
#: The speed forms `--variants` compares, each against "plain" (GFPGAN's own forms) in one run.
#: "defaults" is what the service runs on CUDA; "eager" the same forms uncompiled, which the
#: H200 runs until 2026-11-30 called "defaults" ("eager+X" was "defaults+X" there, and
#: "defaults+X" now was "defaults+X+compile").
VARIANTS = {
    "plain": SpeedOptions(),
    "fold-norms": SpeedOptions(fold_norms=True),
    "lean": SpeedOptions(gfpgan_forward="lean"),
    "fast-resample": SpeedOptions(resample="fast"),
    "bf16-activations": SpeedOptions(activations="compute"),
    # the service's CUDA defaults (Settings.speed_options("cuda") where Triton can build)
    "defaults": _CUDA_DEFAULTS,
    # ... uncompiled (the service's CUDA forms where Triton cannot build, or --compile off)
    "eager": _CUDA_EAGER,
    # ... and before the third H200 run (2026-11-30) made the decoder and ParseNet channels-last
    # and took ParseNet's padding passes and upsampled copies away
    "eager-before": _CUDA_BEFORE,
    # ... the eager forms with either of those two changes undone: what each adds to the other
    "eager+decoder-nchw": dataclasses.replace(_CUDA_EAGER, decoder_channels_last=False),
    "eager+parse-own-forms": dataclasses.replace(_CUDA_EAGER, parse_channels_last=False,
                                                 parse_padding="reflect", parse_upsample="nearest"),
    # ... resampling bf16 maps in float32, as CUDA autocast does (the defaults before 2026-11-29)
    "eager+autocast-resample": dataclasses.replace(_CUDA_EAGER, resample_dtype="autocast"),
    # ... the style modulation writing float32 for autocast to cast (the defaults before 2026-11-30)
    "eager+autocast-modulate": dataclasses.replace(_CUDA_EAGER, modulate_dtype="autocast"),
    # ... detecting with the two waits for the device (the threshold's selection and the NMS),
    # as before 2026-12-01
    "eager+waiting-detection": dataclasses.replace(_CUDA_EAGER, fixed_detection=False),
    "eager+fast-resample": dataclasses.replace(_CUDA_EAGER, resample="fast"),
    # ... GFPGAN's x2 layers as phase convolutions of their input (no upsampled map); with the
    # fast resampling and bf16 activations too, for the x2 and x0.5 resamplings left
    "eager+gfpgan-phases": dataclasses.replace(_CUDA_EAGER, gfpgan_upsample="phases"),
    "all-forms+gfpgan-phases": dataclasses.replace(_CUDA_EAGER, resample="fast", activations="compute",
                                                   gfpgan_upsample="phases"),
    "eager+bf16-activations": dataclasses.replace(_CUDA_EAGER, activations="compute"),
    "all-forms": dataclasses.replace(_CUDA_EAGER, resample="fast", activations="compute"),
    "eager+box": dataclasses.replace(_CUDA_EAGER, paste_mask="box"),
    "plain+box": SpeedOptions(paste_mask="box"),
    # the service's CPU defaults now (Settings.speed_options("cpu")), and the CPU's before them
    # (GFPGAN's fused convolution, everything NCHW, ParseNet's own padding and x2 layers)
    "cpu": _CPU_DEFAULTS,
    "fold-norms+lean": SpeedOptions(fold_norms=True, gfpgan_forward="lean"),
    # torch.compile (Inductor) of GFPGAN's and ParseNet's passes: alone (any device), and inside
    # the CUDA graphs
    "lean+compile": SpeedOptions(modconv="unfused", fold_norms=True, gfpgan_forward="lean", compile=True),
    # ... the CPU defaults compiled: the CUDA defaults' network forms (ParseNet's border and
    # phases, channels-last) without CUDA graphs, so the CPU rehearsal compiles what a GPU does
    "cpu+compile": dataclasses.replace(_CPU_DEFAULTS, compile=True),
    "all-forms+compile": dataclasses.replace(_CUDA_DEFAULTS, resample="fast", activations="compute"),
    # ... GFPGAN's x2 layers as phases, compiled: no upsampled map for Inductor to write either
    "defaults+gfpgan-phases": dataclasses.replace(_CUDA_DEFAULTS, gfpgan_upsample="phases"),
    # ... ParseNet in its own forms (NCHW, its padding passes and x2 copies), compiled: the eager
    # choice of its forms need not be the compiled one (Inductor fuses the padding and the copies)
    "defaults+parse-own-forms": dataclasses.replace(_CUDA_DEFAULTS, parse_channels_last=False,
                                                    parse_padding="reflect", parse_upsample="nearest"),
    # ... with the box paste mask: no ParseNet (DETECT's other target, 800 faces/s on an H100)
    "defaults+box": dataclasses.replace(_CUDA_DEFAULTS, paste_mask="box"),
    # ... detecting with the two waits for the device, as before 2026-12-01
    "defaults+waiting-detection": dataclasses.replace(_CUDA_DEFAULTS, fixed_detection=False),
    # ... RetinaFace compiled too (the defaults leave it eager)
    "defaults+compiled-detector": dataclasses.replace(_CUDA_DEFAULTS, compile_detector=True),
    # ... and the CPU's forms compiled with it (the CPU rehearsal)
    "cpu+compiled-detector+compile": dataclasses.replace(_CPU_DEFAULTS, compile=True, compile_detector=True),
    # ... with bf16 activations (counted compiled, the same bytes as the defaults: BENCHMARKS.md)
    "defaults+bf16-activations": dataclasses.replace(_CUDA_DEFAULTS, activations="compute"),
}


def profile_stages(pipeline, faces, batch_sizes, options, iterations, sync) -> str:
    """Per-stage device time (median over `iterations` batches), operators and syncs per batch."""
    from server.profiling import StageProfiler

    sections = []
    for b in batch_sizes:
        batch, video = _batch(faces, 0, b), VideoState()  # steady_video: one stream's frames
        pipeline.enhance(_jobs(batch, options, video))  # warm: caches and autotuning out of the numbers
        counting = StageProfiler(pipeline.device, count=True)
        pipeline.profiler = counting
        try:
            pipeline.enhance(_jobs(batch, options, video))
            timing = StageProfiler(pipeline.device)
            pipeline.profiler = timing
            for index in range(iterations):
                pipeline.enhance(_jobs(_batch(faces, index * b, b), options, video))
            sync()
        finally:
            pipeline.profiler = None
        counts, times = counting.per_batch_counts(), timing.median_ms()
        moved = counting.per_batch_bytes()
        stages = [name for name in STAGES if name in counts or name in times]
        stages += sorted((set(counts) | set(times)) - set(stages))
        lines = [f"batch {b}, {options.alignment.value}, {pipeline.speed.describe()}:", "",
                 "| stage | ms per batch (median) | operators | syncs | MB moved |", "|---|---:|---:|---:|---:|"]
        for name in stages:
            ops, syncs = counts.get(name, (0, 0))
            lines.append(f"| {name} | {times.get(name, 0.0):.2f} | {ops:.0f} | {syncs:.0f} "
                         f"| {moved.get(name, 0.0) / 1e6:.1f} |")
        ops, syncs = counting.totals()
        lines.append(f"| **total** | {sum(times.values()):.2f} | {ops:.0f} | {syncs:.0f} "
                     f"| {sum(moved.values()) / 1e6:.1f} |")
        sources = ", ".join(f"{op} {n:g}" for op, n in sorted(counting.sync_sources().items()))
        lines.append("")
        lines.append(f"syncs from: {sources or 'none'}"
                     + (f"; CUDA sync debug mode counted {counting.cuda_syncs}" if pipeline.device.type == "cuda" else ""))
        if pipeline.graphed:
            lines.append(f"{', '.join(pipeline.graphed)} ran as CUDA graph replays: the operators, bytes and "
                         "syncs inside a replay are not seen (scripts/gpu_kernels.py counts the "
                         "networks' bytes)")
        compiled = [name for name, on in (("gfpgan and parse", getattr(pipeline.speed, "compile", False)),
                                          ("detect", getattr(pipeline.speed, "compile_detector", False))) if on]
        if compiled:
            lines.append("compiled passes run eagerly while operators are counted (the counting "
                         "dispatch mode is not what their graphs were made for): the "
                         f"{' and '.join(compiled)} operators are the eager form's, the times the compiled form's")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


#: Stage names in pipeline order (server/pipeline.py).
STAGES = ("upload", "detect", "align", "warp", "gfpgan", "parse", "paste", "blend", "download")


def _log_compile_checks(pipeline, what: str) -> None:
    """What each compiled pass's check against the eager passes measured at warm-up
    (FacePipeline.compile_checks), one line each: the GPU check keeps them in its summary."""
    for network, text in sorted(getattr(pipeline, "compile_checks", {}).items()):
        print(f"compile check: {what}, {network}: {text}", file=sys.stderr, flush=True)


def _compiled_eager_calls(pipeline) -> int:
    count = getattr(pipeline, "compiled_eager_calls", None)
    return count() if count is not None else 0


def bench_variants(pipeline, faces, batch_sizes, alignments, names, iterations, seconds, sync) -> str:
    """faces/s of each speed variant at each batch size, side by side with "plain" (or, without
    it, the first variant named). Off CUDA a variant with CUDA graphs runs its network forms
    without them, and its rows say so (the CPU rehearsal runs what the GPU's variants run,
    less the graphs)."""
    rows, failures = {}, {}
    original = pipeline.speed
    graphless = pipeline.device.type != "cuda"

    def label(variant: str) -> str:
        return f"{variant} (no CUDA graphs off CUDA)" if graphless and VARIANTS[variant].cuda_graphs else variant

    try:
        for variant in names:
            speed, name = VARIANTS[variant], label(variant)
            if speed.cuda_graphs and graphless:
                speed = dataclasses.replace(speed, cuda_graphs=False)
            try:
                pipeline.set_speed(speed)
                started = time.perf_counter()
                pipeline.warmup()
                # graphs captured, a compiled form built (or loaded from Inductor's cache)
                print(f"warmed up: variant {name} in {time.perf_counter() - started:.1f} s",
                      file=sys.stderr, flush=True)
                _log_compile_checks(pipeline, f"variant {name}")
                if getattr(pipeline, "fallbacks", None):  # the form asked for is not what would run
                    raise RuntimeError("; ".join(pipeline.fallbacks))
                eager_before = _compiled_eager_calls(pipeline)
                for alignment in alignments:
                    options = EnhanceOptions(alignment=alignment)
                    for b in batch_sizes:
                        rate, latencies = _time_batches(lambda batch: pipeline.enhance([Job(batch, options)]),
                                                        faces, b, iterations, seconds, sync)
                        rows[name, alignment.value, b] = (rate, statistics.median(latencies))
                        eager = _compiled_eager_calls(pipeline) - eager_before
                        if eager:
                            raise RuntimeError(f"compiled passes ran eagerly {eager} times (see the "
                                               f"log): not the compiled form's speed")
                        print(f"measured: variant {name}, {alignment.value}, batch {b}: {rate:.2f} faces/s",
                              file=sys.stderr, flush=True)
            except Exception as error:  # one broken form must not hide the others' numbers
                rows[name, "failed", 0] = (float("nan"), float("nan"))
                failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    finally:
        pipeline.set_speed(original)
    reference = "plain" if "plain" in names else label(names[0])  # what the ratios are against
    lines = [f"| variant | alignment | batch | faces/s | vs {reference} | p50 ms |", "|---|---|---:|---:|---:|---:|"]
    for (name, alignment, b), (rate, p50) in rows.items():
        if alignment == "failed":
            lines.append(f"| {name} | failed: {failures[name]} | | | | |")
            continue
        base = rows.get((reference, alignment, b))
        shown = f"{rate:.1f}" if rate >= 10 else f"{rate:.3g}"
        lines.append(f"| {name} | {alignment} | {b} | {shown} | "
                     f"{f'{rate / base[0]:.2f}x' if base else '-'} | {p50:.1f} |")
    return "\n".join(lines)


def bench_memory(pipeline, faces, batch_sizes, options, largest_probe: int) -> str:
    """Peak device memory of one batch at each size, and the largest batch (doubling) that fits.
    Off CUDA, the peak of the tensors a batch makes, counted (counted_memory)."""
    if pipeline.device.type != "cuda":
        return counted_memory(pipeline, faces, batch_sizes, options)
    device = pipeline.device
    # "for the batch": the peak over what the process held before it (the weights, and in a
    # bench process of many reports also GFPGANer's and other pipelines'), which is what the
    # batch itself needs
    lines = ["| batch | peak allocated MiB | for the batch MiB | peak reserved MiB |", "|---:|---:|---:|---:|"]
    fits = 0
    sizes = sorted(set(batch_sizes))
    size = sizes[-1]
    while size < largest_probe:
        size *= 2
        sizes.append(min(size, largest_probe))
    for b in sizes:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        try:
            pipeline.enhance([Job(_batch(faces, 0, b), options)])
            torch.cuda.synchronize(device)
        except (torch.OutOfMemoryError, DeviceOutOfMemory):  # the pipeline's word for it, or torch's
            lines.append(f"| {b} | out of memory | | |")
            break
        fits = b
        peak = torch.cuda.max_memory_allocated(device)
        lines.append(f"| {b} | {peak / 2**20:.0f} | {(peak - held) / 2**20:.0f} | "
                     f"{torch.cuda.max_memory_reserved(device) / 2**20:.0f} |")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    lines.append("")
    lines.append(f"largest batch that ran: {fits} faces ({options.alignment.value}, "
                 f"{pipeline.speed.describe()}, {total:.0f} GiB card)")
    if hasattr(pipeline, "batch_memory"):
        from server.memory import auto_max_batch_faces

        # in this process, beside what the bench holds: the service measures at its start
        lines.append(f"--max-batch-faces auto here: {auto_max_batch_faces(pipeline)[1]}")
    return "\n".join(lines)


#: Device memory the counted estimate is given for: an H100's 80 GiB, a 24 GiB desk card, a 12 GiB one.
CARDS_GIB = (80, 24, 12)


def counted_memory(pipeline, faces, batch_sizes, options) -> str:
    """The peak bytes of the tensors one batch makes, alive at once (server.profiling.LiveTensors),
    at each size; on the CPU its operators cast as CUDA autocast does (cuda_autocast_policy),
    so the tensors are a GPU's. A face's share is the slope between the smallest and largest
    batch; with the weights it gives about how many faces a batch of a card could take: fewer,
    for the scratch memory (cuDNN's workspaces) and caching a device's allocator adds; more
    past MAX_NETWORK_FACES, where the networks run in passes and a face adds less."""
    from server.pipeline import MAX_NETWORK_FACES
    from server.profiling import LiveTensors, cuda_autocast_policy, tensor_bytes

    nets = [net for net in (pipeline.gfpgan, pipeline.parser, pipeline.detector.net)
            if isinstance(net, torch.nn.Module)]
    weights = sum(tensor_bytes(t) for net in nets for t in [*net.parameters(), *net.buffers()])
    lines = ["| batch | peak tensors MiB (counted) | MiB a face |", "|---:|---:|---:|"]
    peaks = {}
    policy = cuda_autocast_policy if pipeline.device.type == "cpu" else contextlib.nullcontext
    for b in sorted(set(batch_sizes)):
        with policy(), LiveTensors() as live:
            pipeline.enhance([Job(_batch(faces, 0, b), options)])
        peaks[b] = live.peak
        lines.append(f"| {b} | {live.peak / 2**20:.0f} | {live.peak / b / 2**20:.0f} |")
    lines.append("")
    sizes = sorted(peaks)
    if len(sizes) > 1:
        face = (peaks[sizes[-1]] - peaks[sizes[0]]) / (sizes[-1] - sizes[0])
        fixed = peaks[sizes[0]] - sizes[0] * face
        holds = ", ".join(f"{int((gib * 2**30 - weights - fixed) // face)} faces on {gib} GiB"
                          for gib in CARDS_GIB)
        lines.append(f"a face adds {face / 2**20:.0f} MiB; with the weights ({weights / 2**20:.0f} MiB), a "
                     f"batch at that rate takes about {holds} ({options.alignment.value}, "
                     f"{pipeline.speed.describe()})")
    if hasattr(pipeline, "batch_memory"):
        from server.memory import SHARE, fit_batch_faces

        need = pipeline.batch_memory()
        chosen = [f"{fit_batch_faces(need, SHARE * gib * 2**30 - weights, '')[0]} faces on {gib} GiB"
                  for gib in CARDS_GIB]
        graphs = (f"; the graphs' buffers {need.graph_face / 2**20:.1f} MiB a face of every bucket"
                  if need.graph_face else "")
        lines.append(f"--max-batch-faces auto by the networks' passes counted the same way "
                     f"({need.per_face / 2**20:.0f} MiB a face and {need.fixed / 2**20:.0f} MiB more{graphs}): "
                     f"{', '.join(chosen)}")
    lines.append(f"counted on {pipeline.device.type}: the tensors the batch's operators make, alive at "
                 "once, cast as CUDA autocast casts; a device's allocator adds scratch memory (cuDNN's "
                 f"workspaces) and caching, and past {MAX_NETWORK_FACES} faces the networks run in passes")
    return "\n".join(lines)


# -- report ---------------------------------------------------------------------------------------

def markdown_table(measurements: list[Measurement]) -> str:
    """One row per method and batch size. "vs GFPGANer" is against GFPGANer's rate at the same
    batch size, or, where it was not timed at that size (--gfpganer-batch-sizes), at the largest
    size below that it was timed at, marked with that size: its loop is one face at a time."""
    baseline = {m.batch_size: m.faces_per_s for m in measurements if m.method == METHODS[0]}
    lines = ["| method | batch | faces/s | vs GFPGANer | latency mean ms | p50 ms | p95 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in sorted(measurements, key=lambda m: (METHODS.index(m.method), m.batch_size)):
        below = [b for b in baseline if b <= m.batch_size]
        ratio = "-"
        if below:
            against = max(below)
            ratio = f"{m.faces_per_s / baseline[against]:.2f}x" + ("" if against == m.batch_size
                                                                  else f" (at {against})")
        lines.append(f"| {m.method} | {m.batch_size} | {m.faces_per_s:.2f} | {ratio} | "
                     f"{statistics.fmean(m.latencies_ms):.1f} | {m.percentile(50):.1f} | "
                     f"{m.percentile(95):.1f} | {m.percentile(99):.1f} |")
    return "\n".join(lines)


def header(argv: Sequence[str], device: torch.device, dtype: torch.dtype, model: str, faces: np.ndarray,
           options: EnhanceOptions) -> str:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                  f"{torch.get_num_threads()} torch threads)"
    return "\n".join([
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `gfpgan-bench {shlex.join(argv)}`",
        f"- device: {machine}; pipeline dtype {str(dtype).removeprefix('torch.')} "
        "(GFPGANer always float32)",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- model: {model}; {len(faces)} distinct {faces.shape[1]}x{faces.shape[1]} faces, "
        f"alignment {options.alignment.value}, output {options.output_size}",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gfpgan-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="the restorer: a checkpoint or a known id (gfpgan-1.4, "
                        "gfpgan-1.3, gfpgan-1.2, gfpgan-1, restoreformer); several, comma-separated, give a "
                        "report per model (default <weights-dir>/GFPGANv1.4.pth)")
    parser.add_argument("--enable-codeformer", action="store_true",
                        help="allow --model codeformer (S-Lab licence, non-commercial use only)")
    parser.add_argument("--weights-dir", default=default_weights_dir(),
                        help="folder of the detection and parsing weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="our pipeline's dtype: auto, float32, bfloat16")
    parser.add_argument("--alignment", default="detect", choices=["detect", "aligned"])
    parser.add_argument("--steady-video", action="store_true",
                        help="the in-process pipeline's and the service's requests as one video's "
                             "frames (steady_video: the MuseTalk adapter's default), each batch "
                             "the next frames of one stream")
    parser.add_argument("--batch-sizes", default="1,4,8", help="comma-separated, default 1,4,8")
    parser.add_argument("--gfpganer-batch-sizes", default=None,
                        help="time GFPGANer at these of the batch sizes only (default: all). Its loop "
                             "is one face at a time, so its rate does not depend on the batch: the "
                             "other sizes are compared with its rate at the nearest size timed below "
                             "(a batch of 64 is 7 s of a GPU run's time)")
    parser.add_argument("--iterations", type=int, default=10, help="timed batches per cell, default 10")
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop a cell early after this many seconds (at least one batch runs)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help="batches in flight towards the service, default 4")
    parser.add_argument("--overlap-batches", default="off", choices=["on", "off"],
                        help="the loopback service's --overlap-batches for the service and "
                             "service-process methods (service-overlap: always on)")
    parser.add_argument("--face-size", type=int, default=256, help="input crop side, default 256")
    parser.add_argument("--output-size", type=int, default=256, choices=OUTPUT_SIZES)
    parser.add_argument("--faces-from", default=None, help="folder of face crops (else synthetic faces)")
    parser.add_argument("--faces", type=int, default=16, help="synthetic faces to cycle through, default 16")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading weights")
    parser.add_argument("--markdown-out", default=None, help="also write the report to this file")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help="which of gfpganer, pipeline, service (its client in this process), "
                             "service-process (its client in a child process) and service-overlap "
                             "(service, the server with --overlap-batches on) to time (default all)")
    parser.add_argument("--modconv", default="auto", choices=["auto", "fused", "unfused"],
                        help="our pipeline's speed forms, as gfpgan-serve takes them (default: "
                             "the service's defaults)")
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--paste-mask", default="parse", choices=["parse", "box"])
    parser.add_argument("--resample", default="torch", choices=["torch", "fast"])
    parser.add_argument("--resample-dtype", default="auto", choices=["auto", "autocast", "compute"])
    parser.add_argument("--modulate-dtype", default="auto", choices=["auto", "autocast", "compute"])
    parser.add_argument("--activations", default="promote", choices=["promote", "compute"])
    parser.add_argument("--fold-norms", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--gfpgan-forward", default="auto", choices=["auto", "gfpgan", "lean"])
    parser.add_argument("--fixed-selection", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--fixed-detection", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--parse-channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--parse-padding", default="auto", choices=["auto", "reflect", "border"])
    parser.add_argument("--parse-upsample", default="auto", choices=["auto", "nearest", "phases"])
    parser.add_argument("--gfpgan-upsample", default="auto", choices=["auto", "resample", "phases"])
    parser.add_argument("--decoder-channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile-detector", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--split-jobs", action="store_true",
                        help="also time the largest batch size as 1, 2 and 4 jobs (requests) of "
                             "equal parts in one device batch, in process: whether a batch costs "
                             "more when it holds several requests")
    parser.add_argument("--profile", action="store_true",
                        help="also report time, operators (about one kernel launch each) and host "
                             "syncs per stage and per batch")
    parser.add_argument("--variants", default=None,
                        help=f"also compare speed variants side by side: comma-separated names of "
                             f"{', '.join(VARIANTS)} (or 'all')")
    parser.add_argument("--variant-alignments", default=None,
                        help="alignments for --variants (default: --alignment), e.g. aligned,detect")
    parser.add_argument("--memory", type=int, default=0, metavar="LARGEST",
                        help="also measure peak device memory per batch size, doubling up to "
                             "LARGEST faces or the first out-of-memory, on CUDA; elsewhere count "
                             "the peak of the tensors a batch makes at the given sizes")
    return parser


def _batch_sizes(parser, text: str, flag: str = "--batch-sizes") -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"{flag}: expected numbers like 1,4,8; got {text!r}")
    if not sizes or min(sizes) < 1:
        parser.error(f"{flag}: expected positive numbers like 1,4,8; got {text!r}")
    return sizes


class Loaded:
    """Networks kept loaded between reports (server/bench_plan.py runs many in one process): a
    pipeline per model, weights, device and dtype, switched to each report's speed forms, and
    GFPGANer per model and device. Without one, each report loads its own."""

    def __init__(self):
        self._pipelines: dict[tuple, object] = {}
        self._gfpganers: dict[tuple, object] = {}
        self._stack = contextlib.ExitStack()

    def pipeline(self, settings: Settings):
        """The pipeline `settings` describe, in their speed forms, its CUDA graphs for batches up
        to settings.max_batch_faces captured (kept as they are when nothing changed)."""
        from server.pipeline import build_pipeline

        key = (settings.model, settings.weights_dir, settings.device, settings.dtype,
               settings.no_download, settings.enable_codeformer)
        pipeline = self._pipelines.get(key)
        if pipeline is None:
            pipeline = self._pipelines[key] = build_pipeline(settings)
        speed = settings.speed_options(pipeline.device.type)
        if pipeline.speed != speed:  # a compiled form compiles again at warm-up
            pipeline.set_speed(speed)
        pipeline.set_graph_max_batch(settings.max_batch_faces)
        return pipeline

    @contextlib.contextmanager
    def gfpganer(self, model: str, weights_dir: str, device: torch.device):
        key = (model, weights_dir, str(device))
        if key not in self._gfpganers:
            self._gfpganers[key] = self._stack.enter_context(_gfpganer(model, weights_dir, device))
        yield self._gfpganers[key]

    def close(self) -> None:
        self._stack.close()
        self._pipelines.clear()
        self._gfpganers.clear()


class _Fresh(Loaded):
    """Load for one report and let go after it (gfpgan-bench on its own)."""

    def pipeline(self, settings: Settings):
        from server.pipeline import build_pipeline

        return build_pipeline(settings)

    def gfpganer(self, model: str, weights_dir: str, device: torch.device):
        return _gfpganer(model, weights_dir, device)


def run(argv: Sequence[str] | None = None, loaded: Loaded | None = None) -> str:
    """Run the three benchmarks and print (and return) the Markdown report. `loaded`: networks
    kept from an earlier report of the same process (server/bench_plan.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = _batch_sizes(parser, args.batch_sizes)
    args.gfpganer_sizes = sizes if args.gfpganer_batch_sizes is None else \
        _batch_sizes(parser, args.gfpganer_batch_sizes, "--gfpganer-batch-sizes")
    if not set(args.gfpganer_sizes) <= set(sizes) or min(args.gfpganer_sizes) > min(sizes):
        parser.error(f"--gfpganer-batch-sizes: some of --batch-sizes, the smallest included; got "
                     f"{args.gfpganer_batch_sizes!r} of {args.batch_sizes!r}")
    if args.iterations < 1 or args.in_flight < 1:
        parser.error("--iterations and --in-flight must be at least 1")
    options = EnhanceOptions(output_size=args.output_size, alignment=Alignment(args.alignment),
                             steady_video=args.steady_video)
    faces = (faces_from(args.faces_from, args.face_size) if args.faces_from
             else synthetic_faces(args.faces, args.face_size))

    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    if not methods <= set(METHOD_NAMES):
        parser.error(f"--methods: expected some of {', '.join(METHOD_NAMES)}, got {args.methods!r}")
    variants = list(VARIANTS) if args.variants == "all" else \
        [v.strip() for v in (args.variants or "").split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    models = [m.strip() for m in args.model.split(",") if m.strip()] or [""]
    sections = []
    for model in models:
        sections += _report(args, parser, argv, model, sizes, options, faces, methods, variants,
                            titled=len(models) > 1, loaded=loaded or _Fresh())
    report = "\n\n".join(sections) + "\n"
    print(report)
    if args.markdown_out:
        Path(args.markdown_out).write_text(report)
    return report


def _report(args, parser, argv, model, sizes, options, faces, methods, variants, titled,
            loaded: Loaded) -> list[str]:
    """The sections of one model's report."""
    try:
        settings = Settings(model=model, weights_dir=args.weights_dir, device=args.device,
                            dtype=args.dtype, no_download=args.no_download, metrics_port=0,
                            max_batch_faces=min(1024, max(8, max(sizes))), modconv=args.modconv,
                            cuda_graphs=args.cuda_graphs, channels_last=args.channels_last,
                            paste_mask=args.paste_mask, resample=args.resample,
                            resample_dtype=args.resample_dtype, modulate_dtype=args.modulate_dtype,
                            activations=args.activations, fold_norms=args.fold_norms,
                            gfpgan_forward=args.gfpgan_forward, fixed_selection=args.fixed_selection,
                            fixed_detection=args.fixed_detection,
                            parse_channels_last=args.parse_channels_last, parse_padding=args.parse_padding,
                            parse_upsample=args.parse_upsample, gfpgan_upsample=args.gfpgan_upsample,
                            decoder_channels_last=args.decoder_channels_last, compile=args.compile,
                            compile_detector=args.compile_detector, enable_codeformer=args.enable_codeformer)
    except ValueError as error:
        parser.error(str(error))

    pipeline = loaded.pipeline(settings)  # downloads missing weights unless --no-download
    pipeline.warmup()
    _log_compile_checks(pipeline, "the service's forms")
    device = pipeline.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    measurements: list[Measurement] = []
    log = _BatchLog(pipeline)
    gfpganer_note = ""
    if "gfpganer" in methods and pipeline.info.arch not in GFPGANER_ARCHS:
        gfpganer_note = (f"\n- GFPGANer: not run, it has no arch {pipeline.info.arch!r} (its own are "
                         f"{', '.join(GFPGANER_ARCHS)})")
    elif "gfpganer" in methods:
        with loaded.gfpganer(settings.model, settings.weights_dir, device) as restorer:
            measurements += bench_gfpganer(restorer, faces, args.gfpganer_sizes, options.alignment,
                                           args.iterations, args.seconds, sync)
        del restorer
    if "pipeline" in methods:
        measurements += bench_pipeline(pipeline, faces, sizes, options, args.iterations, args.seconds, sync)
    if methods & {"service", "service-process"}:
        with _loopback_service(log, max(8, max(sizes)), args.overlap_batches) as address:
            if "service" in methods:
                measurements += bench_service(address, faces, sizes, options, args.iterations, args.seconds,
                                              args.in_flight, log)
            if "service-process" in methods:
                measurements += bench_service_process(address, faces, sizes, options, args.iterations,
                                                      args.seconds, args.in_flight, log)
    overlap_note = ""
    if "service-overlap" in methods:
        # Overlap queues a full batch while another computes: only where the requests in flight
        # hold two batches can it engage; at smaller sizes its rows would be the service's.
        ceiling = max(8, max(sizes))
        overlap_sizes = [b for b in sizes if args.in_flight * b >= 2 * ceiling]
        overlap_note = (f"\n- service-overlap: timed at {', '.join(map(str, overlap_sizes)) or 'no size'}, "
                        f"where {args.in_flight} requests in flight hold two batches of {ceiling} faces "
                        "(with fewer, a full batch is never queued while another computes)")
        if overlap_sizes:
            with _loopback_service(log, ceiling, "on") as address:
                measurements += bench_service(address, faces, overlap_sizes, options, args.iterations,
                                              args.seconds, args.in_flight, log, method=METHODS[4])

    sections = [header(argv, device, pipeline.dtype, settings.model, faces, options)
                + f"\n- pipeline speed forms: {pipeline.speed.describe()}" + gfpganer_note + overlap_note]
    if titled:
        info = pipeline.info
        sections[0] = (f"## {info.models[0].id if info.models else info.model_name}: {info.model_name} "
                       f"({info.arch})\n\n" + sections[0])
    if measurements:
        sections.append(markdown_table(measurements))
    for method in METHODS[2:]:
        rows = [(size, batches, elapsed) for m, size, batches, elapsed in log.per_size if m == method]
        if rows:
            sections.append(f"### Service batches ({method})\n\nThe batches the loopback service's "
                            "batcher formed while each request size was measured, and the time "
                            "enhance() took for them (busy: that time over the measurement's wall "
                            "time).\n\n" + service_batches_table(rows))
    if args.split_jobs:
        sections.append(f"### One batch of {max(sizes)} faces as several requests (in process)\n\n"
                        + bench_split_jobs(pipeline, faces, max(sizes), options, args.iterations,
                                           args.seconds, sync))
    if args.profile:
        sections.append("### Stages\n\n" + profile_stages(pipeline, faces, sizes, options,
                                                          max(3, args.iterations), sync))
    if variants:
        alignments = [Alignment(a.strip()) for a in (args.variant_alignments or args.alignment).split(",")]
        sections.append("### Speed variants\n\n" + bench_variants(
            pipeline, faces, sizes, alignments, variants, args.iterations, args.seconds, sync))
    if args.memory:
        sections.append("### Device memory\n\n" + bench_memory(pipeline, faces, sizes, options, args.memory))
    return sections


def main(argv: Sequence[str] | None = None) -> None:
    # The console entry point: returns None, so the exit status is 0 (a returned string would
    # be printed to stderr and exit 1).
    run(argv)


if __name__ == "__main__":
    main()
