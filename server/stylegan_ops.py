"""StyleGAN2's two custom ops in plain torch, on every device: the fused bias + leaky ReLU and
upfirdn2d (upsample, FIR filter, downsample).

The original GFPGAN (v1, `arch: original`, GFPGANv1.pth) is built from basicsr's StyleGAN2
layers, which call these ops through basicsr's compiled CUDA extension. basicsr 1.4.2 builds that
extension only when installed with BASICSR_EXT=True (or compiled at run time with
BASICSR_JIT=True and a CUDA toolchain); on a stock install the fused leaky ReLU fails on every
device (NameError: fused_act_ext) and upfirdn2d fails on CUDA, so GFPGANer cannot run this
architecture at all. `install()` points basicsr's StyleGAN2 layers at the forms below instead.

Both are the ops' defining formulas written as torch calls, so they run wherever torch runs
(CPU, CUDA, autocast) and compile and capture into CUDA graphs like any other layer:
- fused_leaky_relu(x, b) = leaky_relu(x + b, slope) * scale, the bias along channels;
- upfirdn2d(x, k, up, down, pad): insert up-1 zeros after every pixel, pad (or crop, when
  negative) by pad[0] before and pad[1] after on both axes, correlate each channel with the
  flipped kernel (a convolution with k), keep every down-th pixel. The channels go through one
  depthwise convolution (groups = channels), where basicsr's CPU form (`upfirdn2d_native`)
  folds them into the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: The names basicsr's StyleGAN2 layers look up when they run.
_PATCHED = (
    ("basicsr.ops.fused_act.fused_act", "fused_leaky_relu"),  # FusedLeakyReLU.forward's global
    ("basicsr.archs.stylegan2_arch", "fused_leaky_relu"),     # EqualLinear, ModulatedConv...
    ("basicsr.archs.stylegan2_arch", "upfirdn2d"),            # UpFirDnUpsample/Downsample/Smooth
)


#: basicsr's own functions that install() replaced, by (module, name): for comparisons.
BASICSR_FORMS: dict[tuple[str, str], object] = {}


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = math.sqrt(2)) -> torch.Tensor:
    """leaky_relu(x + bias) * scale, `bias` added along dimension 1 (channels)."""
    shape = (1, bias.shape[0]) + (1,) * (x.dim() - 2)
    return F.leaky_relu(x + bias.view(shape).to(x.dtype), negative_slope) * scale


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """basicsr's `upfirdn2d(input, kernel, up, down, pad)` for (N, C, H, W) input, any device."""
    n, c, h, w = x.shape
    if up > 1:  # up-1 zeros after every pixel, along both axes
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    before, after = pad
    x = F.pad(x, (max(before, 0), max(after, 0), max(before, 0), max(after, 0)))
    if before < 0 or after < 0:
        x = x[:, :, max(-before, 0):x.shape[2] - max(-after, 0), max(-before, 0):x.shape[3] - max(-after, 0)]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(dtype=x.dtype, device=x.device).expand(c, 1, kh, kw)
    x = F.conv2d(x, weight, groups=c)
    return x[:, :, ::down, ::down] if down > 1 else x


def install() -> None:
    """Point basicsr's StyleGAN2 layers at the forms above (idempotent). Every model built from
    basicsr.archs.stylegan2_arch in this process, GFPGAN v1 included, then runs them."""
    import importlib

    import server.compat  # noqa: F401  (must precede basicsr)

    forms = {"fused_leaky_relu": fused_leaky_relu, "upfirdn2d": upfirdn2d}
    for module_name, name in _PATCHED:
        module = importlib.import_module(module_name)
        if getattr(module, name) is not forms[name]:
            BASICSR_FORMS.setdefault((module_name, name), getattr(module, name))
        setattr(module, name, forms[name])


def installed() -> bool:
    import importlib

    forms = {"fused_leaky_relu": fused_leaky_relu, "upfirdn2d": upfirdn2d}
    return all(getattr(importlib.import_module(m), n, None) is forms[n] for m, n in _PATCHED)
