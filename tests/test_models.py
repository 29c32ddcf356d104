"""Several restorers resident in one service (issue 10): chosen per request, never mixed.

- A mixed stream (GFPGAN v1.4, RestoreFormer, GFPGAN v1 interleaved) over real loopback gRPC
  comes back in order, each face exactly what its own model gives alone.
- An unknown model, or random_noise for a model without noise, is INVALID_ARGUMENT naming the
  loaded ones, and the stream goes on.
- GetInfo lists every loaded restorer; --models loads them (ids or files), a missing one is
  named at start with its URL.
- The client and the MuseTalk adapter select a model by id, file or arch.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from contract import codec
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import Alignment, Background, EnhanceOptions, ModelSpec, RestorerInfo
from server.pipeline import FacePipeline, ModelRouter, build_pipeline
from server.settings import Settings
from server.weights import WeightsMissing
from tests.checkpoints import (
    DETECTION_FILE,
    GFPGAN_FILE,
    PARSING_FILE,
    build_gfpgan_v1,
    build_restoreformer,
    make_checkpoint,
)
from tests.faces import make_faces, template_landmarks
from tests.test_server import channel, running

ALIGNED = dict(alignment=Alignment.ALIGNED)


@pytest.fixture(scope="module")
def three_models(tmp_path_factory, small_weights):
    """A weights folder with GFPGAN v1.4 (small), RestoreFormer (small) and GFPGAN v1 (small)."""
    import os

    folder = tmp_path_factory.mktemp("three_models")
    for name in (GFPGAN_FILE, DETECTION_FILE, PARSING_FILE):
        os.symlink(small_weights / name, folder / name)
    make_checkpoint(folder / "RestoreFormer.pth", build_restoreformer(seed=1))
    make_checkpoint(folder / "GFPGANv1.pth", build_gfpgan_v1(seed=2))
    from tests.test_background import build_rrdbnet

    make_checkpoint(folder / "RealESRGAN_x2plus.pth", build_rrdbnet(2, seed=3))
    return folder


@pytest.fixture(scope="module")
def router(three_models):
    # float32: the tests compare a face in a mixed batch with the same face alone within a level;
    # bf16 (auto's choice on CPUs that compute it) rounds differently with the batch around it
    settings = Settings(weights_dir=str(three_models), models="restoreformer,gfpgan-1", no_download=True,
                        device="cpu", dtype="float32", paste_mask="box", warmup=False,
                        bg_upsampler="realesrgan-x2")
    built = build_pipeline(settings)
    assert isinstance(built, ModelRouter)
    return built


def test_models_load_once_each_and_share_the_detector(router):
    assert list(router.pipelines) == ["gfpgan-1.4", "restoreformer", "gfpgan-1"]
    detectors = {id(p.detector.net) for p in router.pipelines.values()}
    assert len(detectors) == 1
    info = router.info
    assert info.default_model == "gfpgan-1.4" and info.model_name == "GFPGANv1.4"
    listed = {m.id: m for m in info.models}
    assert (listed["restoreformer"].arch, listed["restoreformer"].random_noise) == ("RestoreFormer", False)
    assert (listed["gfpgan-1"].arch, listed["gfpgan-1"].licence) == ("original", "Apache-2.0")
    assert listed["gfpgan-1.4"].channel_multiplier == 2 and listed["gfpgan-1.4"].native_size == 512


async def test_a_mixed_stream_comes_back_in_order_each_face_from_its_model(router):
    from server.jobs import Job

    faces = make_faces(5, seed=11, size=128)
    plan = ["", "restoreformer", "gfpgan-1", "gfpgan-1.4", "restoreformer"]  # "" : the default
    alone = {}
    for model in set(plan) | {"gfpgan-1.4"}:
        [result] = router.pipelines[model or "gfpgan-1.4"].enhance([Job(faces, EnhanceOptions(**ALIGNED))])
        alone[model] = result.faces
    # and backgrounds interleaved with them: faces pasted back at 512, Lanczos or Real-ESRGAN
    points = template_landmarks(2, seed=13, size=128)
    pasted = [EnhanceOptions(alignment=Alignment.LANDMARKS, output_size=512, model=m, background=b)
              for m, b in (("restoreformer", Background.REALESRGAN), ("gfpgan-1.4", Background.LANCZOS))]
    pasted_alone = [router.pipelines[o.model].enhance([Job(faces[i:i + 1], o, points[i:i + 1])])[0].faces[0]
                    for i, o in enumerate(pasted)]
    async with running(types.SimpleNamespace(factory=lambda settings: router), warmup=False) as app, channel(app) as ch:
        call = pb_grpc.FaceEnhancerStub(ch).EnhanceBatch()
        for i, model in enumerate(plan):
            await call.write(codec.encode_request(i, faces[i:i + 1], EnhanceOptions(model=model, **ALIGNED)))
            if i < len(pasted):
                await call.write(codec.encode_request(100 + i, faces[i:i + 1], pasted[i], points[i:i + 1]))
        await call.done_writing()
        answers = [r async for r in call]
        info = await pb_grpc.FaceEnhancerStub(ch).GetInfo(pb.GetInfoRequest())
        counted = {m: app.metrics.registry.get_sample_value("faceenhance_faces_total", {"model": m})
                   for m in ("gfpgan-1.4", "restoreformer", "gfpgan-1")}
    assert counted == {"gfpgan-1.4": 3, "restoreformer": 3, "gfpgan-1": 1}  # the metric's model label
    assert [a.request_id for a in answers] == [0, 100, 1, 101, 2, 3, 4]
    by_id = {a.request_id: a for a in answers}
    for i, expected in enumerate(pasted_alone):
        got = codec.decode_response(by_id[100 + i]).faces[0].astype(int)
        assert got.shape == (512, 512, 3) and np.abs(got - expected).max() <= 1, i
    answers = [by_id[i] for i in range(5)]
    for i, (answer, model) in enumerate(zip(answers, plan)):
        assert not answer.HasField("error"), answer.error.message
        got = codec.decode_response(answer).faces[0].astype(int)
        # The same network on a batch of another size may round a few pixels the other way
        # (CPU convolutions pick their algorithm by shape): at most 1 level.
        assert np.abs(got - alone[model][i]).max() <= 1, (i, model)
        for other in {m or "gfpgan-1.4" for m in plan} - {model or "gfpgan-1.4"}:  # and far from the others
            assert np.abs(got - alone[other][i]).mean() > 2, (i, model, other)
    assert [m.id for m in info.models] == ["gfpgan-1.4", "restoreformer", "gfpgan-1"]
    assert info.default_model == "gfpgan-1.4"


async def test_an_unknown_model_or_noise_without_noise_is_invalid_and_the_stream_goes_on(router):
    faces = make_faces(1, seed=12, size=64)
    async with running(types.SimpleNamespace(factory=lambda settings: router), warmup=False) as app, channel(app) as ch:
        call = pb_grpc.FaceEnhancerStub(ch).EnhanceBatch()
        await call.write(codec.encode_request(1, faces, EnhanceOptions(model="codeformer", **ALIGNED)))
        await call.write(codec.encode_request(2, faces, EnhanceOptions(model="restoreformer", random_noise=True,
                                                                        **ALIGNED)))
        await call.write(codec.encode_request(3, faces, EnhanceOptions(model="gfpgan-1", **ALIGNED)))
        await call.done_writing()
        answers = {r.request_id: r async for r in call}
    assert answers[1].error.code == 3 and "'codeformer' is not loaded here" in answers[1].error.message
    assert "gfpgan-1.4, restoreformer, gfpgan-1" in answers[1].error.message
    assert answers[2].error.code == 3 and "random_noise needs a GFPGAN model" in answers[2].error.message
    assert not answers[3].HasField("error")


def test_models_setting_takes_ids_and_files_and_drops_repeats(tmp_path):
    settings = Settings(weights_dir=str(tmp_path), model="gfpgan-1.3",
                        models=f"restoreformer, gfpgan-1.3,{tmp_path / 'mine.pth'},restoreformer")
    assert settings.model == str(tmp_path / "GFPGANv1.3.pth")
    assert settings.models.split(",") == [str(tmp_path / "RestoreFormer.pth"), str(tmp_path / "mine.pth")]


def test_a_missing_resident_model_is_named_with_its_url_at_start(tmp_path, small_weights):
    import os

    for name in (GFPGAN_FILE, DETECTION_FILE, PARSING_FILE):
        os.symlink(small_weights / name, tmp_path / name)
    settings = Settings(weights_dir=str(tmp_path), models="restoreformer", no_download=True, device="cpu")
    with pytest.raises(WeightsMissing) as caught:
        build_pipeline(settings)
    message = str(caught.value)
    assert str(tmp_path / "RestoreFormer.pth") in message
    assert "releases/download/v1.3.4/RestoreFormer.pth" in message


def test_a_model_spec_picks_the_restorer_that_fits():
    def info(*models):
        return types.SimpleNamespace(models=models, model_name="GFPGANv1.4", model_file="GFPGANv1.4.pth",
                                     arch="clean", channel_multiplier=2, weights_sha256="")
    v14 = RestorerInfo("gfpgan-1.4", "GFPGANv1.4", "1.4", "clean", model_file="GFPGANv1.4.pth",
                       channel_multiplier=2)
    rf = RestorerInfo("restoreformer", "RestoreFormer", "1.0", "RestoreFormer", model_file="RestoreFormer.pth",
                      random_noise=False)
    served = info(v14, rf)
    assert ModelSpec(arch="RestoreFormer").choose(served) == "restoreformer"
    assert ModelSpec(model_path=r"C:\models\gfpgan\RestoreFormer.pth").choose(served) == "restoreformer"
    assert ModelSpec(model="gfpgan-1.4", channel_multiplier=2).choose(served) == "gfpgan-1.4"
    assert ModelSpec(arch="original").choose(served) is None
    [problem] = ModelSpec(arch="original").mismatches(served)
    assert "no restorer the service has loaded fits arch original" in problem and "restoreformer:" in problem
    assert ModelSpec(arch="RestoreFormer").mismatches(served) == []


def test_the_adapter_selects_a_model_by_arch_and_sends_its_id(project):
    """The plan's `arch: RestoreFormer` (and model_path) choose the service's RestoreFormer: every
    batch names it; a model the service has not loaded stops the run at start, listing them."""
    from tests.fake_service import FakeService
    from tests.test_musetalk_adapter import run_launcher

    loaded = [RestorerInfo("gfpgan-1.4", "GFPGANv1.4", "1.4", "clean", model_file="GFPGANv1.4.pth",
                           channel_multiplier=2),
              RestorerInfo("restoreformer", "RestoreFormer", "1.0", "RestoreFormer",
                           model_file="RestoreFormer.pth", random_noise=False)]
    config = project.offline_yaml(9)  # batches of 8 and 1
    with FakeService() as fake:
        fake.servicer.models = loaded
        assert run_launcher("run", "--gfpgan-address", fake.address, "--gfpgan_arch", "RestoreFormer",
                            "--gfpgan_model", "models/gfpgan/RestoreFormer.pth", "--",
                            "scripts/inference.py", "--inference_config", config,
                            "--result_dir", str(project.dir / "out")) == 0
        chosen = list(fake.servicer.model_ids)
        code = run_launcher("run", "--gfpgan-address", fake.address, "--gfpgan_model_id", "gfpgan-1", "--",
                            "scripts/inference.py", "--inference_config", config,
                            "--result_dir", str(project.dir / "out2"))
    assert chosen == ["restoreformer", "restoreformer"]
    assert code == 2


def test_the_adapter_asks_for_the_realesrgan_background_from_its_yaml(project):
    """The plan's YAML `bg_upsampler: realesrgan` (with upscale 2) makes every batch of the run
    ask the service for Real-ESRGAN; a service without one stops the run at start (exit 2)."""
    from contract.pb import face_enhance_pb2 as pb
    from tests.fake_service import FakeService
    from tests.test_musetalk_adapter import run_launcher

    with FakeService() as fake:
        section = f"gfpgan:\n  address: {fake.address}\n  upscale: 2\n  bg_upsampler: realesrgan\n"
        config = project.offline_yaml(9, gfpgan=section)
        fake.servicer.backgrounds = ["lanczos", "realesrgan"]
        assert run_launcher("run", "--", "scripts/inference.py", "--inference_config", config,
                            "--result_dir", str(project.dir / "out")) == 0
        asked = list(fake.servicer.background_kinds)
        fake.servicer.backgrounds = ["lanczos"]
        code = run_launcher("run", "--", "scripts/inference.py", "--inference_config", config,
                            "--result_dir", str(project.dir / "out2"))
    assert asked == [pb.BACKGROUND_REALESRGAN] * 2
    assert code == 2

