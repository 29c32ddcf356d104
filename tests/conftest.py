"""Shared fixtures: random-valued weights of the real architectures, made once per test session.

Fast tests use `small_weights` (a narrow GFPGAN); `full_gfpgan` is made only when a test asks.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _compile_only_where_marked(request, monkeypatch):
    """On CUDA the service's defaults compile GFPGAN and ParseNet (--compile auto), a build of
    half a minute or more. The tests marked `compiles` build them (the GPU check runs those in a
    step of its own); every other test gets the defaults eagerly, in process and in the service
    processes it starts, as it would where Triton cannot build. On the CPU auto never compiles:
    nothing changes there. (Read from the variable, not tests.device: the client's tests run
    in MuseTalk's environments, which have no torch.)"""
    on_cuda = os.environ.get("GFPGAN_TEST_DEVICE", "cpu").startswith("cuda")
    if on_cuda and request.node.get_closest_marker("compiles") is None:
        monkeypatch.setattr("server.speed.compile_toolchain_problem",
                            lambda: "tests not marked `compiles` run the passes eagerly")
        monkeypatch.setenv("GFPGAN_COMPILE", "off")


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory) -> Path:
    """A weights dir: narrow GFPGANv1.4.pth, detection_Resnet50_Final.pth, parsing_parsenet.pth
    (made by the service's Python where that is another one: see tests/service_process.py)."""
    from tests.service_process import make_small_weights

    return make_small_weights(tmp_path_factory.mktemp("small_weights"))


@pytest.fixture(scope="session")
def full_gfpgan(tmp_path_factory) -> Path:
    """A full-size (narrow=1, ~330 MB) random GFPGANv1.4.pth, alone in its own directory."""
    from tests.checkpoints import GFPGAN_FILE, make_gfpgan_checkpoint

    return make_gfpgan_checkpoint(tmp_path_factory.mktemp("full_gfpgan") / GFPGAN_FILE, narrow=1.0)


@pytest.fixture
def project(tmp_path):
    """A MuseTalk project for the stand-in: video frames, "audio" lengths, inference YAMLs."""
    from tests.musetalk_project import make_project

    return make_project(tmp_path)
