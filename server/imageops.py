"""Batched image operations on the device that reproduce OpenCV's, for the pipeline.

Resizes and blurs are separable linear maps, built once as small matrices and applied with
two matmuls over the whole batch; warps are `grid_sample` with OpenCV's pixel-centre
convention. Everything takes and returns float tensors shaped (N, C, H, W).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

# cv2.INTER_CUBIC's kernel parameter.
_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic kernel (a = -0.75) at distances t; OpenCV's interpolateCubic."""
    t = np.abs(t)
    a = _CUBIC_A
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def _lanczos4_weights(t: np.ndarray) -> np.ndarray:
    """sinc(t) * sinc(t / 4) on 8 taps; OpenCV's interpolateLanczos4 before normalising."""
    return np.sinc(t) * np.sinc(t / 4.0)


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """(out_size, in_size) matrix W such that W @ signal is cv2.resize along one axis.

    method: "linear", "cubic", "lanczos4" (any scale) or "area" (downscaling). Borders
    replicate the edge pixel, as cv2.resize does.
    """
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size
    rows = np.arange(out_size)
    if method == "area":
        if out_size > in_size:
            raise ValueError("area resize only shrinks; use linear, cubic or lanczos4 to enlarge")
        for dst in range(out_size):
            start, stop = dst * scale, (dst + 1) * scale
            for src in range(int(math.floor(start)), min(int(math.ceil(stop)), in_size)):
                overlap = min(stop, src + 1) - max(start, src)
                if overlap > 1e-12:
                    weights[dst, src] += overlap / scale
        return weights
    centre = (rows + 0.5) * scale - 0.5
    base = np.floor(centre).astype(np.int64)
    frac = centre - base
    if method == "linear":
        # OpenCV clamps the sample position itself at the borders (no extrapolation).
        low = base < 0
        high = base >= in_size - 1
        frac = np.where(low | high, 0.0, frac)
        base = np.clip(base, 0, in_size - 1)
        taps = np.arange(2)
        kernel = np.stack([1.0 - frac, frac], axis=1)
    elif method in ("cubic", "lanczos4"):
        half = 2 if method == "cubic" else 4
        taps = np.arange(-half + 1, half + 1)
        dist = frac[:, None] - taps[None, :]
        kernel = _cubic_weights(dist) if method == "cubic" else _lanczos4_weights(dist)
        kernel /= kernel.sum(axis=1, keepdims=True)
        base = base[:, None]
    else:
        raise ValueError(f"unknown resize method {method!r}")
    index = np.clip(base.reshape(-1, 1) + taps[None, :], 0, in_size - 1)
    np.add.at(weights, (np.repeat(rows, len(taps)), index.reshape(-1)), kernel.reshape(-1))
    return weights


@functools.lru_cache(maxsize=8)
def gaussian_blur_matrix(size: int, ksize: int, sigma: float, times: int = 1) -> np.ndarray:
    """(size, size) matrix of cv2.GaussianBlur along one axis (BORDER_REFLECT_101), `times` over."""
    half = ksize // 2
    kernel = np.exp(-((np.arange(ksize) - half) ** 2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    blur = np.zeros((size, size), dtype=np.float64)
    for out in range(size):
        for k in range(ksize):
            src = out + k - half
            # reflect-101: ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ...
            while src < 0 or src >= size:
                src = -src if src < 0 else 2 * (size - 1) - src
            blur[out, src] += kernel[k]
    return np.linalg.matrix_power(blur, times)


@functools.lru_cache(maxsize=64)
def _device_matrix(factory, args: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(factory(*args), dtype=dtype, device=device)


def apply_separable(images: torch.Tensor, factory, rows_args: tuple, cols_args: tuple) -> torch.Tensor:
    """R @ image @ C.T for every image and channel, R = factory(*rows_args), C likewise.

    The matrices are built once per shape and kept on the device.
    """
    rows = _device_matrix(factory, rows_args, images.device, images.dtype)
    cols = _device_matrix(factory, cols_args, images.device, images.dtype)
    return apply_matrices(images, rows, cols)


def apply_matrices(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ image @ cols.T for every image and channel: apply_separable with matrices made
    beforehand (code compiled by torch.compile must not build them: it would trace the Python
    loops that do).

    A channels-last batch (the upload, a channels-last network's output) is multiplied in that
    layout: each image is an (H, W*C) matrix there, then (H'*W, C) rows of W' columns, so no
    layout copy is made (matmul would copy every image of a batch of more than one to NCHW
    first: an operator and a pass over the batch that a batch of one does not take). The
    result stays channels-last."""
    if images.dim() == 4 and images.shape[1] > 1 and not images.is_contiguous() and \
            images.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = images.shape
        tall = torch.matmul(rows, images.permute(0, 2, 3, 1).reshape(n, h, w * c))  # (n, h', w c)
        out = torch.matmul(cols, tall.view(n * rows.shape[0], w, c))  # (n h', w', c)
        return out.view(n, rows.shape[0], cols.shape[0], c).permute(0, 3, 1, 2)
    return torch.matmul(torch.matmul(rows, images), cols.transpose(0, 1))


def resize(images: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """Resize (N, C, H, W) images to (N, C, size, size) like cv2.resize(method)."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    return apply_separable(images, resize_matrix, (height, size, method), (width, size, method))


def gaussian_blur_matrices(height: int, width: int, ksize: int, sigma: float, times: int,
                           device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, cols) device matrices gaussian_blur applies to (height, width) images."""
    return (_device_matrix(gaussian_blur_matrix, (height, ksize, sigma, times), torch.device(device), dtype),
            _device_matrix(gaussian_blur_matrix, (width, ksize, sigma, times), torch.device(device), dtype))


def gaussian_blur(images: torch.Tensor, ksize: int, sigma: float, times: int = 1) -> torch.Tensor:
    """cv2.GaussianBlur(image, (ksize, ksize), sigma) applied `times` times, batched."""
    height, width = images.shape[-2:]
    return apply_matrices(images, *gaussian_blur_matrices(height, width, ksize, sigma, times,
                                                          images.device, images.dtype))


def resize_for_output(images: torch.Tensor, size: int) -> torch.Tensor:
    """The resize used for backgrounds and aligned outputs: area to shrink, Lanczos-4 to enlarge.

    Enlarging matches what facexlib does to the background; shrinking uses area averaging
    (facexlib would use Lanczos-4 there too, which aliases).
    """
    return resize(images, size, "area" if size < images.shape[-1] else "lanczos4")


def similarity_transform(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src points to dst.

    src: (N, K, 2), dst: (K, 2) or (N, K, 2), weights: (N, K) (1 keeps a point, 0 drops it)
    -> (N, 2, 3) matrices in cv2's convention.
    """
    z = _complex_points(src)
    return _similarity_matrices(*_similarity(z, _complex_points(dst.to(device=src.device)), weights))


def _complex_points(points: torch.Tensor) -> torch.Tensor:
    """(..., K, 2) points -> (..., K) complex128 x + iy."""
    return torch.view_as_complex(points.to(torch.float64).contiguous())


def _similarity(z: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares similarity z -> c z + shift onto t, for complex points z: (N, K) and
    t: (K,) or (N, K), optionally weighted (N, K): (c, shift), each (N,) complex.

    A rotation with a uniform scale is a multiplication by one complex number, so the fit is
    one complex least squares: c = sum w conj(z - mean z) (t - mean t) / sum w |z - mean z|^2.
    The same sums as the real form (a = sum s.d / |s|^2, b = sum s x d / |s|^2), in a third
    of the operators: on the device each is a launch for a few dozen numbers."""
    if weights is None:
        z_mean, t_mean = z.mean(dim=1, keepdim=True), t.mean(dim=-1, keepdim=True)
        zc, tc = z - z_mean, t - t_mean
        conj = zc.conj_physical()  # (a lazy conj() is made physical by each product reading it)
        c = (conj * tc).sum(dim=1) / (conj * zc).real.sum(dim=1)
    else:
        w = weights.to(torch.float64)
        total = w.sum(dim=1, keepdim=True)
        z_mean, t_mean = (z * w).sum(dim=1, keepdim=True) / total, (t * w).sum(dim=1, keepdim=True) / total
        zc, tc = z - z_mean, t - t_mean
        wz = zc.conj() * w
        c = (wz * tc).sum(dim=1) / (wz * zc).real.sum(dim=1)
    return c, (t_mean - c.unsqueeze(1) * z_mean).squeeze(1)


def _similarity_matrices(c: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(N,) complex c and shift -> (N, 2, 3) matrices [[a, -b, x], [b, a, y]] (c = a + ib)."""
    a, b = c.real, c.imag
    return torch.stack([a, -b, shift.real, b, a, shift.imag], dim=-1).view(-1, 2, 3)


def _opencv_lmeds_pairs(count: int = 5, iterations: int = 13) -> list[tuple[int, int]]:
    """The point pairs cv2.estimateAffinePartial2D(method=LMEDS) tries, in its order.

    OpenCV seeds its generator with the same constant on every call and, for 5 points,
    draws 13 random pairs (confidence 0.99, outlier ratio 0.45); this replays that
    generator (multiply-with-carry, coefficient 4164903690).
    """
    state = (1 << 64) - 1
    pairs = []
    for _ in range(iterations):
        chosen: list[int] = []
        while len(chosen) < 2:
            state = ((state & 0xFFFFFFFF) * 4164903690 + (state >> 32)) & ((1 << 64) - 1)
            index = (state & 0xFFFFFFFF) % count
            if index not in chosen:
                chosen.append(index)
        pairs.append((chosen[0], chosen[1]))
    return pairs


_LMEDS_PAIRS = torch.tensor(_opencv_lmeds_pairs())


@functools.lru_cache(maxsize=8)
def _lmeds_pairs(device: torch.device) -> torch.Tensor:
    return _LMEDS_PAIRS.to(device)


def robust_similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """What facexlib's cv2.estimateAffinePartial2D(landmarks, template, method=LMEDS) returns,
    for a batch, on the device.

    Least median of squares over OpenCV's own sequence of point pairs picks a model; points
    within its inlier bound are kept and the similarity is refitted on them by least squares
    (where OpenCV's Levenberg-Marquardt refinement converges). A landmark the detector got
    wrong (an occluded mouth corner, say) is dropped instead of skewing the alignment.
    src: (N, 5, 2), dst: (5, 2) -> (N, 2, 3).
    """
    n, k, _ = src.shape
    z = _complex_points(src.to(torch.float32))  # OpenCV works on float32 points
    t = _complex_points(dst.to(device=src.device, dtype=torch.float32))
    pairs = _lmeds_pairs(src.device)
    m = pairs.shape[0]
    c, shift = _similarity(z[:, pairs].reshape(n * m, 2), t[pairs].repeat(n, 1))
    projected = c.view(n, m, 1) * z.unsqueeze(1) + shift.view(n, m, 1)  # (N, pairs, K)
    errors = torch.view_as_real(projected - t).pow(2).sum(-1).to(torch.float32)
    medians = errors.kthvalue(k // 2 + 1, dim=-1).values
    best = medians.argmin(dim=1)  # first minimum, as OpenCV keeps the first
    rows = torch.arange(n, device=src.device)
    sigma = (2.5 * 1.4826 * (1 + 5.0 / (k - 2)) * medians[rows, best].double().sqrt()).clamp_min(0.001)
    inliers = errors[rows, best] <= (sigma * sigma).to(torch.float32).unsqueeze(-1)
    return _similarity_matrices(*_similarity(z, t, inliers))


def invert_affine(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of (N, 2, 3) affine matrices (cv2.invertAffineTransform, batched)."""
    # The 2x2 inverse in closed form: torch.linalg.inv checks for singular input on the host,
    # which would stall the device queue once per call. [[a, b], [c, d]] -> [[d, -b], [-c, a]] / det,
    # the adjugate in one gather and one multiply by its signs.
    flat = matrices.reshape(-1, 6)  # a, b, x, c, d, y
    order = _device_matrix(_adjugate, ("order",), matrices.device, torch.int64)
    signs = _device_matrix(_adjugate, ("signs",), matrices.device, matrices.dtype)
    det = flat[:, 0] * flat[:, 4] - flat[:, 1] * flat[:, 3]
    inv = (flat.index_select(1, order) * signs / det.unsqueeze(1)).view(-1, 2, 2)
    shift = torch.bmm(inv, matrices[:, :, 2:]).neg_()
    return torch.cat([inv, shift], dim=2)


def _adjugate(part: str) -> list:
    """invert_affine's constants (kept on each device by _device_matrix): which entries of
    (a, b, x, c, d, y) make the adjugate (d, b, c, a) ("order"), and their signs."""
    return [4, 1, 3, 0] if part == "order" else [1.0, -1.0, -1.0, 1.0]


@functools.lru_cache(maxsize=64)
def _normalising(height: int, width: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """((2, 3), (3, 3)) float64 on `device`: source pixels -> grid_sample's normalised
    coordinates, and normalised -> destination pixels of a size x size output."""
    to_norm = np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1]])
    to_px = np.array([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]])
    return torch.from_numpy(to_norm).to(device), torch.from_numpy(to_px).to(device)


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, size: int,
                border_value: torch.Tensor | float = 0.0) -> torch.Tensor:
    """cv2.warpAffine(image, M, (size, size)) with bilinear sampling, for a batch.

    images: (N, C, H, W) float; matrices: (N, 2, 3) mapping source pixels to destination
    pixels (cv2's convention, pixel centres at integer coordinates); pixels outside the source
    read as border_value (a scalar or a (C,) tensor), blended bilinearly at the edge like
    BORDER_CONSTANT.
    """
    return warp_affine_inverse(images, invert_affine(matrices.double()), size, border_value)


def warp_affine_inverse(images: torch.Tensor, inverse: torch.Tensor, size: int,
                        border_value: torch.Tensor | float = 0.0) -> torch.Tensor:
    """warp_affine given the inverse map, (N, 2, 3) destination -> source pixels (float64 keeps
    the sampling positions exact to well under a thousandth of a pixel)."""
    n, channels, height, width = images.shape
    if n == 0:  # affine_grid refuses an empty batch
        return images.new_zeros((0, channels, size, size))
    inverse = inverse.double()
    to_norm, to_px = _normalising(height, width, size, images.device)
    bottom = to_px[2:].expand(n, 1, 3)  # the affine matrices' implicit last row, [0, 0, 1]
    theta = to_norm @ torch.cat([inverse, bottom], dim=1) @ to_px
    grid = F.affine_grid(theta, [n, channels, size, size], align_corners=False).to(images.dtype)
    if torch.is_tensor(border_value):
        border = border_value.to(device=images.device, dtype=images.dtype).reshape(1, -1, 1, 1)
    else:
        border = float(border_value)  # a plain number: nothing to upload
    warped = F.grid_sample(images - border, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return warped + border
