"""The pipeline's speed forms (server/speed.py) give the same faces as the plain pipeline.

Tolerances are in 0..255 levels of the output faces, on the narrow random-valued test weights
(which amplify small differences more than full-width ones do, see tests/checkpoints.py).
Runs on the CPU, or on GFPGAN_TEST_DEVICE (scripts/gpu_check.py runs it on CUDA).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os

import numpy as np
import pytest
import torch

import server.compat  # noqa: F401
from contract.types import Alignment, EnhanceOptions, FaceStatus
from server.jobs import Job
from server.pipeline import FacePipeline
from server.profiling import StageProfiler
import server.speed as speed_module
from server.pipeline import parse_logits
from server.settings import Settings
from server.speed import (MODULATE_DTYPES, RESAMPLE_DTYPES, CompiledForward, GraphedForward, SpeedOptions,
                          bilinear_phase_weights, bilinear_upsample_conv2d, border_conv2d, box_paste_mask, downsample2x_bilinear, graph_buckets, reflection_pad,
                          resampling_forms, set_activation_form, set_modconv_form, set_norm_folding,
                          upsample2x_bilinear, upsample2x_nearest, upsample_conv2d)
from tests.device import TEST_DEVICE, needs_cuda
from tests.faces import make_faces, template_landmarks, weights_with_detector
from tests.test_pipeline import load_nets, reference, with_landmarks

ALIGNED = EnhanceOptions(alignment=Alignment.ALIGNED)
LANDMARKS = EnhanceOptions(alignment=Alignment.LANDMARKS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, small_weights):
    return weights_with_detector(tmp_path_factory.mktemp("speed_weights"), small_weights)


@pytest.fixture(scope="module")
def nets(weights):
    return load_nets(weights)


#: torch.compile's backend in the compiled-form tests: Inductor where the GPU check runs them (its
#: Triton kernels are what would serve); on the CPU "aot_eager", the same whole-graph trace without
#: Inductor's C++ build, which takes minutes per network on two cores (compiled on this CPU once
#: with Inductor: GFPGAN 148 s, ParseNet 42 s, faces within 1 level). GFPGAN_TEST_COMPILE_BACKEND
#: overrides it.
COMPILE_BACKEND = os.environ.get("GFPGAN_TEST_COMPILE_BACKEND") or (
    "inductor" if TEST_DEVICE.type == "cuda" else "aot_eager")


def make_pipeline(nets, speed=SpeedOptions(), dtype=torch.float32, graph_max_batch=8, backend=None):
    gfpgan, detector, parser = nets
    return FacePipeline(gfpgan, detector, parser, device=TEST_DEVICE, dtype=dtype, speed=speed,
                        graph_max_batch=graph_max_batch, compile_backend=backend or COMPILE_BACKEND)


def levels(a, b):
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return d.mean(), d.max()


def test_unfused_modulated_convolution_equals_gfpgans_own(nets):
    gfpgan = nets[0]
    x = torch.rand(3, 3, 512, 512, generator=torch.Generator().manual_seed(1)).to(TEST_DEVICE) * 2 - 1
    with torch.no_grad():
        set_modconv_form(gfpgan, "fused")
        fused = gfpgan(x, return_rgb=False, randomize_noise=False)[0]
        count = set_modconv_form(gfpgan, "unfused")
        unfused = gfpgan(x, return_rgb=False, randomize_noise=False)[0]
        set_modconv_form(gfpgan, "fused")
        again = gfpgan(x, return_rgb=False, randomize_noise=False)[0]
    assert count == 15 + 8  # 15 StyleConvs and 8 ToRGBs in the 512 decoder
    # float32 rounding only: the same sums in another order
    assert (fused - unfused).abs().max() < 1e-4
    assert torch.equal(fused, again)  # switching back restores GFPGAN's own forward


@pytest.fixture(scope="module")
def plain_forms_results(nets):
    """One DETECT, one LANDMARKS and one ALIGNED job through GFPGAN's own forms, computed once
    for every speed form compared with it. The pasted jobs have a face each (ParseNet at 512
    costs seconds a face here); the ALIGNED one has two, so that GFPGAN runs on a batch whose
    faces have styles of their own (the per-face part of the modulated convolution)."""
    faces = make_faces(2, seed=21)
    points = template_landmarks(2, seed=21)
    jobs = [Job(faces[:1], EnhanceOptions()), Job(faces[1:], LANDMARKS, points[1:]), Job(faces, ALIGNED)]
    return jobs, make_pipeline(nets).enhance(jobs)


@pytest.mark.parametrize("speed", [SpeedOptions(modconv="unfused"),
                                   SpeedOptions(modconv="unfused", channels_last=True),
                                   SpeedOptions(modconv="unfused", channels_last=True, decoder_channels_last=True,
                                                gfpgan_forward="lean"),
                                   SpeedOptions(resample="fast"),
                                   dataclasses.replace(Settings().speed_options("cpu"), resample="fast"),
                                   dataclasses.replace(Settings().speed_options("cpu"), gfpgan_upsample="phases"),
                                   SpeedOptions(fold_norms=True, gfpgan_forward="lean")],
                         ids=["unfused", "unfused-channels-last", "unfused-channels-last-decoder+lean",
                              "fast-resample", "cpu-defaults+fast-resample", "cpu-defaults+gfpgan-phases",
                              "fold-norms+lean"])
def test_speed_forms_give_the_plain_pipelines_faces(nets, plain_forms_results, speed):
    jobs, plain = plain_forms_results
    fast = make_pipeline(nets, speed).enhance(jobs)
    make_pipeline(nets)  # leave the shared networks in their plain form
    for a, b in zip(plain, fast):
        assert a.status == b.status
        mean, worst = levels(a.faces, b.faces)
        print(f"{speed.describe()}: mean {mean:.4f} max {worst:.0f}")
        assert mean < 0.02 and worst <= 2, (mean, worst)


def test_fast_resampling_keeps_gfpgans_channels_last_maps_channels_last(nets, monkeypatch):
    """With the service's forms (GFPGAN's encoder and decoder channels-last) and fast
    resampling, every map GFPGAN resamples, in its U-Net and its StyleGAN decoder, keeps its
    layout, and every one of 8x8 or more is NHWC: no convolution after a resampling meets an
    NCHW input. (At 4x4 the U-Net's bottom map is NCHW in every form: GFPGAN flattens it.)"""
    gfpgan = nets[0]
    seen = []

    def nhwc(t):
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    for name in ("upsample2x_bilinear", "downsample2x_bilinear"):
        original = getattr(speed_module, name)

        def recorded(x, _f=original, _n=name):
            out = _f(x)
            seen.append((_n, tuple(x.shape[1:]), nhwc(x), nhwc(out)))
            return out
        monkeypatch.setattr(speed_module, name, recorded)
    pipeline = make_pipeline(nets, dataclasses.replace(Settings().speed_options("cpu"), resample="fast"))
    crops = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(4)).to(TEST_DEVICE) * 255
    try:
        with torch.no_grad(), pipeline.speed.resampling():
            gfpgan(pipeline._network_input(crops), return_rgb=False, randomize_noise=False)
    finally:
        make_pipeline(nets)  # leave the shared networks in their plain form
    wide = [entry for entry in seen if entry[1][0] > 3]  # a 3-channel RGB map is both layouts
    # GFPGAN v1.4: two x0.5 a U-Net down block, two x2 an up block, one x2 a decoder level
    assert sum(name == "downsample2x_bilinear" for name, *_ in wide) >= 12, seen
    assert sum(name == "upsample2x_bilinear" for name, *_ in wide) >= 18, seen
    assert all(before == after for _, _, before, after in wide), seen
    assert all(before for _, (_, h, _), before, _ in wide if h >= 8), seen


def test_decoder_channels_last_runs_the_stylegan_decoder_in_nhwc_and_gives_the_same_faces(nets):
    """--decoder-channels-last: the modulated convolutions' 5-D weights are laid out so that the
    shared weight of the unfused form is channels-last, and the StyleGAN decoder's activations
    come out NHWC (with --channels-last alone they stay NCHW: a convolution's output follows its
    weight); the restored faces are the NCHW ones within float rounding, and switching back
    restores the weights' layout."""
    gfpgan = nets[0]
    decoder = gfpgan.stylegan_decoder
    crops = torch.from_numpy(make_faces(2, seed=33, size=512)).permute(0, 3, 1, 2).float().to(TEST_DEVICE)
    layouts = []
    hook = decoder.style_convs[-1].register_forward_hook(
        lambda _module, _args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)
                                                   and not out.is_contiguous()))
    faces = {}
    try:
        for on in (False, True):
            pipeline = make_pipeline(nets, SpeedOptions(modconv="unfused", channels_last=True,
                                                        decoder_channels_last=on))
            weight = decoder.style_convs[-1].modulated_conv.weight
            assert weight[0].is_contiguous(memory_format=torch.channels_last) == on
            with torch.no_grad():
                faces[on] = pipeline._gfpgan_fixed_noise(crops)
        make_pipeline(nets)  # back to the plain forms
        assert all(p.is_contiguous() for p in gfpgan.parameters() if p.dim() == 5)
    finally:
        hook.remove()
    assert layouts == [False, True]
    # float32 sums in another order: a level here and there where a value sits on a rounding
    # edge (on CUDA, cuDNN also picks other algorithms for the other layout, as in the
    # fixed-selection test)
    difference = (faces[True] - faces[False]).abs()
    worst, changed = difference.max().item(), (difference > 0).float().mean().item()
    print(f"decoder channels-last: max {worst:.0f} levels, {changed:.5f} of values differ")
    cuda = TEST_DEVICE.type == "cuda"
    assert worst <= (2 if cuda else 1) and changed < (0.01 if cuda else 0.001), (worst, changed)


def test_parse_channels_last_runs_parsenet_in_nhwc_and_gives_the_same_masks(nets):
    """--parse-channels-last: ParseNet's weights and its activations go channels-last (the
    setting takes effect), with PyTorch's padding, with padding from slices and with no padding
    pass (--parse-padding border); the face masks are the NCHW ones within float rounding, and
    switching back restores NCHW."""
    parser = nets[2]
    crops = torch.from_numpy(make_faces(1, seed=31, size=512)).permute(0, 3, 1, 2).float().to(TEST_DEVICE)
    first_conv = next(m for m in parser.modules() if isinstance(m, torch.nn.Conv2d))
    first_layer = parser.encoder[0]  # (its convolution's output, in whichever padding form)
    layouts = []
    hook = first_layer.register_forward_hook(
        lambda _module, _args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)
                                                   and not out.is_contiguous()))
    masks = {}
    forms = [(False, "torch", "reflect", "nearest"), (True, "torch", "reflect", "nearest"),
             (True, "fast", "reflect", "nearest"), (True, "torch", "border", "phases")]
    try:
        for nhwc, resample, padding, upsample in forms:
            pipeline = make_pipeline(nets, SpeedOptions(parse_channels_last=nhwc, resample=resample,
                                                        parse_padding=padding, parse_upsample=upsample,
                                                        fold_norms=True))
            weight = first_conv.weight
            assert weight.is_contiguous(memory_format=torch.channels_last) == nhwc
            with torch.no_grad():
                masks[nhwc, resample, padding, upsample] = pipeline._parse_masks(crops)
        pipeline = make_pipeline(nets)  # back to the plain forms: NCHW, norms unfolded
        assert first_conv.weight.is_contiguous()
    finally:
        hook.remove()
    assert layouts == [False, True, True, True]
    for key in forms[1:]:
        worst = (masks[key] - masks[forms[0]]).abs().max().item()
        # the mask is a blurred argmax of the logits: a near-tie may flip in a few pixels
        changed = ((masks[key] - masks[forms[0]]).abs() > 1e-3).float().mean().item()
        print(f"parse channels-last {key[1:]}: max {worst:.4f}, {changed:.5f} of pixels differ")
        assert changed < 0.002, (key, changed)


@pytest.mark.parametrize("stride, size, pad", [(1, (12, 12), 1), (2, (12, 12), 1), (1, (9, 14), 1),
                                               (2, (9, 14), 1), (1, (11, 9), 2), (2, (11, 9), 2)])
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_border_convolution_is_reflection_padding_then_the_convolution(stride, size, pad, nhwc):
    """border_conv2d (--parse-padding border): a zero-padded convolution whose border outputs are
    recomputed from reflected strips equals ReflectionPad2d then the unpadded convolution: both
    strides ParseNet uses, odd and even sizes (a stride-2 end row that does or does not reach
    the padding), a 5x5 window, both layouts. Float rounding only (another summation order)."""
    torch.manual_seed(stride * 100 + size[0] + pad)
    conv = torch.nn.Conv2d(6, 5, 2 * pad + 1, stride).to(TEST_DEVICE)
    x = torch.randn(3, 6, *size, device=TEST_DEVICE)
    if nhwc:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(torch.nn.ReflectionPad2d(pad)(x))
        got = border_conv2d(x, conv, pad)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5
    # and the border is what the padding changes: the zero-padded convolution alone differs there
    with torch.no_grad():
        zero = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride, pad)
    assert (zero[:, :, 0] - expected[:, :, 0]).abs().max() > 1e-3
    assert (zero[:, :, :, 0] - expected[:, :, :, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(8, 8), (5, 7), (1, 2)])
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_upsampling_convolution_from_phases_is_upsample_pad_convolve(size, nhwc):
    """upsample_conv2d (--parse-upsample phases): four 2x2 convolutions of the input, one per
    output phase, equal ParseNet's x2 layer (nearest x2, ReflectionPad2d(1), 3x3 convolution),
    edges included, the output in the input's layout. Float rounding only (summed weights)."""
    torch.manual_seed(size[0] * 10 + size[1])
    conv = torch.nn.Conv2d(6, 5, 3).to(TEST_DEVICE)
    x = torch.randn(2, 6, *size, device=TEST_DEVICE)
    if nhwc:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(torch.nn.ReflectionPad2d(1)(torch.nn.functional.interpolate(x, scale_factor=2)))
        got = upsample_conv2d(x, conv)
    assert got.shape == expected.shape == (2, 5, 2 * size[0], 2 * size[1])
    assert (got - expected).abs().max().item() < 1e-5
    assert got.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


@pytest.mark.parametrize("size", [(8, 8), (5, 7), (2, 3), (1, 4)])
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_bilinear_upsampling_convolution_from_phases_is_upsample_then_convolve(size, nhwc, with_bias):
    """bilinear_upsample_conv2d (--gfpgan-upsample phases): four 3x3 convolutions of the input,
    one per output phase, equal GFPGAN's x2 layer (bilinear x2, then a zero-padded 3x3
    convolution), the edges and corners too, the output in the input's layout; a map too small
    for the edge strips (one row) takes the upsampled form. Float rounding only."""
    torch.manual_seed(size[0] * 10 + size[1])
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=with_bias).to(TEST_DEVICE)
    x = torch.randn(2, 6, *size, device=TEST_DEVICE)
    if nhwc:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        phases = bilinear_phase_weights(conv.weight)
        assert phases.shape == (20, 6, 3, 3)
        got = bilinear_upsample_conv2d(x, conv.weight, conv.bias, phases,
                                       None if conv.bias is None else conv.bias.repeat_interleave(4))
    assert got.shape == expected.shape == (2, 5, 2 * size[0], 2 * size[1])
    assert (got - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())
    if size[0] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def test_gfpgan_upsample_phases_runs_every_x2_layer_from_its_input_and_gives_gfpgans_output(nets, monkeypatch):
    """--gfpgan-upsample phases: each of GFPGAN v1.4's x2 layers, its U-Net's 7 up blocks and
    its decoder's 7 upsampling StyleConvs, runs as bilinear_upsample_conv2d, and the only x2
    resamplings left are the RGB skips' and the up blocks' skips (after their 1x1 convolution:
    its output channels, not its input's). GFPGAN's output is the upsampled forms' within float32 rounding, and
    switching back runs GFPGAN's own ResBlock forward again."""
    gfpgan = nets[0]
    calls, resampled = [], []
    original = speed_module.bilinear_upsample_conv2d
    monkeypatch.setattr(speed_module, "bilinear_upsample_conv2d",
                        lambda x, *a: calls.append(tuple(x.shape[1:])) or original(x, *a))
    resample = speed_module._resampled  # (what GFPGAN's F.interpolate and the lean forwards call)
    monkeypatch.setattr(speed_module, "_resampled",
                        lambda x, size, scale, *a, **k: resampled.append((tuple(x.shape[1:]), scale))
                        or resample(x, size, scale, *a, **k))
    x = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(8)).to(TEST_DEVICE) * 2 - 1
    cpu = Settings().speed_options("cpu")
    outputs = {}
    try:
        for form in ("resample", "phases"):
            pipeline = make_pipeline(nets, dataclasses.replace(cpu, gfpgan_upsample=form))
            calls.clear()
            resampled.clear()
            with torch.no_grad(), pipeline.speed.resampling():
                outputs[form] = gfpgan(pipeline._network_input(x * 127.5 + 127.5), return_rgb=False,
                                       randomize_noise=False)[0]
            ups = [shape for shape, scale in resampled if scale == 2]
            # x2 resamplings: each ToRGB's RGB skip (7) in both forms; as GFPGAN writes it, each up
            # block's main path and skip (14) and each upsampling StyleConv (7); with phases, the
            # up blocks' skips alone, after their 1x1 convolution (the test's narrow GFPGAN has
            # 2 output channels in the last, which is why channels alone cannot tell them apart)
            if form == "resample":
                assert calls == [] and len(ups) == 7 + 14 + 7, ups
            else:
                assert len(calls) == 14 and len(ups) == 7 + 7, (calls, ups)
    finally:
        make_pipeline(nets)  # leave the shared networks in their plain form
    from gfpgan.archs.gfpganv1_clean_arch import ResBlock
    assert all("forward" not in m.__dict__ for m in gfpgan.modules() if isinstance(m, ResBlock))
    worst = (outputs["phases"] - outputs["resample"]).abs().max().item()
    print(f"gfpgan upsample phases: max {worst:.2e} of {outputs['resample'].abs().max().item():.2f}")
    assert worst < 1e-4 * max(1.0, outputs["resample"].abs().max().item()), worst


def _launches(fn) -> dict[str, int]:
    """fn()'s operators that launch, views aside (the profiler's count), by name."""
    from server.profiling import OpCounter

    with torch.no_grad(), OpCounter(record=True) as counted:
        fn()
    names = [name.removeprefix("aten::") for name, _, _ in counted.record]
    return {name: names.count(name) for name in names}


@pytest.mark.parametrize("stride", [1, 2])
def test_border_convolution_runs_eight_operators(stride):
    """border_conv2d with ParseNet's 3x3 windows: the zero-padded convolution, and per side a
    strip (the columns' reflected along their length too), its convolution and one copy back:
    with stride 1 both ends of a side share a strip and one strided copy, with stride 2 only
    the start needs one. Eight operators, where the padding pass and the convolution were two."""
    conv = torch.nn.Conv2d(4, 3, 3, stride).to(TEST_DEVICE)
    x = torch.randn(2, 4, 10, 12, device=TEST_DEVICE)
    assert _launches(lambda: border_conv2d(x, conv, 1)) == {"convolution": 3, "cat": 3, "copy_": 2}


def _reference_upsampling(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv(torch.nn.ReflectionPad2d(1)(torch.nn.functional.interpolate(x, scale_factor=2)))


def test_upsampling_convolution_runs_three_operators_and_keeps_its_weights_until_they_change(monkeypatch):
    """upsample_conv2d makes its four phases' weights once per weight: later calls run the
    padding, one convolution and one interleaving copy, nothing else. A weight changed in
    place, a new weight (norm folding swaps it), or a new bias gives new phase weights, never
    stale ones. Inside torch.compile's tracing or a CUDA graph capture the phase weights are
    computed and not kept (a kept tensor made during capture holds nothing until a replay)."""
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(4, 3, 3).to(TEST_DEVICE)
    x = torch.randn(2, 4, 6, 5, device=TEST_DEVICE)
    with torch.no_grad():
        upsample_conv2d(x, conv)
        assert _launches(lambda: upsample_conv2d(x, conv)) == \
            {"replication_pad2d": 1, "convolution": 1, "copy_": 1}
        got = upsample_conv2d(x, conv)
        assert (got - _reference_upsampling(x, conv)).abs().max() < 1e-5
        changes = [lambda: conv.weight.mul_(-2.0),
                   lambda: setattr(conv, "weight", torch.nn.Parameter(torch.randn_like(conv.weight))),
                   lambda: conv.bias.add_(3.0),
                   lambda: setattr(conv, "bias", torch.nn.Parameter(torch.randn_like(conv.bias)))]
        for change in changes:
            before = upsample_conv2d(x, conv)
            change()
            got = upsample_conv2d(x, conv)
            assert (got - _reference_upsampling(x, conv)).abs().max() < 1e-5
            assert (got - before).abs().max() > 1e-2
        kept = conv.__dict__["_phase_weights"]
        for name, value in (("compiling", lambda: True), ("capturing", lambda _device: True)):
            conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))
            with monkeypatch.context() as patch:
                if name == "compiling":
                    patch.setattr(torch.compiler, "is_compiling", value)
                else:
                    patch.setattr(speed_module, "_capturing", value)
                got = upsample_conv2d(x, conv)
            assert (got - _reference_upsampling(x, conv)).abs().max() < 1e-5, name
            assert conv.__dict__["_phase_weights"] is kept, name  # not kept from there


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """How many times each operator ran."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_parse_forms_drop_their_passes_and_give_parsenets_logits(nets, monkeypatch):
    """--parse-padding border and --parse-upsample phases take effect: ParseNet's 46 padding
    passes and its 8 upsamplings are gone from its mask pass (counted as they run; the x2 layers
    that take phases pad their quarter-size input by replication instead), in NCHW and
    channels-last, with folded norms; the logits are ParseNet's own within float rounding;
    switching back restores its own forward. (ParseNet is fully convolutional: 128x128 keeps
    this quick; the border form is taken on every map size here, down to ParseNet's 8x8 body.)"""
    parser = nets[2]
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4)).to(TEST_DEVICE) * 2 - 1
    # by default maps under 128x128 keep their padding pass: on a 128x128 input, most of them
    make_pipeline(nets, SpeedOptions(parse_padding="border", fold_norms=True))
    with torch.no_grad(), _CountOps() as ops:
        parse_logits(parser, x)
    assert 0 < ops.counts.get("reflection_pad2d", 0) < 46
    monkeypatch.setattr(speed_module, "BORDER_MIN_SIZE", 1)
    logits, counts = {}, {}
    forms = [(padding, upsample) for padding in ("reflect", "border") for upsample in ("nearest", "phases")]
    for nhwc in (False, True):
        for padding, upsample in forms:
            make_pipeline(nets, SpeedOptions(parse_padding=padding, parse_upsample=upsample,
                                             parse_channels_last=nhwc, fold_norms=True))
            inputs = x.contiguous(memory_format=torch.channels_last) if nhwc else x
            with torch.no_grad(), _CountOps() as ops:
                logits[nhwc, padding, upsample] = parse_logits(parser, inputs)
            counts[nhwc, padding, upsample] = tuple(ops.counts.get(name, 0) for name in (
                "reflection_pad2d", "replication_pad2d", "upsample_nearest2d"))
    make_pipeline(nets)  # the plain forms again
    with torch.no_grad():
        own = parser(x)[0]
    expected = {("reflect", "nearest"): (46, 0, 8), ("border", "nearest"): (0, 0, 8),
                ("reflect", "phases"): (38, 8, 0), ("border", "phases"): (0, 8, 0)}
    assert counts == {(nhwc, *form): expected[form] for nhwc in (False, True) for form in forms}
    for key, value in logits.items():
        worst = (value - logits[False, "reflect", "nearest"]).abs().max().item()
        print(f"parse {key}: logits differ by {worst:.2e} at most")
        assert worst < 1e-4, (key, worst)
    assert not any("forward" in vars(m) for m in parser.modules())
    assert (own - logits[False, "reflect", "nearest"]).abs().max() < 1e-4  # (norms folded there)


@pytest.mark.parametrize("modconv", ["fused", "unfused"])
def test_lean_gfpgan_forward_equals_gfpgans_own(nets, modconv):
    gfpgan = nets[0]
    x = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(3)).to(TEST_DEVICE) * 2 - 1
    outputs = {}
    with torch.no_grad():
        own = gfpgan(x, return_rgb=False, randomize_noise=False)[0]
        for form in ("gfpgan", "lean"):
            set_modconv_form(gfpgan, modconv)
            count = set_activation_form(gfpgan, "promote", form, modconv)
            outputs[form, "stored"] = gfpgan(x, return_rgb=False, randomize_noise=False)[0]
            torch.manual_seed(11)  # fresh noise: both forms draw it layer by layer, in the same order
            if TEST_DEVICE.type == "cuda":
                torch.cuda.manual_seed(11)
            outputs[form, "fresh"] = gfpgan(x, return_rgb=False, randomize_noise=True)[0]
            # a caller that wants GFPGAN's intermediate RGB images gets GFPGAN's own forward
            outputs[form, "rgbs"] = len(gfpgan(x, return_rgb=True, randomize_noise=False)[1])
        set_modconv_form(gfpgan, "fused")
        set_activation_form(gfpgan, "promote")
        again = gfpgan(x, return_rgb=False, randomize_noise=False)[0]
    assert count == 15
    assert outputs["gfpgan", "rgbs"] == outputs["lean", "rgbs"] > 0
    for noise in ("stored", "fresh"):
        # float32 rounding only: the same sums in another order ([-1, 1] output units)
        difference = (outputs["gfpgan", noise] - outputs["lean", noise]).abs().max()
        assert difference < 1e-4, (noise, difference)
    assert torch.equal(again, own)  # switching back restores GFPGAN's own


def test_norm_folding_drops_the_layers_and_keeps_the_networks_outputs(nets):
    _, detector, parser = nets
    generator = torch.Generator().manual_seed(4)
    images = (torch.rand(2, 3, 256, 256, generator=generator) * 255 - 110).to(TEST_DEVICE)
    crops = (torch.rand(1, 3, 512, 512, generator=generator) * 2 - 1).to(TEST_DEVICE)
    # RetinaFace is 50+ layers deep and its random-valued test weights give large logits, so
    # float32 rounding reaches 1e-3 of a softmax score; ParseNet's outputs stay within 1e-5.
    for net, x, pairs, ones, tolerance in ((detector, images, 73, 0, 1e-3), (parser, crops, 36, 40, 1e-5)):
        with torch.no_grad():
            plain = net(x)
            folding = set_norm_folding(net, True)
            folded = net(x)
            batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
            set_norm_folding(net, False)
            again = net(x)
        assert (folding.pairs, folding.times_one) == (pairs, ones)
        assert batch_norms == 0  # every batch norm of both networks follows a convolution
        for a, b, c in zip(plain, folded, again):
            assert torch.equal(a, c)  # unfolding puts the original layers back
            # the same sums in another order: float32 rounding, relative to the output's range
            print(net.__class__.__name__, float((a - b).abs().max()), float(a.abs().max()))
            assert (a - b).abs().max() <= tolerance * a.abs().max(), (a - b).abs().max()
        if net is detector:  # and no anchor changes sides of the detection threshold
            assert torch.equal(plain[1][..., 1] > 0.97, folded[1][..., 1] > 0.97)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 7, 9), (2, 2, 16, 1), (2, 6, 1, 5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fast_resampling_equals_torchs(shape, layout):
    """The fast forms give F.interpolate's and ReflectionPad2d's values (float32 rounding) and
    keep the input's layout: a channels-last map comes out channels-last, for the convolution
    after it (an NCHW result there costs a layout conversion or two on cuDNN)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(TEST_DEVICE)
    x = x.contiguous(memory_format=layout)
    F = torch.nn.functional

    def kept_layout(out):
        return out.is_contiguous(memory_format=layout)

    up = upsample2x_bilinear(x)
    assert (up - F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)).abs().max() < 1e-6
    nearest = upsample2x_nearest(x)
    assert torch.equal(nearest, F.interpolate(x, scale_factor=2, mode="nearest"))
    assert kept_layout(up) and kept_layout(nearest)
    if x.shape[2] > 2 and x.shape[3] > 2:
        assert torch.equal(reflection_pad(x, 1), torch.nn.ReflectionPad2d(1)(x))
        assert torch.equal(reflection_pad(x, 2), torch.nn.ReflectionPad2d(2)(x))
    even = x[..., : x.shape[2] // 2 * 2, : x.shape[3] // 2 * 2]
    if even.numel():
        down = downsample2x_bilinear(even)
        assert (down - F.interpolate(even, scale_factor=0.5, mode="bilinear", align_corners=False)).abs().max() < 1e-6
        assert kept_layout(down)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fast_resampling_in_bf16_rounds_at_most_once_more_than_torch(layout):
    """In bf16 the fast x2 and x0.5 resamplings round once per dimension where PyTorch's kernel
    rounds once: within two half-steps of bf16 (2^-8 of the largest input each) of the exact
    values, where PyTorch's is within one. Measured on float32 interpolation of the same bf16
    map."""
    x = torch.randn(2, 16, 12, 10, generator=torch.Generator().manual_seed(5)).to(TEST_DEVICE)
    x = x.bfloat16().contiguous(memory_format=layout)
    F = torch.nn.functional
    scale = float(x.abs().max())
    for fast, factor in ((upsample2x_bilinear, 2), (downsample2x_bilinear, 0.5)):
        exact = F.interpolate(x.float(), scale_factor=factor, mode="bilinear", align_corners=False)
        torchs = F.interpolate(x.float(), scale_factor=factor, mode="bilinear", align_corners=False).bfloat16()
        out = fast(x)
        assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=layout)
        assert float((torchs.float() - exact).abs().max()) <= 2 ** -8 * scale
        worst = float((out.float() - exact).abs().max())
        assert worst <= 2 * 2 ** -8 * scale, (fast.__name__, worst, scale)
        assert worst > 0  # (bf16 does round here: the bound is not met by exactness)


def test_fast_resampling_is_what_the_networks_run_and_gives_their_output(nets, monkeypatch):
    gfpgan, _, parser = nets
    calls = []
    for name in ("upsample2x_bilinear", "downsample2x_bilinear", "upsample2x_nearest", "reflection_pad"):
        original = getattr(speed_module, name)
        monkeypatch.setattr(speed_module, name,
                            lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    pipeline = make_pipeline(nets, SpeedOptions(resample="fast"))  # prepares the layers
    x = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(3)).to(TEST_DEVICE) * 2 - 1
    with torch.no_grad():
        plain = gfpgan(x, return_rgb=False, randomize_noise=False)[0], parser(x)[0]
        assert calls == []  # prepared, but off outside resampling_forms
        with resampling_forms(fast=True):
            fast = gfpgan(x, return_rgb=False, randomize_noise=False)[0], parser(x)[0]
    assert {"upsample2x_bilinear", "downsample2x_bilinear", "upsample2x_nearest", "reflection_pad"} <= set(calls)
    assert (plain[0] - fast[0]).abs().max() < 1e-4
    assert (plain[1] - fast[1]).abs().max() < 1e-3 * plain[1].abs().max()
    assert pipeline.speed.resample == "fast"


def test_bf16_activations_stay_bf16_and_give_the_promoted_faces(nets):
    from gfpgan.archs.stylegan2_clean_arch import StyleConv

    gfpgan = nets[0]
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in gfpgan.modules() if isinstance(m, StyleConv)]
    faces = make_faces(2, seed=27)
    points = template_landmarks(2, seed=27)
    try:
        results = {}
        for form in ("promote", "compute"):
            seen.clear()
            pipeline = make_pipeline(nets, SpeedOptions(activations=form), dtype=torch.bfloat16)
            [results[form]] = pipeline.enhance([Job(faces, LANDMARKS, points)])
            results[form, "dtypes"] = set(seen)
    finally:
        for hook in hooks:
            hook.remove()
        make_pipeline(nets)
    # GFPGAN's own StyleConv turns bf16 activations into float32 (its noise and bias are
    # float32); the compute form keeps them bf16: the setting takes effect
    assert results["promote", "dtypes"] == {torch.float32}
    assert results["compute", "dtypes"] == {torch.bfloat16}
    mean, worst = levels(results["promote"].faces, results["compute"].faces)
    print(f"bf16 activations vs promoted: mean {mean:.3f} max {worst:.0f}")
    # one more bf16 rounding per layer, on the narrow random network (bf16 vs fp32 is < 4 / 96)
    assert mean < 1.0 and worst <= 48, (mean, worst)  # measured: mean 0.35, max 20


def test_mixed_noise_is_one_pass_and_keeps_each_faces_mode(nets):
    pipeline = make_pipeline(nets)
    calls = []
    original = pipeline.gfpgan.forward
    pipeline.gfpgan.forward = lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)
    try:
        faces = make_faces(2, seed=22)
        noisy = EnhanceOptions(alignment=Alignment.ALIGNED, random_noise=True)
        jobs = [Job(faces[:1], ALIGNED), Job(faces[1:], noisy)]
        first, second = pipeline.enhance(jobs), pipeline.enhance(jobs)
        assert calls == [2, 2]  # one network pass per batch, both faces in it
        [fixed_alone] = pipeline.enhance([jobs[0]])
    finally:
        del pipeline.gfpgan.forward
    assert np.array_equal(first[0].faces, second[0].faces)  # stored noise: the same every time
    assert levels(first[0].faces, fixed_alone.faces)[1] <= 1
    assert not np.array_equal(first[1].faces, second[1].faces)  # fresh noise on every call


def test_box_mask_pastes_like_facexlib_without_parsing(nets, weights, monkeypatch):
    faces = make_faces(2, seed=23)
    points = template_landmarks(2, seed=23)
    [ours] = make_pipeline(nets, SpeedOptions(paste_mask="box")).enhance([Job(faces, LANDMARKS, points)])
    [parse] = make_pipeline(nets).enhance([Job(faces, LANDMARKS, points)])
    with reference(weights, 1, monkeypatch) as restorer:
        restorer.face_helper.use_parse = False
        refs = []
        for face, p in zip(faces, points):
            with_landmarks(restorer, p)
            refs.append(restorer.enhance(face, has_aligned=False, only_center_face=True, paste_back=True)[2])
    assert ours.status == [FaceStatus.ENHANCED] * 2
    for mine, ref, with_parse in zip(ours.faces, refs, parse.faces):
        mean, worst = levels(mine, ref)
        inner_mean, inner_worst = levels(mine[16:-16, 16:-16], ref[16:-16, 16:-16])
        print(f"box mask vs facexlib use_parse=False: mean {mean:.3f} max {worst:.0f}; 16 px in from "
              f"the crop's edge: mean {inner_mean:.3f} max {inner_worst:.0f}; vs the parse mask: "
              f"mean {levels(mine, with_parse)[0]:.2f}")
        # The same feathered box, except at the crop's own edge: where the template box reaches
        # past the crop, facexlib's erosion treats the outside as inside and leaves the face
        # unfeathered there, while ours fades it out over the last few pixels (measured: mean
        # 1.4-1.8 levels over the crop, up to ~140 in the outermost 8 px; 0.15-0.4, max 14,
        # from 16 px in).
        assert mean < 2.5, (mean, worst)
        assert inner_mean < 0.6 and inner_worst <= 24, (inner_mean, inner_worst)


def test_box_mask_is_one_inside_and_feathers_to_zero():
    mask = box_paste_mask(512)
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask[100:412, 100:412].min() == pytest.approx(1.0)
    assert mask[0].max() == 0 and mask[:, 0].max() == 0
    assert 0 < mask[256, 40] < 1  # a soft edge


@pytest.mark.parametrize("forms", ["plain", "the device's defaults"])
def test_bfloat16_stays_close_to_float32_on_the_same_weights(nets, forms):
    """bf16 (auto's dtype on CUDA and on CPUs that compute it) against float32, both in the same
    forms: GFPGAN's own, and those the service runs by default on this device."""
    from server.settings import Settings

    faces = make_faces(2, seed=24)
    points = template_landmarks(2, seed=24)
    jobs = [Job(faces, LANDMARKS, points), Job(faces, ALIGNED)]
    speed = SpeedOptions() if forms == "plain" else Settings().speed_options(TEST_DEVICE.type)
    fp32 = make_pipeline(nets, speed=speed).enhance(jobs)
    bf16 = make_pipeline(nets, speed=speed, dtype=torch.bfloat16).enhance(jobs)
    for a, b in zip(fp32, bf16):
        mean, worst = levels(a.faces, b.faces)
        print(f"bfloat16 vs float32: mean {mean:.3f} max {worst:.0f}")
        # bf16 keeps 8 bits of mantissa: ~0.4% per operation, which the narrow random network
        # accumulates to a couple of levels on average.
        assert mean < 4.0 and worst <= 96, (mean, worst)


def test_in_bfloat16_a_face_never_depends_on_the_faces_beside_it(nets):
    """bf16 rounds differently with the size of a network pass, and with a face's place in it (the
    backend picks other kernels for other sizes and for the rows past its last full block:
    BENCHMARKS.md, "bfloat16 and the batch around a face"), but a face's pixels never depend on
    which faces share its pass: at the same place in a pass of the same size, beside other faces,
    it comes back identical, in the service's forms on this device. A leak between rows (a CUDA
    graph's padding rows, a selection that mixes faces) would show here, where rounding cannot
    hide it."""
    from server.settings import Settings

    faces = make_faces(5, seed=31)
    pipeline = make_pipeline(nets, speed=Settings().speed_options(TEST_DEVICE.type), dtype=torch.bfloat16)
    for options in (ALIGNED, EnhanceOptions()):
        for place, orders in ((0, ([0, 1, 2], [0, 3, 4])), (2, ([1, 2, 0], [4, 3, 0]))):
            a, b = (pipeline.enhance([Job(faces[order], options)])[0] for order in orders)
            assert np.array_equal(a.faces[place], b.faces[place]), (options.alignment, place)
            assert a.status[place] == b.status[place]


def test_the_batch_rounding_table_measures_a_face_alone_beside_others_and_last(weights, tmp_path):
    """scripts/batch_rounding.py: a row per dtype, alignment and pass size; a pass of one is
    face 0 alone (0 levels), and face 0 beside other faces gives its own pixels (0 levels)."""
    import re

    import cv2

    from tests.helpers import load_script

    for i, face in enumerate(make_faces(4, seed=5)):
        cv2.imwrite(str(tmp_path / f"face{i:02d}.png"), face)
    table = load_script("batch_rounding").main([str(weights), str(tmp_path), "--device", TEST_DEVICE.type, "--dtypes", "bfloat16",
                         "--alignments", "aligned,detect", "--sizes", "1,3",
                         "--markdown-out", str(tmp_path / "table.md")])
    assert (tmp_path / "table.md").read_text() == table + "\n"
    rows = re.findall(r"(?m)^\| bfloat16 \| (\w+) \| (\d+) \| (\d+) \| ([\d.]+) \| (\d+) \| (\d+) \|$", table)
    assert [(a, int(n)) for a, n, *_ in rows] == [("aligned", 1), ("aligned", 3), ("detect", 1), ("detect", 3)]
    assert all(int(beside) == 0 for *_, beside, _ in rows)
    assert all(int(worst) == 0 and int(last) == 0 for _, n, worst, _, _, last in rows if n == "1")


def test_graph_buckets_cover_every_size_up_to_the_largest():
    assert graph_buckets(8) == [1, 2, 4, 6, 8]
    assert graph_buckets(32) == [1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32]  # MuseTalk's realtime 20 unpadded
    assert graph_buckets(20) == [1, 2, 4, 6, 8, 12, 16, 20]
    assert graph_buckets(26) == [1, 2, 4, 6, 8, 12, 16, 20, 24, 26]
    assert graph_buckets(64) == [1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 48, 64]
    assert graph_buckets(1) == [1]


def test_cuda_graphs_option_on_the_cpu_warns_and_runs_eagerly(nets, caplog):
    if TEST_DEVICE.type == "cuda":
        pytest.skip("the CPU's behaviour")
    pipeline = make_pipeline(nets, SpeedOptions(cuda_graphs=True))
    assert "no effect on cpu" in caplog.text
    pipeline.warmup()
    assert pipeline._graphs == {}


@needs_cuda
def test_cuda_graphs_give_the_eager_faces_at_every_batch_size(nets):
    eager = make_pipeline(nets, SpeedOptions(modconv="unfused"))
    graphed = make_pipeline(nets, SpeedOptions(modconv="unfused", cuda_graphs=True), graph_max_batch=4)
    graphed.warmup()
    assert set(graphed._graphs) == {"gfpgan", "parse", "detect"}
    replays = graphed._graphs["gfpgan"].replays
    detections = graphed._graphs["detect"].replays
    points = template_landmarks(6, seed=25)
    faces = make_faces(6, seed=25)
    for n in (1, 3, 6):  # exact bucket, padded to 4, larger than every bucket (replays of 4 and 2)
        a = eager.enhance([Job(faces[:n], LANDMARKS, points[:n])])[0]
        b = graphed.enhance([Job(faces[:n], LANDMARKS, points[:n])])[0]
        assert levels(a.faces, b.faces)[1] <= 1, n
        a = eager.enhance([Job(faces[:n], EnhanceOptions())])[0]
        b = graphed.enhance([Job(faces[:n], EnhanceOptions())])[0]
        assert a.status == b.status and levels(a.faces, b.faces)[1] <= 1, n
    # every pass replayed, none eager: the LANDMARKS passes alone are 1 + 1 + 2 replays
    assert graphed._graphs["gfpgan"].replays >= replays + 4
    assert graphed._graphs["gfpgan"].eager_calls == 0
    assert graphed._graphs["detect"].replays == detections + 4  # 6 images: 4 and 2
    assert graphed._graphs["detect"].eager_calls == 0


@needs_cuda
def test_wait_free_detection_replays_one_graph_and_finds_the_eager_faces(nets):
    """With wait-free detection the detect graph holds RetinaFace and the centre face's choice:
    one replay per bucket, no eager call, and the faces and statuses of the same forms run
    eagerly (within a level: GFPGAN's graphs run other batch sizes)."""
    from server.profiling import StageProfiler

    speed = SpeedOptions(modconv="unfused", paste_mask="box", fixed_selection=True, fixed_detection=True)
    eager = make_pipeline(nets, speed)
    graphed = make_pipeline(nets, dataclasses.replace(speed, cuda_graphs=True), graph_max_batch=4)
    graphed.warmup()
    assert graphed.detector.graphed_centre and graphed.detector.graphed
    detections = graphed._graphs["detect"].replays
    faces = make_faces(6, seed=25)
    for n in (1, 3, 6):
        a = eager.enhance([Job(faces[:n], EnhanceOptions())])[0]
        b = graphed.enhance([Job(faces[:n], EnhanceOptions())])[0]
        assert a.status == b.status and levels(a.faces, b.faces)[1] <= 1, n
    assert graphed._graphs["detect"].replays == detections + 4  # 1, 3 (one each), 6 (4 and 2)
    assert graphed._graphs["detect"].eager_calls == 0
    assert eager.redetected_images == graphed.redetected_images == 0
    graphed.profiler = StageProfiler(TEST_DEVICE, count=True)
    graphed.enhance([Job(faces[:3], EnhanceOptions())])
    assert sum(syncs for _, syncs in graphed.profiler.per_batch_counts().values()) == 1
    graphed.profiler = None


@pytest.mark.parametrize("wait_free", [False, True])
def test_detection_through_a_stand_in_for_its_graph_finds_the_same_faces(nets, wait_free):
    """The pipeline replays RetinaFace from a CUDA graph through FaceDetector.raw's one-tensor
    form, or with wait-free detection through raw_centre (RetinaFace's outputs and the centre
    rows in one tensor); through a stand-in for it (any device) a batch gives exactly the faces
    and pixels of the eager pass, calling it once. The wait-free stand-in also serves the
    waiting detection's raw outputs (steady video, all faces). set_speed drops the graphs. (With
    the box paste mask: ParseNet, seconds a face here, has no part in detection.)"""
    pipeline = make_pipeline(nets, SpeedOptions(paste_mask="box", fixed_selection=wait_free,
                                                fixed_detection=wait_free))
    faces = make_faces(3, seed=28)
    images = torch.from_numpy(faces).permute(0, 3, 1, 2).float().to(TEST_DEVICE)
    [plain] = pipeline.enhance([Job(faces, EnhanceOptions())])
    found, usable = pipeline.detector.candidates(images)
    calls = []

    def stand_in(x):
        calls.append(x.shape[0])
        return (pipeline.detector.raw_centre if wait_free else pipeline.detector.raw)(x)

    pipeline.detector.use_graph((256, 256), stand_in, with_centre=wait_free)
    [through] = pipeline.enhance([Job(faces, EnhanceOptions())])
    assert calls == [3]
    assert through.status == plain.status and np.array_equal(through.faces, plain.faces)
    if wait_free:
        again, again_usable = pipeline.detector.candidates(images)
        assert calls == [3, 3] and torch.equal(found.boxes, again.boxes) and torch.equal(usable, again_usable)
    pipeline.set_speed(SpeedOptions())
    assert pipeline.detector.graphed == {} and pipeline.detector.graphed_centre == {}


@needs_cuda
def test_graphed_forward_pads_to_the_bucket_and_drops_the_padding():
    calls = []
    def double(x):
        calls.append(x.shape[0])
        return x * 2
    graphed = GraphedForward(double, (3,), [2, 4], TEST_DEVICE)
    graphed.capture()
    x = torch.arange(9.0, device=TEST_DEVICE).view(3, 3)
    assert torch.equal(graphed(x), x * 2) and graphed.replays == 1
    # larger than every bucket: a replay of 4 and one of 2 (padded from 1), nothing eager
    five = torch.arange(15.0, device=TEST_DEVICE).view(5, 3)
    assert torch.equal(graphed(five), five * 2)
    assert graphed.replays == 3 and graphed.eager_calls == 0


class _ReplayedOnTheCpu:
    """A stand-in for a captured torch.cuda.CUDAGraph: replay() runs `fn` from the static input
    into the static output, as the graph's kernels would."""

    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out = fn, static_in, static_out

    def replay(self):
        self.static_out.copy_(self.fn(self.static_in))


def test_a_batch_larger_than_every_graph_bucket_runs_as_replays_in_order():
    """GraphedForward's bucketing on any device (its graphs stood in for): a batch of 11 with
    buckets up to 4 is three replays (4, 4, and 3 padded to 4), its rows in order, the padding's
    outputs dropped, and each replay's output a copy (the next replay writes the same memory)."""
    def fn(x):
        return x * 2 + 1
    graphed = GraphedForward(fn, (2,), [2, 4], torch.device("cpu"))
    for size in graphed.buckets:
        static_in = torch.full((size, 2), -7.0)  # the padding's rows: never returned
        static_out = fn(static_in)
        graphed._graphs[size] = (_ReplayedOnTheCpu(fn, static_in, static_out), static_in, static_out)
    x = torch.arange(22.0).view(11, 2)
    out = graphed(x)
    assert torch.equal(out, fn(x))
    assert graphed.replays == 3 and graphed.eager_calls == 0
    small = graphed(x[:1])  # bucket 2, one row back
    assert torch.equal(small, fn(x[:1])) and graphed.replays == 4
    graphed(x[5:7])
    assert torch.equal(small, fn(x[:1]))  # not overwritten by the next replay


def _graphs_made() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.compiles
def test_compiled_passes_give_the_eager_faces_from_one_graph_each_for_every_batch_size(nets):
    """--compile: GFPGAN's and ParseNet's passes are compiled at warm-up, each into one whole
    graph that serves every batch size; no request compiles or falls back to eager, a mixed-noise
    batch (which runs GFPGAN eagerly through the noise hook) included, and the faces are the
    eager pipeline's with the same forms within rounding (one level at most, as the CUDA-graph
    form: the compiled code sums in another order)."""
    base = dataclasses.replace(SpeedOptions(modconv="unfused", fold_norms=True, gfpgan_forward="lean"),
                               **({"cuda_graphs": True, "channels_last": True, "fixed_selection": True}
                                  if TEST_DEVICE.type == "cuda" else {}))
    eager = make_pipeline(nets, base)
    faces, points = make_faces(3, seed=41), template_landmarks(3, seed=41)
    # GFPGAN on 3, 1 and 2 (mixed) faces; ParseNet (seconds a face here) on the 3 pasted ones
    # (a fresh size: warm-up compiled on 2)
    jobs = [[Job(faces, LANDMARKS, points)], [Job(faces[:1], ALIGNED)],
            [Job(faces[:1], ALIGNED), Job(faces[1:2], EnhanceOptions(alignment=Alignment.ALIGNED,
                                                                   random_noise=True))]]
    if TEST_DEVICE.type == "cuda":  # cheap there: detected faces, one row per image
        jobs.append([Job(faces, EnhanceOptions())])
    expected = [eager.enhance(batch) for batch in jobs]
    compiled = make_pipeline(nets, dataclasses.replace(base, compile=True))
    before = _graphs_made()
    compiled.warmup()
    assert compiled.fallbacks == []
    # each compiled pass was checked against the eager passes at warm-up, and what it measured kept
    assert sorted(compiled.compile_checks) == ["gfpgan", "parse"]
    assert all("levels from float32 on average" in text for text in compiled.compile_checks.values())
    forwards = compiled._fixed
    assert all(isinstance(f, CompiledForward) and f.warmed for f in forwards.values())
    assert _graphs_made() - before == 2  # GFPGAN and ParseNet, one graph each
    calls = {name: f.calls for name, f in forwards.items()}
    got = [compiled.enhance(batch) for batch in jobs]
    assert _graphs_made() - before == 2  # batches of 3 and 1 faces and a mixed one: no new graph
    assert [f.eager_calls for f in forwards.values()] == [0, 0]
    assert all(f.calls > calls[name] for name, f in forwards.items())
    for batch, want, have in zip(jobs, expected, got):
        for job, a, b in zip(batch, want, have):
            assert a.status == b.status
            if job.options.random_noise:
                continue  # fresh noise: a different face each time
            mean, worst = levels(a.faces, b.faces)
            print(f"compiled ({COMPILE_BACKEND}), {job.options.alignment.value} x{len(job.faces)}: "
                  f"mean {mean:.4f} max {worst:.0f}")
            assert mean < 0.02 and worst <= 1, (job.options.alignment, mean, worst)
    make_pipeline(nets)  # leave the shared networks in their plain forms


@pytest.mark.compiles
def test_a_compiled_bf16_pass_resamples_in_bf16_in_one_graph(nets):
    """--compile with --dtype bfloat16 and --resample-dtype compute: the resamplings' autocast-off
    regions trace into GFPGAN's one graph (fullgraph: no break, no eager call), and the graph
    runs the eager pass's operators in their types: the same output. Traced with "aot_eager" on
    every device (what is checked is dynamo's trace, not Inductor's code, which the test above
    builds; a second Inductor build of GFPGAN would not fit the GPU check's compile step): to
    the bit on the CPU, within float rounding on CUDA (cuDNN may pick other kernels)."""
    speed = SpeedOptions(modconv="unfused", gfpgan_forward="lean", activations="compute",
                         resample_dtype="compute", paste_mask="box")
    faces = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(47)).to(TEST_DEVICE) * 255
    try:
        want = make_pipeline(nets, speed, dtype=torch.bfloat16)._fixed["gfpgan"](faces)
        compiled = make_pipeline(nets, dataclasses.replace(speed, compile=True), dtype=torch.bfloat16,
                                 backend="aot_eager")
        before = _graphs_made()
        compiled.warmup()
        forward = compiled._fixed["gfpgan"]
        assert compiled.fallbacks == [] and _graphs_made() - before == 1
        have = forward(faces)
        assert forward.eager_calls == 0
    finally:
        make_pipeline(nets)  # leave the shared networks in their plain forms
    if TEST_DEVICE.type == "cpu":
        assert torch.equal(have, want)
    else:
        assert (have - want).abs().max() <= 1.0


@pytest.mark.compiles
def test_compiled_forward_is_one_graph_for_every_batch_size_and_never_compiles_after_warm_up(caplog):
    """CompiledForward on a small function: batches of 0, 1, 2 and 5 rows, and a channels-last
    one, give fn's values from the graph made at warm-up; a call that would need a new graph
    (here a float64 batch) runs fn eagerly, is counted and logged, and compiles nothing.
    COMPILE_BACKEND: Inductor on CUDA; on the CPU its first build on a cold cache took 56 s in
    the rehearsal, most of it the compiler's own start-up."""
    def fn(x):
        return torch.nn.functional.leaky_relu(reflection_pad(x * 2 + 1, 1), 0.2).mean(dim=1)

    def channels_last(x):
        return x.contiguous(memory_format=torch.channels_last)

    forward = CompiledForward(fn, "small", backend=COMPILE_BACKEND)
    before = _graphs_made()
    forward.warm(torch.rand(3, 2, 8, 8, device=TEST_DEVICE))
    assert _graphs_made() - before == 1
    for n, layout in [(0, None), (1, None), (2, None), (5, None), (4, channels_last), (1, channels_last)]:
        x = torch.rand(n, 2, 8, 8, device=TEST_DEVICE)
        x = layout(x) if layout else x
        assert torch.allclose(forward(x), fn(x), atol=1e-6), n
    assert forward.calls == 6 and forward.eager_calls == 0 and _graphs_made() - before == 1
    with caplog.at_level(logging.WARNING, logger="server.speed"):
        x = torch.rand(2, 2, 8, 8, device=TEST_DEVICE, dtype=torch.float64)
        assert torch.equal(forward(x), fn(x))
    assert forward.eager_calls == 1 and _graphs_made() - before == 1
    assert "would need a new graph" in caplog.text


@pytest.mark.compiles
def test_parsenets_cuda_forms_compile_into_one_graph_and_give_the_eager_values():
    """The CUDA defaults' ParseNet forms under --compile: an x2 layer as phases (one convolution
    read through a strided view) and a border convolution, channels-last, compile into one
    graph for every batch size with the eager values; the phase weights are computed inside the
    graph, not kept from the trace (a value kept from tracing would be a fake tensor)."""
    torch.manual_seed(53)
    up, conv = torch.nn.Conv2d(4, 6, 3).to(TEST_DEVICE), torch.nn.Conv2d(6, 5, 3).to(TEST_DEVICE)
    up, conv = up.to(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)

    def fn(x):
        x = upsample_conv2d(x.contiguous(memory_format=torch.channels_last), up)
        return torch.nn.functional.leaky_relu(border_conv2d(x, conv, 1), 0.2)

    forward = CompiledForward(fn, "parse-forms", backend=COMPILE_BACKEND)
    before = _graphs_made()
    forward.warm(torch.rand(2, 4, 9, 7, device=TEST_DEVICE))
    assert "_phase_weights" not in up.__dict__
    with torch.no_grad():
        for n in (1, 3):
            x = torch.rand(n, 4, 9, 7, device=TEST_DEVICE)
            got, want = forward(x), fn(x)
            assert got.shape == want.shape == (n, 5, 18, 14)
            assert (got - want).abs().max().item() < 1e-4, n
    assert forward.eager_calls == 0 and _graphs_made() - before == 1


@pytest.mark.compiles
def test_a_pass_that_fails_to_compile_runs_eagerly_and_is_reported(nets, monkeypatch):
    """The service still starts and serves the same faces; `fallbacks` names what did not take
    effect (gfpgan-bench marks such a variant failed rather than timing the eager form)."""
    def fail(self, sample):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(CompiledForward, "warm", fail)
    speed = SpeedOptions(modconv="unfused", paste_mask="box")
    pipeline = make_pipeline(nets, dataclasses.replace(speed, compile=True))
    pipeline.warmup()
    assert pipeline.fallbacks == ["compile of gfpgan: RuntimeError: no compiler here"]
    assert not isinstance(pipeline._fixed["gfpgan"], CompiledForward)
    faces = make_faces(2, seed=43)
    [a] = make_pipeline(nets, speed).enhance([Job(faces, ALIGNED)])
    [b] = pipeline.enhance([Job(faces, ALIGNED)])
    assert np.array_equal(a.faces, b.faces)
    pipeline.set_speed(speed)
    assert pipeline.fallbacks == []  # a new form starts clean


class _Skewed:
    """A stand-in for a compiled pass (CompiledForward's name, fn and call): fn's output plus
    `offset`, as a compiler bug that moves every value would give."""

    def __init__(self, fn, name: str, offset: float = 0.0):
        self.fn, self.name, self.offset = fn, name, offset

    def __call__(self, x):
        return self.fn(x) + self.offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_warm_up_check_passes_the_eager_values_and_catches_a_pass_that_moves_them(nets, dtype):
    """FacePipeline._check_compiled: a compiled pass is measured against eager float32 on the
    same crops, and allowed twice the eager pass's own distance in the service's dtype plus
    COMPILE_CHECK_SLACK (half a level on average, 4 at the 99.9th percentile). The eager values
    pass in float32 and in bf16 (whose own distance from float32 is levels, not zero); GFPGAN's
    faces one level off everywhere pass in bf16 and fail in float32; faces 6 levels off, or
    masks 5% off, fail in both."""
    speed = SpeedOptions(modconv="unfused", gfpgan_forward="lean")
    pipeline = make_pipeline(nets, speed, dtype=dtype)
    gfpgan, parse = pipeline._gfpgan_fixed_noise, pipeline._parse_masks
    assert pipeline._check_compiled(_Skewed(gfpgan, "gfpgan")) is None
    one_level = pipeline._check_compiled(_Skewed(gfpgan, "gfpgan", 1.0))
    assert (one_level is None) == (dtype == torch.bfloat16), one_level
    problem = pipeline._check_compiled(_Skewed(gfpgan, "gfpgan", 6.0))
    # (in bf16 the eager pass's own error partly cancels the offset, and 255 clamps it)
    mean = float(problem.split(" levels")[0]) if problem else 0.0
    assert problem and "levels from float32 on average" in problem and mean > 5, problem
    if dtype == torch.float32:  # ParseNet (seconds a pass here): its masks are 0..1, in levels x255
        problem = pipeline._check_compiled(_Skewed(parse, "parse", 0.05))
        assert problem and "12.75 levels from float32 on average" in problem, problem
    assert not pipeline._float32_reference  # the pipeline is left in its own dtype


def test_the_check_s_reference_is_the_float32_pass_and_its_crops_vary_at_every_scale(nets):
    """The reference a bf16 pipeline checks against is the float32 pipeline's pass on the same
    weights, exactly; the crops are the same on every call, in 0..255, and vary from the whole
    crop down to single pixels (a flat crop would leave most arithmetic multiplying constants)."""
    from server.pipeline import check_crops

    crops = check_crops(2, TEST_DEVICE)
    assert torch.equal(crops, check_crops(2, TEST_DEVICE)) and crops.shape == (2, 3, 512, 512)
    assert crops.min() >= 0 and crops.max() <= 255 and torch.equal(crops, crops.round())
    assert not torch.equal(crops[0], crops[1])
    for size in (512, 64, 8, 2):  # block means still vary at every scale
        blocks = torch.nn.functional.avg_pool2d(crops.float(), 512 // size)
        assert blocks.std().item() > 4, size
    speed = SpeedOptions(modconv="unfused", gfpgan_forward="lean", paste_mask="box")
    bf16 = make_pipeline(nets, speed, dtype=torch.bfloat16)
    want = make_pipeline(nets, speed)._gfpgan_fixed_noise(crops[:1])
    bf16._float32_reference = True
    assert torch.equal(bf16._gfpgan_fixed_noise(crops[:1]), want)
    bf16._float32_reference = False
    assert not torch.equal(bf16._gfpgan_fixed_noise(crops[:1]), want)


@pytest.mark.compiles
def test_a_compiled_pass_that_gives_other_faces_runs_eagerly_and_is_reported(nets, monkeypatch):
    """At warm-up each compiled pass is checked against the eager one; one that moves the faces
    (here by 6 levels, as a miscompiled kernel might) is logged, named in `fallbacks` and
    replaced by its eager pass, and the service serves the eager faces."""
    real = CompiledForward.__call__

    def skewed(self, x):
        return real(self, x) + 6.0

    speed = SpeedOptions(modconv="unfused", gfpgan_forward="lean", paste_mask="box")
    # traced, not built by Inductor, on every device: what is checked is the check, and another
    # Inductor build of GFPGAN would crowd the GPU check's compile tests
    pipeline = make_pipeline(nets, dataclasses.replace(speed, compile=True), backend="aot_eager")
    monkeypatch.setattr(CompiledForward, "__call__", skewed)
    pipeline.warmup()
    [note] = pipeline.fallbacks
    assert note.startswith("compile of gfpgan: 6.00 levels from float32 on average"), note
    assert note == f"compile of gfpgan: {pipeline.compile_checks['gfpgan']}"
    assert not isinstance(pipeline._fixed["gfpgan"], CompiledForward)
    faces = make_faces(2, seed=44)
    [a] = make_pipeline(nets, speed).enhance([Job(faces, ALIGNED)])
    [b] = pipeline.enhance([Job(faces, ALIGNED)])
    assert np.array_equal(a.faces, b.faces)
    # a check that cannot run (here it raises) keeps nothing unchecked: the pass runs eagerly
    monkeypatch.undo()

    def broken(self, forward):
        raise RuntimeError("out of memory in the check")

    monkeypatch.setattr(FacePipeline, "_check_compiled", broken)
    pipeline.set_speed(dataclasses.replace(speed, compile=True))
    pipeline.warmup()
    assert pipeline.fallbacks == ["compile of gfpgan: its check against the eager pass failed: "
                                  "RuntimeError: out of memory in the check"]
    assert not isinstance(pipeline._fixed["gfpgan"], CompiledForward)


def test_codeformer_s_pass_is_left_uncompiled_and_parsenet_s_compiled():
    """CodeFormer restores through its fidelity-weighted passes, never the fixed-noise pass:
    --compile compiles ParseNet's pass for it and does not spend a build on that one."""
    from server.model import CodeFormerNet

    class Stand(torch.nn.Module):
        def forward(self, x):
            return (x,)

    parser = torch.nn.Sequential(torch.nn.Conv2d(3, 19, 1))
    pipeline = FacePipeline(CodeFormerNet(Stand()), torch.nn.Identity(), parser, device=TEST_DEVICE,
                            dtype=torch.float32, speed=SpeedOptions(modconv="unfused", compile=True),
                            compile_backend="aot_eager")
    assert not isinstance(pipeline._fixed["gfpgan"], CompiledForward)
    assert isinstance(pipeline._fixed["parse"], CompiledForward)


@pytest.mark.compiles
def test_the_compiled_detector_finds_the_eager_faces_and_detects_other_sizes_eagerly(nets):
    """--compile-detector: RetinaFace's pass for 256x256 images is compiled at warm-up, checked
    against the eager pass (compile_checks), and serves both ways of detecting (the waiting
    one, and the wait-free one where the device is CUDA), every batch size from one graph; the
    faces are the eager pipeline's within one level. Images of another size detect eagerly
    (the compiled pass is made for one size), and measuring a batch's memory runs nothing
    compiled. Through Inductor on CUDA (the GPU check); traced by aot_eager on the CPU, where
    Inductor's build of it gave anchors within 0.001 px (BENCHMARKS.md)."""
    base = SpeedOptions(modconv="unfused", paste_mask="box")
    # one Inductor build a device (the GPU check's compile tests share one step's time): on CUDA
    # the service's way, wait-free in the detect graph
    forms = [base] if TEST_DEVICE.type == "cpu" else \
        [dataclasses.replace(base, cuda_graphs=True, fixed_selection=True, fixed_detection=True)]
    faces, wide = make_faces(3, seed=45), make_faces(2, seed=46, size=320)
    jobs = [[Job(faces, EnhanceOptions())], [Job(faces[:1], EnhanceOptions())], [Job(wide, EnhanceOptions())]]
    for speed in forms:
        expected = [make_pipeline(nets, speed).enhance(batch) for batch in jobs]
        pipeline = make_pipeline(nets, dataclasses.replace(speed, compile_detector=True))
        forward = pipeline._fixed["detect"]
        assert isinstance(forward, CompiledForward) and pipeline.detector.compiled == {(256, 256): forward}
        pipeline.batch_memory()
        assert forward.calls == 0 and not forward.warmed
        before = _graphs_made()
        pipeline.warmup()
        assert pipeline.fallbacks == [] and forward.warmed
        assert "px from the eager pass's on average" in pipeline.compile_checks["detect"]
        print(f"compiled detector ({COMPILE_BACKEND}): {pipeline.compile_checks['detect']}")
        assert _graphs_made() - before == 1  # RetinaFace's, for every batch size
        calls = forward.calls
        # with CUDA graphs the 256x256 batches replay the detect graph, which captured the
        # compiled pass at warm-up (a call a bucket, after the check's)
        replayed = speed.cuda_graphs
        if replayed:
            assert "detect" in pipeline.graphed and calls > 1
        got = [pipeline.enhance(batch) for batch in jobs[:2]]
        assert forward.calls == calls + (0 if replayed else 2) and forward.eager_calls == 0
        got.append(pipeline.enhance(jobs[2]))
        assert forward.calls == calls + (0 if replayed else 2)  # 320x320: eagerly
        assert _graphs_made() - before == 1
        assert got[0][0].status == [FaceStatus.ENHANCED] * 3  # faces were found
        for want, have in zip(expected, got):
            for a, b in zip(want, have):
                assert a.status == b.status
                mean, worst = levels(a.faces, b.faces)
                assert mean < 0.02 and worst <= 1, (speed, mean, worst)


class _Shifted:
    """A stand-in for the compiled detector: the eager pass with `offset` added to some of its
    columns (0-3 box offsets, 5 the face score, 6-15 landmark offsets), as a miscompiled
    kernel might move them."""

    def __init__(self, fn, columns: slice, offset: float):
        self.fn, self.name, self.columns, self.offset = fn, "detect", columns, offset

    def __call__(self, x):
        out = self.fn(x).clone()
        out[..., self.columns] += self.offset
        return out


def test_the_detector_check_passes_the_eager_anchors_and_catches_moved_ones(nets):
    """FacePipeline._check_compiled_detector: every anchor's box and landmarks, decoded to
    pixels, and its face score, against the eager pass's, within DETECTOR_CHECK (0.05 px on
    average, 0.5 at the 99.9th percentile, scores 0.01). The eager pass passes; landmark
    offsets moved by a tenth of a prior (a fifth of a pixel for the 16-px anchors, 10 px for
    the 512-px ones), or scores by 0.05, fail."""
    from server.pipeline import DETECTOR_CHECK

    assert DETECTOR_CHECK == (0.05, 0.5, 0.01)
    pipeline = make_pipeline(nets)
    eager = pipeline.detector.net_pass
    assert pipeline._check_compiled_detector(_Shifted(eager, slice(0, 16), 0.0)) is None
    assert "anchors 0.0000 px" in pipeline.compile_checks["detect"]
    moved = pipeline._check_compiled_detector(_Shifted(eager, slice(6, 16), 0.1))
    assert moved and float(moved.split(" px")[0].split()[-1]) > 0.05, moved
    scored = pipeline._check_compiled_detector(_Shifted(eager, slice(5, 6), 0.05))
    assert scored and "scores 0.05000 at most" in scored, scored


@pytest.mark.compiles
def test_a_compiled_detector_that_moves_anchors_runs_eagerly_and_is_reported(nets, monkeypatch):
    """A compiled detector whose anchors fail the check at warm-up is logged, named in
    `fallbacks` and replaced by the eager pass (FaceDetector.compiled empty), and the service
    detects the eager faces; GFPGAN's compiled pass, which passed, stays compiled."""
    real = CompiledForward.__call__

    def shifted(self, x):
        out = real(self, x)
        return out + 0.5 if self.name == "detect" else out

    speed = SpeedOptions(modconv="unfused", paste_mask="box", compile=True, compile_detector=True)
    pipeline = make_pipeline(nets, speed, backend="aot_eager")
    monkeypatch.setattr(CompiledForward, "__call__", shifted)
    pipeline.warmup()
    [note] = pipeline.fallbacks
    assert note.startswith("compile of detect: anchors ") and note.endswith("(allowed: 0.05, 0.5 and 0.01)"), note
    assert pipeline._fixed["detect"] == pipeline.detector.net_pass and pipeline.detector.compiled == {}
    assert isinstance(pipeline._fixed["gfpgan"], CompiledForward)
    monkeypatch.undo()
    faces = make_faces(2, seed=47)
    eager = make_pipeline(nets, SpeedOptions(modconv="unfused", paste_mask="box"))
    [a], [b] = eager.enhance([Job(faces, EnhanceOptions())]), pipeline.enhance([Job(faces, EnhanceOptions())])
    assert a.status == b.status and levels(a.faces, b.faces)[1] <= 1


def test_compile_detector_is_a_setting_off_by_default():
    """--compile-detector: auto is off on every device until a GPU run times it; on asks for it
    (with or without --compile), and it reaches the pipeline and gfpgan-bench's flags."""
    assert not Settings().speed_options("cuda").compile_detector
    assert not Settings().speed_options("cpu").compile_detector
    on = Settings(compile_detector="on", compile="off").speed_options("cpu")
    assert on.compile_detector and not on.compile
    flags = on.serve_flags()
    assert flags[flags.index("--compile-detector") + 1] == "on"


def test_compile_needs_the_unfused_modulated_convolution():
    with pytest.raises(ValueError, match="compile needs modconv='unfused'"):
        SpeedOptions(compile=True)
    flags = SpeedOptions(modconv="unfused", compile=True).serve_flags()
    assert flags[flags.index("--compile") + 1] == "on"


def test_profile_counts_launches_and_syncs_per_stage(nets):
    pipeline = make_pipeline(nets)
    pipeline.warmup()  # the resize and blur matrices are made (and uploaded) once, here
    counts, stages = {}, {}
    for n in (1, 4):
        for name, options in (("aligned", ALIGNED), ("detect", EnhanceOptions())):
            pipeline.profiler = StageProfiler(TEST_DEVICE, count=True)
            pipeline.enhance([Job(make_faces(n, seed=26), options)])
            counts[name, n] = pipeline.profiler.totals()
            stages[name, n] = pipeline.profiler.per_batch_counts()
            assert {"upload", "gfpgan", "download"} <= set(stages[name, n])
    pipeline.profiler = None
    print(counts)
    # launches do not grow with the number of faces (on the CPU not by one: a channels-last
    # batch is resized in its layout, without the copy to NCHW that a batch of one skipped)
    assert abs(counts["aligned", 1][0] - counts["aligned", 4][0]) <= 0.01 * counts["aligned", 1][0]
    if TEST_DEVICE.type == "cpu":
        assert counts["aligned", 1][0] == counts["aligned", 4][0], counts
    assert abs(counts["detect", 1][0] - counts["detect", 4][0]) <= 0.05 * counts["detect", 1][0]
    # an ALIGNED batch waits for the device once, for its results; DETECT also waits on the
    # detections (the threshold's nonzero, the NMS, the face selection)
    assert counts["aligned", 4][1] == 1
    assert counts["detect", 1][1] == counts["detect", 4][1] == 4
    # folded norms: 73 batch norms fewer in RetinaFace, 36 batch norms and 40 multiplications by
    # one in ParseNet; the lean GFPGAN forward: per StyleConv 9 operators instead of 13 (15 of
    # them), no copies of the 14 SFT conditions, 2 operators instead of 3 for each of 7 SFTs
    # and with one face per image (only the centre face, the default) taken as fixed-size rows,
    # the selection does not wait; a batch that wants every face still selects
    pipeline.set_speed(SpeedOptions(fixed_selection=True))
    pipeline.profiler = StageProfiler(TEST_DEVICE, count=True)
    pipeline.enhance([Job(make_faces(1, seed=26), EnhanceOptions())])
    assert pipeline.profiler.totals()[1] == 3
    # (with the box paste mask: the test detector finds 8 faces in this image, and the waits are
    # the selection's, not the mask's; ParseNet costs seconds a face here)
    pipeline.set_speed(SpeedOptions(fixed_selection=True, paste_mask="box"))
    pipeline.profiler = StageProfiler(TEST_DEVICE, count=True)
    pipeline.enhance([Job(make_faces(1, seed=26), EnhanceOptions(only_center_face=False))])
    assert pipeline.profiler.totals()[1] == 4
    pipeline.set_speed(SpeedOptions(fold_norms=True, gfpgan_forward="lean"))
    pipeline.profiler = StageProfiler(TEST_DEVICE, count=True)
    pipeline.enhance([Job(make_faces(1, seed=26), EnhanceOptions())])
    folded = pipeline.profiler.per_batch_counts()
    pipeline.profiler = None
    pipeline.set_speed(SpeedOptions())
    assert folded["detect"][0] == stages["detect", 1]["detect"][0] - 73
    assert folded["gfpgan"][0] == stages["detect", 1]["gfpgan"][0] - 4 * 15 - 14 - 7
    # ParseNet: 36 batch norms and 40 multiplications by one, 2 of those in the image head, which
    # the mask pass does not run (parse_logits)
    assert folded["parse"][0] == stages["detect", 1]["parse"][0] - 36 - 38


def test_the_profile_counts_the_bytes_each_operator_reads_and_writes():
    """op_bytes: every distinct tensor argument read once, every output written once; a
    broadcast dimension counts once, a view moves nothing, a copy's target is written only."""
    from server.profiling import OpCounter, count_pass, tensor_bytes

    x, bias = torch.rand(2, 3, 8, 8), torch.rand(1, 3, 1, 1)  # 1,536 and 12 bytes
    counter = OpCounter()
    with counter:
        y = x + bias
        xx = x * x  # one tensor read twice by one kernel: counted once
    assert counter.counts["other"].bytes == (1536 + 12 + 1536) + (1536 + 1536)
    assert tensor_bytes(bias.expand(2, 3, 8, 8)) == 12 and tensor_bytes(xx[:, :1]) == 512
    counter = OpCounter()
    with counter:
        y.relu_()  # read and written in place
        flat = y.view(2, 192)  # a view: no kernel
        target = torch.empty(2, 192)
        target.copy_(flat)  # reads flat, writes target
    assert counter.counts["other"].bytes == 2 * 1536 + 2 * 1536
    assert counter.counts["other"].ops == 2
    counter = OpCounter()
    with counter:  # an .out form writes its out tensor, in its own dtype, and reads the rest
        torch.mul(x, bias, out=torch.empty(2, 3, 8, 8, dtype=torch.bfloat16))
    assert counter.counts["other"].bytes == (1536 + 12) + 768
    # a pass: FLOPs are two per multiply-add of the convolution; bytes its input, weight, bias, output
    conv = torch.nn.Conv2d(3, 4, 3)
    counts = count_pass(conv, torch.rand(1, 3, 8, 8))
    assert counts.flops == 2 * (4 * 3 * 9) * (6 * 6)
    assert counts.bytes == 4 * (3 * 64 + 4 * 3 * 9 + 4 + 4 * 36) and counts.ops == 1
    assert counts.entries == [("aten::convolution", counts.flops, counts.bytes)]


def test_bytes_counted_on_the_cpu_are_cast_as_cuda_autocast_casts():
    """CPU autocast pads in float32 and upsamples in the input's type; CUDA autocast the other
    way round (its fp32 list has the upsamplings, no padding). cuda_autocast_policy counts the
    bytes a GPU moves, and leaves CPU autocast as it was."""
    import torch.nn.functional as F

    from server.profiling import cuda_autocast_policy

    x = torch.rand(1, 2, 8, 8, dtype=torch.bfloat16)

    def dtypes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (F.pad(x, (1, 1, 1, 1), mode="reflect").dtype,
                    F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False).dtype,
                    F.interpolate(x, scale_factor=2).dtype, F.conv2d(x.float(), torch.rand(3, 2, 3, 3)).dtype)

    cpu = (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    assert dtypes() == cpu
    with cuda_autocast_policy():
        assert dtypes() == (torch.bfloat16, torch.float32, torch.float32, torch.bfloat16)
    assert dtypes() == cpu


#: Forms whose resamplings meet bf16 maps: (network, speed forms). GFPGAN's own (fused, float32
#: activations: only the U-Net's resamplings see bf16), the defaults' (unfused, lean), with bf16
#: activations (the decoder's too), and ParseNet's nearest x2 layers.
KEEP_DTYPE_FORMS = [
    ("gfpgan", SpeedOptions()),
    ("gfpgan", SpeedOptions(modconv="unfused", channels_last=True, gfpgan_forward="lean")),
    ("gfpgan", SpeedOptions(modconv="unfused", gfpgan_forward="lean", activations="compute")),
    ("parse", SpeedOptions(fold_norms=True)),
]


def _passes_of(nets, network: str, forms: dict, faces: torch.Tensor, policy, dtype=torch.bfloat16) -> dict:
    """{name: (output of `network`'s pass over faces, bytes and FLOPs of a one-face pass)} for
    each of `forms` ({name: SpeedOptions}), cast under `policy` (a context manager)."""
    from server.profiling import count_pass

    runs = {}
    try:
        with policy():
            for name, form in forms.items():
                run = make_pipeline(nets, form, dtype=dtype)._fixed[network]
                runs[name] = run(faces), count_pass(run, faces[:1])
    finally:
        make_pipeline(nets)  # leave the shared networks in their plain form
    return runs


def _cuda_casts():
    """CUDA autocast's casts: its own on CUDA, server.profiling.cuda_autocast_policy on the CPU."""
    from server.profiling import cuda_autocast_policy

    return cuda_autocast_policy() if TEST_DEVICE.type == "cpu" else contextlib.nullcontext()


@pytest.mark.parametrize("network, form", KEEP_DTYPE_FORMS,
                         ids=["gfpgan-own", "gfpgan-defaults", "gfpgan-bf16-activations", "parse"])
def test_resampling_in_the_compute_dtype_gives_the_same_pixels_with_fewer_bytes(nets, network, form):
    """--resample-dtype compute resamples a bf16 map in bf16. Cast as CUDA autocast casts
    (resampling in float32, server.profiling.cuda_autocast_policy on the CPU; on CUDA its own),
    that drops a float32 copy and two casts per resampling. The output is the same to the bit:
    both kernels accumulate in float32 and round once, and every such map feeds a convolution,
    which rounds it to bf16 anyway."""
    faces = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(29)).to(TEST_DEVICE) * 255
    forms = {name: dataclasses.replace(form, resample_dtype=name) for name in RESAMPLE_DTYPES}
    runs = _passes_of(nets, network, forms, faces, _cuda_casts)
    (kept, kept_counts), (cast, cast_counts) = runs["compute"], runs["autocast"]
    assert torch.equal(kept, cast)
    assert kept_counts.bytes < 0.95 * cast_counts.bytes
    assert kept_counts.flops == cast_counts.flops
    if TEST_DEVICE.type == "cpu":
        # The CPU's own autocast resamples in bf16 already (float32 maps cast down, as they
        # still are): there the two forms are one.
        own = _passes_of(nets, network, forms, faces, contextlib.nullcontext)
        assert torch.equal(own["compute"][0], own["autocast"][0])
        assert own["compute"][1].bytes == own["autocast"][1].bytes


#: GFPGAN forms whose unfused modulated convolutions scale a map by its style: (form, dtype,
#: how many float32 maps go into a convolution that way, which --modulate-dtype compute writes
#: in bf16 instead of casting: with float32 activations 16 of the decoder's 23 (the 7 upsampling
#: ones resample first); with bf16 activations only the first's, GFPGAN's float32 constant input)
MODULATE_FORMS = [
    (SpeedOptions(modconv="unfused"), torch.bfloat16, 16),  # GFPGAN's own StyleConv, unfused
    (SpeedOptions(modconv="unfused", channels_last=True, gfpgan_forward="lean", resample_dtype="compute"),
     torch.bfloat16, 16),  # the CUDA defaults
    (SpeedOptions(modconv="unfused", gfpgan_forward="lean", activations="compute"), torch.bfloat16, 1),
    (SpeedOptions(modconv="fused"), torch.bfloat16, 0),  # the weight is modulated, not the map
    (SpeedOptions(modconv="unfused", gfpgan_forward="lean"), torch.float32, 0),  # no autocast
]


@pytest.mark.parametrize("form, dtype, casts", MODULATE_FORMS,
                         ids=["gfpgan-own-unfused", "defaults", "bf16-activations", "fused", "float32"])
def test_modulating_into_the_compute_dtype_gives_the_same_pixels_with_fewer_bytes(nets, form, dtype, casts):
    """--modulate-dtype compute: the style's multiply writes a float32 map straight into the
    dtype autocast runs the convolution after it in, where it wrote float32 for autocast to cast.
    The float32 product is rounded once either way: the same output to the bit, a cast fewer per
    such convolution, under CUDA's casts and the CPU's own (both cast a convolution's input).
    Forms without float32 maps or without the multiply are unchanged, operator for operator."""
    faces = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(31)).to(TEST_DEVICE) * 255
    forms = {name: dataclasses.replace(form, modulate_dtype=name) for name in MODULATE_DTYPES}
    policies = [_cuda_casts] + ([contextlib.nullcontext] if TEST_DEVICE.type == "cpu" else [])
    for policy in policies:
        runs = _passes_of(nets, "gfpgan", forms, faces, policy, dtype=dtype)
        (into, into_counts), (cast, cast_counts) = runs["compute"], runs["autocast"]
        assert torch.equal(into, cast)
        assert into_counts.flops == cast_counts.flops
        assert into_counts.ops == cast_counts.ops - casts
        if casts >= 16:
            assert into_counts.bytes < 0.95 * cast_counts.bytes
        elif casts:
            assert into_counts.bytes < cast_counts.bytes
        else:
            assert into_counts.bytes == cast_counts.bytes


#: Forms that remove work, against the form they replace: (network, dtype, base, form, the
#: form's FLOPs as a share of the base's: the same, or fewer, or the few more of ParseNet's
#: border rows and columns computed again).
LIGHTER_FORMS = [
    ("gfpgan", torch.bfloat16, SpeedOptions(modconv="unfused"), SpeedOptions(modconv="unfused", activations="compute"),
     (1.0, 1.0)),
    ("gfpgan", torch.float32, SpeedOptions(modconv="unfused"), SpeedOptions(modconv="unfused", gfpgan_forward="lean"),
     (1.0, 1.0)),
    ("parse", torch.float32, SpeedOptions(), SpeedOptions(fold_norms=True), (1.0, 1.0)),
    ("parse", torch.float32, SpeedOptions(), SpeedOptions(parse_padding="border"), (1.0, 1.05)),
    ("parse", torch.float32, SpeedOptions(), SpeedOptions(parse_upsample="phases"), (0.5, 0.8)),
]


@pytest.mark.parametrize("network, dtype, base, form, flops", LIGHTER_FORMS,
                         ids=["bf16-activations", "lean", "fold-norms", "parse-border", "parse-phases"])
def test_a_form_that_removes_work_moves_fewer_bytes(nets, network, dtype, base, form, flops):
    """What a pass reads and writes sets its floor on a GPU, where these networks are bound by
    memory more than by their FLOPs (BENCHMARKS.md, "The floor"); counted here on the CPU, a
    pass of one face."""
    from server.profiling import count_pass

    face = torch.rand(1, 3, 512, 512, device=TEST_DEVICE) * 255
    counts = {}
    for name, speed in (("base", base), ("form", form)):
        pipeline = make_pipeline(nets, speed, dtype=dtype)
        counts[name] = count_pass(pipeline._fixed[network], face)
    make_pipeline(nets)  # leave the shared networks in their plain form
    print(network, form.describe(), counts)
    assert counts["form"].bytes < 0.95 * counts["base"].bytes
    share = counts["form"].flops / counts["base"].flops
    assert flops[0] <= share <= flops[1]


def test_the_stage_profile_gives_the_bytes_each_stage_moves(nets):
    """gfpgan-bench --profile: a megabytes column per stage, its total their sum, the networks'
    bytes growing with the batch (their weights are read once a pass)."""
    from server.bench import profile_stages

    pipeline = make_pipeline(nets)
    tables = {}
    for n in (1, 2):
        text = profile_stages(pipeline, make_faces(2, seed=28), [n], ALIGNED, 1, lambda: None)
        rows = {cells[0]: cells[1:] for cells in
                ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
                 if line.startswith("| ") and not line.startswith("| stage"))}
        tables[n] = {stage: float(cells[3]) for stage, cells in rows.items()}
    assert "| stage | ms per batch (median) | operators | syncs | MB moved |" in text
    for table in tables.values():
        assert table["**total**"] == pytest.approx(sum(v for k, v in table.items() if k != "**total**"), abs=0.2)
    assert 0 < tables[1]["gfpgan"] < tables[2]["gfpgan"] < 2 * tables[1]["gfpgan"]


def test_a_detect_batch_meets_the_launch_and_sync_targets_with_the_service_defaults(nets):
    """Issue 8's targets, counted on the CPU with the forms the service picks on CUDA (graphs
    aside, which exist on CUDA only): a DETECT batch (ParseNet paste mask) runs at most 1,000
    operators, flat in the batch size, and waits for the device once, for its download (wait-
    free detection; detecting the waiting way, 3 times). ParseNet's border strips and x2 phases
    (the CUDA defaults since the third H200 run) run more kernels than its own forms, inside its
    graph on CUDA; they still fit, and so do its own forms."""
    from server.settings import Settings

    # Eager: the operators counted are what the eager forms dispatch, about one kernel launch
    # each; compiled (the CUDA default where Triton builds) GFPGAN and ParseNet launch fewer,
    # fused kernels, inside the same graph replays.
    cuda = Settings(compile="off").speed_options("cuda")
    if TEST_DEVICE.type != "cuda":
        cuda = dataclasses.replace(cuda, cuda_graphs=False)
    own_parse = dataclasses.replace(cuda, parse_channels_last=False, parse_padding="reflect",
                                    parse_upsample="nearest")
    waiting = dataclasses.replace(cuda, fixed_detection=False)
    counted = {}
    for name, speed in (("defaults", cuda), ("ParseNet's own forms", own_parse), ("waiting detection", waiting)):
        pipeline = make_pipeline(nets, speed)
        pipeline.warmup()
        for n in (1, 3):
            pipeline.profiler = StageProfiler(TEST_DEVICE, count=True)
            pipeline.enhance([Job(make_faces(n, seed=27), EnhanceOptions())])
            counted[name, n] = pipeline.profiler.per_batch_counts()
        pipeline.profiler = None
    make_pipeline(nets)  # leave the shared networks in their plain form
    totals = {key: (sum(o for o, _ in stages.values()), sum(s for _, s in stages.values()))
              for key, stages in counted.items()}
    print(totals)
    assert len({totals["defaults", n][0] for n in (1, 3)}) == 1, totals  # flat in the batch size
    assert len({totals["ParseNet's own forms", n][0] for n in (1, 3)}) == 1, totals
    assert {key: syncs for key, (_, syncs) in totals.items()} == {
        (name, n): 3 if name == "waiting detection" else 1 for name, n in totals}, totals
    if TEST_DEVICE.type == "cpu":  # on CUDA, cuDNN's layout conversions count as operators too
        assert all(ops <= 1000 for ops, _ in totals.values()), totals
        for n in (1, 3):  # the forms differ in ParseNet's stage alone
            defaults, own = counted["defaults", n], counted["ParseNet's own forms", n]
            assert {k: v for k, v in defaults.items() if k != "parse"} == \
                {k: v for k, v in own.items() if k != "parse"}, (defaults, own)


@pytest.mark.parametrize("fast, keep_dtype", [(True, False), (False, False), (False, True), (True, True)])
def test_the_resampling_forms_reach_the_compiled_graph(monkeypatch, fast, keep_dtype):
    """resampling_forms is read inside a compiled pass (plain flags there: the GPU image's
    torch.compile can neither set nor read a context variable); CompiledForward sets it around
    the call, and the graph runs the forms it names, as the eager pass does: the fast
    upsampling, and a bf16 map resampled with autocast off. Stand-ins show which ran: a marked
    fast upsampling, and F.interpolate as a 1x1 convolution, which autocast (float16 here, on
    any device) casts to float16 unless it is off."""
    marked = lambda x: torch.full((x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3]), 7.0,  # noqa: E731
                                  device=x.device, dtype=x.dtype)
    monkeypatch.setattr(speed_module, "upsample2x_bilinear", marked)
    monkeypatch.setattr(torch.nn.functional, "interpolate", lambda x, *args, **kwargs: torch.nn.functional.conv2d(
        x, torch.ones(x.shape[1], x.shape[1], 1, 1, dtype=x.dtype, device=x.device)))

    def upsample(x):
        with torch.autocast(x.device.type, dtype=torch.float16):
            return speed_module._interpolate(x.bfloat16(), scale_factor=2, mode="bilinear", align_corners=False)

    forward = CompiledForward(upsample, "upsample", functools.partial(resampling_forms, fast, keep_dtype),
                              backend="aot_eager")
    x = torch.rand(3, 2, 4, 4, device=TEST_DEVICE)
    forward.warm(x)
    out = forward(x)
    with resampling_forms(fast, keep_dtype):
        want = upsample(x)
    assert want.dtype == (torch.bfloat16 if fast or keep_dtype else torch.float16)  # the forms act
    assert want.shape[2] == (8 if fast else 4)
    assert out.dtype == want.dtype and torch.equal(out, want) and forward.eager_calls == 0
    assert not speed_module._fast_traced and not speed_module._keep_dtype_traced  # put back after the call


def test_live_tensors_count_each_storage_once_while_any_tensor_on_it_lives():
    """server.profiling.LiveTensors, the memory count off CUDA: the peak of what the operators
    inside make that is alive at once; a view adds nothing, an in-place op adds nothing, a
    freed tensor gives its bytes back, and what existed before is not counted."""
    from server.profiling import LiveTensors

    x = torch.rand(1000)  # 4,000 bytes, made before
    with LiveTensors() as live:
        a = x * 2  # 4,000
        view = a.view(10, 100)  # the same storage
        b = a + 1  # 8,000
        b.mul_(3)  # in place
        del a, view  # a's storage gone: 4,000
        c = b * 3  # 8,000
        del b, c  # 0
        d = torch.cat([x, x])  # 8,000 again
    assert live.peak == 8000
    assert live.live == 8000
    del d
    assert live.live == 0
