"""Speed forms of the pipeline's networks: each one a switch, each one equal to the plain form.

- `set_modconv_form`: StyleGAN2's modulated convolution without per-sample weights, its
  style-scaled float32 maps written in the compute dtype by the multiply itself (`_modulated`).
- `NoisePlan`: one GFPGAN pass for a batch that mixes fixed and fresh noise.
- `GraphedForward`: a fixed-shape forward captured as CUDA graphs, one per batch-size bucket.
- `CompiledForward`: a fixed-shape forward compiled by torch.compile, for every batch size.
- `box_paste_mask`: facexlib's non-parsing paste mask (its `use_parse=False`), made once.
- `NormFolding`: RetinaFace's and ParseNet's batch norms folded into their convolutions, and
  ParseNet's `x * 1.0` layers dropped.
- `set_parse_forms`: ParseNet's convolutions without their padding passes (`border_conv2d`),
  and its x2 layers as four 2x2 convolutions of their input, run as one (`upsample_conv2d`).
- `resampling_forms`: the networks' x2 / x0.5 resampling and reflection padding as plain
  elementwise ops (fast). On an H200, PyTorch's NCHW bilinear upsampling and reflection padding
  took 37% of GFPGAN's and 37% of ParseNet's time at batch 16 (BENCHMARKS.md, kernels), far
  more than the convolutions. And resampling a bf16 map in bf16 (keep_dtype), where CUDA
  autocast would cast it up to float32 for the resampling and back down for the convolution
  after it: the same pixels, a fifth of the bytes.

The pipeline (server/pipeline.py) picks them through `SpeedOptions`; the settings of the same
names choose them for the service, and `gfpgan-bench --variants` measures each on and off.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import logging
import os
import shutil
import sysconfig
import weakref
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MODCONV_FORMS = ("fused", "unfused")
PASTE_MASKS = ("parse", "box")
RESAMPLE_FORMS = ("torch", "fast")
ACTIVATION_FORMS = ("promote", "compute")
RESAMPLE_DTYPES = ("autocast", "compute")
MODULATE_DTYPES = ("autocast", "compute")
GFPGAN_FORWARDS = ("gfpgan", "lean")
PARSE_PADDINGS = ("reflect", "border")
GFPGAN_UPSAMPLES = ("resample", "phases")
PARSE_UPSAMPLES = ("nearest", "phases")


@dataclass(frozen=True)
class SpeedOptions:
    """How the pipeline runs its networks. Every form gives the same faces within the tolerances
    stated in tests/test_speed.py; only speed and memory differ."""

    #: "fused": GFPGAN's own grouped convolution with a weight per face; "unfused": scale the
    #: input by the style, one convolution with the shared weight, demodulate the output.
    modconv: str = "fused"
    #: Capture GFPGAN and ParseNet as CUDA graphs per batch-size bucket at warm-up (CUDA only).
    cuda_graphs: bool = False
    #: Run the convolutions channels-last (NHWC), the layout tensor cores read directly.
    channels_last: bool = False
    #: "parse": ParseNet's face mask (GFPGANer's paste); "box": a feathered box, no ParseNet.
    paste_mask: str = "parse"
    #: "torch": F.interpolate and ReflectionPad2d as the networks call them; "fast": the same
    #: results from slices and elementwise ops (see resampling_forms).
    resample: str = "torch"
    #: "autocast": every resampling casts as autocast's lists say. CUDA's has the bilinear and
    #: nearest upsamplings on its float32 list, so a bf16 map is cast up to float32, resampled
    #: into a float32 copy (4 times the map's size for x2) and cast back down by the convolution
    #: that reads it. "compute": a map already in the compute dtype (bf16) is resampled in it.
    #: Both kernels accumulate in float32 and round once, and every such map feeds a
    #: convolution, which would round it to bf16 anyway: the same pixels to the bit, about a
    #: fifth of those bytes. float32 maps resample as before; so does everything on the CPU,
    #: whose autocast resamples in bf16 already.
    resample_dtype: str = "autocast"
    #: With the unfused modulated convolution, the style scales a map's input channels before
    #: the convolution. "autocast": the product of a float32 map (GFPGAN's decoder activations
    #: under "promote") is written in float32 and autocast casts it for the convolution: a
    #: multiply and a cast, each a pass over the map. "compute": a product that goes straight
    #: into the convolution (no resampling between) is written in the compute dtype (bf16) by
    #: the multiply itself (`torch.mul(..., out=)`): the float32 product rounded once, as the
    #: cast rounds it, so the same pixels to the bit, in one pass of 6 bytes an element instead
    #: of two of 14. bf16 maps and float32 passes are unchanged.
    modulate_dtype: str = "autocast"
    #: "promote": as GFPGAN runs under autocast, where its float32 noise and bias parameters turn
    #: every StyleConv output back into float32; "compute": they are cast instead, so the
    #: activations stay in the compute dtype (bf16) between convolutions (half the bytes).
    activations: str = "promote"
    #: Fold RetinaFace's and ParseNet's eval-mode batch norms into the convolutions before them
    #: and drop ParseNet's `x * 1.0` layers (NormFolding): one operator and one pass over an
    #: activation map fewer per removed layer.
    fold_norms: bool = False
    #: "gfpgan": GFPGAN v1.2-v1.4 (the clean architecture) as GFPGAN writes it; "lean": without
    #: its training-time copies, and each StyleConv's elementwise work in two multiply-adds
    #: (_lean_gfpgan_forward, _lean_decoder_forward, _lean_styleconv_forward).
    gfpgan_forward: str = "gfpgan"
    #: DETECT batches that want one face per image take it as a fixed-size row per image (a
    #: placeholder, never pasted, where there is none) instead of selecting the faces: one host
    #: wait fewer per batch, at the price of restoring a placeholder for each faceless image.
    fixed_selection: bool = False
    #: With fixed_selection, the detection does not wait for the device either
    #: (FaceDetector.centre_rows): each image's best-scored anchors are suppressed as a
    #: fixed-size overlap matrix instead of by torchvision's NMS over the anchors a `nonzero`
    #: selected, inside RetinaFace's CUDA graph when there is one. Two host waits fewer per
    #: batch; an image it cannot vouch for is detected again that way (FacePipeline._detect_again).
    fixed_detection: bool = False
    #: Run ParseNet channels-last too. Its reflection padding and layout conversions were over
    #: half its time on the H200 in NCHW; in NHWC with PyTorch's padding it measured slower, and
    #: with parse_padding "border" and parse_upsample "phases" its pass of 16 took 46.2 ms
    #: against 68.5 in its own forms (third H200 run: the service's defaults since).
    parse_channels_last: bool = False
    #: Lay out the StyleGAN decoder's modulated convolutions channels-last too (their 5-D
    #: weights, which `channels_last` leaves NCHW): the decoder, most of GFPGAN, then runs NHWC
    #: like the encoder instead of NCHW, where on the H200 its x2 upsamplings took 1.07 ms each
    #: against 0.37 in NHWC, cuDNN converted layouts around its convolutions, and its
    #: activations met the encoder's NHWC conditions in mixed-layout elementwise kernels. Needs
    #: the unfused form. On the third H200 run GFPGAN's pass of 16 took 64.0 ms with it against
    #: 73.4 without (the service's defaults since).
    decoder_channels_last: bool = False
    #: "reflect": ParseNet's own reflection-padding pass before each of its 46 convolutions;
    #: "border": each convolution on a map of BORDER_MIN_SIZE or more zero-padded (no padding
    #: pass), its first and last rows and columns, the only outputs the padding reaches, then
    #: computed again from thin reflected strips (border_conv2d). On the H200 the padding
    #: passes took 37% of ParseNet's time (NCHW) and made channels-last ParseNet slower;
    #: counted here they write 39% of its bytes. "border" took the pass of 16 from 68.5 to
    #: 49.7 ms on the third H200 run.
    parse_padding: str = "reflect"
    #: "nearest": ParseNet's x2 layers as it writes them: upsample (a copy 4 times the input),
    #: pad, 3x3 convolution; "phases": the same outputs as four 2x2 convolutions of the input
    #: itself, one per output phase, run as one convolution (upsample_conv2d): no upsampled
    #: copy, 16 taps per four outputs instead of 36. Its 8 x2 layers are 43% of ParseNet's
    #: 469 GFLOP a face.
    parse_upsample: str = "nearest"
    #: "resample": GFPGAN's 14 x2 layers (the U-Net's up blocks and the decoder's upsampling
    #: StyleConvs) as it writes them: a bilinear x2 to a map 4 times the input, then a 3x3
    #: convolution of it; "phases": the same outputs as four 3x3 convolutions of the input
    #: itself, one per output phase, run as one (bilinear_upsample_conv2d): no upsampled copy,
    #: and an up block's 1x1 skip convolution before its x2 instead of after (fewer channels to
    #: resample). Those resamplings were 20 of GFPGAN's 62 ms a pass of 16 on the third H200
    #: run. Needs the lean forward and the unfused modulated convolution.
    gfpgan_upsample: str = "resample"
    #: Compile GFPGAN's and ParseNet's fixed-shape passes with torch.compile (Inductor) at
    #: warm-up, once for every batch size (CompiledForward): elementwise work, padding,
    #: resampling and layout changes fused into the kernels around the convolutions. Needs the
    #: unfused modulated convolution (the fused one's grouped convolution is another graph for
    #: every batch size).
    compile: bool = False
    #: Compile RetinaFace's pass (FaceDetector.net_pass) the same way, for 256x256 images (the
    #: size lip-sync crops come in; other sizes detect eagerly), inside its CUDA graph when
    #: there is one; checked at warm-up against the eager pass's anchors (FacePipeline
    #: _check_compiled_detector). RetinaFace (resnet50, float32, 14 GFLOP a 256x256 image) is
    #: the one network of a DETECT batch that ran eagerly under `compile`.
    compile_detector: bool = False

    def __post_init__(self):
        if self.modconv not in MODCONV_FORMS:
            raise ValueError(f"modconv must be one of {MODCONV_FORMS}, got {self.modconv!r}")
        if self.paste_mask not in PASTE_MASKS:
            raise ValueError(f"paste_mask must be one of {PASTE_MASKS}, got {self.paste_mask!r}")
        if self.activations not in ACTIVATION_FORMS:
            raise ValueError(f"activations must be one of {ACTIVATION_FORMS}, got {self.activations!r}")
        if self.gfpgan_forward not in GFPGAN_FORWARDS:
            raise ValueError(f"gfpgan_forward must be one of {GFPGAN_FORWARDS}, got {self.gfpgan_forward!r}")
        if self.parse_padding not in PARSE_PADDINGS:
            raise ValueError(f"parse_padding must be one of {PARSE_PADDINGS}, got {self.parse_padding!r}")
        if self.parse_upsample not in PARSE_UPSAMPLES:
            raise ValueError(f"parse_upsample must be one of {PARSE_UPSAMPLES}, got {self.parse_upsample!r}")
        if self.gfpgan_upsample not in GFPGAN_UPSAMPLES:
            raise ValueError(f"gfpgan_upsample must be one of {GFPGAN_UPSAMPLES}, got {self.gfpgan_upsample!r}")
        if self.gfpgan_upsample == "phases" and (self.gfpgan_forward != "lean" or self.modconv != "unfused"):
            raise ValueError("gfpgan_upsample='phases' needs gfpgan_forward='lean' and modconv='unfused' "
                             "(it is part of the lean forward of the unfused modulated convolution)")
        if self.resample not in RESAMPLE_FORMS:
            raise ValueError(f"resample must be one of {RESAMPLE_FORMS}, got {self.resample!r}")
        if self.resample_dtype not in RESAMPLE_DTYPES:
            raise ValueError(f"resample_dtype must be one of {RESAMPLE_DTYPES}, got {self.resample_dtype!r}")
        if self.modulate_dtype not in MODULATE_DTYPES:
            raise ValueError(f"modulate_dtype must be one of {MODULATE_DTYPES}, got {self.modulate_dtype!r}")
        if self.channels_last and self.modconv == "fused":
            # The fused form folds the batch into channels with a view, which NHWC cannot take.
            raise ValueError("channels_last needs modconv='unfused' (the fused form views the "
                             "batch as channels, which a channels-last tensor cannot)")
        if self.decoder_channels_last and self.modconv == "fused":
            raise ValueError("decoder_channels_last needs modconv='unfused' (the fused form builds "
                             "a weight per face and views it as groups, which NHWC cannot take)")
        if self.fixed_detection and not self.fixed_selection:
            raise ValueError("fixed_detection needs fixed_selection (it detects one row per image, "
                             "which the fixed-size selection takes)")
        if self.compile and self.modconv == "fused":
            raise ValueError("compile needs modconv='unfused' (the fused form's grouped convolution "
                             "has a group per face: one compiled graph for every batch size)")

    def _settings(self) -> list[tuple[str, str]]:
        """(name, value) of every field, in order, as the settings spell them (bools on/off)."""
        return [(f.name, ("on" if value else "off") if isinstance(value, bool) else value)
                for f in dataclasses.fields(self) for value in [getattr(self, f.name)]]

    def serve_flags(self) -> list[str]:
        """The gfpgan-serve / gfpgan-bench flags that choose exactly these forms."""
        return [part for name, value in self._settings()
                for part in ("--" + name.replace("_", "-"), value)]

    def describe(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self._settings())

    def resampling(self) -> contextlib.AbstractContextManager:
        """The resampling_forms these options choose: what every network pass runs inside."""
        return resampling_forms(self.resample == "fast", self.resample_dtype == "compute")


# -- modulated convolution ----------------------------------------------------------------------


def _unfused_forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """ModulatedConv2d.forward as one shared-weight convolution.

    conv(x, w * s) == conv(x * s, w) when s scales input channels, and demodulation scales
    output channels by 1 / sqrt(sum over (c_in, k, k) of (w * s)^2 + eps), which is
    (s^2 @ sum_k(w^2)^T): both come out of the convolution, so no weight is built per face.
    Bilinear resampling is linear per channel, so scaling before it is the same as after.
    """
    b = x.shape[0]
    s = self.modulation(style)  # (b, c_in)
    x = _modulated(self, x, s)
    if self.sample_mode == "upsample":
        x = _interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    elif self.sample_mode == "downsample":
        x = _interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    weight = self.weight[0]  # (c_out, c_in, k, k)
    out = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
    if self.demodulate:
        energy = weight.float().pow(2).sum(dim=(2, 3))  # (c_out, c_in)
        demod = torch.rsqrt(s.float().pow(2) @ energy.t() + self.eps)  # (b, c_out)
        out = out * demod.view(b, self.out_channels, 1, 1).to(out.dtype)
    return out


def _modulated(conv, x: torch.Tensor, s: torch.Tensor, straight: bool = False) -> torch.Tensor:
    """x (b, c_in, h, w) scaled by the style s (b, c_in), for `conv`'s unfused convolution.

    With modulate_dtype "compute" (set_modconv_form), a float32 map that goes straight into
    the convolution under autocast is written in autocast's dtype by the multiply itself: the
    float32 product rounded once, as autocast's cast of it would be, in one pass instead of a
    multiply and a cast. `straight`: the product goes to a convolution whatever the layer's
    sample mode (an x2 by phases pads it, a copy, and convolves it). Compiled code multiplies
    as written: the compiler fuses the cast."""
    scale = s.view(*s.shape, 1, 1).to(x.dtype)
    if (x.dtype == torch.float32 and (straight or conv.sample_mode is None)
            and conv.__dict__.get("_modulate_compute", False)
            and not torch.compiler.is_compiling() and torch.is_autocast_enabled(x.device.type)):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype != torch.float32:
            return torch.mul(x, scale, out=torch.empty_like(x, dtype=dtype))
    return x * scale


def _modulated_conv_class():
    from gfpgan.archs.stylegan2_clean_arch import ModulatedConv2d
    return ModulatedConv2d


def _swap_forward(net: torch.nn.Module, cls: type, forward) -> int:
    """Give every `cls` module in `net` `forward` (None: its class's own); returns how many.

    The modules keep their parameters and state-dict keys: only their forward changes."""
    count = 0
    for module in net.modules():
        if isinstance(module, cls):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward.__get__(module)
            count += 1
    return count


def set_modconv_form(net: torch.nn.Module, form: str, modulate_dtype: str = "autocast") -> int:
    """Switch every ModulatedConv2d in `net` to `form` ("fused" or "unfused"), its style
    modulation writing `modulate_dtype` (SpeedOptions.modulate_dtype); returns how many."""
    if form not in MODCONV_FORMS:
        raise ValueError(f"modconv must be one of {MODCONV_FORMS}, got {form!r}")
    if modulate_dtype not in MODULATE_DTYPES:
        raise ValueError(f"modulate_dtype must be one of {MODULATE_DTYPES}, got {modulate_dtype!r}")
    cls = _modulated_conv_class()
    for module in net.modules():
        if isinstance(module, cls):
            module.__dict__["_modulate_compute"] = modulate_dtype == "compute"
    return _swap_forward(net, cls, _unfused_forward if form == "unfused" else None)


def _compute_dtype_styleconv_forward(self, x, style, noise=None):
    """StyleConv.forward with the noise and bias cast to the activations' dtype: the same sums,
    without promoting a bf16 activation map to float32 on every layer."""
    out = self.modulated_conv(x, style) * 2**0.5
    if noise is None:
        b, _, h, w = out.shape
        noise = out.new_empty(b, 1, h, w).normal_()
    out = out + (self.weight * noise).to(out.dtype)
    out = out + self.bias.to(out.dtype)
    return self.activate(out)


def _halved_energy(conv) -> tuple[torch.Tensor, torch.Tensor]:
    """((c_in, c_out), (1,)) float32: half the sum over the kernel of the squared shared weight,
    and half of eps, made once per weight on its device (_derived). Traced by torch.compile,
    they are computed in the graph: one read of the decoder's weights a pass, well under a
    percent of it."""
    return _derived(conv, "_halved_energy", _make_halved_energy)


def _make_halved_energy(conv) -> tuple[torch.Tensor, torch.Tensor]:
    weight = conv.weight
    energy = weight[0].detach().float().pow(2).sum(dim=(2, 3)).t().contiguous() / 2
    return energy, torch.full((1,), conv.eps / 2, dtype=torch.float32, device=weight.device)


def _lean_styleconv_forward(self, x, style, noise=None):
    """StyleConv.forward (modulated convolution, x sqrt(2), noise, bias, leaky ReLU) with the
    elementwise work in two multiply-adds.

    Demodulation scales each output channel of each face by 1 / sqrt(s^2 @ E + eps), where E
    sums the squared weight over the kernel (made once): with E and eps halved, rsqrt gives
    sqrt(2) times that scale, GFPGAN's "for conversion" gain included. Scaling the output
    channels after the convolution equals scaling the weight before it, so the convolution
    runs on the style-modulated weight (fused form) or input (unfused form) alone, and
    `bias + out * gain` and `+ noise * weight` are one operator each: three passes over the
    activation map after the convolution instead of four (fused) or five (unfused)."""
    conv = self.modulated_conv
    b, c = x.shape[:2]
    s = conv.modulation(style)  # (b, c_in)
    energy, half_eps = _halved_energy(conv)
    gain = torch.rsqrt(torch.addmm(half_eps, s.float().pow(2), energy))  # (b, c_out)
    if self.__dict__.get("_upsample_phases", False):  # (an unfused x2 layer: set_activation_form)
        phases, _ = _derived(conv, "_bilinear_phases", _modulated_phase_weights)
        out = bilinear_upsample_conv2d(_modulated(conv, x, s, straight=True), conv.weight[0], None, phases, None)
    elif self.__dict__.get("_unfused_conv", False):
        x = _resample(_modulated(conv, x, s), conv.sample_mode)
        out = F.conv2d(x, conv.weight[0].to(x.dtype), padding=conv.padding)
    else:
        weight = (conv.weight * s.view(b, 1, c, 1, 1)).view(b * conv.out_channels, c, conv.kernel_size,
                                                             conv.kernel_size)
        x = _resample(x, conv.sample_mode)
        h, w = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=conv.padding, groups=b)
        out = out.view(b, conv.out_channels, *out.shape[2:4])
    gain, bias, strength = gain.view(b, -1, 1, 1), self.bias, self.weight
    if noise is None:
        noise = torch.randn((b, 1, *out.shape[2:]), device=out.device, dtype=torch.float32)
    if self.__dict__.get("_compute_dtype", False):  # activations stay in the compute dtype
        gain, bias, strength, noise = (t.to(out.dtype) for t in (gain, bias, strength, noise))
    out = torch.addcmul(bias, out, gain)
    out = torch.addcmul(out, noise, strength)
    return F.leaky_relu(out, 0.2, inplace=True)


def _resample(x: torch.Tensor, mode) -> torch.Tensor:
    if mode == "upsample":
        return _interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if mode == "downsample":
        return _interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    return x


def _lean_gfpgan_forward(self, x, return_latents=False, return_rgb=True, randomize_noise=True, **kwargs):
    """GFPGANv1Clean.forward for inference: the same U-Net, style code and SFT conditions,
    without the copy GFPGAN makes of every condition (14 full copies of feature maps a pass,
    there so that training can reuse the tensors). Any other use runs GFPGAN's own forward."""
    if return_latents or return_rgb or kwargs:
        return type(self).forward(self, x, return_latents=return_latents, return_rgb=return_rgb,
                                  randomize_noise=randomize_noise, **kwargs)
    feat = F.leaky_relu_(self.conv_body_first(x), negative_slope=0.2)
    skips = []
    for down in self.conv_body_down:
        feat = down(feat)
        skips.append(feat)
    feat = F.leaky_relu_(self.final_conv(feat), negative_slope=0.2)
    style = self.final_linear(feat.view(feat.size(0), -1))
    if self.different_w:
        style = style.view(style.size(0), -1, self.num_style_feat)
    conditions = []
    for up, scale, shift, skip in zip(self.conv_body_up, self.condition_scale, self.condition_shift,
                                      reversed(skips)):
        feat = up(feat + skip)
        conditions += [scale(feat), shift(feat)]
    image, _ = self.stylegan_decoder([style], conditions, input_is_latent=self.input_is_latent,
                                     randomize_noise=randomize_noise)
    return image, []


def _lean_decoder_forward(self, styles, conditions, input_is_latent=False, noise=None, randomize_noise=True,
                          truncation=1, truncation_latent=None, inject_index=None, return_latents=False):
    """StyleGAN2GeneratorCSFT.forward for one style code, SFT on half the channels (GFPGAN
    v1.2-v1.4): the SFT modulation is applied in place to the half it changes (two operators),
    where GFPGAN splits, modulates into new tensors and concatenates (three, and a copy of the
    whole map). Any other use runs the decoder's own forward."""
    if len(styles) != 1 or truncation < 1 or return_latents or not self.sft_half:
        return type(self).forward(self, styles, conditions, input_is_latent, noise, randomize_noise, truncation,
                                  truncation_latent, inject_index, return_latents)
    style = styles[0] if input_is_latent else self.style_mlp(styles[0])
    if noise is None:
        noise = [None] * self.num_layers if randomize_noise else \
            [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
    latent = style if style.ndim >= 3 else style.unsqueeze(1).repeat(1, self.num_latent, 1)
    out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0], noise=noise[0])
    skip = self.to_rgb1(out, latent[:, 1])
    i = 1
    for conv1, conv2, noise1, noise2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2], noise[1::2],
                                                    noise[2::2], self.to_rgbs):
        out = conv1(out, latent[:, i], noise=noise1)
        if i < len(conditions):  # out is this layer's own new tensor: modulate its half in place
            out[:, out.size(1) // 2:].mul_(conditions[i - 1]).add_(conditions[i])
        out = conv2(out, latent[:, i + 1], noise=noise2)
        skip = to_rgb(out, latent[:, i + 2], skip)
        i += 2
    return skip, None


def set_activation_form(net: torch.nn.Module, form: str, gfpgan_forward: str = "gfpgan",
                        modconv: str = "fused", upsample: str = "resample") -> int:
    """Switch every StyleConv in `net` to `form` ("promote" or "compute"), and `net` (GFPGAN v1.2-
    v1.4) to `gfpgan_forward` ("gfpgan": its own forwards; "lean": _lean_gfpgan_forward,
    _lean_decoder_forward and _lean_styleconv_forward with the modulated convolution in
    `modconv`'s form, and its x2 layers in `upsample`'s (SpeedOptions.gfpgan_upsample));
    returns how many StyleConvs."""
    if form not in ACTIVATION_FORMS:
        raise ValueError(f"activations must be one of {ACTIVATION_FORMS}, got {form!r}")
    if gfpgan_forward not in GFPGAN_FORWARDS:
        raise ValueError(f"gfpgan_forward must be one of {GFPGAN_FORWARDS}, got {gfpgan_forward!r}")
    if upsample not in GFPGAN_UPSAMPLES:
        raise ValueError(f"gfpgan_upsample must be one of {GFPGAN_UPSAMPLES}, got {upsample!r}")
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean, ResBlock, StyleGAN2GeneratorCSFT
    from gfpgan.archs.stylegan2_clean_arch import StyleConv
    lean = gfpgan_forward == "lean"
    phases = lean and modconv == "unfused" and upsample == "phases"
    _swap_forward(net, GFPGANv1Clean, _lean_gfpgan_forward if lean else None)
    _swap_forward(net, StyleGAN2GeneratorCSFT, _lean_decoder_forward if lean else None)
    for module in net.modules():
        if isinstance(module, ResBlock) and module.scale_factor == 2:
            if phases:
                module.forward = _phases_up_block_forward.__get__(module)
                _derived(module.conv2, "_bilinear_phases", _conv_phase_weights)  # made now
            else:
                module.__dict__.pop("forward", None)
    if lean:
        for module in net.modules():
            if isinstance(module, StyleConv):
                module.__dict__["_unfused_conv"] = modconv == "unfused"
                module.__dict__["_compute_dtype"] = form == "compute"
                module.__dict__["_upsample_phases"] = phases and module.modulated_conv.sample_mode == "upsample"
                _halved_energy(module.modulated_conv)  # made now, not on the first request
                if module.__dict__["_upsample_phases"]:
                    _derived(module.modulated_conv, "_bilinear_phases", _modulated_phase_weights)
        return _swap_forward(net, StyleConv, _lean_styleconv_forward)
    return _swap_forward(net, StyleConv, _compute_dtype_styleconv_forward if form == "compute" else None)


# -- noise ----------------------------------------------------------------------------------------


class NoisePlan:
    """Per-face noise for one GFPGAN pass: stored noise for some faces, fresh for the others.

    GFPGAN's decoder takes either its stored noise for the whole batch or fresh noise for the
    whole batch. A forward pre-hook on the decoder hands it a noise list instead, built as
    `where(wants_fresh, randn, stored)` per layer, so a batch that mixes both is one pass.
    """

    def __init__(self, gfpgan: torch.nn.Module):
        self.decoder = gfpgan.stylegan_decoder
        self._fresh: torch.Tensor | None = None  # (B,) bool while a mixed pass runs
        self.decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        if self._fresh is None:
            return None
        fresh = self._fresh.view(-1, 1, 1, 1)
        noises = []
        for i in range(self.decoder.num_layers):
            stored = getattr(self.decoder.noises, f"noise{i}")
            random = torch.randn((fresh.shape[0], *stored.shape[1:]), device=stored.device,
                                 dtype=stored.dtype)
            noises.append(torch.where(fresh, random, stored))
        return args, {**kwargs, "noise": noises}

    @contextlib.contextmanager
    def mixed(self, fresh: torch.Tensor):
        """While inside, the decoder uses fresh noise where `fresh` is True, stored noise elsewhere."""
        self._fresh = fresh
        try:
            yield
        finally:
            self._fresh = None


# -- CUDA graphs ----------------------------------------------------------------------------------


def graph_buckets(largest: int) -> list[int]:
    """Batch sizes that get a graph: powers of two and the halfway points, and from 16 to 32
    every fourth size, up to `largest`.

    A batch is padded up to the next bucket, so at most a third of a replay is padding
    (beyond the first few sizes), and above 16 at most three faces in 20: MuseTalk's realtime
    batch of 20 faces replays a graph of 20, not of 24 (a fifth of its pass spent on padding)."""
    sizes, value = set(range(16, 33, 4)), 1
    while value < largest:
        sizes.add(value)
        if value >= 4:
            sizes.add(value * 3 // 2)
        value *= 2
    sizes.add(largest)
    return sorted(s for s in sizes if s <= largest)


class GraphedForward:
    """`fn(x)` for x of shape (n, *sample_shape), replayed from CUDA graphs captured per bucket.

    `fn` must be a pure function of x on the device (its weights fixed). A batch is copied into
    the static input of the smallest bucket that holds it (the rows beyond n keep whatever the
    last replay left there and their outputs are dropped); a batch larger than every bucket
    runs as replays of the largest bucket and one of the bucket that holds the rest (detection
    over a batch of 64 images, with graphs up to 32: two replays rather than RetinaFace's 318
    launches eagerly). The graphs share one memory pool; each replay's output is cloned before
    returning, since the next replay may reuse that memory.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], sample_shape: Sequence[int],
                 buckets: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32):
        self.fn = fn
        self.sample_shape = tuple(sample_shape)
        self.buckets = sorted(buckets)
        self.device = device
        self.dtype = dtype
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.replays = 0
        self.eager_calls = 0

    def capture(self, pool=None) -> None:
        """Capture every bucket, largest first (the first capture sizes the pool), into `pool`
        or a new one.

        `pool`, a torch.cuda.graph_pool_handle() other networks' graphs are captured into too,
        keeps about the largest of their peaks where a pool each keeps the sum. Sharing is
        safe as the buckets of one network share: the replays run on one stream, one after
        another, every replay's output is copied out before the next (__call__), and the
        static inputs are not in the pool. The pool must be live (graphs in it exist) or new:
        a handle whose graphs are all gone may not be captured into again."""
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        stream = torch.cuda.Stream(self.device)
        for size in sorted(self.buckets, reverse=True):
            static_in = torch.zeros((size, *self.sample_shape), device=self.device, dtype=self.dtype)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up outside the graph: cuDNN picks its algorithms here
                    self.fn(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = self.fn(static_in)
            self._graphs[size] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def bucket_for(self, n: int) -> int | None:
        for size in self.buckets:
            if size >= n:
                return size
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self._graphs or n == 0:
            self.eager_calls += 1
            return self.fn(x)
        largest = self.buckets[-1]
        if n > largest:
            return torch.cat([self._replay(x[start:start + largest]) for start in range(0, n, largest)])
        return self._replay(x)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        graph, static_in, static_out = self._graphs[self.bucket_for(n)]
        static_in[:n].copy_(x)
        graph.replay()
        self.replays += 1
        return static_out[:n].clone()


# -- torch.compile --------------------------------------------------------------------------------


class CompiledForward:
    """`fn(x)`, a pure function of a batch x on the device, compiled by torch.compile (Inductor)
    once for every batch size from 1 up: the batch dimension is dynamic, every other one static.

    - PyTorch specialises a dimension of size 1, so a batch of one runs as two rows (the face
      and a copy of it) and keeps its first output row.
    - x goes in contiguous (NCHW), whatever layout it comes in: fn sets the layout its network
      wants, and a graph is only good for the strides it was made for.
    - The whole function must compile as one graph (fullgraph): a part that cannot would run
      between compiled pieces, slower, without anyone hearing of it.
    - After warm() it never compiles again: a call that would need a new graph (something it
      was compiled against changed) runs `fn` eagerly, counted in `eager_calls` and logged
      once, instead of stalling a request for the compiler.
    - Always under no_grad: inference only, and grad mode is part of what a graph is made for.

    Nothing is shared between instances but torch.compile's cache, which keys on the function's
    code: make instances after `reset_compiled()`.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 backend: str = "inductor"):
        self.fn = fn
        self.name = name
        #: entered around every call: state fn reads but a compiled graph cannot set
        #: (resampling_forms)
        self.context = context
        #: torch.compile's backend: "inductor" (fused kernels) serves; "aot_eager" traces the
        #: same graph without generating code (the CPU tests: Inductor's C++ build of GFPGAN
        #: takes minutes on two cores)
        self.backend = backend
        self._compiled = torch.compile(fn, fullgraph=True, dynamic=None, backend=backend)
        self.warmed = False
        self.calls = 0
        self.eager_calls = 0

    def warm(self, sample: torch.Tensor) -> None:
        """Compile on `sample` (a batch of at least one), now rather than on the first request."""
        self(sample)
        self.warmed = True

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:
            return self.fn(x)
        # One layout in: a graph is made for the strides it saw, and ParseNet's input comes
        # channels-last from a channels-last GFPGAN (a copy of 3 channels, next to nothing).
        rows = x.contiguous()
        if n == 1:
            rows = torch.cat([rows, rows])
        torch._dynamo.mark_dynamic(rows, 0)
        if not self.warmed:
            with self.context():
                out = self._compiled(rows)
        else:
            try:
                with self.context(), torch.compiler.set_stance("fail_on_recompile"):
                    out = self._compiled(rows)
            except RuntimeError as error:
                if "fail_on_recompile" not in str(error):
                    raise
                if self.eager_calls == 0:
                    log.warning("compiled %s would need a new graph; running it eagerly: %s",
                                self.name, str(error).splitlines()[0][:300])
                self.eager_calls += 1
                return self.fn(x)
        self.calls += 1
        return out[:n] if n == 1 else out


def compile_toolchain_problem() -> str | None:
    """Why torch.compile cannot build GPU code in this environment, or None when it can.

    Inductor's GPU kernels are Triton kernels, and Triton launches them through a small C module
    it builds at run time with the host's C compiler (CC, else clang, gcc or cc), against
    Python's own headers. CUDA runtime images ship neither (pytorch/pytorch#116696), and a
    compile there fails at warm-up. Found before, `--compile auto` stays off with a reason
    instead of failing a build on every start. Triton itself comes with torch's CUDA wheels on
    Linux; on Windows it is the separate triton-windows, which brings its own C compiler
    (TinyCC) and finds Python's headers itself."""
    if importlib.util.find_spec("triton") is None:
        return ("Triton is not installed: torch.compile's GPU code generator (it comes with torch's "
                "CUDA wheels on Linux; on Windows: pip install triton-windows)")
    if os.name == "nt":
        return None
    named = os.environ.get("CC", "").strip()
    candidates = [named.split()[0]] if named else ["clang", "gcc", "cc"]
    if not any(shutil.which(c) for c in candidates):
        where = f"CC={named!r} is not on PATH" if named else "no C compiler (clang, gcc or cc) on PATH"
        return (f"{where}: Triton builds its kernel launcher with one (install gcc, or set CC)")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return (f"no Python headers ({headers}): Triton builds its kernel launcher against them "
                "(install python3-dev, or the python3.X-dev of this interpreter)")
    return None


def reset_compiled() -> None:
    """Forget every torch.compile graph of this process: the speed forms swap module forwards,
    which a compiled graph may have been specialised to."""
    torch._dynamo.reset()


# -- the box paste mask --------------------------------------------------------------------------


def _cv2_gaussian_sigma(ksize: int) -> float:
    """The sigma cv2.GaussianBlur picks for sigma 0: 0.3 * ((ksize - 1) / 2 - 1) + 0.8."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


def box_paste_mask(face_size: int = 512) -> np.ndarray:
    """facexlib's non-parsing paste mask, in template space: (face_size, face_size) float in [0, 1].

    facexlib (use_parse=False) warps a box of ones to the image, erodes it by 2 * upscale
    pixels, then erodes it again by 2 * w_edge and blurs it with a (2 * w_edge + 1) kernel,
    where w_edge = sqrt(face area) // 20. In the template the face area is face_size^2, so
    w_edge is face_size // 20 template pixels: the same box, made once in template space and
    warped with the face (tests/test_speed.py compares it with facexlib's own paste).
    """
    import cv2

    w_edge = int(face_size) // 20
    mask = np.ones((face_size, face_size), np.float32)
    # warpAffine's bilinear border leaves about one pixel of partial coverage, which facexlib's
    # first erosion (by 2 * upscale output pixels, ~2 template pixels at a 256 face) removes.
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.erode(mask, np.ones((2 * w_edge, 2 * w_edge), np.uint8),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0)
    ksize = 2 * w_edge + 1
    return cv2.GaussianBlur(mask, (ksize, ksize), _cv2_gaussian_sigma(ksize))


def set_memory_format(net: torch.nn.Module, channels_last: bool, modulated: bool = False) -> None:
    """Lay out every 4-D parameter and buffer (the convolution weights) channels-last, or back;
    with `modulated`, the modulated convolutions' (1, c_out, c_in, k, k) weights too, so that
    the shared weight the unfused form convolves with, `weight[0]`, is channels-last (a
    convolution's output follows its weight's layout, so the StyleGAN decoder then runs NHWC).

    `Module.to(memory_format=...)` refuses networks with 5-D parameters, which GFPGAN's
    modulated convolutions have."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    five = torch.channels_last if modulated else torch.contiguous_format
    for tensor in [*net.parameters(), *net.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=layout)
        elif tensor.dim() == 5 and tensor.shape[0] == 1:
            tensor.data = tensor.data[0].contiguous(memory_format=five).unsqueeze(0)


def check_speed_device(speed: SpeedOptions, device: torch.device) -> list[str]:
    """What the operator should hear about options that cannot act on this device."""
    notes = []
    if speed.cuda_graphs and device.type != "cuda":
        notes.append(f"--cuda-graphs has no effect on {device}: CUDA graphs exist on CUDA only")
    return notes



# -- resampling and padding -----------------------------------------------------------------------

#: (fast, keep_dtype): see resampling_forms.
_FORMS = contextvars.ContextVar("resampling_forms", default=(False, False))
#: The same state as code compiled by torch.compile reads it: dynamo cannot set a context
#: variable, and the GPU image's (torch 2.11) cannot read one either, so resampling_forms also
#: keeps these plain flags, which a compiled graph reads as globals and keeps guards on.
_fast_traced = False
_keep_dtype_traced = False


def _fast_on() -> bool:
    """Whether fast resampling is on here (see resampling_forms)."""
    if torch.compiler.is_compiling():
        return _fast_traced
    return _FORMS.get()[0]


def _keep_dtype_on() -> bool:
    """Whether a reduced-precision map is resampled in its own dtype here (resampling_forms)."""
    if torch.compiler.is_compiling():
        return _keep_dtype_traced
    return _FORMS.get()[1]


def upsample2x_bilinear(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), one dimension
    at a time.

    Output pixel 2i reads 1/4 of input i-1 and 3/4 of i, pixel 2i+1 3/4 of i and 1/4 of i+1,
    the edge pixel standing in for its missing neighbour. Each dimension is two lerps over the
    whole map, written straight into the even and odd rows (columns) of an output laid out as
    x is, and two one-row copies for the edges: every pass runs at memory speed and a
    channels-last map stays channels-last for the convolution after it. (On the third H200
    run PyTorch's channels-last kernel moved 0.27-0.56 TB/s of the card's 4.2, and GFPGAN's
    bilinear resamplings took 20 of its pass of 16's 62 ms. An earlier form of this, built
    with cat and stack, copied every map three times more and came out NCHW: 85 ms a pass.)
    Rounded once per dimension, where PyTorch rounds once: in bf16, a rounding step apart at
    most. Compiled code gets the out-of-place form, which Inductor fuses."""
    if torch.compiler.is_compiling():
        return _upsample2x_bilinear_traced(x)
    return _upsample_dim(_upsample_dim(x, 3), 2)


def _like(x: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of `shape` laid out as x is (channels-last stays channels-last)."""
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=_layout_of(x))


def _upsample_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x doubled along `dim` by bilinear interpolation (align_corners=False)."""
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * n
    out = _like(x, shape)
    pairs = out.unflatten(dim, (n, 2))  # a view: [..., i, 0, ...] is output 2i, [..., i, 1, ...] 2i+1
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    if n > 1:
        torch.lerp(x.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), 0.25, out=even.narrow(dim, 1, n - 1))
        torch.lerp(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), 0.25, out=odd.narrow(dim, 0, n - 1))
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    odd.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
    return out


def _upsample2x_bilinear_traced(x: torch.Tensor) -> torch.Tensor:
    """upsample2x_bilinear out of place (cat, lerp, stack), for code torch.compile traces."""
    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        before = torch.cat([t.narrow(dim, 0, 1), t.narrow(dim, 0, n - 1)], dim)
        after = torch.cat([t.narrow(dim, 1, n - 1), t.narrow(dim, n - 1, 1)], dim)
        even = torch.lerp(t, before, 0.25)
        odd = torch.lerp(t, after, 0.25)
        out = torch.stack([even, odd], dim + 1)
        return out.flatten(dim, dim + 1)
    return along(along(x, 3), 2)


def downsample2x_bilinear(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False) for even sizes:
    each output pixel sits halfway between two input pixels in each direction, so it is the
    mean of a 2x2 block: the mean of each pair of rows, then of each pair of columns, two
    elementwise passes that keep x's layout. (avg_pool2d gives the same; on the H200 its
    channels-last kernel took 2.5 times PyTorch's bilinear one. Compiled code gets it.)"""
    if torch.compiler.is_compiling():
        return F.avg_pool2d(x, 2)
    rows = torch.lerp(x[:, :, 0::2], x[:, :, 1::2], 0.5)
    return torch.lerp(rows[..., 0::2], rows[..., 1::2], 0.5)


def upsample2x_nearest(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="nearest"): one copy into an output laid out as x
    is (expand and reshape would come out NCHW whatever x's layout)."""
    n, c, h, w = x.shape
    if torch.compiler.is_compiling():
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
    out = _like(x, (n, c, 2 * h, 2 * w))
    out.unflatten(3, (w, 2)).unflatten(2, (h, 2)).copy_(x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2))
    return out


def _reflected(x: torch.Tensor, dim: int, start: int, stop: int, pad: int) -> list[torch.Tensor]:
    """Entries [start, stop) along `dim` of x reflection-padded by `pad` on both sides, as at
    most three slices of x to concatenate (the edge entry is not repeated, as in
    nn.ReflectionPad2d)."""
    def down(first: int, length: int) -> torch.Tensor:  # x[first + length - 1], ..., x[first]
        piece = x.narrow(dim, first, length)
        return piece.flip(dim) if length > 1 else piece  # (a flip is a copy; one entry needs none)

    n, pieces, j = x.shape[dim], [], start
    while j < stop:
        if j < pad:  # before the first entry: x[pad - j], going down
            end = min(stop, pad)
            pieces.append(down(pad - end + 1, end - j))
        elif j < n + pad:  # x itself
            end = min(stop, n + pad)
            pieces.append(x.narrow(dim, j - pad, end - j))
        else:  # past the last entry: x[2 (n - 1) - (j - pad)], going down
            end = stop
            pieces.append(down(2 * (n - 1) - (end - 1 - pad), end - j))
        j = end
    return pieces


def _cat(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def reflection_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """nn.ReflectionPad2d(pad)(x), from slices: the edge row is not repeated."""
    if pad == 0:
        return x
    for dim in (3, 2):
        x = _cat(_reflected(x, dim, 0, x.shape[dim] + 2 * pad, pad), dim)
    return x


def _interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, **kwargs):
    """F.interpolate, with the x2 / x0.5 cases the networks use routed to the functions above
    while fast resampling is on, and a bf16 (or float16) map resampled in its own type, autocast
    off, while keep_dtype is (resampling_forms)."""
    if _keep_dtype_on() and x.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(x.device.type, enabled=False):
            return _resampled(x, size, scale_factor, mode, align_corners, **kwargs)
    return _resampled(x, size, scale_factor, mode, align_corners, **kwargs)


def _resampled(x, size, scale_factor, mode, align_corners, **kwargs):
    if _fast_on() and size is None and not kwargs and x.dim() == 4:
        if mode == "bilinear" and align_corners is False:
            if scale_factor == 2:
                return upsample2x_bilinear(x)
            if scale_factor == 0.5 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0:
                return downsample2x_bilinear(x)
        if mode == "nearest" and scale_factor == 2:
            return upsample2x_nearest(x)
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode=mode,
                         align_corners=align_corners, **kwargs)


class _Functional:
    """torch.nn.functional as GFPGAN's modules see it: every name handed through, except
    interpolate (see _interpolate). Installed once as those modules' `F`."""

    interpolate = staticmethod(_interpolate)

    def __getattr__(self, name):
        return getattr(F, name)


def _install_resampling_hooks() -> None:
    import gfpgan.archs.gfpganv1_clean_arch as gfpgan_arch
    import gfpgan.archs.stylegan2_clean_arch as stylegan_arch

    for module in (gfpgan_arch, stylegan_arch):
        if not isinstance(module.F, _Functional):
            module.F = _Functional()


class _FastReflectionPad(torch.nn.Module):
    """Stands in for a ParseNet layer's nn.ReflectionPad2d while fast resampling is on."""

    def __init__(self, original: torch.nn.ReflectionPad2d):
        super().__init__()
        self.original = original
        self.pad = int(original.padding[0])

    def forward(self, x):
        if _fast_on() and x.dim() == 4:
            return reflection_pad(x, self.pad)
        return self.original(x)


def border_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d, pad: int) -> torch.Tensor:
    """conv(nn.ReflectionPad2d(pad)(x)) without the padding pass.

    The convolution runs zero-padded (its padding is part of the convolution kernel, not a pass
    over memory), which gives every output whose window stays inside x. Only the outputs whose
    window reaches the padding differ: the first and last rows and columns (one each for a 3x3
    window). Those are computed again from thin strips of the reflected input and written over:
    first the rows (zero-padded across, like the rest), then the columns, reflected along their
    length, which makes the corners right too. Where the stride allows, the two sides share one
    concatenation and one convolution (the outputs between their windows are dropped). On the
    CPU the result differs from the padded form by float rounding at most (another summation
    order)."""
    k, s = conv.kernel_size, conv.stride
    weight, bias, dilation, groups = conv.weight, conv.bias, conv.dilation, conv.groups
    out = F.conv2d(x, weight, bias, s, pad, dilation, groups)
    for dim in (2, 3):
        n, size, kd, sd = x.shape[dim], out.shape[dim], k[dim - 2], s[dim - 2]
        first = min(size, -(-pad // sd))  # outputs before this one see the padding at the start
        last = max(first, -(-(n - pad) // sd))  # from this one on they see the padding at the end
        spans = [(lo, hi) for lo, hi in ((0, first), (last, size)) if lo < hi]
        groups_of_spans = [spans] if sd == 1 else [[span] for span in spans]
        for together in groups_of_spans:
            strip = _cat([piece for lo, hi in together
                          for piece in _reflected(x, dim, lo * sd, (hi - 1) * sd + kd, pad)], dim)
            if dim == 3:  # the columns, reflected along their length: right at the corners
                strip = _cat(_reflected(strip, 2, 0, x.shape[2] + 2 * pad, pad), 2)
            part = F.conv2d(strip, weight, bias, s, (0, pad) if dim == 2 else 0, dilation, groups)
            if len(together) == 2 and all(hi - lo == 1 for lo, hi in together):
                # one output at each end (a 3x3 window), the strip's first and last: one copy
                # through views that step from the one to the other
                (start, _), (end, _) = together
                every = (slice(None),) * dim
                out.narrow(dim, start, end - start + 1)[every + (slice(None, None, end - start),)].copy_(
                    part[every + (slice(None, None, part.shape[dim] - 1),)])
                continue
            lo, hi = together[0]
            out.narrow(dim, lo, hi - lo).copy_(part.narrow(dim, 0, hi - lo))
            if len(together) == 2:  # the end's outputs are the strip's last ones
                lo, hi = together[1]
                out.narrow(dim, lo, hi - lo).copy_(part.narrow(dim, part.shape[dim] - (hi - lo), hi - lo))
    return out


#: The smallest feature map (its shorter side) that border_conv2d takes in ParseNet: its strips
#: compute about 8 lines of outputs per layer, an eighth of the work of a 64x64 map (ParseNet's
#: body runs at 32x32), while such a map's padding pass costs little.
BORDER_MIN_SIZE = 128


def upsample_conv2d(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv(nn.ReflectionPad2d(1)(F.interpolate(x, scale_factor=2, mode="nearest"))) for a 3x3,
    stride-1 convolution, from x itself: no upsampled copy, no padding of it, and 16 taps per
    four outputs instead of 36.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1, which are source rows i-1, i, i: so it is
    a two-row convolution of rows i-1 and i with kernel rows (w0, w1 + w2); row 2i+1 reads
    i, i, i+1: (w0 + w1, w2). The same holds across columns, so each of the four output phases
    (even or odd row, even or odd column) is a 2x2 convolution of x. At the edges the
    upsampled image's reflection repeats the source's edge pixel, which is x padded by
    replication (on x, a quarter of the upsampled size).

    The four phases run as one convolution with four times the output channels (phase_weights,
    made once per weight), each phase's outputs offset by one row or column from the next's;
    one copy through a strided view of that output interleaves them into an output of x's
    layout. Three operators (pad, convolution, copy) where four convolutions and four strided
    writes ran, with the taps summed on every call; the shared output costs (h+1)(w+1) instead
    of h*w outputs per phase. Float rounding differs from the upsampled form (summed weights,
    other sums)."""
    n, _, h, w = x.shape
    weight, bias = _derived(conv, "_phase_weights", phase_weights)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    phases = F.conv2d(padded, weight, bias, 1, 0, 1, conv.groups)  # (n, 4 c, h + 1, w + 1)
    c = phases.shape[1] // 4
    # out[:, k, 2i + a, 2j + b] = phases[:, 4k + 2a + b, i + a, j + b]: linear in (k, i, a, j, b)
    sn, sc, sh, sw = phases.stride()
    # (from phases' own storage offset, which torch.compile cannot read as a number)
    interleaved = phases.as_strided((n, c, h, 2, w, 2), (sn, 4 * sc, sh, 2 * sc + sh, sw, sc + sw))
    out = _like(x, (n, c, 2 * h, 2 * w), phases.dtype)
    out.view(n, c, h, 2, w, 2).copy_(interleaved)
    return out


def phase_weights(conv: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """upsample_conv2d's weights for a 3x3 convolution: (4 c_out, c_in, 2, 2), output channel
    4k + 2a + b holding channel k's taps for output phase (a, b) (row parity a, column parity
    b), in the weight's layout; and its bias, each entry four times."""
    def halves(t: torch.Tensor, dim: int) -> list[torch.Tensor]:  # (even phase, odd phase) taps
        k0, k1, k2 = t.unbind(dim)
        return [torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)]
    weight = conv.weight
    taps = torch.stack([taps for rows in halves(weight, 2) for taps in halves(rows, 3)], 1)
    taps = taps.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).contiguous(memory_format=_layout_of(weight))
    return taps, None if conv.bias is None else conv.bias.repeat_interleave(4)


#: Bilinear x2 (align_corners=False) then a 3x3 convolution, per output phase: output row 2i
#: reads upsampled rows 2i-1, 2i, 2i+1, which mix source rows i-1, i, i+1 with weights 3/4 and
#: 1/4; [phase][tap][k] is how much kernel row k puts on source row i-1+tap (even, odd phase).
_BILINEAR_PHASES = (((0.75, 0.25, 0.0), (0.25, 0.75, 0.75), (0.0, 0.0, 0.25)),
                    ((0.25, 0.0, 0.0), (0.75, 0.75, 0.25), (0.0, 0.25, 0.75)))


def bilinear_phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """bilinear_upsample_conv2d's weights for a 3x3 weight (c_out, c_in, 3, 3): (4 c_out, c_in,
    3, 3) float32, output channel 4k + 2a + b holding channel k's taps on the source for output
    phase (a, b) (row parity a, column parity b), in the weight's layout."""
    mix = torch.tensor(_BILINEAR_PHASES, dtype=torch.float32, device=weight.device)  # (2, 3, 3)
    taps = torch.einsum("atk,bul,oikl->oabitu", mix, mix, weight.detach().float())
    return taps.reshape(4 * weight.shape[0], *weight.shape[1:]).contiguous(memory_format=_layout_of(weight))


def _conv_phase_weights(conv: torch.nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    return bilinear_phase_weights(conv.weight), None if conv.bias is None else conv.bias.repeat_interleave(4)


def _modulated_phase_weights(conv) -> tuple[torch.Tensor, None]:
    return bilinear_phase_weights(conv.weight[0]), None


def bilinear_upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             phases: torch.Tensor, phase_bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), weight,
    bias, padding=1) for a 3x3 weight, from x itself: no upsampled copy (4 times x) to write and
    read again. `phases`, `phase_bias`: bilinear_phase_weights(weight) and the bias four times.

    Each output phase (even or odd row, even or odd column) is a 3x3 convolution of x whose
    taps mix the kernel's (_BILINEAR_PHASES); the four run as one convolution of x padded by
    replication (the x2 repeats the edge pixel), with four times the output channels, and one
    copy through a strided view interleaves them into an output of x's layout. The same FLOPs.
    Only the first and last output rows and columns differ: there the convolution's zero
    padding meets the upsampled map, not a replicated edge. They are computed again from the
    upsampled ends of x (two rows or columns at each end, x2 as F.interpolate does), rows
    first, then columns, corners included. Float rounding differs from the upsampled form."""
    n, _, h, w = x.shape
    if h < 2 or w < 2:
        return F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), weight, bias,
                        padding=1)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    four = F.conv2d(padded, phases, phase_bias)  # (n, 4 c, h, w)
    c = four.shape[1] // 4
    # out[:, k, 2i + a, 2j + b] = four[:, 4k + 2a + b, i, j]
    sn, sc, sh, sw = four.stride()
    out = _like(x, (n, c, 2 * h, 2 * w), four.dtype)
    out.view(n, c, h, 2, w, 2).copy_(four.as_strided((n, c, h, 2, w, 2), (sn, 4 * sc, sh, 2 * sc, sw, sc)))
    for dim in (2, 3):
        size = x.shape[dim]
        ends = torch.cat([x.narrow(dim, 0, 2), x.narrow(dim, size - 2, 2)], dim)
        up = F.interpolate(ends, scale_factor=2, mode="bilinear", align_corners=False)  # 8 along dim
        # upsampled rows 0, 1 and 2h-2, 2h-1 (x2 of two rows gives the first two exactly, of the
        # last two the last two); zero-padded, the first output is row 0's, the last row 2h-1's
        strip = torch.cat([up.narrow(dim, 0, 2), up.narrow(dim, 6, 2)], dim)
        edge = F.conv2d(strip, weight, bias, padding=1)
        take = [slice(None)] * 4
        take[dim] = slice(None, None, 3)
        put = [slice(None)] * 4
        put[dim] = slice(None, None, out.shape[dim] - 1)
        out[tuple(put)] = edge[tuple(take)]
    return out


def _phases_up_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GFPGAN's ResBlock (mode "up") with its x2 and second convolution as
    bilinear_upsample_conv2d, and its 1x1 skip convolution before the x2 instead of after it
    (both are linear per pixel, so they commute): the skip's x2 resamples its output channels,
    half of its input's or as many."""
    out = F.leaky_relu_(self.conv1(x), negative_slope=0.2)
    phases, phase_bias = _derived(self.conv2, "_bilinear_phases", _conv_phase_weights)
    out = F.leaky_relu_(bilinear_upsample_conv2d(out, self.conv2.weight, self.conv2.bias, phases, phase_bias),
                        negative_slope=0.2)
    return out + _interpolate(self.skip(x), scale_factor=2, mode="bilinear", align_corners=False)


def _derived(conv: torch.nn.Module, name: str, make: Callable):
    """make(conv): tensors derived from a layer's weight and bias, kept in the layer under
    `name` until either is replaced or changed (norm folding swaps them, a layout change or an
    in-place load rewrites them).

    Computed in place, not kept, where a kept value would be wrong: in code torch.compile
    traces (it cannot read the key; the graph then computes them every pass, fused) and during
    a CUDA graph capture (the capture records kernels without running them, so the kept tensor
    would hold nothing until the first replay; GraphedForward's warm-up passes run first, so a
    capture finds them made)."""
    if torch.compiler.is_compiling():
        return make(conv)
    sources = (conv.weight, getattr(conv, "bias", None))
    key = tuple(_tensor_key(t) for t in sources)
    cached = conv.__dict__.get(name)
    if cached is not None and cached[0] == key and all(
            ref is None or ref() is tensor for ref, tensor in zip(cached[1], sources)):
        return cached[2]
    with torch.no_grad():
        value = make(conv)
    if not _capturing(conv.weight.device):
        conv.__dict__[name] = (key, tuple(None if t is None else weakref.ref(t) for t in sources), value)
    return value


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph capture is under way on `device`'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What identifies a tensor's current values: its memory, its in-place writes (an inference
    tensor counts none), its type, device and layout."""
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:  # an inference tensor: it cannot be written outside inference mode
        version = None
    return (t.data_ptr(), version, t.dtype, t.device, tuple(t.shape), t.stride())


def _is_upsampling(scale_func) -> bool:
    """A facexlib ConvLayer's scale_func that doubles the image (nearest), ours or routed."""
    calls = getattr(getattr(scale_func, "__code__", None), "co_names", ())
    return getattr(scale_func, "_routed", False) or "interpolate" in calls


def _parse_conv_layer_forward(self, x: torch.Tensor) -> torch.Tensor:
    """facexlib's ConvLayer.forward with upsample_conv2d in place of its x2 upsampling, padding
    and convolution (parse_upsample "phases"), or border_conv2d in place of its padding and
    convolution (parse_padding "border")."""
    if self.parse_form == "phases":
        out = upsample_conv2d(x, self.conv2d)
    else:
        out = self.scale_func(x)
        if min(out.shape[2:]) >= BORDER_MIN_SIZE:
            out = border_conv2d(out, self.conv2d, self.border_pad)
        else:  # small maps: their padding pass is cheap, the strips' share of the work is not
            out = self.conv2d(self.reflection_pad(out))
    return self.relu(self.norm(out))


def set_parse_forms(parser: torch.nn.Module | None, padding: str = "reflect",
                    upsample: str = "nearest") -> None:
    """Switch ParseNet's convolution layers to `padding` ("reflect": their own padding pass;
    "border": border_conv2d) and their x2 layers to `upsample` ("nearest": upsample, pad,
    convolve; "phases": upsample_conv2d)."""
    if padding not in PARSE_PADDINGS:
        raise ValueError(f"parse_padding must be one of {PARSE_PADDINGS}, got {padding!r}")
    if upsample not in PARSE_UPSAMPLES:
        raise ValueError(f"parse_upsample must be one of {PARSE_UPSAMPLES}, got {upsample!r}")
    if not isinstance(parser, torch.nn.Module):
        return
    from facexlib.parsing.parsenet import ConvLayer

    # Norm folding finds its conv -> batch-norm pairs by tracing the layers' own forward: made
    # before any layer takes another form, whose strips and phases fx cannot trace.
    NormFolding.of(parser)
    for module in parser.modules():
        if not isinstance(module, ConvLayer):
            continue
        module.__dict__.pop("forward", None)
        pad = getattr(module.reflection_pad, "original", module.reflection_pad)
        conv = module.conv2d
        fits = (module.use_pad and isinstance(pad, torch.nn.ReflectionPad2d) and len(set(pad.padding)) == 1
                and tuple(conv.padding) == (0, 0) and conv.padding_mode == "zeros"
                and tuple(conv.dilation) == (1, 1)
                and all(k == 2 * pad.padding[0] + 1 for k in conv.kernel_size))
        if not fits:
            continue
        up = _is_upsampling(module.scale_func)
        if up and upsample == "phases" and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1):
            module.parse_form = "phases"
        elif padding == "border":
            module.parse_form, module.border_pad = "border", int(pad.padding[0])
        else:
            continue
        module.forward = _parse_conv_layer_forward.__get__(module)


def prepare_resampling(parser: torch.nn.Module | None) -> None:
    """Make GFPGAN's archs and ParseNet's pad and upsampling layers follow `resampling_forms`.

    Idempotent; with fast resampling off, every layer computes exactly what it did before."""
    _install_resampling_hooks()
    if not isinstance(parser, torch.nn.Module):
        return
    for module in parser.modules():
        pad = getattr(module, "reflection_pad", None)
        if isinstance(pad, torch.nn.ReflectionPad2d) and len(set(pad.padding)) == 1:
            module.reflection_pad = _FastReflectionPad(pad)
        scale = getattr(module, "scale_func", None)
        # facexlib's ConvLayer(scale='up') keeps `lambda x: nn.functional.interpolate(x, 2, nearest)`
        calls = getattr(getattr(scale, "__code__", None), "co_names", ())
        if callable(scale) and "interpolate" in calls and not getattr(scale, "_routed", False):
            routed = functools.partial(_interpolate, scale_factor=2, mode="nearest")
            routed._routed = True
            module.scale_func = routed


@contextlib.contextmanager
def resampling_forms(fast: bool = False, keep_dtype: bool = False):
    """While inside, the prepared networks resample and pad with the functions above (`fast`),
    and resample a bf16 map in bf16 (`keep_dtype`: SpeedOptions.resample_dtype "compute").

    Inside code being compiled it changes nothing (the compiler can set neither a context
    variable nor a global): CompiledForward enters it around the compiled call instead."""
    global _fast_traced, _keep_dtype_traced
    if torch.compiler.is_compiling():
        yield
        return
    token, before = _FORMS.set((fast, keep_dtype)), (_fast_traced, _keep_dtype_traced)
    _fast_traced, _keep_dtype_traced = fast, keep_dtype
    try:
        yield
    finally:
        _FORMS.reset(token)
        _fast_traced, _keep_dtype_traced = before


# -- normalisation layers folded away ------------------------------------------------------------


class _Leaves(torch.fx.Tracer):
    """fx's tracer, keeping our stand-in modules whole (their forward reads a context variable,
    which tracing would bake in); only the graph's conv -> batch-norm edges are wanted."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, _FastReflectionPad) or super().is_leaf_module(m, qualname)


def _same(x):
    return x


def _is_times_one(fn) -> bool:
    """A one-argument lambda whose whole body multiplies by the constant 1.0 (facexlib's
    `lambda x: x * 1.0`, ParseNet's stand-in for "no norm" and "no activation")."""
    code = getattr(fn, "__code__", None)
    if code is None or getattr(fn, "__name__", "") != "<lambda>" or code.co_argcount != 1 or code.co_names:
        return False
    if [c for c in code.co_consts if c is not None] != [1.0]:
        return False
    probe = torch.tensor([-2.5, 0.0, 3.0])
    return torch.equal(fn(probe), probe)


class NormFolding:
    """A network's normalisation layers folded away, switchable on and off in place:

    - every eval-mode BatchNorm2d whose input is a Conv2d's output (used by nothing else) is
      folded into that convolution. In eval mode batch norm is a per-channel affine map, so
      conv + BN is one convolution with weight W * g / sqrt(var + eps) and bias
      (b - mean) * g / sqrt(var + eps) + beta (computed in float64);
    - every `lambda x: x * 1.0` layer (ParseNet's "none" norm and activation) is dropped.

    Each removed layer was one operator and one full read and write of an activation map:
    RetinaFace has 73 conv + BN pairs; ParseNet 36 pairs and 40 multiplications by one. The
    modules keep their names; the removed layers are put back when unfolded.
    """

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self.folded = False
        self._pairs: list[tuple[torch.nn.Conv2d, torch.nn.Module, str, torch.nn.BatchNorm2d]] = []
        self._ones = [(module, name, fn) for module in net.modules()
                      for name, fn in list(vars(module).items()) if _is_times_one(fn)]
        try:
            graph = _Leaves().trace(net)
        except Exception as error:  # a network fx cannot trace (a test's stand-in): no pairs
            log.debug("norm folding: %s not traceable (%s)", type(net).__name__, error)
            graph = torch.fx.Graph()
        for node in graph.nodes:
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            source = node.args[0]
            if source.op != "call_module" or len(source.users) != 1:
                continue
            bn, conv = net.get_submodule(node.target), net.get_submodule(source.target)
            if type(bn) is torch.nn.BatchNorm2d and type(conv) is torch.nn.Conv2d and \
                    bn.track_running_stats and bn.num_features == conv.out_channels:
                parent, _, name = node.target.rpartition(".")
                self._pairs.append((conv, net.get_submodule(parent), name, bn))
        self._originals = [(conv.weight, conv.bias) for conv, *_ in self._pairs]

    @property
    def pairs(self) -> int:
        return len(self._pairs)

    @property
    def times_one(self) -> int:
        return len(self._ones)

    @classmethod
    def of(cls, net: torch.nn.Module) -> "NormFolding":
        """The folding of `net`, made once per network (pipelines that share a network share it)."""
        folding = net.__dict__.get("_norm_folding")
        if folding is None:
            folding = cls(net)
            net.__dict__["_norm_folding"] = folding
        return folding

    @torch.no_grad()
    def set(self, on: bool) -> None:
        if on == self.folded:
            return
        for (conv, parent, name, bn), (weight, bias) in zip(self._pairs, self._originals):
            if on:
                scale = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
                base = bias.double() if bias is not None else torch.zeros_like(scale)
                folded_w = weight.double() * scale.view(-1, *[1] * (weight.dim() - 1))
                folded_b = (base - bn.running_mean.double()) * scale + bn.bias.double()
                conv.weight = torch.nn.Parameter(folded_w.to(weight.dtype).contiguous(
                    memory_format=_layout_of(weight)), requires_grad=False)
                conv.bias = torch.nn.Parameter(folded_b.to(weight.dtype), requires_grad=False)
                setattr(parent, name, torch.nn.Identity())
            else:
                conv.weight, conv.bias = weight, bias
                setattr(parent, name, bn)
        for module, name, fn in self._ones:
            setattr(module, name, _same if on else fn)
        self.folded = on


def _layout_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def set_norm_folding(net: torch.nn.Module | None, on: bool) -> NormFolding | None:
    """Fold (or unfold) `net`'s normalisation layers; returns its NormFolding (None: not a
    module)."""
    if not isinstance(net, torch.nn.Module):
        return None
    folding = NormFolding.of(net)
    folding.set(on)
    return folding
