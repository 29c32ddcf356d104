"""What the adapter adds to a MuseTalk run's wall time: the stand-in's offline script, same
frames and batches, with GFPGAN off, overlapped (the hook), and blocking (no overlap), median of N.

    python -m musetalk_adapter.bench_overhead --gfpgan-address HOST:PORT [--fake-service] ...
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from musetalk_adapter.__main__ import run_script
from musetalk_adapter.config import GFPGANSettings
from musetalk_adapter.enhancer import GFPGANEnhancer
from musetalk_adapter.hook import import_vae_class, install

DEFAULT_STANDIN = Path(__file__).resolve().parent.parent / "tests" / "musetalk_standin"
MODES = ("off", "overlapped", "blocking")


def _project(folder: Path, frames: int) -> Path:
    """A few drawn video frames and an inference YAML asking for `frames` generated frames."""
    video = folder / "video"
    video.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        frame = np.zeros((340, 330, 3), np.uint8)
        frame[:] = rng.integers(40, 200, size=3)
        cv2.ellipse(frame, (165, 170), (100, 130), 0, 0, 360, (120, 150, 200), -1)
        cv2.line(frame, (120, 240), (210, 240), (60, 50, 150), 8)
        cv2.imwrite(str(video / f"{k:08d}.png"), frame)
    (folder / "audio.txt").write_text(str(frames))
    config = folder / "bench.yaml"
    config.write_text(f"task_0:\n  video_path: {video}\n  audio_path: {folder / 'audio.txt'}\n")
    return config


@contextlib.contextmanager
def in_standin(standin: Path):
    """Run as if from MuseTalk's root folder `standin`: cwd and sys.path point there, and
    cwd, sys.path, sys.argv and the `musetalk` modules are put back afterwards."""
    saved = os.getcwd(), list(sys.path), list(sys.argv)
    os.chdir(standin)
    sys.path.insert(0, str(standin))
    try:
        yield
    finally:
        os.chdir(saved[0])
        sys.path[:], sys.argv[:] = saved[1], saved[2]
        for name in [m for m in sys.modules if m == "musetalk" or m.startswith("musetalk.")]:
            del sys.modules[name]


def run_once(mode: str, settings: GFPGANSettings, standin: Path, config: Path, out: Path,
             batch_size: int) -> tuple[float, dict]:
    """Wall seconds of one whole stand-in run in `mode`, and the adapter's summary."""
    enhancer = GFPGANEnhancer(settings) if mode != "off" else None
    with in_standin(standin):
        vae = import_vae_class()
        if mode == "overlapped":
            uninstall = install(enhancer, vae)
        elif mode == "blocking":
            # What a plain call after decode_latents costs: wait for each batch at once.
            original = vae.decode_latents
            vae.decode_latents = lambda self, latents: enhancer.enhance_batch(original(self, latents))
            uninstall = lambda: setattr(vae, "decode_latents", original)  # noqa: E731
        else:
            uninstall = lambda: None  # noqa: E731
        started = time.perf_counter()
        try:
            run_script(["scripts/inference.py", "--inference_config", str(config),
                        "--result_dir", str(out), "--batch_size", str(batch_size)])
        finally:
            elapsed = time.perf_counter() - started
            uninstall()
    summary = enhancer.close().as_dict() if enhancer else {}
    return elapsed, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m musetalk_adapter.bench_overhead",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--gfpgan-address", default=None, help="a running gfpgan-serve")
    parser.add_argument("--fake-service", action="store_true",
                        help="answer from tests/fake_service.py in this process instead (a service "
                             "with no compute: the adapter's and transport's own cost)")
    parser.add_argument("--standin", type=Path, default=DEFAULT_STANDIN)
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unet-ms", type=float, default=32.0,
                        help="stand-in UNet+VAE time per face (MuseTalk: ~32 ms on a V100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alignment", default="aligned")
    parser.add_argument("--upscale", type=int, default=1)
    parser.add_argument("--timeout-ms", type=float, default=60000)
    args = parser.parse_args(argv)
    if not (args.standin / "scripts" / "inference.py").is_file():
        parser.error(f"no stand-in at {args.standin} (scripts/inference.py); pass --standin")
    with contextlib.ExitStack() as stack:
        address = args.gfpgan_address
        if args.fake_service:
            sys.path.insert(0, str(args.standin.parent.parent))
            from tests.fake_service import FakeService

            address = stack.enter_context(FakeService()).address
        if not address:
            parser.error("give --gfpgan-address HOST:PORT or --fake-service")
        os.environ["STANDIN_UNET_MS"] = str(args.unet_ms)
        settings = GFPGANSettings(enabled=True, address=address, alignment=args.alignment,
                                  upscale=args.upscale, timeout_ms=args.timeout_ms).check()
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_overhead_")))
        config = _project(folder, args.frames)
        # One untimed run of each first: imports, connections, the service's first batches.
        for mode in MODES:
            run_once(mode, settings, args.standin, config, folder / f"warm_{mode}", args.batch_size)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        summaries = {}
        for r in range(args.repeats):
            for mode in MODES:  # interleaved, so drift in machine load hits every mode alike
                elapsed, summaries[mode] = run_once(mode, settings, args.standin, config,
                                                    folder / f"{mode}_{r}", args.batch_size)
                times[mode].append(elapsed)
    base = statistics.median(times["off"])
    print(f"stand-in offline run: {args.frames} frames, batch {args.batch_size}, UNet {args.unet_ms:g} "
          f"ms/face, alignment {args.alignment}, upscale {args.upscale}, "
          f"{'fake service' if args.fake_service else address}; median of {args.repeats}")
    print("| mode | wall s | vs off | per frame ms | faces enhanced | fell back | waited s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        wall = statistics.median(times[mode])
        s = summaries.get(mode, {})
        print(f"| {mode} | {wall:.2f} | {wall - base:+.2f} s ({(wall / base - 1) * 100:+.0f}%) | "
              f"{(wall - base) / args.frames * 1000:+.1f} | {s.get('faces_enhanced', '-')} | "
              f"{s.get('faces_fell_back', '-')} | {s.get('waiting_s', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
