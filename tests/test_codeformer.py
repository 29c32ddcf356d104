"""CodeFormer (issue 10): opt-in (S-Lab licence, non-commercial), with its own fidelity weight w.

- Refused unless the operator enables it; GetInfo and the README name its licence.
- The network as the service loads it (through spandrel) against CodeFormer's own code on the
  same random-valued weights: exact, at two values of w.
- Through the pipeline against GFPGANer's paste-back with CodeFormer's own network in place of
  GFPGAN (CodeFormer's inference script uses the same facexlib helper), with the same landmarks.
- One batch asking two values of w gives each face its own.
- fidelity_weight for a model without one is INVALID_ARGUMENT.
"""
from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
import torch

import server.compat  # noqa: F401
from contract import codec
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import Alignment, EnhanceOptions, FaceStatus
from server.jobs import Job
from server.model import CODEFORMER_LICENCE, ModelLoadError, load_restorer
from server.pipeline import FacePipeline, ModelRouter, build_pipeline
from server.settings import Settings
from tests.checkpoints import DETECTION_FILE, GFPGAN_FILE, PARSING_FILE, make_checkpoint
from tests.codeformer_reference import original_codeformer
from tests.device import TEST_DEVICE
from tests.faces import make_faces, template_landmarks
from tests.fakes import FakePipeline
from tests.test_server import channel, running

#: A CodeFormer with a narrow transformer and a small codebook; its convolutional VQGAN has
#: fixed sizes in the architecture (74 M parameters, some 7 s per 512 face on 2 CPU cores).
SMALL = dict(dim_embd=64, n_head=8, n_layers=2, codebook_size=64)


@pytest.fixture(scope="module")
def codeformer_file(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        net = original_codeformer()(**SMALL).eval()
        with torch.no_grad():
            # Decisive code predictions, as a trained model makes. A random transformer's top-1
            # codes are near-ties that the sub-level difference between two warps (ours and
            # cv2's) flips, and one flipped code changes a 32 px patch. Here one code wins every
            # token by a wide margin: the code lookup is then the same in both pipelines, and
            # everything else (encoder, AdaIN, the w-weighted fusion, generator) still depends
            # on the face.
            norm, linear = net.idx_pred_layer[0], net.idx_pred_layer[1]
            norm.bias.zero_()
            norm.bias[0] = 100.0
            linear.weight[:, 0] = 0.0
            linear.weight[7, 0] = 10.0
    return make_checkpoint(tmp_path_factory.mktemp("codeformer") / "codeformer.pth", net)


@pytest.fixture(scope="module")
def reference_net(codeformer_file):
    net = original_codeformer()(**SMALL).eval()
    net.load_state_dict(torch.load(codeformer_file, weights_only=True)["params_ema"])
    return net.to(TEST_DEVICE)


def test_codeformer_is_refused_unless_enabled_naming_its_licence(codeformer_file):
    with pytest.raises(ModelLoadError, match="S-Lab License 1.0.*--enable-codeformer"):
        load_restorer(codeformer_file, "cpu")


def test_the_loaded_network_is_codeformers_own_exactly(codeformer_file, reference_net):
    loaded = load_restorer(codeformer_file, TEST_DEVICE, allow_codeformer=True)
    assert (loaded.arch, loaded.licence, loaded.id, loaded.has_noise) == ("CodeFormer", CODEFORMER_LICENCE,
                                                                           "codeformer", False)
    assert loaded.config["dim_embd"] == 64 and loaded.config["n_layers"] == 2
    assert loaded.restorer_info().fidelity_weight
    x = torch.from_numpy(make_faces(1, seed=2, size=512)).permute(0, 3, 1, 2).contiguous().float()
    x = (x / 127.5 - 1).to(TEST_DEVICE)
    with torch.no_grad():
        for w in (0.0, 0.7):
            ours = loaded.net(x, w=w)[0]
            theirs = reference_net(x, w=w, adain=True)[0]
            assert torch.equal(ours, theirs), w


def test_through_the_pipeline_each_face_gets_its_own_w_and_matches_the_reference(
        codeformer_file, reference_net, small_weights, monkeypatch):
    from tests.test_pipeline import diff, load_nets, reference, with_landmarks

    _, detector, parser = load_nets(small_weights)
    loaded = load_restorer(codeformer_file, TEST_DEVICE, allow_codeformer=True)
    pipeline = FacePipeline(loaded.net, detector, parser, device=TEST_DEVICE, dtype=torch.float32)
    faces, points = make_faces(2, seed=8), template_landmarks(2, seed=8)
    weights = (0.2, 0.9)
    jobs = [Job(faces[i:i + 1], EnhanceOptions(alignment=Alignment.LANDMARKS, fidelity_weight=w), points[i:i + 1])
            for i, w in enumerate(weights)]
    results = pipeline.enhance(jobs)  # one batch, two values of w
    assert [r.status for r in results] == [[FaceStatus.ENHANCED]] * 2

    class CodeFormerAsGFPGAN(torch.nn.Module):  # GFPGANer's call, CodeFormer's inference settings
        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, x, **_):
            return reference_net(x, w=self.w, adain=True)[0], None

    with reference(small_weights, 1, monkeypatch) as restorer:
        for i, w in enumerate(weights):
            restorer.gfpgan = CodeFormerAsGFPGAN(w)
            with_landmarks(restorer, points[i])
            expected = restorer.enhance(faces[i], has_aligned=False, only_center_face=True, paste_back=True)[2]
            mean, worst = diff(results[i].faces[0], expected)
            print(f"CodeFormer w={w} LANDMARKS 256: mean {mean:.3f} max {worst:.0f}")
            assert mean < 0.7 and worst <= 12, (w, mean, worst)
    # and w matters: the two faces through the other w differ from what they got
    [swapped] = pipeline.enhance([Job(faces[:1], EnhanceOptions(alignment=Alignment.LANDMARKS,
                                                                 fidelity_weight=0.9), points[:1])])
    assert np.abs(swapped.faces[0].astype(int) - results[0].faces[0]).mean() > 0.5


def test_enabled_codeformer_is_listed_with_its_licence(codeformer_file, small_weights, tmp_path):
    for name in (GFPGAN_FILE, DETECTION_FILE, PARSING_FILE):
        os.symlink(small_weights / name, tmp_path / name)
    os.symlink(codeformer_file, tmp_path / "codeformer.pth")
    off = Settings(weights_dir=str(tmp_path), models="codeformer", no_download=True, device="cpu")
    with pytest.raises(ModelLoadError, match="--enable-codeformer"):
        build_pipeline(off)
    on = Settings(weights_dir=str(tmp_path), models="codeformer", enable_codeformer=True, no_download=True,
                  device="cpu")
    router = build_pipeline(on)
    assert isinstance(router, ModelRouter)
    listed = {m.id: m for m in router.info.models}
    assert listed["codeformer"].licence == CODEFORMER_LICENCE and listed["codeformer"].fidelity_weight
    assert listed["gfpgan-1.4"].licence == "Apache-2.0" and not listed["gfpgan-1.4"].fidelity_weight


async def test_fidelity_weight_for_a_model_without_one_is_invalid():
    faces = make_faces(1, seed=9, size=64)
    async with running(FakePipeline()) as app, channel(app) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.FaceEnhancerStub(ch).Enhance(
                codec.encode_request(1, faces, EnhanceOptions(fidelity_weight=0.5)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fidelity_weight is a restorer's own weight" in refused.value.details()
