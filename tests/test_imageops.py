"""The device image operations reproduce OpenCV's (float in, float out)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from server import imageops
from server.profiling import OpCounter
from tests.device import TEST_DEVICE
from tests.faces import TEMPLATE_512, make_faces

FACE = make_faces(1, seed=11)[0]


def as_tensor(img):
    return torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None].to(TEST_DEVICE)


def as_image(t):
    return t[0].permute(1, 2, 0).cpu().numpy()


@pytest.mark.parametrize("size,method,flag", [
    (512, "linear", cv2.INTER_LINEAR), (100, "linear", cv2.INTER_LINEAR),
    (1024, "cubic", cv2.INTER_CUBIC), (512, "lanczos4", cv2.INTER_LANCZOS4),
    (300, "lanczos4", cv2.INTER_LANCZOS4), (128, "area", cv2.INTER_AREA), (200, "area", cv2.INTER_AREA),
])
def test_resize_equals_cv2(size, method, flag):
    expected = cv2.resize(FACE.astype(np.float32), (size, size), interpolation=flag)
    ours = as_image(imageops.resize(as_tensor(FACE), size, method))
    assert np.abs(ours - expected).max() < 1e-3


def test_a_channels_last_batch_is_resized_in_its_layout_with_the_same_pixels():
    """The upload and a channels-last network's output are channels-last: resized in that
    layout, a batch gives every image's NCHW result (float rounding only), stays channels-last,
    and runs the same two products for one image as for three, no copy to NCHW first."""
    faces = torch.from_numpy(make_faces(3, seed=12).astype(np.float32)).to(TEST_DEVICE)
    nhwc = faces.permute(0, 3, 1, 2)  # channels-last (N, C, H, W), as the pipeline uploads
    imageops.resize(nhwc[:1], 512, "linear")  # its matrices are made once, here
    ops = {}
    for n in (1, 3):
        with OpCounter(record=True) as counted:  # the operators that launch, views aside
            got = imageops.resize(nhwc[:n], 512, "linear")
        ops[n] = [name for name, _, _ in counted.record]
        want = imageops.resize(nhwc[:n].contiguous(), 512, "linear")
        assert got.shape == want.shape == (n, 3, 512, 512)
        assert (got - want).abs().max().item() < 1e-3
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert ops[1] == ops[3] and "aten::clone" not in ops[3], ops


def test_gaussian_blur_equals_cv2_twice():
    mask = (np.random.default_rng(0).random((512, 512)) > 0.5) * 255.0
    expected = cv2.GaussianBlur(cv2.GaussianBlur(mask, (101, 101), 11), (101, 101), 11)
    ours = imageops.gaussian_blur(torch.from_numpy(mask)[None, None].to(TEST_DEVICE), 101, 11.0, 2)[0, 0].cpu().numpy()
    assert np.abs(ours - expected).max() < 1e-6


def test_warp_affine_equals_cv2_with_constant_border():
    matrix = cv2.getRotationMatrix2D((128, 128), 17, 1.9)
    matrix[:, 2] += [3.3, -7.1]
    expected = cv2.warpAffine(FACE.astype(np.float32), matrix, (512, 512), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(135, 133, 132))
    ours = as_image(imageops.warp_affine(as_tensor(FACE), torch.from_numpy(matrix)[None].to(TEST_DEVICE), 512,
                                         torch.tensor([135.0, 133, 132])))
    # cv2 quantises sample positions to 1/32 pixel
    assert np.abs(ours - expected).mean() < 0.01 and np.abs(ours - expected).max() < 0.5


def test_robust_similarity_equals_cv2_lmeds_including_outliers():
    rng = np.random.default_rng(1)
    points, expected = [], []
    for _ in range(300):
        m = cv2.getRotationMatrix2D((0, 0), rng.uniform(-30, 30), rng.uniform(0.1, 1))
        p = TEMPLATE_512 @ m[:, :2].T + rng.uniform(0, 200, 2)
        p = p + rng.normal(0, rng.choice([0.5, 3, 10, 30]), p.shape)  # some with outliers
        points.append(p)
        expected.append(cv2.estimateAffinePartial2D(p, TEMPLATE_512, method=cv2.LMEDS)[0])
    ours = imageops.robust_similarity_transform(torch.tensor(np.array(points), device=TEST_DEVICE),
                                                torch.tensor(TEMPLATE_512))
    # OpenCV refines with 10 Levenberg-Marquardt steps; we solve the same least squares exactly
    assert np.abs(ours.cpu().numpy() - np.array(expected)).max() < 0.01


def test_invert_affine_equals_cv2():
    matrix = cv2.getRotationMatrix2D((10, 20), 33, 0.7)
    ours = imageops.invert_affine(torch.from_numpy(matrix)[None].to(TEST_DEVICE))[0].cpu().numpy()
    assert np.abs(ours - cv2.invertAffineTransform(matrix)).max() < 1e-12
