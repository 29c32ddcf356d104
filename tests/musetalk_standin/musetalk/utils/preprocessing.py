"""Stand-in for musetalk/utils/preprocessing.py: frames from a folder and one face box per
frame, not square and of varying size like MuseTalk's landmark boxes (no detector needed).
"""
from __future__ import annotations

import cv2

coord_placeholder = (0.0, 0.0, 0.0, 0.0)


def read_imgs(paths):
    return [cv2.imread(path) for path in paths]


def face_box(frame_index: int, frame) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): wider than 256 on some frames, narrower on others, never square."""
    width = (200, 280, 236)[frame_index % 3]
    height = (230, 300, 262)[frame_index % 3]
    x1, y1 = 16, 12
    return x1, y1, min(x1 + width, frame.shape[1]), min(y1 + height, frame.shape[0])


def get_landmark_and_bbox(paths, upperbondrange=0):
    frames = read_imgs(paths)
    return [face_box(k, frame) for k, frame in enumerate(frames)], frames
