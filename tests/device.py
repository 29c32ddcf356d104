"""The device the pipeline tests run on: the CPU unless GFPGAN_TEST_DEVICE names another.

`GFPGAN_TEST_DEVICE=cuda pytest tests/test_pipeline.py ...` runs the pipeline, image-op, speed
and end-to-end tests on the GPU (scripts/gpu_check.py does). References (GFPGANer, OpenCV) stay
on the CPU. On CUDA, TF32 is turned off so that float32 means float32 in the parity tests.
"""
from __future__ import annotations

import os

import pytest
import torch

TEST_DEVICE = torch.device(os.environ.get("GFPGAN_TEST_DEVICE", "cpu"))
ON_CUDA = TEST_DEVICE.type == "cuda"

if ON_CUDA:
    # Also for the service processes the tests start (cuBLAS and cuDNN read it).
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

#: For tests of CUDA-only forms (graphs): they run in the GPU check and its CPU rehearsal skips
#: them with this reason.
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="CUDA only: run with GFPGAN_TEST_DEVICE=cuda")

