"""The batched GFPGAN pipeline: faces in, restored faces out, in one pass on the device.

faces -> one tensor -> batched detection -> per-face similarity transform -> warp to the
512 template -> GFPGAN over the whole batch -> inverse warp + soft parsing-mask paste ->
fidelity blend -> output size -> uint8. It knows nothing about gRPC or queues; the batcher
calls `enhance(jobs)` from its worker thread (see server/jobs.py).
"""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from client.types import Alignment, EnhanceOptions, FaceStatus
from server import imageops
from server.detection import FaceDetector, Faces, centre_faces
from server.jobs import Job, JobResult, ModelInfo

log = logging.getLogger(__name__)

FACE_SIZE = 512
# facexlib's FFHQ 5-point template for 512x512 faces: eyes, nose, mouth corners.
FACE_TEMPLATE = torch.tensor([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=torch.float64)
# facexlib fills the area outside the image with this grey (BGR) when warping to the template.
WARP_BORDER_BGR = (135.0, 133.0, 132.0)
# ParseNet classes that belong to the face mask (facexlib's MASK_COLORMAP: 0 background,
# 14 neck, 16 cloth, 17 hair, 18 hat are left out).
_FACE_CLASSES = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0]
# facexlib feathers the parsing mask with two 101x101 Gaussian blurs (sigma 11) and clears a
# 10-pixel frame.
_MASK_BLUR = (101, 11.0, 2)
_MASK_FRAME = 10
# A hard cap on restored faces per image when only_center_face is off, so that one
# crowded (or adversarial) image cannot blow up a device batch.
MAX_FACES_PER_IMAGE = 8


def _to_network(images_bgr: torch.Tensor) -> torch.Tensor:
    """0..255 BGR -> the [-1, 1] RGB the networks take."""
    return images_bgr.flip(1) / 127.5 - 1.0


def _from_network(output_rgb: torch.Tensor) -> torch.Tensor:
    """Network output [-1, 1] RGB -> 0..255 BGR, rounded like basicsr's tensor2img."""
    return ((output_rgb.float().clamp(-1, 1) + 1.0) * 127.5).round().flip(1)


@dataclass
class _Group:
    """The images of one input size in a device batch, on their way through the pipeline."""

    indices: list[int]             # which jobs, in order
    images: torch.Tensor           # (n, 3, S, S) float BGR 0..255
    options: list[EnhanceOptions]  # per image
    faces: Faces                   # faces to restore and paste (DETECT and LANDMARKS images)
    affines: torch.Tensor          # (faces, 2, 3) image -> 512 template
    aligned_index: torch.Tensor    # images given as already aligned (ALIGNED)
    warped: torch.Tensor           # (faces, 3, 512, 512) template crops
    aligned_inputs: torch.Tensor   # (aligned, 3, 512, 512) ALIGNED inputs resized to 512
    noise: torch.Tensor            # per crop (faces then aligned): wants random noise
    pasted_faces: torch.Tensor | None = None
    aligned_faces: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.options)

    @property
    def num_crops(self) -> int:
        return self.warped.shape[0] + self.aligned_inputs.shape[0]


class FacePipeline:
    """GFPGAN + RetinaFace + ParseNet, resident on one device, run over batches of faces."""

    def __init__(self, gfpgan: torch.nn.Module, detector: torch.nn.Module, parser: torch.nn.Module,
                 *, device: torch.device, dtype: torch.dtype, info: ModelInfo | None = None):
        self.gfpgan = gfpgan
        self.detector = FaceDetector(detector)
        self.parser = parser
        self.device = torch.device(device)
        self.dtype = dtype
        self.info = info or ModelInfo("GFPGAN", "GFPGANv1Clean", "", str(self.device), str(dtype))
        self._face_mask_lut = torch.tensor(_FACE_CLASSES, dtype=torch.float32, device=self.device)
        self._template = FACE_TEMPLATE.to(self.device)
        self._border = torch.tensor(WARP_BORDER_BGR, device=self.device)

    # -- the door ---------------------------------------------------------------------------

    @torch.no_grad()
    def enhance(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Run every job's faces through the pipeline in as few device passes as possible."""
        groups = defaultdict(list)  # input size -> job indices: one tensor per size
        for index, job in enumerate(jobs):
            groups[job.faces.shape[1]].append(index)
        plans = [self._prepare(jobs, indices) for indices in groups.values()]
        crops = torch.cat([c for plan in plans for c in (plan.warped, plan.aligned_inputs)])
        restored = self._restore(crops, torch.cat([plan.noise for plan in plans]))
        results: list[JobResult | None] = [None] * len(jobs)
        offset = 0
        for plan in plans:
            for index, result in self._finish(plan, restored[offset:offset + plan.num_crops], jobs):
                results[index] = result
            offset += plan.num_crops
        return results  # type: ignore[return-value]

    def warmup(self, faces: int = 1, size: int = 256) -> None:
        """One DETECT and one ALIGNED pass, so kernels and caches exist before real traffic."""
        image = np.full((faces, size, size, 3), 128, dtype=np.uint8)
        self.enhance([Job(image, EnhanceOptions()),
                      Job(image, EnhanceOptions(alignment=Alignment.ALIGNED))])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- stages -----------------------------------------------------------------------------

    def _upload(self, jobs: Sequence[Job], indices: list[int]) -> torch.Tensor:
        """The jobs' uint8 NHWC faces -> one float NCHW BGR tensor on the device."""
        host = np.concatenate([np.ascontiguousarray(jobs[i].faces) for i in indices])
        tensor = torch.from_numpy(host)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.permute(0, 3, 1, 2).float()

    def _prepare(self, jobs: Sequence[Job], indices: list[int]) -> _Group:
        """Upload one size group, find its faces and warp them to the 512 template."""
        images = self._upload(jobs, indices)
        options = [jobs[i].options for i in indices for _ in range(jobs[i].faces.shape[0])]
        aligned = torch.tensor([o.alignment is Alignment.ALIGNED for o in options], device=self.device)
        detect = torch.tensor([o.alignment is Alignment.DETECT for o in options], device=self.device)
        centre_only = torch.tensor([o.only_center_face for o in options], device=self.device)
        random_noise = torch.tensor([o.random_noise for o in options], device=self.device)

        faces = self._locate(jobs, indices, images, detect, centre_only)
        affines = imageops.robust_similarity_transform(faces.landmarks, self._template)
        warped = imageops.warp_affine(images[faces.image], affines, FACE_SIZE,
                                      self._border)
        aligned_index = aligned.nonzero().flatten()
        resized = imageops.resize(images[aligned_index], FACE_SIZE, "linear")
        # facexlib and cv2 hand GFPGAN uint8 crops: round like they do.
        return _Group(indices=indices, images=images, options=options, faces=faces, affines=affines,
                      aligned_index=aligned_index, warped=warped.round().clamp(0, 255),
                      aligned_inputs=resized.round().clamp(0, 255),
                      noise=torch.cat([random_noise[faces.image], random_noise[aligned_index]]))

    def _locate(self, jobs, indices, images, detect, centre_only) -> Faces:
        """5-point landmarks of every face to restore: detected, or given by the caller."""
        size = images.shape[-1]
        detect_index = detect.nonzero().flatten()
        found = self.detector.detect(images[detect_index]) if detect_index.numel() else None
        if found is not None:
            found = centre_faces(found, size, size, centre_only[detect_index])
            found.image = detect_index[found.image]
            found = found.take(_rank_within_image(found.image) < MAX_FACES_PER_IMAGE)
        given_images, given_points = [], []
        start = 0
        for i in indices:
            job = jobs[i]
            count = job.faces.shape[0]
            if job.options.alignment is Alignment.LANDMARKS:
                given_images.append(torch.arange(start, start + count))
                given_points.append(torch.as_tensor(job.landmarks, dtype=torch.float32))
            start += count
        parts = [found] if found is not None else []
        if given_images:
            image = torch.cat(given_images).to(self.device)
            points = torch.cat(given_points).to(self.device)
            zeros = torch.zeros(image.shape[0], device=self.device)
            parts.append(Faces(image, torch.zeros(image.shape[0], 4, device=self.device), zeros, points))
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return Faces(empty, torch.zeros(0, 4, device=self.device), torch.zeros(0, device=self.device),
                         torch.zeros(0, 5, 2, device=self.device))
        merged = Faces(*(torch.cat(t) for t in zip(*((p.image, p.boxes, p.scores, p.landmarks) for p in parts))))
        # paste order: image by image, each image's faces in detection (score) order
        return merged.take(torch.sort(merged.image, stable=True).indices)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _restore(self, crops: torch.Tensor, random_noise: torch.Tensor) -> torch.Tensor:
        """GFPGAN over all crops at once (two passes only if some want random noise)."""
        restored = torch.empty_like(crops)
        for wants_noise in (False, True):
            index = (random_noise == wants_noise).nonzero().flatten()
            if index.numel() == 0:
                continue
            with self._autocast():
                output = self.gfpgan(_to_network(crops[index]), return_rgb=False,
                                     randomize_noise=wants_noise)[0]
            restored[index] = _from_network(output)
        return restored

    def _face_masks(self, restored: torch.Tensor) -> torch.Tensor:
        """Soft face masks in [0, 1] from ParseNet, feathered like facexlib's paste-back."""
        with self._autocast():
            logits = self.parser(_to_network(restored))[0]
        masks = self._face_mask_lut[logits.float().argmax(dim=1)].unsqueeze(1) * 255.0
        ksize, sigma, times = _MASK_BLUR
        masks = imageops.gaussian_blur(masks, ksize, sigma, times)
        frame = torch.zeros_like(masks)
        frame[..., _MASK_FRAME:-_MASK_FRAME, _MASK_FRAME:-_MASK_FRAME] = 1.0
        return masks * frame / 255.0

    def _finish(self, plan: _Group, restored: torch.Tensor, jobs: Sequence[Job]):
        """Paste restored faces back, blend with the original, resize, and hand out per job."""
        faces = plan.faces
        num_faces = faces.image.shape[0]
        plan.pasted_faces, plan.aligned_faces = restored[:num_faces], restored[num_faces:]
        plan.masks = self._face_masks(plan.pasted_faces) if num_faces else None
        status = torch.full((plan.n,), int(FaceStatus.NO_FACE), dtype=torch.int64, device=self.device)
        status[faces.image] = int(FaceStatus.ENHANCED)
        status[plan.aligned_index] = int(FaceStatus.ENHANCED)
        status_host = status.cpu().tolist()
        outputs = {size: _to_host(self._compose(plan, size))
                   for size in sorted({o.output_size for o in plan.options})}
        rows = defaultdict(int)  # next unread row of each output size
        start = 0
        for i in plan.indices:
            count, size = jobs[i].faces.shape[0], jobs[i].options.output_size
            out = outputs[size][rows[size]:rows[size] + count]
            rows[size] += count
            yield i, JobResult(out, [FaceStatus(s) for s in status_host[start:start + count]])
            start += count

    def _compose(self, plan: _Group, out_size: int) -> torch.Tensor:
        """Output canvases, at out_size, of the group's images that asked for that size."""
        images, faces = plan.images, plan.faces
        wanted = torch.tensor([o.output_size == out_size for o in plan.options], device=self.device)
        chosen = wanted.nonzero().flatten()
        row_of = torch.full((plan.n,), -1, dtype=torch.int64, device=self.device)
        row_of[chosen] = torch.arange(chosen.numel(), device=self.device)
        fidelity = torch.tensor([o.fidelity for o in plan.options], device=self.device)
        scale = out_size / images.shape[-1]

        background = imageops.resize_for_output(images[chosen], out_size)
        canvas = background.clone()
        sel = wanted[faces.image].nonzero().flatten()
        if sel.numel():
            # template -> output canvas: undo the alignment, then map input pixels to output
            # pixels centre to centre (q = s * p + (s - 1) / 2; facexlib adds s / 2, which
            # shifts the face half an output pixel right and down when upscaling).
            to_canvas = imageops.invert_affine(plan.affines[sel]) * scale
            to_canvas[:, :, 2] += (scale - 1.0) / 2.0
            face_px = imageops.warp_affine(plan.pasted_faces[sel], to_canvas, out_size, 0.0).round()
            face_alpha = imageops.warp_affine(plan.masks[sel], to_canvas, out_size, 0.0)
            target = row_of[faces.image[sel]]
            rank = _rank_within_image(target)
            for r in range(int(rank.max()) + 1):  # several faces in one image paste in turn
                at = (rank == r).nonzero().flatten()
                alpha, rows = face_alpha[at], target[at]
                canvas[rows] = alpha * face_px[at] + (1 - alpha) * canvas[rows]
        f = fidelity[chosen].view(-1, 1, 1, 1)
        canvas = (1 - f) * canvas + f * background
        aligned = plan.aligned_index
        sel = wanted[aligned].nonzero().flatten()
        if sel.numel():
            f = fidelity[aligned[sel]].view(-1, 1, 1, 1)
            blended = (1 - f) * plan.aligned_faces[sel] + f * plan.aligned_inputs[sel]
            canvas[row_of[aligned[sel]]] = imageops.resize_for_output(blended, out_size)
        return canvas


def _rank_within_image(image: torch.Tensor) -> torch.Tensor:
    """0 for each image's first face, 1 for its second, ... (image ids sorted ascending)."""
    if image.numel() == 0:
        return image
    position = torch.arange(image.numel(), device=image.device)
    first = torch.full((int(image.max()) + 1,), image.numel(), device=image.device).scatter_reduce(
        0, image, position, reduce="amin")
    return position - first[image]


def _to_host(canvas: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) float 0..255 -> (N, S, S, 3) uint8 on the host, C-contiguous."""
    return canvas.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def resolve_device(name: str) -> torch.device:
    """"auto" -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA (fp16 is unsafe for GFPGAN), float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_pipeline(settings) -> FacePipeline:
    """Fetch missing weights (unless --no-download), load the three networks once, and wrap them."""
    from server.model import load_models
    from server.weights import ensure_weights

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    paths = ensure_weights(settings.model, settings.weights_dir, download=not settings.no_download)
    models = load_models(paths, device)
    for warning in models.gfpgan.warnings:
        log.warning("%s", warning)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return FacePipeline(models.gfpgan.net, models.detector, models.parser, device=device, dtype=dtype,
                        info=models.gfpgan.model_info(dtype))
