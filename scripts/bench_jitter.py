"""Jitter benchmark (issue 11): how much a video's output shimmers from frame to frame.

Three sequences of 256x256 frames, each frame perturbed on its own like a lip-sync model's
output (pixel noise, a sub-pixel shift, a redrawn mouth): a static face, a face moving slowly
(1 px per frame), and a cut between two faces. Each runs through
  (a) GFPGANer frame by frame, with its defaults (fresh StyleGAN noise on every call),
  (b) our pipeline frame by frame,
  (c) our pipeline with steady video (the alignment smoothed over the sequence).
Printed per sequence: the mean frame-to-frame change of the output in the upper face (eyes
band, where nothing should change) and in the mouth band, the frame-to-frame jitter of the
landmarks the warp used (px, the sequence's own motion taken out), and faces/s.

    python scripts/bench_jitter.py                      # random-valued weights made here (CPU)
    python scripts/bench_jitter.py --weights-dir DIR    # real weights (GFPGANv1.4.pth, ...)
    python scripts/bench_jitter.py --skip-detection --frames 40   # the detect_every saving
    python scripts/bench_jitter.py --reuse-mask --frames 20        # the mask_every saving (ParseNet)

Random-valued networks restore nothing, but they are deterministic with fixed noise, so the
output's change between frames still shows how much the alignment (and the noise) moved. A
detector with random weights finds faces far too roughly to stand for RetinaFace, so by default
the landmarks are the drawn faces' own, moved with each frame, plus independent detection noise
(--detector-noise-px, 1 px by default), given to all three runs alike (LANDMARKS for ours,
GFPGANer's landmark step replaced). With real weights, --alignment detect detects.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import server.compat  # noqa: E402,F401  (before gfpgan/basicsr/facexlib)
import torch  # noqa: E402

from contract.types import Alignment, EnhanceOptions  # noqa: E402
from server import imageops  # noqa: E402
from server.jobs import Job  # noqa: E402
from server.pipeline import FacePipeline  # noqa: E402
from server.speed import SpeedOptions  # noqa: E402
from server.steady import VideoState  # noqa: E402

UPPER = slice(int(0.15 * 256), int(0.45 * 256))
MOUTH = slice(int(0.62 * 256), int(0.85 * 256))


def perturb(face: np.ndarray, rng: np.random.Generator, shift=(0.0, 0.0)) -> np.ndarray:
    """One frame: the face moved by `shift` plus a sub-pixel wobble, a redrawn mouth, noise."""
    dx, dy = shift[0] + rng.uniform(-0.3, 0.3), shift[1] + rng.uniform(-0.3, 0.3)
    frame = cv2.warpAffine(face, np.float32([[1, 0, dx], [0, 1, dy]]), (256, 256),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mouth = frame[MOUTH].astype(np.int16)
    mouth += rng.integers(-12, 13, size=(1, 1, 3), dtype=np.int16)  # the generated mouth changes
    frame[MOUTH] = np.clip(mouth, 0, 255).astype(np.uint8)
    noise = rng.normal(0, 2.0, frame.shape)
    return np.clip(frame + noise, 0, 255).astype(np.uint8)


def sequences(frames: int, noise_px: float) -> dict[str, tuple]:
    """name -> (frames, true shift of each frame (x, y) in px, detected landmarks (n, 5, 2),
    the faces' true landmarks (n, 5, 2))."""
    from tests.faces import make_faces, template_landmarks

    rng = np.random.default_rng(7)
    marks = template_landmarks(2, seed=1)
    a, b = make_faces(2, seed=1, landmarks=marks)
    motion = {
        "static": [(0.0, 0.0)] * frames,
        "slow (1 px/frame)": [(t - frames / 2, 0.4 * (t - frames / 2)) for t in range(frames)],
        "cut": [(0.0, 0.0)] * frames,
    }
    out = {}
    for name, shifts in motion.items():
        which = [1 if name == "cut" and t >= frames // 2 else 0 for t in range(frames)]
        faces = [perturb((a, b)[which[t]], rng, shifts[t]) for t in range(frames)]
        true = np.stack([marks[which[t]] + np.array(shifts[t]) for t in range(frames)])
        points = (true + rng.normal(0, noise_px, true.shape)).astype(np.float32)
        out[name] = (np.stack(faces), np.array(shifts), points, true)
    return out


def change(outputs: np.ndarray, rows: slice, skip: set[int]) -> float:
    diffs = [np.abs(outputs[t, rows].astype(float) - outputs[t - 1, rows]).mean()
             for t in range(1, len(outputs)) if t not in skip]
    return float(np.mean(diffs))


def lag_frames(points: list, true: np.ndarray, shifts: np.ndarray) -> float:
    """How far behind its true position the used alignment is, along the motion, in frames."""
    step = shifts[1] - shifts[0]
    speed2 = float(step @ step)
    if speed2 == 0:
        return float("nan")
    behind = [float(((true[t] - p).mean(axis=0)) @ step) / speed2
              for t, p in enumerate(points) if p is not None and t >= len(points) // 3]
    return float(np.mean(behind))


def jitter(points: list[np.ndarray | None], shifts: np.ndarray, skip: set[int]) -> float:
    """Mean frame-to-frame movement of the 5 points beyond the sequence's own motion (px)."""
    moves = []
    for t in range(1, len(points)):
        if t in skip or points[t] is None or points[t - 1] is None:
            continue
        own = shifts[t] - shifts[t - 1]
        moves.append(np.linalg.norm((points[t] - points[t - 1]) - own, axis=1).mean())
    return float(np.mean(moves)) if moves else float("nan")


@contextlib.contextmanager
def recording_alignment(log: list):
    """Record the landmarks each pipeline warp is fitted to."""
    original = imageops.robust_similarity_transform

    def recorded(src, dst):
        log.append(src.detach().float().cpu().numpy().copy())
        return original(src, dst)

    imageops.robust_similarity_transform = recorded
    try:
        yield
    finally:
        imageops.robust_similarity_transform = original


def run_ours(pipeline: FacePipeline, frames: np.ndarray, steady: bool, given: np.ndarray | None):
    alignment = Alignment.DETECT if given is None else Alignment.LANDMARKS
    options = EnhanceOptions(alignment=alignment, steady_video=steady)
    video = VideoState() if steady else None
    outputs, points, log = [], [], []
    started = time.perf_counter()
    with recording_alignment(log):
        for t, frame in enumerate(frames):
            before = len(log)
            marks = None if given is None else given[t:t + 1]
            [result] = pipeline.enhance([Job(frame[None], options, marks, video=video)])
            outputs.append(result.faces[0])
            used = log[before] if len(log) > before else np.zeros((0, 5, 2))
            points.append(used[0] if len(used) == 1 else None)
    return np.stack(outputs), points, len(frames) / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a stage's time is its own (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _frames_per_second(pipeline, frames: np.ndarray, options: EnhanceOptions, batch: int,
                       points: np.ndarray | None = None) -> tuple[float, list[np.ndarray], VideoState]:
    """One stream, `batch` frames per request: (faces/s, outputs, its VideoState)."""
    video, outputs = VideoState(), []
    _sync(pipeline.device)
    started = time.perf_counter()
    for t in range(0, len(frames), batch):
        marks = None if points is None else points[t:t + batch]
        outputs.append(pipeline.enhance([Job(frames[t:t + batch], options, marks, video=video)])[0].faces)
    _sync(pipeline.device)
    return len(frames) / (time.perf_counter() - started), outputs, video


def _timed_run(pipeline, holder, name: str, run):
    """`run()` (a _frames_per_second) with the network pass holder[name] (a dict of passes) or
    holder.name (an object's) timed: (faces/s, run()'s result, {"s": the pass's seconds, "rows":
    the rows it computed}). The device is waited for around each pass, so on a GPU those waits
    would slow the run: faces/s come from a second run without them there."""
    if isinstance(holder, dict):
        get, put = holder.__getitem__, holder.__setitem__
    else:
        get, put = (lambda n: getattr(holder, n)), (lambda n, value: setattr(holder, n, value))
    original, spent = get(name), {"s": 0.0, "rows": 0}

    def timed(x):
        _sync(pipeline.device)
        started = time.perf_counter()
        out = original(x)
        _sync(pipeline.device)
        spent["s"] += time.perf_counter() - started
        spent["rows"] += x.shape[0]
        return out

    put(name, timed)
    try:
        result = run()
    finally:
        put(name, original)
    speed = result[0] if pipeline.device.type == "cpu" else run()[0]
    return speed, result, spent


def run_skip_detection(pipeline: FacePipeline, frames: np.ndarray, every: int, batch: int):
    """Steady video, DETECT, `batch` frames per request, detecting every `every`-th frame:
    (faces/s, detector seconds per frame, frames detected)."""
    options = EnhanceOptions(steady_video=True, detect_every=every)
    speed, _, spent = _timed_run(pipeline, pipeline.detector, "candidates",
                                 lambda: _frames_per_second(pipeline, frames, options, batch))
    return speed, spent["s"] / len(frames), spent["rows"]


def skip_detection_table(pipeline: FacePipeline, frames_count: int, batch: int) -> list[str]:
    """The saving of detect_every on a still, perturbed face (MuseTalk's stable crops)."""
    from tests.faces import make_faces

    rng = np.random.default_rng(11)
    face = make_faces(1, seed=1)[0]
    frames = np.stack([perturb(face, rng) for _ in range(frames_count)])
    lines = [f"skip detection: {frames_count} frames of a still face (perturbed per frame), "
             f"{batch} per request, steady video, DETECT:", "",
             "| detect_every | frames detected | detector ms/frame | faces/s | faces/s vs every frame |",
             "| --- | --- | --- | --- | --- |"]
    base = None
    for every in (1, 2, 5, 10):
        speed, detect_s, detected = run_skip_detection(pipeline, frames, every, batch)
        base = base or speed
        lines.append(f"| {every} | {detected}/{frames_count} | {1000 * detect_s:.1f} | {speed:.2f} | "
                     f"{speed / base:.2f}x |")
    return lines


def run_reuse_mask(pipeline: FacePipeline, frames: np.ndarray, points: np.ndarray | None, every: int,
                   batch: int):
    """Steady video, `batch` frames per request, the paste mask computed on every `every`-th
    frame; LANDMARKS with `points`, else DETECT: (faces/s, mask seconds per frame, masks
    computed, outputs, the stream's VideoState)."""
    alignment = Alignment.DETECT if points is None else Alignment.LANDMARKS
    options = EnhanceOptions(alignment=alignment, steady_video=True, mask_every=every)
    # the pass the pipeline calls: its CUDA graph when it has one, else the network's forward
    holder = pipeline._graphs if "parse" in pipeline._graphs else pipeline._fixed
    speed, (_, outputs, video), spent = _timed_run(
        pipeline, holder, "parse", lambda: _frames_per_second(pipeline, frames, options, batch, points))
    return speed, spent["s"] / len(frames), spent["rows"], np.concatenate(outputs), video


def reuse_mask_table(pipeline: FacePipeline, frames_count: int, batch: int, detect: bool,
                     noise_px: float) -> list[str]:
    """The saving of mask_every on the static sequence (a still face, perturbed per frame)."""
    frames, _, points, _ = sequences(frames_count, noise_px)["static"]
    how = "DETECT" if detect else f"LANDMARKS (the face's own points, {noise_px:g} px detection noise)"
    lines = [f"reuse the paste mask: {frames_count} frames of a still face (perturbed per frame), "
             f"{batch} per request, steady video, {how}, ParseNet's mask:", "",
             "| mask_every | masks computed | mask ms/frame | faces/s | faces/s vs every frame | "
             "levels vs every frame: mean, max | cuts |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = reference = None
    for every in (1, 2, 5, 10):
        speed, mask_s, masks, outputs, video = run_reuse_mask(pipeline, frames, None if detect else points,
                                                             every, batch)
        if base is None:
            base, reference = speed, outputs
        diff = np.abs(outputs.astype(int) - reference)
        lines.append(f"| {every} | {masks}/{frames_count} | {1000 * mask_s:.1f} | {speed:.2f} | "
                     f"{speed / base:.2f}x | {diff.mean():.3f}, {diff.max()} | {video.resets} |")
    return lines


def gfpganer(weights: Path, narrow: float, workdir: Path):
    """GFPGAN's own GFPGANer on our files, with its defaults (fresh noise every call); `workdir`
    becomes the current folder (facexlib's weights are found from it)."""
    import gfpgan.utils
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    (workdir / "gfpgan" / "weights").mkdir(parents=True)
    for name in ("detection_Resnet50_Final.pth", "parsing_parsenet.pth"):
        os.symlink(weights / name, workdir / "gfpgan" / "weights" / name)
    os.chdir(workdir)  # facexlib reads its weights from ./gfpgan/weights
    if narrow != 1:
        gfpgan.utils.GFPGANv1Clean = lambda **kw: GFPGANv1Clean(**{**kw, "narrow": narrow})
    return gfpgan.utils.GFPGANer(model_path=str(weights / "GFPGANv1.4.pth"), upscale=1, arch="clean",
                                 channel_multiplier=2, device=torch.device("cpu"))


def run_gfpganer(restorer, frames: np.ndarray, given: np.ndarray | None):
    outputs, points = [], []
    helper = restorer.face_helper
    detect = helper.get_face_landmarks_5
    started = time.perf_counter()
    for t, frame in enumerate(frames):
        if given is not None:  # GFPGANer's landmark step, replaced by the given points
            def landmarks(*args, points=given[t], **kwargs):
                helper.all_landmarks_5 = [np.asarray(points, np.float64)]
                helper.det_faces = [np.zeros(5)]
                return 1
            helper.get_face_landmarks_5 = landmarks
        else:
            helper.get_face_landmarks_5 = detect
        _, _, restored = restorer.enhance(frame.copy(), has_aligned=False, only_center_face=True,
                                          paste_back=True)
        outputs.append(restored if restored is not None else frame)
        found = restorer.face_helper.all_landmarks_5
        points.append(np.asarray(found[0], np.float32) if len(found) == 1 else None)
    return np.stack(outputs), points, len(frames) / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="GFPGANv1.4.pth, detection_Resnet50_Final.pth, parsing_parsenet.pth "
                             "(default: random-valued ones of the real architectures, made here, "
                             "with a detector calibrated to find the benchmark's faces)")
    parser.add_argument("--frames", type=int, default=16, help="frames per sequence")
    parser.add_argument("--paste-mask", default=None, choices=["box", "parse"],
                        help="our pipeline's paste mask (box: no ParseNet pass, much faster on a CPU; "
                             "the default without --device; with it, the service's default, parse)")
    parser.add_argument("--no-gfpganer", action="store_true", help="skip (a)")
    parser.add_argument("--alignment", default="landmarks", choices=["landmarks", "detect"],
                        help="landmarks: the faces' own points plus detection noise (default); "
                             "detect: the detector's (meaningful with real weights)")
    parser.add_argument("--detector-noise-px", type=float, default=1.0,
                        help="--alignment landmarks: per-frame noise on each point, in px")
    parser.add_argument("--skip-detection", action="store_true",
                        help="only the detect_every table: faces/s and detector time per frame "
                             "with detection on every 1st, 2nd, 5th and 10th frame")
    parser.add_argument("--reuse-mask", action="store_true",
                        help="only the mask_every table: faces/s and ParseNet time per frame with "
                             "the paste mask computed on every 1st, 2nd, 5th and 10th frame "
                             "(ParseNet's mask, whatever --paste-mask says). With --alignment "
                             "landmarks (the default) the still face's own points plus detection "
                             "noise; a detector of random values moves its landmarks so far from "
                             "frame to frame that steady video counts cuts, which drop the mask")
    parser.add_argument("--batch", type=int, default=8,
                        help="--skip-detection, --reuse-mask: frames per request (MuseTalk's batch, 8)")
    parser.add_argument("--device", default=None,
                        help="--skip-detection, --reuse-mask: run on this device (cuda, cpu) with the "
                             "pipeline the service builds for it (its dtype and speed forms, CUDA "
                             "graphs on CUDA); faces/s then come from a run of their own, without the "
                             "waits that time the stages. Default: the CPU, float32, GFPGAN's own "
                             "forms, one run (the rows in BENCHMARKS.md)")
    parser.add_argument("--markdown-out", type=Path, default=None,
                        help="--skip-detection, --reuse-mask: also write the tables here")
    args = parser.parse_args(argv)
    # Made weights (300 MB) and GFPGANer's folder live as long as the run; so does its current folder.
    with tempfile.TemporaryDirectory(prefix="bench_jitter_") as scratch, contextlib.chdir(os.getcwd()):
        return run(parser, args, Path(scratch))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, scratch: Path) -> int:
    if args.device is not None and not (args.skip_detection or args.reuse_mask):
        parser.error("--device goes with --skip-detection and/or --reuse-mask")
    if args.reuse_mask and args.paste_mask == "box":
        parser.error("--reuse-mask measures ParseNet's mask: leave --paste-mask out (both tables then "
                     "use ParseNet's)")
    paste_mask = "parse" if args.reuse_mask else args.paste_mask or ("box" if args.device is None else "parse")

    narrow = 1.0
    weights = args.weights_dir
    if weights is None:
        from tests.checkpoints import SMALL_NARROW, make_weights_dir
        from tests.faces import weights_with_detector

        base = scratch / "weights"
        small = make_weights_dir(base / "small", narrow=SMALL_NARROW)
        (base / "detect").mkdir()
        weights = weights_with_detector(base / "detect", small)
        narrow = SMALL_NARROW
    weights = weights.resolve()
    from server.model import load_restorer, load_parsenet, load_retinaface

    if args.device is not None:
        from server.pipeline import build_pipeline
        from server.settings import Settings

        settings = Settings(model=str(weights / "GFPGANv1.4.pth"), weights_dir=str(weights),
                            device=args.device, no_download=True, metrics_port=0,
                            paste_mask=paste_mask,
                            max_batch_faces=max(8, args.batch))
        pipeline = build_pipeline(settings)
        pipeline.warmup(faces=args.batch)
        how = (f"{pipeline.device}, {pipeline.dtype} (the service's pipeline for it), "
               f"torch {torch.__version__}")
    else:
        device = torch.device("cpu")
        pipeline = FacePipeline(load_restorer(weights / "GFPGANv1.4.pth", device).net,
                                load_retinaface(weights / "detection_Resnet50_Final.pth", device),
                                load_parsenet(weights / "parsing_parsenet.pth", device), device=device,
                                dtype=torch.float32,
                                speed=SpeedOptions(paste_mask=paste_mask))
        how = f"CPU, torch {torch.__version__}"
    if args.skip_detection or args.reuse_mask:
        source = "random-valued weights" if args.weights_dir is None else str(weights)
        tables = []
        if args.skip_detection:
            tables.append(skip_detection_table(pipeline, args.frames, args.batch))
        if args.reuse_mask:
            tables.append(reuse_mask_table(pipeline, args.frames, args.batch, args.alignment == "detect",
                                           args.detector_noise_px))
        text = "\n\n".join("\n".join(lines) for lines in tables)
        head = f"{how}, {source}, paste mask {paste_mask}"
        print(f"{head}\n\n{text}")
        if args.markdown_out is not None:
            args.markdown_out.write_text(f"{head}\n\n{text}\n")
        return 0
    restorer = None if args.no_gfpganer else gfpganer(weights, narrow, scratch / "gfpganer")
    print(f"jitter: {args.frames} frames per sequence, 256x256, CPU, torch {torch.__version__}, "
          f"{'random-valued weights' if args.weights_dir is None else weights}, paste mask "
          f"{paste_mask}, alignment {args.alignment}"
          + (f" (detection noise {args.detector_noise_px} px)" if args.alignment == "landmarks" else ""))
    for name, (frames, shifts, marks, true) in sequences(args.frames, args.detector_noise_px).items():
        skip = {args.frames // 2} if name == "cut" else set()
        given = marks if args.alignment == "landmarks" else None
        rows = []
        runs = [("(b) ours, frame by frame", lambda: run_ours(pipeline, frames, False, given)),
                ("(c) ours, steady video", lambda: run_ours(pipeline, frames, True, given))]
        if restorer is not None:
            runs.insert(0, ("(a) GFPGANer, frame by frame", lambda: run_gfpganer(restorer, frames, given)))
        for label, run in runs:
            outputs, points, speed = run()
            found = sum(p is not None for p in points)
            cut = args.frames // 2
            extra = (lag_frames(points, true, shifts) if name.startswith("slow")
                     else float(np.linalg.norm(points[cut] - marks[cut], axis=1).mean())
                     if name == "cut" and points[cut] is not None else float("nan"))
            rows.append((label, change(outputs, UPPER, skip), change(outputs, MOUTH, skip),
                         jitter(points, shifts, skip), extra, speed, found))
        what = {"slow (1 px/frame)": "lag (frames)", "cut": "off its detection at the cut (px)"}.get(name, "-")
        print(f"\n{name}:\n")
        print(f"| run | upper-face change | mouth change | alignment jitter (px) | {what} | faces/s | "
              "frames with a face |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, upper, mouth, jit, extra, speed, found in rows:
            print(f"| {label} | {upper:.2f} | {mouth:.2f} | {jit:.3f} | {extra:.2f} | {speed:.2f} | "
                  f"{found}/{args.frames} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
