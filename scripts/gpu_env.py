#!/usr/bin/env python3
"""scripts/gpu_check.py's first steps: what machine this is, and the weights and faces it uses.

    python scripts/gpu_env.py                       # the device, driver, torch and packages
    python scripts/gpu_env.py --make-weights DIR --faces DIR [--narrow 1]

The weights are random-valued checkpoints of the real architectures (tests/checkpoints.py):
GFPGANv1Clean at the given width, RetinaFace resnet50 calibrated on drawn faces so that it
finds one face per crop like a trained one (tests/faces.py), ParseNet. They cost what the
published weights cost to run; their pixels mean nothing. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PACKAGES = ("torch", "torchvision", "numpy", "opencv-python-headless", "grpcio", "protobuf",
            "grpcio-health-checking", "grpcio-reflection", "gfpgan", "basicsr", "facexlib", "pytest",
            "pytest-asyncio", "pytest-timeout", "scipy", "prometheus-client")


def describe() -> None:
    import torch

    print(f"python: {platform.python_version()} ({sys.executable})")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
              f"compute capability {props.major}.{props.minor}")
        print(f"cuda: torch built for {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
    else:
        print(f"device: CPU only ({platform.machine()}, {torch.get_num_threads()} torch threads)")
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "missing"
        print(f"package {name}: {version}")
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                 "clocks.max.sm,temperature.gpu,utilization.gpu", "--format=csv"],
                                capture_output=True, text=True, timeout=30)
        print(result.stdout.strip())
    # the imports the check needs, so a missing wheel shows here and not in the middle of a step
    import server.compat  # noqa: F401
    import gfpgan  # noqa: F401
    import grpc_health.v1  # noqa: F401
    import grpc_reflection.v1alpha  # noqa: F401

    from contract.pb import face_enhance_pb2  # noqa: F401  (the stubs accept this protobuf)
    print("imports: ok")


def make(weights: Path, faces: Path, narrow: float) -> None:
    import cv2
    import torch

    from tests.checkpoints import DETECTION_FILE, make_weights_dir
    from tests.faces import calibrated_retinaface, make_faces

    t0 = time.monotonic()
    torch.set_num_threads(max(1, min(16, torch.get_num_threads())))
    make_weights_dir(weights, narrow=narrow)
    net = calibrated_retinaface(make_faces(4, seed=1))
    torch.save(net.state_dict(), weights / DETECTION_FILE)
    faces.mkdir(parents=True, exist_ok=True)
    for index, face in enumerate(make_faces(16, seed=200)):
        cv2.imwrite(str(faces / f"face{index:02d}.png"), face)
    sizes = {p.name: f"{p.stat().st_size / 2**20:.1f} MiB" for p in sorted(weights.iterdir())}
    print(f"weights (narrow {narrow:g}) in {time.monotonic() - t0:.1f} s: {sizes}; 16 faces in {faces}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-weights", type=Path, default=None)
    parser.add_argument("--faces", type=Path, default=None)
    parser.add_argument("--narrow", type=float, default=1.0)
    args = parser.parse_args()
    if args.make_weights is None:
        describe()
    else:
        make(args.make_weights, args.faces or args.make_weights / "faces", args.narrow)


if __name__ == "__main__":
    main()
