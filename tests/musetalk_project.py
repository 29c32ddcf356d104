"""A MuseTalk project for the stand-in (tests/musetalk_standin): video frames, "audio"
lengths and inference YAMLs, and what the adapter's tests read back from a run.
"""
from __future__ import annotations

import argparse
import glob
from pathlib import Path

import cv2
import numpy as np

from musetalk_adapter import add_arguments
from tests.faces import make_faces

STANDIN = Path(__file__).resolve().parent / "musetalk_standin"
VIDEO_FRAMES = 5


def make_project(tmp_path: Path) -> argparse.Namespace:
    """Video frames with a face and hard blue/red regions, "audio" lengths, inference YAMLs."""
    frames = tmp_path / "video"
    frames.mkdir()
    faces = make_faces(VIDEO_FRAMES, seed=3)
    for k in range(VIDEO_FRAMES):
        frame = np.full((340, 330, 3), 90, np.uint8)
        frame[:, :110] = (220, 40, 40)   # blue in BGR: a red/blue swap anywhere shows
        frame[:, 220:] = (30, 40, 230)   # red
        frame[40:296, 40:296] = faces[k]
        frame[60:120, 50:100] = (255, 0, 0)
        frame[60:120, 230:280] = (0, 0, 255)
        cv2.imwrite(str(frames / f"{k:08d}.png"), frame)

    def audio(name: str, frames_count: int) -> str:
        path = tmp_path / f"{name}.txt"
        path.write_text(str(frames_count))
        return str(path)

    def offline_yaml(frames_count: int, gfpgan: str = "") -> str:
        path = tmp_path / f"test_{frames_count}.yaml"
        path.write_text(f"task_0:\n  video_path: {frames}\n  audio_path: {audio('speech', frames_count)}\n"
                        + gfpgan)
        return str(path)

    def realtime_yaml(frames_count: int) -> str:
        path = tmp_path / "realtime.yaml"
        path.write_text(f"avator_1:\n  preparation: true\n  bbox_shift: 5\n  video_path: {frames}\n"
                        f"  audio_clips:\n    clip_0: {audio('clip', frames_count)}\n")
        return str(path)

    return argparse.Namespace(dir=tmp_path, offline_yaml=offline_yaml, realtime_yaml=realtime_yaml)


def written_frames(folder: Path) -> list[np.ndarray]:
    paths = sorted(glob.glob(str(folder / "**" / "*.png"), recursive=True))
    names = [int(Path(p).stem) for p in paths]
    assert names == list(range(len(paths))), f"frames missing or repeated: {names}"
    return [cv2.imread(p) for p in paths]


def musetalk_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inference_config")
    return add_arguments(parser).parse_args(list(argv))
