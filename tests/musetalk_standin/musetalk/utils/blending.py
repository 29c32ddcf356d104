"""Stand-in for musetalk/utils/blending.py: pastes the face (already resized to its box by the
caller) into a copy of the frame; MuseTalk's parsing mask is left out so pixels can be checked.
"""
from __future__ import annotations


def get_image(image, face, face_box, upper_boundary_ratio=0.5, expand=1.5, mode="raw", fp=None):
    x1, y1, x2, y2 = face_box
    out = image.copy()
    out[y1:y2, x1:x2] = face
    return out


def get_image_blending(image, face, face_box, mask_array=None, crop_box=None):
    return get_image(image, face, face_box)
