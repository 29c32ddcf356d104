"""The background upsampler: Real-ESRGAN (basicsr's RRDBNet) on the device, for the whole crop.

When a face comes back larger than it went in (`output_size` 512 or 1024 from a 256 crop), the
area around the pasted face is the input enlarged. By default that is a Lanczos resize; with
`background: realesrgan` it is Real-ESRGAN, run as Real-ESRGAN's own `RealESRGANer.enhance`
runs it (GFPGANer's `bg_upsampler`), on a batch at once:
  BGR -> RGB in [0, 1]; reflect-pad `PRE_PAD` pixels right and bottom (and to an even size for
  the x2 model, which folds 2x2 pixels into channels); the network; crop; clamp to [0, 1];
  back to BGR 0..255, rounded; then Lanczos-4 to the output size when that is not the
  network's own scale (RealESRGANer's `outscale`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import server.compat  # noqa: F401  (must precede basicsr)
import torch
import torch.nn.functional as F

from server import imageops

log = logging.getLogger(__name__)

#: RealESRGANer's default reflect padding before the network, in input pixels.
PRE_PAD = 10
_EXPECTED = ("a Real-ESRGAN RRDBNet checkpoint (RealESRGAN_x2plus.pth or RealESRGAN_x4plus.pth, "
             "a dict with 'params_ema' or 'params')")


@dataclass
class BackgroundUpsampler:
    """A loaded Real-ESRGAN network and its scale; `__call__` upsamples a batch."""

    net: torch.nn.Module
    scale: int
    name: str
    sha256: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """(N, 3, H, W) BGR 0..255 float -> (N, 3, size, size) BGR 0..255, whole values."""
        if images.shape[0] == 0:
            return images.new_zeros((0, 3, size, size))
        height, width = images.shape[-2:]
        x = images.flip(1) / 255.0
        x = F.pad(x, (0, PRE_PAD, 0, PRE_PAD), mode="reflect")
        mod = {2: 2, 1: 4}.get(self.scale)
        pad_h = pad_w = 0
        if mod is not None:
            pad_h, pad_w = (-x.shape[-2]) % mod, (-x.shape[-1]) % mod
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        weight = next(self.net.parameters())
        out = self.net(x.to(weight.dtype)).float()
        out = out[:, :, :height * self.scale, :width * self.scale].clamp(0, 1)
        out = (out.flip(1) * 255.0).round()
        if size != height * self.scale:
            out = imageops.resize(out, size, "lanczos4").round().clamp(0, 255)
        return out


def rrdbnet_config(state_dict: dict[str, torch.Tensor], path: Path | str = "<state dict>") -> dict[str, Any]:
    """RRDBNet's constructor arguments, read off the state dict. The x2 and x1 models fold
    2x2 / 4x4 pixels into channels before the first convolution, so its input channels give the
    scale: 3 -> x4, 12 -> x2, 48 -> x1."""
    try:
        first = state_dict["conv_first.weight"]
        blocks = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.rdb1\.", k))})
        grow = int(state_dict["body.0.rdb1.conv1.weight"].shape[0])
        out_ch = int(state_dict["conv_last.weight"].shape[0])
    except (KeyError, IndexError) as error:
        raise ValueError(f"{path}: not an RRDBNet ({type(error).__name__}: {error}); expected {_EXPECTED}") from None
    in_ch = int(first.shape[1])
    scale = {3: 4, 12: 2, 48: 1}.get(in_ch)
    if scale is None or out_ch != 3:
        raise ValueError(f"{path}: an RRDBNet with {in_ch} input and {out_ch} output channels is not "
                         f"a 3-channel Real-ESRGAN x1/x2/x4 model; expected {_EXPECTED}")
    return dict(num_in_ch=3, num_out_ch=3, num_feat=int(first.shape[0]), num_block=len(blocks),
                num_grow_ch=grow, scale=scale)


def load_realesrgan(path: str | Path, device: torch.device | str) -> BackgroundUpsampler:
    """Load a Real-ESRGAN RRDBNet checkpoint (x2plus, x4plus, or another size) onto `device`."""
    from basicsr.archs.rrdbnet_arch import RRDBNet

    from server.model import ModelLoadError, _load_strict, _read_checkpoint, _ready
    from server.weights import sha256_file

    path = Path(path)
    checkpoint = _read_checkpoint(path, _EXPECTED)
    key = next((k for k in ("params_ema", "params") if isinstance(checkpoint, dict) and k in checkpoint), None)
    if key is None:
        raise ModelLoadError(f"{path} has no 'params_ema' or 'params' entry; expected {_EXPECTED}")
    state_dict = checkpoint[key]
    try:
        config = rrdbnet_config(state_dict, path)
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    net = RRDBNet(**config)
    _load_strict(net, state_dict, path, _EXPECTED)
    net = _ready(net, device)
    sha256 = sha256_file(path)
    log.info("loaded the background upsampler %s (RRDBNet x%d, %d blocks) from %s, sha256 %s",
             path.stem, config["scale"], config["num_block"], path, sha256[:12])
    return BackgroundUpsampler(net=net, scale=config["scale"], name=path.stem, sha256=sha256,
                               path=path.absolute(), config=config)
