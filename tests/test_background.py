"""Real-ESRGAN backgrounds (issue 10): `background: realesrgan`, on the device, batched.

- The upsampler against Real-ESRGAN's own RealESRGANer.enhance on the same random-valued
  RRDBNet (x2 and x4, enlarged to its scale and resized to other output sizes).
- Through the pipeline against GFPGANer with that RealESRGANer as its bg_upsampler.
- One batch mixing Lanczos and Real-ESRGAN backgrounds gives each image what it gives alone.
- Asked of a service with none loaded, or with ALIGNED: INVALID_ARGUMENT.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import server.compat  # noqa: F401
from contract import codec
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import Alignment, Background, EnhanceOptions, FaceStatus, InvalidRequest
from server.background import load_realesrgan, rrdbnet_config
from server.jobs import Job
from server.pipeline import FacePipeline
from tests.checkpoints import make_checkpoint
from tests.device import TEST_DEVICE
from tests.faces import make_faces, template_landmarks
from tests.fakes import FakePipeline
from tests.test_server import channel, running

SMALL_RRDB = dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=4)


def build_rrdbnet(scale: int, seed: int = 0):
    from basicsr.archs.rrdbnet_arch import RRDBNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RRDBNet(scale=scale, **SMALL_RRDB).eval()
        with torch.no_grad():  # an output that varies with the input, mostly inside [0, 1]
            net.conv_last.weight.mul_(10.0)
            net.conv_last.bias.fill_(0.5)
    return net


@pytest.fixture(scope="module", params=[2, 4], ids=["x2plus", "x4plus"])
def realesrgan_file(request, tmp_path_factory):
    scale = request.param
    path = tmp_path_factory.mktemp(f"x{scale}") / f"RealESRGAN_x{scale}plus.pth"
    return make_checkpoint(path, build_rrdbnet(scale, seed=scale))


def reference_upsampler(path, scale, pre_pad=10):
    """Real-ESRGAN's own RealESRGANer on the same file (its network built at the file's sizes)."""
    from realesrgan import RealESRGANer

    return RealESRGANer(scale=scale, model_path=str(path), model=build_rrdbnet(scale), tile=0,
                        pre_pad=pre_pad, half=False, device=TEST_DEVICE)


def test_the_published_sizes_are_read_back_from_the_keys():
    from basicsr.archs.rrdbnet_arch import RRDBNet

    for scale, in_ch in ((2, 12), (4, 3)):
        net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=scale)
        assert net.conv_first.weight.shape[1] == in_ch
        assert rrdbnet_config(net.state_dict()) == dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23,
                                                        num_grow_ch=32, scale=scale)


@pytest.mark.parametrize("size", [512, 1024])
def test_the_upsampler_is_realesrganer(realesrgan_file, size):
    upsampler = load_realesrgan(realesrgan_file, TEST_DEVICE)
    reference = reference_upsampler(realesrgan_file, upsampler.scale)
    images = make_faces(2, seed=3)  # 256 x 256
    ours = upsampler(torch.from_numpy(images).permute(0, 3, 1, 2).float().to(TEST_DEVICE), size)
    ours = ours.permute(0, 2, 3, 1).cpu().numpy()
    for mine, image in zip(ours, images):
        theirs, _ = reference.enhance(image, outscale=size / 256)
        assert theirs.shape == mine.shape == (size, size, 3)
        d = np.abs(mine - theirs.astype(np.float64))
        print(f"x{upsampler.scale} -> {size}: mean {d.mean():.4f} max {d.max():.0f}")
        if size == 256 * upsampler.scale:  # the network's own scale: no resize
            assert d.max() <= 1 and d.mean() < 0.01
        else:  # cv2's fixed-point Lanczos against ours in float: a level here and there
            assert d.max() <= 2 and d.mean() < 0.1
    assert np.abs(ours[0].astype(float) - ours[1]).mean() > 5  # two images, two backgrounds


@pytest.fixture(scope="module")
def pipeline(small_weights, tmp_path_factory):
    from tests.test_pipeline import load_nets

    x2 = make_checkpoint(tmp_path_factory.mktemp("bg") / "RealESRGAN_x2plus.pth", build_rrdbnet(2, seed=2))
    gfpgan, detector, parser = load_nets(small_weights)
    return FacePipeline(gfpgan, detector, parser, device=TEST_DEVICE, dtype=torch.float32,
                        upsampler=load_realesrgan(x2, TEST_DEVICE))


def test_through_the_pipeline_it_matches_gfpganer_with_realesrganer_as_bg_upsampler(pipeline, small_weights,
                                                                                    monkeypatch):
    from tests.test_pipeline import diff, reference, with_landmarks

    faces, points = make_faces(1, seed=5), template_landmarks(1, seed=5)
    options = EnhanceOptions(alignment=Alignment.LANDMARKS, output_size=512, background=Background.REALESRGAN)
    [result] = pipeline.enhance([Job(faces, options, points)])
    assert result.status == [FaceStatus.ENHANCED]
    with reference(small_weights, 2, monkeypatch) as restorer:
        restorer.bg_upsampler = reference_upsampler(pipeline.upsampler.path, 2)
        with_landmarks(restorer, points[0])
        expected = restorer.enhance(faces[0], has_aligned=False, only_center_face=True, paste_back=True)[2]
    mean, worst = diff(result.faces[0], expected)
    print(f"LANDMARKS 512 with Real-ESRGAN: mean {mean:.3f} max {worst:.0f}")
    assert mean < 0.7 and worst <= 12, (mean, worst)  # the parity tests' tolerance at 512
    # and the background really is Real-ESRGAN's, not a Lanczos resize
    [plain] = pipeline.enhance([Job(faces, EnhanceOptions(alignment=Alignment.LANDMARKS, output_size=512), points)])
    corner = (slice(0, 40), slice(0, 40))
    assert np.abs(plain.faces[0][corner].astype(float) - result.faces[0][corner]).mean() > 5


def test_one_batch_mixes_backgrounds_and_each_image_gets_its_own(pipeline):
    faces, points = make_faces(2, seed=6), template_landmarks(2, seed=6)
    kinds = [Background.REALESRGAN, Background.LANCZOS]
    jobs = [Job(faces[i:i + 1], EnhanceOptions(alignment=Alignment.LANDMARKS, output_size=512, background=k),
                points[i:i + 1]) for i, k in enumerate(kinds)]
    together = pipeline.enhance(jobs)
    for job, result in zip(jobs, together):
        [alone] = pipeline.enhance([job])
        assert np.abs(alone.faces.astype(int) - result.faces).max() <= 1


def test_realesrgan_with_aligned_is_refused_by_the_options():
    with pytest.raises(InvalidRequest, match="ALIGNED returns the face alone"):
        EnhanceOptions(alignment=Alignment.ALIGNED, background=Background.REALESRGAN).validate()


async def test_a_service_without_an_upsampler_refuses_realesrgan_and_says_how_to_load_one():
    import grpc

    faces = make_faces(1, seed=7, size=64)
    request = codec.encode_request(1, faces, EnhanceOptions(output_size=512, background=Background.REALESRGAN))
    async with running(FakePipeline()) as app, channel(app) as ch:
        stub = pb_grpc.FaceEnhancerStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Enhance(request)
        info = await stub.GetInfo(pb.GetInfoRequest())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--bg-upsampler realesrgan-x2" in refused.value.details()
    assert list(info.backgrounds) == ["lanczos"]


def test_bg_upsampler_setting_loads_real_esrgan_beside_every_restorer(small_weights, tmp_path):
    import os

    from server.pipeline import build_pipeline
    from server.settings import Settings
    from tests.checkpoints import DETECTION_FILE, GFPGAN_FILE, PARSING_FILE

    for name in (GFPGAN_FILE, DETECTION_FILE, PARSING_FILE):
        os.symlink(small_weights / name, tmp_path / name)
    make_checkpoint(tmp_path / "RealESRGAN_x4plus.pth", build_rrdbnet(4))
    settings = Settings(weights_dir=str(tmp_path), bg_upsampler="realesrgan-x4", no_download=True, device="cpu")
    assert settings.bg_upsampler == str(tmp_path / "RealESRGAN_x4plus.pth")
    built = build_pipeline(settings)
    assert built.upsampler.scale == 4 and built.info.backgrounds == ("lanczos", "realesrgan")
    missing = Settings(weights_dir=str(tmp_path), bg_upsampler="realesrgan-x2", no_download=True, device="cpu")
    with pytest.raises(Exception, match=r"(?s)RealESRGAN_x2plus.pth.*v0.2.1"):
        build_pipeline(missing)
