"""Non-maximum suppression over a batch: one call while the batch's candidates are few, groups of
whole images when they are many, and the same faces either way (torchvision's own batched_nms,
which loops over the images, is the reference)."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from server import detection
from server.detection import _batched_nms, _groups


def candidates(counts, seed=0):
    """Boxes per image, sorted by image as the threshold's nonzero gives them: clusters of
    overlapping boxes (so NMS suppresses some) at the same places in every image (so that
    without the per-image shift boxes of different images would suppress each other)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(counts)])
    centres = torch.tensor([[40.0, 40.0], [120.0, 90.0], [200.0, 200.0]])
    pick = torch.randint(0, 3, (image.numel(),), generator=g)
    centre = centres[pick] + torch.randn(image.numel(), 2, generator=g) * 6
    half = 20 + torch.rand(image.numel(), 2, generator=g) * 10
    boxes = torch.cat([centre - half, centre + half], dim=1)
    scores = torch.rand(image.numel(), generator=g)
    return boxes, scores, image


@pytest.fixture
def calls(monkeypatch):
    """The sizes of the NMS calls made."""
    seen = []
    real = detection.nms

    def counted(boxes, scores, threshold):
        seen.append(boxes.shape[0])
        return real(boxes, scores, threshold)

    monkeypatch.setattr(detection, "nms", counted)
    return seen


def test_groups_join_whole_images_up_to_the_limit():
    assert _groups([3, 0, 4, 12, 2, 2, 0], 8) == [7, 12, 4]
    assert _groups([0, 0], 8) == []
    assert _groups([8, 1], 8) == [8, 1]


@pytest.mark.parametrize("limit", [10_000, 40, 7])
def test_nms_in_groups_keeps_what_torchvisions_batched_nms_keeps(monkeypatch, calls, limit):
    counts = [30, 0, 25, 3, 60, 18]  # 136 boxes; with a limit of 7 the 25- and 60-box images go alone
    boxes, scores, image = candidates(counts)
    monkeypatch.setattr(detection, "NMS_BOXES_PER_CALL", limit)
    kept = _batched_nms(boxes, scores, image, detection.NMS_THRESHOLD)
    expected = batched_nms(boxes, scores, image, detection.NMS_THRESHOLD)
    assert sorted(kept.tolist()) == sorted(expected.tolist())
    assert len(expected) < sum(counts)  # something was suppressed
    # within an image, in falling score, as one call gives it (the detector regroups by image)
    for i in range(len(counts)):
        mine = kept[image[kept] == i]
        assert torch.equal(mine, expected[image[expected] == i])
    if limit >= sum(counts):
        assert calls == [sum(counts)]
    else:
        assert len(calls) > 1 and sum(calls) == sum(counts)
        assert all(n <= limit or n in counts for n in calls)  # only a lone image may exceed it


def test_nms_of_no_candidates_is_empty(calls):
    kept = _batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.4)
    assert kept.shape == (0,) and calls == []
