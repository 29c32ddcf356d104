"""Synthetic face crops, landmarks and a detector that finds faces in them, for tests.

The crops are drawn, not photographed: a skin-coloured oval with eyes, nose and mouth on a
smooth background, softened like MuseTalk's decoded output, with a known 5-point layout.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

# No torch at import: the client's and adapter's tests use make_faces in environments without it.

# facexlib's FFHQ template for 512x512 (left eye, right eye, nose, mouth corners).
TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                         [201.26117, 371.41043], [313.08905, 371.15118]])


def template_landmarks(count: int, seed: int = 0, size: int = 256) -> np.ndarray:
    """(count, 5, 2) float32 landmarks: the template, rotated a few degrees, scaled and shifted
    to sit in a size x size crop the way a MuseTalk face does (face filling most of the crop)."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(count):
        angle = np.deg2rad(rng.uniform(-8, 8))
        scale = size / 512 * rng.uniform(0.9, 1.1)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        centre = TEMPLATE_512.mean(axis=0)
        shift = np.array([size / 2, size / 2]) + rng.uniform(-6, 6, size=2)
        points.append((TEMPLATE_512 - centre) @ rot.T + shift)
    return np.asarray(points, dtype=np.float32)


def make_faces(count: int, seed: int = 0, size: int = 256, landmarks: np.ndarray | None = None) -> np.ndarray:
    """(count, size, size, 3) uint8 BGR drawn faces whose eyes/nose/mouth sit at `landmarks`."""
    rng = np.random.default_rng(seed)
    if landmarks is None:
        landmarks = template_landmarks(count, seed=seed, size=size)
    faces = []
    for points in landmarks:
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = rng.uniform(40, 200, size=3)
        tilt = rng.uniform(-60, 60, size=(2, 3))
        img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
        skin = np.array([120, 150, 200]) + rng.uniform(-30, 30, size=3)
        eyes, nose, mouth = points[:2], points[2], points[3:]
        centre = (eyes.mean(axis=0) + mouth.mean(axis=0)) / 2
        eye_dist = np.linalg.norm(eyes[1] - eyes[0])
        angle = np.degrees(np.arctan2(*(eyes[1] - eyes[0])[::-1]))
        axes = (int(eye_dist * 1.1), int(eye_dist * 1.45))
        img = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
        cv2.ellipse(img, tuple(int(v) for v in centre), axes, angle, 0, 360, skin.tolist(), -1)
        for eye in eyes:
            cv2.ellipse(img, tuple(int(v) for v in eye), (int(eye_dist * 0.18), int(eye_dist * 0.08)),
                        angle, 0, 360, (40, 30, 30), -1)
        cv2.circle(img, tuple(int(v) for v in nose), int(eye_dist * 0.08), (skin * 0.7).tolist(), -1)
        cv2.line(img, tuple(int(v) for v in mouth[0]), tuple(int(v) for v in mouth[1]), (60, 50, 150),
                 max(2, int(eye_dist * 0.08)))
        noise = rng.normal(0, 4, img.shape)
        img = cv2.GaussianBlur(np.clip(img + noise, 0, 255).astype(np.uint8), (0, 0), 1.2)
        faces.append(img)
    return np.stack(faces)


def calibrated_retinaface(samples: np.ndarray, seed: int = 0, class_gain: float = 5.0,
                          background_bias: float = 0.0, face_sized: bool = True):
    """A random-valued resnet50 RetinaFace that behaves like a detector on `samples`.

    With default batch-norm statistics a random ResNet's activations explode, so every anchor
    scores 1.0 (ties) with boxes of absurd size. Batch-norm statistics are taken from the
    samples, the box and landmark heads are damped so regressions stay near their anchors, and
    the class head is scaled so that some anchors pass GFPGANer's 0.97 threshold, with distinct
    scores (so NMS order is not decided by ties).

    `face_sized`: only the anchors a lip-sync crop's face matches can score above the threshold,
    the coarsest level's 256-pixel ones, as a trained detector's do on a crop its face fills, and
    their boxes overlap as boxes on one face do: on 256x256 make_faces images 16-60 candidates
    and 1-3 faces after NMS. Without it every level fires,
    70 to 1,400 candidates an image and 50 to 900 left after NMS, which no detector gives on a
    face crop (server.detection's wait-free path takes 256 candidates and vouches for up to 4
    faces left; past either it detects again, the waiting way).
    """
    import torch

    import server.compat  # noqa: F401  (must precede facexlib)
    from facexlib.detection.retinaface import RetinaFace

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RetinaFace(network_name="resnet50", half=False, device="cpu")
    images = torch.from_numpy(samples).permute(0, 3, 1, 2).float() - net.mean_tensor
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration pass
    net.train()
    with torch.no_grad():
        net(images)
    net.eval()
    with torch.no_grad():
        for head in (*net.BboxHead, *net.LandmarkHead):
            head.conv1x1.weight.mul_(0.1)
            head.conv1x1.bias.zero_()
        # Landmarks laid out like the FFHQ template around each anchor (eye distance a
        # quarter of the anchor size), so that detections are face-shaped and cv2's robust
        # LMEDS fit and a least-squares fit agree, as they do on real detections.
        layout = (TEMPLATE_512 - TEMPLATE_512.mean(axis=0)) / 512 / 0.1  # / the prior variance
        for head in net.LandmarkHead:
            anchors = head.conv1x1.bias.numel() // 10
            head.conv1x1.bias.copy_(torch.tensor(np.tile(layout.reshape(-1), anchors)))
        for head in net.ClassHead:
            head.conv1x1.weight.mul_(class_gain)
            head.conv1x1.bias[0::2] += background_bias  # (background, face) logits per anchor
        if face_sized:  # every anchor background but the coarsest level's first (256 pixels)
            for level, head in enumerate(net.ClassHead):
                background = slice(0, None, 2) if level < len(net.ClassHead) - 1 else slice(2, None, 2)
                head.conv1x1.bias[background] += 1000.0
            # ... and its boxes twice its anchors' size: they overlap as boxes that meet on one
            # face do, so that NMS leaves 1-3 of them, where a trained detector leaves one or two
            for head in net.BboxHead:
                head.conv1x1.bias.view(-1, 4)[:, 2:] += math.log(2.0) / 0.2  # / the size variance
    return net


def weights_with_detector(directory, small_weights, samples_seed: int = 1):
    """A weights dir like `small_weights` whose detector is calibrated on make_faces images."""
    import os
    from pathlib import Path

    import torch

    from tests.checkpoints import DETECTION_FILE, GFPGAN_FILE, PARSING_FILE

    directory = Path(directory)
    for name in (GFPGAN_FILE, PARSING_FILE):
        if not (directory / name).exists():
            os.symlink(Path(small_weights) / name, directory / name)
    net = calibrated_retinaface(make_faces(4, seed=samples_seed))
    torch.save(net.state_dict(), directory / DETECTION_FILE)
    return directory
