"""The restorers besides GFPGAN v1.3/v1.4 (issue 10): GFPGAN v1 ("original") and RestoreFormer.

- The plain-torch StyleGAN2 ops against their defining formulas and basicsr's `upfirdn2d_native`.
- GFPGAN v1 as loaded by the service against the gfpgan module's GFPGANv1 with only those two
  ops swapped for the reference forms; and stock basicsr failing on it (why the ops exist).
- RestoreFormer as loaded (its sizes read off the weights) against gfpgan's RestoreFormer on the
  same weights, and through the pipeline against GFPGANer(arch='RestoreFormer').
- Each file recognised from its keys; a wrong one named and refused.
"""
from __future__ import annotations

import importlib
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import server.compat  # noqa: F401
from contract.types import Alignment, EnhanceOptions, FaceStatus
from server import stylegan_ops
from server.jobs import Job
from server.model import ModelLoadError, load_restorer
from server.pipeline import FacePipeline
from tests.checkpoints import (
    SMALL_RESTOREFORMER_CONFIG,
    build_gfpgan_v1,
    build_restoreformer,
    make_checkpoint,
)
from tests.device import TEST_DEVICE
from tests.faces import make_faces, template_landmarks

CPU = torch.device("cpu")


# --- the StyleGAN2 ops ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 5)])
def test_fused_leaky_relu_is_its_formula(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    out = stylegan_ops.fused_leaky_relu(x, bias)
    b = bias.view(1, -1, *([1] * (len(shape) - 2)))
    pre = x + b
    expected = torch.where(pre >= 0, pre, 0.2 * pre) * math.sqrt(2)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def _upfirdn_by_definition(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]):
    """upfirdn2d written out as sums: zero-stuff, pad/crop, convolve with k, decimate."""
    n, c, h, w = x.shape
    stuffed = np.zeros((n, c, h * up, w * up))
    stuffed[:, :, ::up, ::up] = x
    p0, p1 = pad
    padded = np.pad(stuffed, ((0, 0), (0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))))
    padded = padded[:, :, max(-p0, 0):padded.shape[2] - max(-p1, 0), max(-p0, 0):padded.shape[3] - max(-p1, 0)]
    kh, kw = k.shape
    oh, ow = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    out = np.zeros((n, c, oh, ow))
    flipped = k[::-1, ::-1]
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = (padded[:, :, i:i + kh, j:j + kw] * flipped).sum(axis=(2, 3))
    return out[:, :, ::down, ::down]


# The three uses in StyleGAN2 (upsample, downsample, blur), an asymmetric kernel, a crop.
UPFIRDN_CASES = [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (2, 2)), (1, 1, (1, 1)), (2, 2, (1, 0)),
                 (1, 1, (-1, -1))]


@pytest.mark.parametrize("up, down, pad", UPFIRDN_CASES)
def test_upfirdn2d_matches_its_definition_and_basicsr_native(up, down, pad):
    from basicsr.ops.upfirdn2d.upfirdn2d import upfirdn2d_native

    gen = torch.Generator().manual_seed(up * 10 + down)
    x = torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64)
    kernel = torch.randn(4, 3, generator=gen, dtype=torch.float64)  # asymmetric: flips matter
    ours = stylegan_ops.upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    native = upfirdn2d_native(x, kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])
    defined = _upfirdn_by_definition(x.numpy(), kernel.numpy(), up, down, pad)
    assert ours.shape == native.shape == defined.shape
    assert np.allclose(ours.numpy(), defined, rtol=0, atol=1e-10)
    assert torch.allclose(ours, native, rtol=0, atol=1e-10)


def test_install_points_basicsr_stylegan2_at_the_plain_torch_ops():
    stylegan_ops.install()
    arch = importlib.import_module("basicsr.archs.stylegan2_arch")
    assert arch.upfirdn2d is stylegan_ops.upfirdn2d
    assert arch.fused_leaky_relu is stylegan_ops.fused_leaky_relu
    assert stylegan_ops.installed()


# --- GFPGAN v1 (original) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gfpgan_v1_file(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("v1") / "GFPGANv1.pth", build_gfpgan_v1(seed=3))


def _reference_forms(monkeypatch):
    """basicsr's own forms where they exist without the compiled extension: upfirdn2d_native
    (its CPU path) and the fused leaky ReLU as F.leaky_relu(x + b) * sqrt(2)."""
    from basicsr.ops.upfirdn2d.upfirdn2d import upfirdn2d_native

    def upfirdn(x, kernel, up=1, down=1, pad=(0, 0)):
        return upfirdn2d_native(x, kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])

    def fused(x, bias, negative_slope=0.2, scale=2 ** 0.5):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return F.leaky_relu(x + bias.view(shape), negative_slope) * scale

    for module, name in stylegan_ops._PATCHED:
        monkeypatch.setattr(importlib.import_module(module), name,
                            upfirdn if name == "upfirdn2d" else fused)


def test_gfpgan_v1_is_recognised_and_matches_gfpgan_with_only_the_ops_swapped(gfpgan_v1_file, monkeypatch):
    loaded = load_restorer(gfpgan_v1_file, CPU)
    assert (loaded.arch, loaded.architecture, loaded.name, loaded.version) == ("original", "GFPGANv1", "GFPGANv1", "1")
    assert loaded.has_noise and loaded.config["narrow"] == 1 / 16
    x = torch.from_numpy(make_faces(2, seed=4, size=512)).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1
    with torch.no_grad():
        ours = loaded.net(x, return_rgb=False, randomize_noise=False)[0]
        _reference_forms(monkeypatch)
        reference = loaded.net(x, return_rgb=False, randomize_noise=False)[0]
    assert ours.abs().mean() > 0.05  # a real image, not zeros
    assert torch.allclose(ours, reference, rtol=0, atol=2e-5), (ours - reference).abs().max()


def _pipeline_against_gfpganer(path, arch: str, small_weights, tmp_path, monkeypatch, seed: int, label: str,
                               stored_noise: bool = False) -> tuple[float, float]:
    """Our pipeline and GFPGANer(arch=arch) on the restorer file `path`, given the same landmarks
    (GFPGANer's constructor patched to the file's sizes by the caller): (mean, max) difference."""
    import os

    import gfpgan.utils

    from tests.checkpoints import DETECTION_FILE, PARSING_FILE
    from tests.test_pipeline import diff, load_nets, with_landmarks

    _, detector, parser = load_nets(small_weights)
    loaded = load_restorer(path, TEST_DEVICE)
    pipeline = FacePipeline(loaded.net, detector, parser, device=TEST_DEVICE, dtype=torch.float32)
    faces, points = make_faces(1, seed=seed), template_landmarks(1, seed=seed)
    [result] = pipeline.enhance([Job(faces, EnhanceOptions(alignment=Alignment.LANDMARKS), points)])
    assert result.status == [FaceStatus.ENHANCED]

    (tmp_path / "gfpgan" / "weights").mkdir(parents=True)
    for name in (DETECTION_FILE, PARSING_FILE):
        os.symlink(small_weights / name, tmp_path / "gfpgan" / "weights" / name)
    monkeypatch.chdir(tmp_path)  # facexlib reads its weights from ./gfpgan/weights
    reference = gfpgan.utils.GFPGANer(model_path=str(path), upscale=1, arch=arch, channel_multiplier=2,
                                      device=TEST_DEVICE)
    if stored_noise:
        net = reference.gfpgan
        reference.gfpgan = lambda x, **kw: net(x, **{**kw, "randomize_noise": False})
    with_landmarks(reference, points[0])
    expected = reference.enhance(faces[0], has_aligned=False, only_center_face=True, paste_back=True)[2]
    mean, worst = diff(result.faces[0], expected)
    print(f"{label} LANDMARKS 256: mean {mean:.3f} max {worst:.0f}")
    return mean, worst


def test_gfpgan_v1_through_the_pipeline_matches_gfpganer_original(gfpgan_v1_file, small_weights, tmp_path,
                                                                  monkeypatch):
    """GFPGANer(arch='original') runs once the ops are plain torch (its only change), on the same
    file, given the same landmarks: the parity tests' tolerance at 256."""
    import gfpgan.utils
    from gfpgan.archs.gfpganv1_arch import GFPGANv1

    from tests.checkpoints import SMALL_NARROW

    monkeypatch.setattr(gfpgan.utils, "GFPGANv1", lambda **kw: GFPGANv1(**{**kw, "narrow": SMALL_NARROW}))
    mean, worst = _pipeline_against_gfpganer(gfpgan_v1_file, "original", small_weights, tmp_path, monkeypatch,
                                             seed=9, label="GFPGAN v1", stored_noise=True)
    assert mean < 0.7 and worst <= 12, (mean, worst)


def test_stock_basicsr_cannot_run_gfpgan_v1_without_the_compiled_ops(gfpgan_v1_file, monkeypatch):
    """Why the plain-torch ops exist: basicsr's own forms need fused_act_ext (not built)."""
    from basicsr.ops.fused_act import fused_act

    if hasattr(fused_act, "fused_act_ext"):
        pytest.skip("this basicsr has its compiled extension")
    loaded = load_restorer(gfpgan_v1_file, CPU)
    for (module, name), original in stylegan_ops.BASICSR_FORMS.items():
        monkeypatch.setattr(importlib.import_module(module), name, original)
    assert importlib.import_module("basicsr.archs.stylegan2_arch").fused_leaky_relu is not stylegan_ops.fused_leaky_relu
    with pytest.raises(NameError, match="fused_act_ext"), torch.no_grad():
        loaded.net(torch.zeros(1, 3, 512, 512), return_rgb=False, randomize_noise=False)


# --- RestoreFormer -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def restoreformer_file(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rf") / "RestoreFormer.pth", build_restoreformer(seed=5))


def test_restoreformer_is_recognised_with_its_sizes_and_is_gfpgans_network_exactly(restoreformer_file):
    loaded = load_restorer(restoreformer_file, CPU)
    assert (loaded.arch, loaded.architecture, loaded.has_noise) == ("RestoreFormer", "RestoreFormer", False)
    for key, value in SMALL_RESTOREFORMER_CONFIG.items():
        assert loaded.config[key] == value
    reference = build_restoreformer(seed=0)
    reference.load_state_dict(torch.load(restoreformer_file, weights_only=True)["params_ema"])
    x = torch.from_numpy(make_faces(1, seed=6, size=512)).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1
    with torch.no_grad():
        ours, theirs = loaded.net(x)[0], reference(x)[0]
    assert torch.equal(ours, theirs)


def test_the_published_restoreformer_sizes_are_read_back_from_its_keys():
    from server.model import restoreformer_config

    full = build_restoreformer(ch=64, n_embed=1024, embed_dim=256, z_channels=256)
    config = restoreformer_config(full.state_dict())
    assert config == dict(n_embed=1024, embed_dim=256, ch=64, ch_mult=(1, 2, 2, 4, 4, 8), num_res_blocks=2,
                          attn_resolutions=(16,), resolution=512, z_channels=256, double_z=False,
                          enable_mid=True, head_size=8)


def test_restoreformer_through_the_pipeline_matches_gfpganer(restoreformer_file, small_weights, tmp_path, monkeypatch):
    """GFPGANer(arch='RestoreFormer') on the same file (its constructor patched to the small
    sizes), given the same landmarks: the same paste-back within the parity tests' tolerance."""
    import gfpgan.archs.restoreformer_arch as rf_arch

    # GFPGANer calls RestoreFormer() with no arguments: give its constructor the small defaults
    init = rf_arch.RestoreFormer.__init__
    names = list(inspect.signature(init).parameters)[1:]
    defaults = tuple(SMALL_RESTOREFORMER_CONFIG.get(n, d) for n, d in zip(names, init.__defaults__))
    monkeypatch.setattr(init, "__defaults__", defaults)
    mean, worst = _pipeline_against_gfpganer(restoreformer_file, "RestoreFormer", small_weights, tmp_path,
                                             monkeypatch, seed=7, label="RestoreFormer")
    assert mean < 0.7 and worst <= 12, (mean, worst)


# --- recognition ---------------------------------------------------------------------------------

def test_a_codeformer_like_file_is_refused_naming_what_it_looks_like(tmp_path):
    state = {"quantize.embedding.weight": torch.zeros(4, 2), "encoder.conv_in.weight": torch.zeros(1),
             "position_emb": torch.zeros(1)}
    path = make_checkpoint(tmp_path / "codeformer.pth", torch.nn.Module())
    torch.save({"params_ema": state}, path)
    with pytest.raises(ModelLoadError, match="looks like CodeFormer") as caught:
        load_restorer(path, CPU)
    assert str(path) in str(caught.value)


# --- the loader evaluated: spandrel against our recognition --------------------------------------

def test_spandrel_reads_restoreformer_as_we_do_but_not_gfpgans_width_or_v1(restoreformer_file, gfpgan_v1_file,
                                                                          small_weights):
    """Why the service recognises the GFPGAN family itself and uses spandrel only for CodeFormer:
    spandrel reads RestoreFormer's sizes as we do, but builds GFPGAN at the published width only
    (narrow=1, channel_multiplier=2 hard-coded) and takes GFPGAN v1 for the clean architecture."""
    import spandrel

    from server.model import restoreformer_config
    from tests.checkpoints import GFPGAN_FILE

    state = torch.load(restoreformer_file, weights_only=True)["params_ema"]
    theirs = spandrel.ModelLoader().load_from_state_dict(state)
    assert theirs.architecture.id == "RestoreFormer"
    ours = restoreformer_config(state)
    built = theirs.model
    assert built.encoder.conv_in.out_channels == ours["ch"]
    assert built.quantize.embedding.weight.shape == (ours["n_embed"], ours["embed_dim"])
    narrow = torch.load(small_weights / GFPGAN_FILE, weights_only=True)["params_ema"]
    with pytest.raises(Exception, match="size mismatch"):
        spandrel.ModelLoader().load_from_state_dict(narrow)
    v1 = torch.load(gfpgan_v1_file, weights_only=True)["params_ema"]
    with pytest.raises(Exception, match="Error.s. in loading state_dict for GFPGANv1Clean"):
        spandrel.ModelLoader().load_from_state_dict(v1)  # taken for the clean architecture
