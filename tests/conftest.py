"""Shared fixtures: random-valued weights of the real architectures, made once per test session.

Fast tests use `small_weights` (a narrow GFPGAN); `full_gfpgan` is made only when a test asks.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory) -> Path:
    """A weights dir: narrow GFPGANv1.4.pth, detection_Resnet50_Final.pth, parsing_parsenet.pth."""
    from tests.checkpoints import SMALL_NARROW, make_weights_dir

    return make_weights_dir(tmp_path_factory.mktemp("small_weights"), narrow=SMALL_NARROW)


@pytest.fixture(scope="session")
def full_gfpgan(tmp_path_factory) -> Path:
    """A full-size (narrow=1, ~330 MB) random GFPGANv1.4.pth, alone in its own directory."""
    from tests.checkpoints import GFPGAN_FILE, make_gfpgan_checkpoint

    return make_gfpgan_checkpoint(tmp_path_factory.mktemp("full_gfpgan") / GFPGAN_FILE, narrow=1.0)
