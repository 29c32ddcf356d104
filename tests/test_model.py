"""Loading weights: the right network comes out of a good file, a clear error out of a bad one.

All files are random-valued checkpoints of the real architectures (tests/checkpoints.py).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import server.compat  # noqa: F401  (before facexlib/gfpgan)
from facexlib.detection import init_detection_model
from facexlib.parsing import init_parsing_model
from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

from server import weights as weights_module
from server.model import ModelLoadError, load_restorer, load_models, load_parsenet, load_retinaface
from server.weights import WeightPaths
from tests.checkpoints import (
    DETECTION_FILE,
    GFPGAN_FILE,
    GFPGANER_CLEAN_CONFIG,
    PARSING_FILE,
    SMALL_NARROW,
    build_gfpgan,
    make_gfpgan_checkpoint,
    make_retinaface_checkpoint,
    smooth_faces,
)

CPU = torch.device("cpu")


def restore(net, faces, random_noise=False):
    with torch.no_grad():
        return net(faces, return_rgb=False, randomize_noise=random_noise)[0]


@pytest.fixture(scope="module")
def small_gfpgan(small_weights):
    return load_restorer(small_weights / GFPGAN_FILE, CPU)


@pytest.fixture(scope="module")
def faces():
    return smooth_faces(1, seed=7)


# -- GFPGAN: what a good file gives ----------------------------------------------------------


def test_a_narrow_checkpoint_is_recognised_with_the_config_it_was_built_with(small_gfpgan, small_weights):
    path = small_weights / GFPGAN_FILE
    assert small_gfpgan.config == {
        "out_size": 512, "num_style_feat": 512, "channel_multiplier": 2, "narrow": SMALL_NARROW,
        "num_mlp": 8, "different_w": True, "sft_half": True,
    }
    assert (small_gfpgan.name, small_gfpgan.version) == ("GFPGANv1.4", "1.4")
    assert small_gfpgan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert small_gfpgan.path == path.absolute()
    assert small_gfpgan.face_size == 512
    assert (small_gfpgan.supports_bfloat16, small_gfpgan.supports_half) == (True, False)


def test_the_loaded_network_is_ready_for_inference_on_its_device(small_gfpgan):
    net = small_gfpgan.net
    assert isinstance(net, GFPGANv1Clean)
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    assert {p.device for p in net.parameters()} == {CPU}
    assert small_gfpgan.device == CPU


def test_the_info_rpc_reports_the_files_name_version_hash_device_and_dtype(small_gfpgan):
    info = small_gfpgan.model_info(torch.bfloat16)
    assert (info.model_name, info.model_version, info.device, info.dtype) == (
        "GFPGANv1.4", "1.4", "cpu", "bfloat16")
    assert info.weights_sha256 == small_gfpgan.sha256 and len(info.weights_sha256) == 64


def test_the_loaded_network_restores_exactly_like_gfpgans_own_class_with_the_same_weights(
        small_gfpgan, small_weights, faces):
    reference = GFPGANv1Clean(narrow=SMALL_NARROW, **GFPGANER_CLEAN_CONFIG).eval()
    state = torch.load(small_weights / GFPGAN_FILE, map_location="cpu", weights_only=True)
    reference.load_state_dict(state["params_ema"], strict=True)
    assert torch.equal(restore(small_gfpgan.net, faces), restore(reference, faces))


def test_a_params_checkpoint_loads_the_same_network_as_a_params_ema_one(tmp_path, small_gfpgan, faces):
    path = make_gfpgan_checkpoint(tmp_path / GFPGAN_FILE, narrow=SMALL_NARROW, key="params")
    loaded = load_restorer(path, CPU)
    assert loaded.config == small_gfpgan.config
    assert torch.equal(restore(loaded.net, faces), restore(small_gfpgan.net, faces))


@pytest.mark.slow
def test_a_full_size_checkpoint_is_recognised_and_every_weight_arrives(full_gfpgan):
    loaded = load_restorer(full_gfpgan, CPU)
    assert loaded.config["narrow"] == 1.0 and loaded.config["channel_multiplier"] == 2
    saved = torch.load(full_gfpgan, map_location="cpu", weights_only=True)["params_ema"]
    state = loaded.net.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[key], saved[key]) for key in saved)
    assert sum(p.numel() for p in loaded.net.parameters()) == pytest.approx(86.4e6, rel=0.01)


def test_a_file_with_the_published_hash_is_named_by_it_whatever_its_file_name(
        tmp_path, small_weights, monkeypatch):
    path = tmp_path / "restorer.pth"
    shutil.copyfile(small_weights / GFPGAN_FILE, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    published = weights_module.KNOWN_WEIGHTS["GFPGANv1.3.pth"]
    monkeypatch.setitem(weights_module.KNOWN_WEIGHTS, "GFPGANv1.3.pth",
                        weights_module.KnownWeights(published.name, published.url, sha, published.purpose))
    loaded = load_restorer(path, CPU)
    assert (loaded.name, loaded.version, loaded.warnings) == ("GFPGANv1.3", "1.3", [])


def test_a_file_named_like_a_published_one_but_with_another_hash_loads_with_a_warning(
        small_gfpgan, small_weights, caplog):
    # The fixture is a random network saved as GFPGANv1.4.pth: the operator may mean it
    # (fine-tuned weights), so it loads, but the log says so.
    assert len(small_gfpgan.warnings) == 1
    assert "GFPGANv1.4.pth" in small_gfpgan.warnings[0]
    assert small_gfpgan.sha256 in small_gfpgan.warnings[0]
    assert weights_module.KNOWN_WEIGHTS["GFPGANv1.4.pth"].sha256 in small_gfpgan.warnings[0]


def test_a_file_of_unknown_origin_is_a_custom_version(tmp_path, small_weights):
    path = tmp_path / "my-finetune.pth"
    shutil.copyfile(small_weights / GFPGAN_FILE, path)
    loaded = load_restorer(path, CPU)
    assert (loaded.name, loaded.version, loaded.warnings) == ("my-finetune", "custom", [])


# -- GFPGAN: what a bad file gives ------------------------------------------------------------


def _v1_original_keys():
    # The original GFPGAN v1 (arch 'original'): ConvLayer sequences and fused activations.
    return {"conv_body_first.0.weight": torch.zeros(32, 3, 1, 1),
            "conv_body_first.1.bias": torch.zeros(32),
            "stylegan_decoder.style_convs.0.activate.bias": torch.zeros(512),
            "stylegan_decoder.constant_input.weight": torch.zeros(1, 512, 4, 4)}


def _restoreformer_keys():
    return {"encoder.conv_in.weight": torch.zeros(64, 3, 3, 3),
            "quantize.embedding.weight": torch.zeros(1024, 256)}


class _RunsCodeWhenUnpickled:
    """A pickle that would create a folder if a loader ever unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


BAD_GFPGAN_FILES = {
    # case: (what the file holds, words the error must contain)
    "empty": (b"", ["is empty", "download it again"]),
    "html_error_page": (b"<html><body>Not Found</body></html>", ["not a PyTorch checkpoint"]),
    "tensor_not_dict": (torch.zeros(3), ["holds a Tensor, not a dict", "'params_ema' or 'params'"]),
    "no_params_key": ({"net_g": {}}, ["no 'params_ema' or 'params'", "'net_g'"]),
    "original_gfpgan_v1": ({"params_ema": _v1_original_keys()},
                           ["not a face restorer checkpoint", "original GFPGAN v1", "layers missing",
                            "conv_body_first.weight", "conv_body_first.0.weight"]),
    "restoreformer": ({"params_ema": _restoreformer_keys()},
                      ["not a face restorer checkpoint", "RestoreFormer", "quantize.embedding.weight"]),
}


@pytest.mark.parametrize("case", sorted(BAD_GFPGAN_FILES))
def test_a_bad_gfpgan_file_is_refused_with_an_error_naming_the_file_and_the_problem(tmp_path, case):
    content, words = BAD_GFPGAN_FILES[case]
    path = _write(tmp_path / f"{case}.pth", content)
    with pytest.raises(ModelLoadError) as caught:
        load_restorer(path, CPU)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def test_a_missing_gfpgan_file_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / GFPGAN_FILE
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        load_restorer(path, CPU)
    assert str(path) in str(caught.value) and "GFPGAN v1.3/v1.4" in str(caught.value) and "RestoreFormer" in str(caught.value)


def test_a_truncated_gfpgan_file_is_an_error_saying_so(tmp_path, small_weights):
    data = (small_weights / GFPGAN_FILE).read_bytes()
    path = _write(tmp_path / GFPGAN_FILE, data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or damaged") as caught:
        load_restorer(path, CPU)
    assert str(path) in str(caught.value)


def test_a_file_that_would_run_code_when_unpickled_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    path = _write(tmp_path / GFPGAN_FILE, {"params_ema": {}, "extra": _RunsCodeWhenUnpickled(marker)})
    with pytest.raises(ModelLoadError, match="other than tensors") as caught:
        load_restorer(path, CPU)
    assert str(path) in str(caught.value) and "mkdir" in str(caught.value)
    assert not marker.exists()


def test_a_bare_state_dict_is_refused_with_how_to_fix_it(tmp_path):
    path = _write(tmp_path / GFPGAN_FILE, build_gfpgan(narrow=SMALL_NARROW).state_dict())
    with pytest.raises(ModelLoadError, match=r"save it as \{'params_ema': state_dict\}"):
        load_restorer(path, CPU)


def test_a_gfpgan_for_another_face_size_is_refused_saying_only_512_is_served(tmp_path):
    config = dict(GFPGANER_CLEAN_CONFIG, out_size=256)
    path = _write(tmp_path / "GFPGAN256.pth",
                  {"params_ema": GFPGANv1Clean(narrow=SMALL_NARROW, **config).state_dict()})
    with pytest.raises(ModelLoadError, match="256x256 faces.*512x512 networks only") as caught:
        load_restorer(path, CPU)
    assert str(path) in str(caught.value)


def test_a_gfpgan_file_with_a_wrongly_shaped_layer_names_the_layer(tmp_path):
    state = build_gfpgan(narrow=SMALL_NARROW).state_dict()
    state["final_conv.weight"] = state["final_conv.weight"][:, :-1]
    path = _write(tmp_path / GFPGAN_FILE, {"params_ema": state})
    with pytest.raises(ModelLoadError, match="does not fit.*final_conv.weight") as caught:
        load_restorer(path, CPU)
    assert str(path) in str(caught.value)


def test_a_gfpgan_file_with_extra_layers_lists_them(tmp_path):
    state = build_gfpgan(narrow=SMALL_NARROW).state_dict()
    state["discriminator.weight"] = torch.zeros(1)
    path = _write(tmp_path / GFPGAN_FILE, {"params": state})
    with pytest.raises(ModelLoadError, match="1 unexpected.*discriminator.weight"):
        load_restorer(path, CPU)


# -- facexlib's detector and parser -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The parameter 'pretrained':UserWarning",
                            "ignore:Arguments other than a weight enum:UserWarning")
def test_facexlibs_own_loaders_accept_the_test_detection_and_parsing_files(small_weights, tmp_path):
    # Proves the test files have the real key layout (including the 'module.' prefix).
    detector = init_detection_model("retinaface_resnet50", half=False, device="cpu",
                                    model_rootpath=str(small_weights))
    parser = init_parsing_model("parsenet", half=False, device="cpu", model_rootpath=str(small_weights))
    ours_detector = load_retinaface(small_weights / DETECTION_FILE, CPU)
    ours_parser = load_parsenet(small_weights / PARSING_FILE, CPU)
    image = smooth_faces(1, seed=3, size=128) * 127.5
    with torch.no_grad():
        for theirs, ours in zip(detector(image), ours_detector(image)):
            assert torch.equal(theirs, ours)
        face = smooth_faces(1, seed=4, size=64)  # fully convolutional: a small input will do
        for theirs, ours in zip(parser(face), ours_parser(face)):
            assert torch.equal(theirs, ours)


def test_a_detection_file_without_the_module_prefix_loads_the_same_detector(tmp_path, small_weights):
    bare = make_retinaface_checkpoint(tmp_path / DETECTION_FILE, seed=0, module_prefix=False)
    image = smooth_faces(1, seed=3, size=128) * 127.5
    with torch.no_grad():
        a = load_retinaface(bare, CPU)(image)
        b = load_retinaface(small_weights / DETECTION_FILE, CPU)(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_loaded_detector_and_parser_are_in_inference_mode(small_weights):
    for net in (load_retinaface(small_weights / DETECTION_FILE, CPU),
                load_parsenet(small_weights / PARSING_FILE, CPU)):
        assert not any(m.training for m in net.modules())
        assert not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("loader, wrong_file, expected", [
    (load_retinaface, PARSING_FILE, "RetinaFace resnet50"),
    (load_parsenet, DETECTION_FILE, "ParseNet"),
    (load_retinaface, GFPGAN_FILE, "RetinaFace resnet50"),
])
def test_a_detection_or_parsing_file_of_the_wrong_network_names_the_file_and_the_expected_one(
        small_weights, loader, wrong_file, expected):
    with pytest.raises(ModelLoadError) as caught:
        loader(small_weights / wrong_file, CPU)
    assert str(small_weights / wrong_file) in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize("loader", [load_retinaface, load_parsenet])
def test_a_missing_or_truncated_detection_or_parsing_file_names_the_file(tmp_path, loader):
    missing = tmp_path / "absent.pth"
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        loader(missing, CPU)
    assert str(missing) in str(caught.value)
    truncated = _write(tmp_path / "cut.pth", b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelLoadError) as caught:
        loader(truncated, CPU)
    assert str(truncated) in str(caught.value)


def test_loading_never_downloads_or_touches_the_working_directory(small_weights, tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    def no_downloads(*args, **kwargs):
        raise AssertionError("a loader tried to download")

    monkeypatch.setattr("urllib.request.urlopen", no_downloads)
    monkeypatch.setattr("facexlib.utils.misc.download_url_to_file", no_downloads)
    models = load_models(WeightPaths(gfpgan=small_weights / GFPGAN_FILE,
                                     detection=small_weights / DETECTION_FILE,
                                     parsing=small_weights / PARSING_FILE), CPU)
    assert models.gfpgan.config["narrow"] == SMALL_NARROW
    assert list(workdir.iterdir()) == []


# -- the test checkpoints themselves behave like trained ones ---------------------------------


def test_test_checkpoints_have_noise_that_matters_and_fixed_noise_that_repeats(small_gfpgan, faces):
    strengths = [conv.weight.item() for conv in [small_gfpgan.net.stylegan_decoder.style_conv1,
                                                 *small_gfpgan.net.stylegan_decoder.style_convs]]
    assert min(strengths) > 0
    fixed = restore(small_gfpgan.net, faces)
    assert torch.equal(fixed, restore(small_gfpgan.net, faces))
    torch.manual_seed(0)
    noisy = restore(small_gfpgan.net, faces, random_noise=True)
    assert (noisy - fixed).abs().mean() > 0.02  # in [-1, 1] units: ~2.5 levels


def test_test_checkpoints_give_faces_that_vary_and_depend_on_the_input(small_gfpgan, faces):
    output = restore(small_gfpgan.net, faces).clamp(-1, 1)
    assert output.std(dim=(2, 3)).min() > 0.1  # not a flat colour
    assert (output.abs() >= 1).float().mean() < 0.25  # mostly inside the range, not saturated
    other = restore(small_gfpgan.net, smooth_faces(1, seed=8)).clamp(-1, 1)
    assert (output - other).abs().mean() > 0.2  # another face gives another result
