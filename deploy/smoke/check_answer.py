"""Smoke check: one batch through the container, compared with the same pipeline run in-process.

Usage: check_answer.py HOST:PORT WEIGHTS_DIR (run with the project's .venv, from the repo root).
"""
import sys
from pathlib import Path

import numpy as np

from client import Alignment, EnhanceOptions, FaceEnhanceClient, FaceStatus
from server.jobs import Job
from server.pipeline import build_pipeline
from server.settings import Settings
from server.weights import sha256_file
from tests.faces import make_faces

FACES = 3


def main(address: str, weights_dir: str) -> int:
    model = Path(weights_dir) / "GFPGANv1.4.pth"
    options = EnhanceOptions(output_size=256, alignment=Alignment.ALIGNED)
    faces = make_faces(FACES, seed=11)
    with FaceEnhanceClient(address, options=options, timeout_ms=120_000) as client:
        info = client.info()
        result = client.enhance(faces)
    print(f"GetInfo: {info.model_name} sha256 {info.weights_sha256[:12]} on {info.device} as {info.dtype}")
    print(f"answer: {result.faces.shape} {result.faces.dtype}, status {[s.name for s in result.status]}, "
          f"fell back: {result.fell_back} {result.fallback_reason or ''}")
    local = build_pipeline(Settings(model=str(model), weights_dir=weights_dir, device="cpu", no_download=True))
    [expected] = local.enhance([Job(faces, options)])
    difference = int(np.abs(result.faces.astype(int) - expected.faces).max()) if not result.fell_back else -1
    changed = float(np.abs(result.faces.astype(int) - faces.astype(int)).mean())
    print(f"max difference from the in-process pipeline: {difference} levels; "
          f"mean change from the input: {changed:.1f} levels")
    checks = {
        "weights are the mounted ones": info.weights_sha256 == sha256_file(model),
        "served from the service, no fallback": not result.fell_back,
        "every face ENHANCED": list(result.status) == [FaceStatus.ENHANCED] * FACES,
        "shape (3, 256, 256, 3) uint8": result.faces.shape == (FACES, 256, 256, 3) and result.faces.dtype == np.uint8,
        "same pixels as in-process (<= 1 level)": 0 <= difference <= 1,
        "the faces were changed": changed > 0.5,
    }
    for name, passed in checks.items():
        print(f"  {'ok  ' if passed else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
