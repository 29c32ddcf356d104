"""Batched face detection: facexlib's RetinaFace run over a whole batch on the device.

Does what `RetinaFace.detect_faces` + `FaceRestoreHelper.get_face_landmarks_5` do for one
image (score threshold, NMS, eye-distance filter, centre face), for N images at once, without
leaving the device.

Two ways, the same faces:
- `candidates`: the anchors above the threshold selected (`nonzero`), then torchvision's NMS.
  Both wait for the device: the host has to learn how many candidates there are.
- `centre_rows` (GFPGANer's only_center_face, one row per image): each image's FIXED_CANDIDATES
  best-scored anchors, suppressed as a fixed-size overlap matrix in FIXED_NMS_ROUNDS rounds
  (`fixed_centre`). No wait; an image whose answer it cannot vouch for is flagged, and the
  pipeline detects that image again the first way.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.ops import nms

# GFPGANer's settings: get_face_landmarks_5(..., eye_dist_threshold=5) calls
# detect_faces(img, 0.97) with facexlib's default NMS threshold of 0.4.
CONF_THRESHOLD = 0.97
NMS_THRESHOLD = 0.4
#: Most boxes one NMS call takes (its mask: n x n/64 64-bit words, 32 MiB at this size); a batch with more
#: candidates is suppressed in groups of whole images.
NMS_BOXES_PER_CALL = 16_384
EYE_DIST_THRESHOLD = 5.0
#: Anchors a wait-free detection (fixed_centre) takes per image, the best-scored first: 256 of
#: the 2,688 a 256x256 image has. An image with more above the threshold is detected again.
FIXED_CANDIDATES = 256
#: Rounds of fixed_centre's suppression. Greedy NMS is the one fixed point of a round (a box is
#: kept when no kept box before it overlaps it), and the rounds reach it after at most
#: 2 x (boxes kept) - 1 of them: 8 rounds vouch for an image with up to 4 faces left after NMS
#: (a lip-sync crop has one), often more; an image whose last two rounds differ is detected
#: again.
FIXED_NMS_ROUNDS = 8
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
    #: (M,) bool where some rows are placeholders (centre_choice: an image without a face);
    #: None when every row is a face
    present: torch.Tensor | None = None
    #: (M,) bool where some rows come from a wait-free detection (FaceDetector.centre_rows):
    #: False where it could not vouch for the row, whose image must be detected again; None
    #: when every row is vouched for
    settled: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> "Faces":
        if index.dtype == torch.bool:  # one device round trip for the mask, not one per field
            index = index.nonzero().squeeze(1)
        return Faces(self.image[index], self.boxes[index], self.scores[index], self.landmarks[index],
                     None if self.present is None else self.present[index],
                     None if self.settled is None else self.settled[index])


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


@functools.lru_cache(maxsize=16)
def priors(height: int, width: int, device: torch.device) -> torch.Tensor:
    """RetinaFace anchors (cx, cy, w, h), relative to the image, in facexlib's order; made once
    per size and device, so a batch uploads nothing."""
    return _priors_cpu(height, width).to(device)


def network_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) BGR 0..255 images -> RetinaFace's input (float, its BGR mean subtracted)."""
    return images.float() - _bgr_mean(images.device)


class FaceDetector:
    """RetinaFace over a batch of same-size images, returning every face that GFPGANer keeps."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        #: (height, width) -> a stand-in for `raw` at that size (the pipeline's CUDA graphs)
        self.graphed: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}
        #: (height, width) -> a stand-in for `raw_centre` at that size
        self.graphed_centre: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}
        #: (height, width) -> a stand-in for `net_pass` at that size (the pipeline's
        #: --compile-detector: a CompiledForward, made for one image size); other sizes run eagerly
        self.compiled: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}

    def net_pass(self, x: torch.Tensor) -> torch.Tensor:
        """RetinaFace's outputs for mean-subtracted images as one (N, anchors, 16) tensor: box
        offsets (4), class scores (2), landmark offsets (10), run eagerly. One tensor, so that
        the pass can be replayed from a CUDA graph or compiled."""
        loc, conf, landm = self.net(x)
        return torch.cat([loc, conf, landm], dim=-1)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """`net_pass`, compiled where `compiled` has a pass for x's size."""
        compiled = self.compiled.get((x.shape[-2], x.shape[-1]))
        return self.net_pass(x) if compiled is None else compiled(x)

    def use_graph(self, size: tuple[int, int], forward: Callable[[torch.Tensor], torch.Tensor],
                  with_centre: bool = False) -> None:
        """Detect images of `size` through `forward`, a stand-in (a CUDA graph) for `raw`, or
        for `raw_centre` when `with_centre`."""
        if not with_centre:
            self.graphed[size] = forward
            return
        anchors = priors(*size, torch.device("cpu")).shape[0]
        self.graphed[size] = lambda x: forward(x)[:, :anchors * 16].view(x.shape[0], anchors, 16)
        self.graphed_centre[size] = lambda x: forward(x)[:, anchors * 16:]

    def drop_graphs(self) -> None:
        self.graphed, self.graphed_centre = {}, {}

    def raw_centre(self, x: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """`raw` and `fixed_centre` of it in one (N, anchors x 16 + 17) tensor: one
        function of the batch, which the pipeline captures as one CUDA graph (`eager`: with
        `net_pass`, never the compiled pass)."""
        raw = self.net_pass(x) if eager else self.raw(x)
        return torch.cat([raw.flatten(1), fixed_centre(raw, x.shape[-2], x.shape[-1])], dim=1)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        graphed = self.graphed.get((height, width))
        return self.raw(x) if graphed is None else graphed(x)

    @torch.no_grad()
    def centre_rows(self, images: torch.Tensor, image: torch.Tensor | None = None) -> Faces:
        """Each image's centre face, as `candidates` + `centre_choice` find it, in one row per
        image, without waiting for the device. `present` is False where an image has no face
        (its row is a placeholder, not to be used); `settled` is False where this
        cannot vouch for the row (fixed_centre), and the image must be detected again with
        `candidates`. `image`: the rows' `image` (default: 0..N-1)."""
        height, width = images.shape[-2:]
        x = network_input(images)
        graphed = self.graphed_centre.get((height, width))
        if graphed is None:  # eagerly: no packing into one tensor
            row, found, settled = _centre_parts(self._raw(x), height, width)
        else:
            packed = graphed(x)
            row, found, settled = packed[:, :15], packed[:, 15] > 0.5, packed[:, 16] > 0.5
        image = torch.arange(images.shape[0], device=images.device) if image is None else image
        return Faces(image, row[:, :4], row[:, 4], row[:, 5:].reshape(-1, 5, 2), present=found, settled=settled)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Faces:
        """images: (N, 3, H, W) float, BGR, 0..255 -> faces after threshold, NMS, eye filter."""
        faces, usable = self.candidates(images)
        return faces.take(usable)

    @torch.no_grad()
    def candidates(self, images: torch.Tensor) -> tuple[Faces, torch.Tensor]:
        """Faces after threshold and NMS, and which of them pass GFPGANer's eye-distance filter.

        The filter is returned as a mask rather than applied, so the caller can fold it into its
        own selection and take the faces once (each selection costs a device round trip).
        """
        n, _, height, width = images.shape
        x = network_input(images)
        graphed = self.graphed.get((height, width))
        out = self.raw(x) if graphed is None else graphed(x)
        scores = out[..., 5]
        # The one data-dependent step: which anchors pass the threshold.
        image_index, prior_index = (scores > CONF_THRESHOLD).nonzero(as_tuple=True)
        scores = scores[image_index, prior_index]
        boxes, points = decode(out[image_index, prior_index], priors(height, width, images.device)[prior_index],
                               height, width)
        kept = _batched_nms(boxes, scores, image_index, NMS_THRESHOLD)
        # batched_nms orders by score over the whole batch; regroup by image, keeping that order.
        kept = kept[torch.sort(image_index[kept], stable=True).indices]
        faces = Faces(image_index[kept], boxes[kept], scores[kept], points[kept])
        eye_dist = torch.linalg.vector_norm(faces.landmarks[:, 0] - faces.landmarks[:, 1], dim=-1)
        return faces, eye_dist >= EYE_DIST_THRESHOLD


def decode(raw: torch.Tensor, anchors: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of RetinaFace's raw outputs (..., 16) at their anchors (..., 4) -> boxes (..., 4)
    x1, y1, x2, y2 and landmarks (..., 5, 2) in input pixels, as facexlib decodes them (its
    centre - size / 2 as centre + size * -0.5, the same numbers exactly, both corners in one
    operator: the wait-free detection runs it on every candidate)."""
    loc, landm = raw[..., :4], raw[..., 6:]
    centre, size = anchors[..., :2], anchors[..., 2:]
    scale, _, corner_scale = _scales(width, height, raw.device)
    box_centre = centre + loc[..., :2] * _VARIANCE[0] * size
    box_size = size * torch.exp(loc[..., 2:] * _VARIANCE[1])
    halves = _constant((-0.5, 0.5), raw.device, raw.dtype).view(2, 1)
    boxes = (box_centre.unsqueeze(-2) + box_size.unsqueeze(-2) * halves).reshape(*loc.shape) * corner_scale
    points = (centre.unsqueeze(-2) + landm.reshape(*landm.shape[:-1], 5, 2) * _VARIANCE[0] * size.unsqueeze(-2)) * scale
    return boxes, points


def fixed_centre(raw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`candidates` + `centre_choice` of RetinaFace's raw outputs (N, anchors, 16), in shapes
    the host knows: (N, 17), per image its centre face's box (4), score and landmarks (10),
    `found` (1.0: it has a face) and `settled` (1.0: this is the answer `candidates` gives).

    Each image's FIXED_CANDIDATES best-scored anchors are decoded as `candidates` decodes them
    and suppressed as torchvision's NMS suppresses them, in the same order (score, then anchor:
    its sort is stable), by the same overlap and the same comparison, but as a matrix: each
    round keeps the boxes that no box kept by the round before overlaps. After the eye filter
    the face nearest the centre is chosen, ties to the higher score. An image is not settled
    when more of its anchors passed the threshold than were taken, or when its last two rounds
    differ. Nothing here waits for the device, and it can be captured in a CUDA graph. Written
    in few operators (each is a kernel launch where it runs eagerly): the same arithmetic as
    `candidates` and torchvision's kernels, grouped."""
    row, found, settled = _centre_parts(raw, height, width)
    return torch.cat([row, torch.stack([found, settled], dim=1).to(row.dtype)], dim=1)


def _centre_parts(raw: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fixed_centre's row (box, score, landmarks), found and settled, unpacked."""
    n, count, _ = raw.shape
    k = min(FIXED_CANDIDATES, count)
    device, dtype = raw.device, raw.dtype
    # By score, ties in anchor order: the anchors above the threshold come first (a NaN score,
    # from a broken pass, sorts before them and is never above it: it only takes a place).
    ranked, order = torch.sort(raw[..., 5], dim=1, descending=True, stable=True)
    valid = ranked[:, :k] > CONF_THRESHOLD
    order = order[:, :k]
    top = torch.gather(raw, 1, order.unsqueeze(-1).expand(n, k, raw.shape[-1]))
    scores = top[..., 5]
    boxes, points = decode(top, priors(height, width, device)[order], height, width)  # as `candidates` does
    half_scale = _scales(width, height, device)[1]
    # [j, i]: box j, earlier in the order, suppresses box i when kept; a box is kept when no
    # kept box suppresses it: valid - (kept @ suppresses), clamped at 0, round after round.
    suppresses = _overlapping(boxes) * _later(k, device, dtype)
    valid = valid.to(dtype).unsqueeze(1)
    keep = before = valid
    for _ in range(FIXED_NMS_ROUNDS):
        before, keep = keep, torch.baddbmm(valid, keep, suppresses, alpha=-1).clamp_(min=0)
    # settled: the last two rounds agree, and no anchor above the threshold was left out (the
    # first one not taken is below it: not above it, and not NaN)
    settled = (keep == before).all(-1).squeeze(1)
    if k < count:
        settled = settled & (ranked[:, k] <= CONF_THRESHOLD)
    # kept (1.0, else 0.0) and eyes far enough apart
    usable = torch.linalg.vector_norm(points[:, :, 0] - points[:, :, 1], dim=-1) * keep.squeeze(1) \
        >= EYE_DIST_THRESHOLD
    # _centre_index, row by row (a box not usable is at infinity, which is never the best)
    dist = torch.linalg.vector_norm((boxes[..., :2] + boxes[..., 2:]) / 2 - half_scale, dim=-1)
    dist = torch.where(usable, dist, float("inf"))
    is_best = (dist == dist.amin(1, keepdim=True)) & (dist < float("inf"))  # finite: a distance is >= 0
    found, first = torch.max(is_best, dim=1)  # (any, the index of the first)
    # a faceless image's row: the first candidate's values, never used (`found` is False)
    row = torch.cat([boxes, scores.unsqueeze(-1), points.flatten(2)], dim=-1)
    row = torch.gather(row, 1, first.view(n, 1, 1).expand(n, 1, row.shape[-1])).squeeze(1)
    return row, found, settled


def _overlapping(boxes: torch.Tensor) -> torch.Tensor:
    """(N, K, K) bool: box j and box i of an image overlap as torchvision's NMS finds it (its
    CPU and CUDA kernels' arithmetic, x and y side by side; on the CPU an overlap above the
    threshold as a double, which is one at or above it as a float32, on CUDA above it as a
    float32)."""
    low, high = boxes[..., :2], boxes[..., 2:]
    area = (high - low).prod(-1)
    sides = (torch.minimum(high.unsqueeze(2), high.unsqueeze(1)) - torch.maximum(low.unsqueeze(2), low.unsqueeze(1)))
    inter = sides.clamp_(min=0).prod(-1)
    overlap = inter / (area.unsqueeze(2) + area.unsqueeze(1) - inter)
    return overlap > NMS_THRESHOLD if boxes.is_cuda else overlap >= NMS_THRESHOLD


@functools.lru_cache(maxsize=8)
def _later(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(K, K): [j, i] 1 where j < i, made once per size and device."""
    return torch.ones(k, k, dtype=dtype, device=device).triu(1)


@functools.lru_cache(maxsize=32)
def _scales(width: int, height: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(width, height), half of it (the image centre) and (width, height, width, height)."""
    scale = _scale(width, height, device)
    return scale, scale / 2, scale.repeat(2)


@functools.lru_cache(maxsize=8)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, image: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """NMS within each image, in one NMS call: each image's boxes are shifted past the previous
    image's, so boxes of different images never overlap (torchvision's batched_nms does this too
    below a size limit, above which it loops over the images, one round trip each).

    `image` must be sorted (the threshold's `nonzero` gives it so). Past NMS_BOXES_PER_CALL boxes
    the images are split into groups of at most that many boxes, one NMS call each: torchvision's
    CUDA kernel keeps an n x n/64 bit mask, which grows with the square of the batch's boxes and
    overflows its int32 size past about 370,000 (on the H200, 256 random-weight images passed
    450,626 anchors and failed so). Only such batches pay the extra host read.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if n <= NMS_BOXES_PER_CALL:
        return _nms_one_call(boxes, scores, image, threshold)
    kept, start = [], 0
    for count in _groups(torch.bincount(image).tolist(), NMS_BOXES_PER_CALL):
        part = slice(start, start + count)
        kept.append(_nms_one_call(boxes[part], scores[part], image[part], threshold) + start)
        start += count
    return torch.cat(kept)


def _nms_one_call(boxes: torch.Tensor, scores: torch.Tensor, image: torch.Tensor,
                  threshold: float) -> torch.Tensor:
    offsets = image.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, threshold)


def _groups(counts: list[int], limit: int) -> list[int]:
    """Consecutive images' box counts joined into groups of at most `limit` boxes (an image
    with more is a group of its own); the group sizes, in order."""
    groups: list[int] = []
    for count in counts:
        if count == 0:
            continue
        if groups and groups[-1] + count <= limit:
            groups[-1] += count
        else:
            groups.append(count)
    return groups


@functools.lru_cache(maxsize=8)
def _bgr_mean(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BGR_MEAN, dtype=torch.float32).view(1, 3, 1, 1).to(device)


@functools.lru_cache(maxsize=32)
def _scale(width: int, height: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([width, height], dtype=torch.float32).to(device)


def centre_faces(faces: Faces, height: int, width: int, wanted: torch.Tensor) -> Faces:
    """Keep, for each image whose `wanted` flag is set, only the face nearest the image centre.

    Images whose flag is clear keep all their faces. Ties go to the higher-scored face, as in
    facexlib's get_center_face (first minimum in score order).
    """
    if faces.image.numel() == 0:
        return faces
    return faces.take(centre_mask(faces, height, width, wanted))


def centre_mask(faces: Faces, height: int, width: int, wanted: torch.Tensor,
                among: torch.Tensor | None = None) -> torch.Tensor:
    """The faces `centre_faces` keeps, as a mask; `among` (a mask) limits the candidates."""
    count = faces.image.numel()
    among = torch.ones(count, dtype=torch.bool, device=faces.boxes.device) if among is None else among
    if count == 0:
        return among
    first = _centre_index(faces, height, width, int(wanted.shape[0]), among)
    position = torch.arange(count, device=faces.boxes.device)
    chosen = position == first[faces.image]
    return among & (chosen | ~wanted[faces.image])


def centre_choice(faces: Faces, height: int, width: int, n_images: int,
                  among: torch.Tensor) -> tuple[Faces, torch.Tensor]:
    """One face per image, the one `centre_faces` keeps, as fixed-size tensors: (faces of
    images 0..n-1, found), `found` False where an image has no candidate `among` allows (its
    row then holds another face's values, or zeros, and must not be used). The shapes are
    known on the host, so unlike a selection this does not wait for the device."""
    count, device = faces.image.numel(), faces.boxes.device
    if count == 0:
        return Faces(torch.arange(n_images, device=device), torch.zeros(n_images, 4, device=device),
                     torch.zeros(n_images, device=device), torch.zeros(n_images, 5, 2, device=device)), \
            torch.zeros(n_images, dtype=torch.bool, device=device)
    first = _centre_index(faces, height, width, n_images, among)
    found = first < count
    picked = faces.take(first.clamp(max=count - 1))
    picked.image = torch.arange(n_images, device=device)
    return picked, found


def _centre_index(faces: Faces, height: int, width: int, n_images: int, among: torch.Tensor) -> torch.Tensor:
    """(n_images,): each image's face nearest the image centre among `among` (ties to the
    higher score, as facexlib's get_center_face: first minimum in score order); the face count
    where an image has none."""
    count = faces.image.numel()
    centre = _scale(width, height, faces.boxes.device) / 2
    dist = torch.linalg.vector_norm((faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2 - centre, dim=-1)
    dist = torch.where(among, dist, float("inf"))
    best = torch.full((n_images,), float("inf"), device=dist.device).scatter_reduce(
        0, faces.image, dist, reduce="amin")
    is_best = among & (dist == best[faces.image]) & torch.isfinite(dist)
    position = torch.arange(count, device=dist.device)
    return torch.full((n_images,), count, device=dist.device).scatter_reduce(
        0, faces.image, torch.where(is_best, position, count), reduce="amin")
