"""Batched face detection: facexlib's RetinaFace run over a whole batch on the device.

Does what `RetinaFace.detect_faces` + `FaceRestoreHelper.get_face_landmarks_5` do for one
image (score threshold, NMS, eye-distance filter, centre face), for N images at once, without
leaving the device.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

# GFPGANer's settings: get_face_landmarks_5(..., eye_dist_threshold=5) calls
# detect_faces(img, 0.97) with facexlib's default NMS threshold of 0.4.
CONF_THRESHOLD = 0.97
NMS_THRESHOLD = 0.4
EYE_DIST_THRESHOLD = 5.0
# RetinaFace (resnet50) configuration, from facexlib.
_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
_STEPS = (8, 16, 32)
_VARIANCE = (0.1, 0.2)
_BGR_MEAN = (104.0, 117.0, 123.0)


@dataclass
class Faces:
    """Detected faces of a batch, sorted by image, then by score (highest first)."""

    image: torch.Tensor      # (M,) int64: which image of the batch
    boxes: torch.Tensor      # (M, 4) x1, y1, x2, y2 in input pixels
    scores: torch.Tensor     # (M,)
    landmarks: torch.Tensor  # (M, 5, 2) x, y in input pixels

    def take(self, index: torch.Tensor) -> "Faces":
        return Faces(self.image[index], self.boxes[index], self.scores[index], self.landmarks[index])


@functools.lru_cache(maxsize=16)
def _priors_cpu(height: int, width: int) -> torch.Tensor:
    levels = []
    for step, sizes in zip(_STEPS, _MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(rows, dtype=torch.float32) + 0.5) * step / height,
                                (torch.arange(cols, dtype=torch.float32) + 0.5) * step / width,
                                indexing="ij")
        per_size = [torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], -1)
                    for s in sizes]
        # facexlib's order: row, column, then anchor size
        levels.append(torch.stack(per_size, dim=2).reshape(-1, 4))
    return torch.cat(levels)


def priors(height: int, width: int, device: torch.device) -> torch.Tensor:
    """RetinaFace anchors (cx, cy, w, h), relative to the image, in facexlib's order."""
    return _priors_cpu(height, width).to(device)


class FaceDetector:
    """RetinaFace over a batch of same-size images, returning every face that GFPGANer keeps."""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Faces:
        """images: (N, 3, H, W) float, BGR, 0..255 -> faces after threshold, NMS, eye filter."""
        n, _, height, width = images.shape
        mean = torch.tensor(_BGR_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
        loc, conf, landm = self.net(images.float() - mean)
        anchors = priors(height, width, images.device)
        centre, size = anchors[:, :2], anchors[:, 2:]
        scores = conf[..., 1]
        keep = scores > CONF_THRESHOLD                      # (N, P)
        image_index, prior_index = keep.nonzero(as_tuple=True)
        loc, landm, scores = loc[keep], landm[keep], scores[keep]
        centre, size = centre[prior_index], size[prior_index]
        box_centre = centre + loc[:, :2] * _VARIANCE[0] * size
        box_size = size * torch.exp(loc[:, 2:] * _VARIANCE[1])
        scale = torch.tensor([width, height], device=images.device, dtype=torch.float32)
        boxes = torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], dim=1) * scale.repeat(2)
        points = (centre.unsqueeze(1) + landm.view(-1, 5, 2) * _VARIANCE[0] * size.unsqueeze(1)) * scale
        kept = batched_nms(boxes, scores, image_index, NMS_THRESHOLD)
        # batched_nms orders by score over the whole batch; regroup by image, keeping that order.
        kept = kept[torch.sort(image_index[kept], stable=True).indices]
        faces = Faces(image_index[kept], boxes[kept], scores[kept], points[kept])
        eye_dist = torch.linalg.vector_norm(faces.landmarks[:, 0] - faces.landmarks[:, 1], dim=-1)
        return faces.take(eye_dist >= EYE_DIST_THRESHOLD)


def centre_faces(faces: Faces, height: int, width: int, wanted: torch.Tensor) -> Faces:
    """Keep, for each image whose `wanted` flag is set, only the face nearest the image centre.

    Images whose flag is clear keep all their faces. Ties go to the higher-scored face, as in
    facexlib's get_center_face (first minimum in score order).
    """
    if faces.image.numel() == 0:
        return faces
    centre = torch.tensor([width / 2, height / 2], device=faces.boxes.device)
    dist = torch.linalg.vector_norm((faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2 - centre, dim=-1)
    n = int(wanted.shape[0])
    best = torch.full((n,), float("inf"), device=dist.device).scatter_reduce(
        0, faces.image, dist, reduce="amin")
    is_best = dist == best[faces.image]
    # the first face (highest score) among equally near ones
    position = torch.arange(faces.image.numel(), device=dist.device)
    first = torch.full((n,), faces.image.numel(), device=dist.device).scatter_reduce(
        0, faces.image, torch.where(is_best, position, faces.image.numel()), reduce="amin")
    chosen = position == first[faces.image]
    return faces.take(chosen | ~wanted[faces.image])
