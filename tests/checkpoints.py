"""Random-valued checkpoints of the real GFPGAN, RetinaFace and ParseNet architectures.

Tests load these through the service's own loaders (and GFPGAN's reference code), so no real
weights are needed; they are saved in the same layout as the published files.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import server.compat  # noqa: F401  (must precede gfpgan/basicsr/facexlib)
import torch
from torch import nn
from torch.nn import functional as F
from facexlib.detection.retinaface import RetinaFace
from facexlib.parsing.parsenet import ParseNet
from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

#: The smallest width of GFPGANv1Clean that still builds and runs at 512x512: below 1/32 the
#: encoder's 512-pixel level gets int(32 * narrow) = 0 channels.
MIN_NARROW = 1 / 32
#: The width the fast tests use (21 MB, ~0.15 s per face on 2 CPU cores). Narrow networks are
#: more sensitive to sub-level input noise: +-0.5 level of uniform input noise changes the output
#: by 0.68 levels on average (max 5.1) at MIN_NARROW, 0.08 (max 2.5) here, 0.03 (max 0.3) at full
#: width. MIN_NARROW is too jumpy for parity tests between two warping implementations.
SMALL_NARROW = 1 / 16

#: GFPGANer's configuration for arch='clean' (v1.3 / v1.4), apart from `narrow`.
GFPGANER_CLEAN_CONFIG = dict(
    out_size=512,
    num_style_feat=512,
    channel_multiplier=2,
    decoder_load_path=None,
    fix_decoder=False,
    num_mlp=8,
    input_is_latent=True,
    different_w=True,
    sft_half=True,
)

# The calibrated output's spread in [-1, 1] units on the calibration faces: other faces then
# stay mostly inside the range (at most ~7% of pixels clipped, measured over 8 faces).
_OUTPUT_STD = 0.35

GFPGAN_FILE = "GFPGANv1.4.pth"
DETECTION_FILE = "detection_Resnet50_Final.pth"
PARSING_FILE = "parsing_parsenet.pth"


@contextmanager
def _seeded(seed: int):
    """Initialise modules from `seed` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def smooth_faces(count: int, seed: int = 0, size: int = 512) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1], (count, 3, size, size): stand-ins for face crops."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def build_gfpgan(narrow: float = 1.0, seed: int = 0, noise_strength: float = 0.1) -> GFPGANv1Clean:
    """A randomly initialised GFPGANv1Clean with GFPGANer's config and non-zero noise strengths.

    A fresh network has every noise-injection strength at zero, so noise would have no effect and
    determinism would be trivially true; real checkpoints have non-zero strengths. Each StyleConv
    gets a slightly different strength so that a layer mix-up would show. The weights are then
    calibrated (see `_calibrate`) so that the output depends on the input like a trained one.
    """
    with _seeded(seed), torch.no_grad():
        net = GFPGANv1Clean(narrow=narrow, **GFPGANER_CLEAN_CONFIG).eval()
        decoder = net.stylegan_decoder
        style_convs = [decoder.style_conv1, *decoder.style_convs]
        for index, conv in enumerate(style_convs):
            conv.weight.fill_(noise_strength * (1.0 + index / len(style_convs)))
            # Zero at init as well; trained files have per-channel biases.
            conv.bias.normal_(0.0, 0.05)
        _calibrate(net, smooth_faces(2, seed=seed))
    return net


def _calibrate(net: GFPGANv1Clean, faces: torch.Tensor) -> None:
    """Data-dependent init: the output depends on the input and mostly lies inside [-1, 1].

    With PyTorch's default init the U-Net encoder shrinks its signal at every level, so the output
    of a random network hardly depends on the input (a mean change of 0.004 between two different
    faces) and a broken warp would go unnoticed. One forward pass over sample faces rescales each
    U-Net layer, in forward order, to zero-mean unit-variance outputs (scale maps to about 1, shift
    maps to about 0, like SFT in a trained model); then the to-RGB layers, which the image is
    linear in, are scaled so that the image has mean 0 and standard deviation _OUTPUT_STD.
    """
    unet_layers = [
        module
        for name, module in net.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not name.startswith("stylegan_decoder")
    ]
    last_scale_conv = {id(branch[-1]) for branch in net.condition_scale}
    last_shift_conv = {id(branch[-1]) for branch in net.condition_shift}

    def normalise(module, _inputs, output):
        # Per output channel for convolutions; over the whole layer for the linear style code,
        # whose batch is too small for per-feature statistics.
        per_channel = output.ndim == 4
        dims = (0, 2, 3) if per_channel else tuple(range(output.ndim))
        mean = output.mean(dim=dims)
        std = output.std(dim=dims).clamp_min(1e-6)
        target_std, target_mean = 1.0, 0.0
        if id(module) in last_scale_conv:
            target_std, target_mean = 0.5, 1.0
        elif id(module) in last_shift_conv:
            target_std = 0.5
        gain = target_std / std
        module.weight.mul_(gain.reshape(-1, 1, 1, 1) if per_channel else gain)
        as_output = (lambda t: t.reshape(1, -1, 1, 1)) if per_channel else (lambda t: t)
        if module.bias is None:  # the ResBlock skips: scale only
            return output * as_output(gain)
        module.bias.copy_((module.bias - mean) * gain + target_mean)
        return (output - as_output(mean)) * as_output(gain) + target_mean

    hooks = [layer.register_forward_hook(normalise) for layer in unet_layers]
    try:
        # Every layer downstream already sees the normalised outputs, so this image is the
        # calibrated network's: no second pass needed (that matters at full width on a CPU).
        image, _ = net(faces, return_rgb=False, randomize_noise=False)
    finally:
        for hook in hooks:
            hook.remove()

    decoder = net.stylegan_decoder
    gain = _OUTPUT_STD / image.std().clamp_min(1e-6)
    for to_rgb in [decoder.to_rgb1, *decoder.to_rgbs]:
        to_rgb.modulated_conv.weight.mul_(gain)
        to_rgb.bias.mul_(gain)
    # A constant added to the first RGB layer survives every upsample unchanged.
    decoder.to_rgb1.bias.sub_(image.mean(dim=(0, 2, 3)).reshape(1, 3, 1, 1) * gain)


def make_gfpgan_checkpoint(
    path: str | Path,
    narrow: float = 1.0,
    key: str = "params_ema",
    seed: int = 0,
    noise_strength: float = 0.1,
) -> Path:
    """Write `{key: state_dict}` of `build_gfpgan(narrow, seed, noise_strength)` to `path`."""
    path = Path(path)
    net = build_gfpgan(narrow=narrow, seed=seed, noise_strength=noise_strength)
    torch.save({key: net.state_dict()}, path)
    return path


def make_retinaface_checkpoint(path: str | Path, seed: int = 0, module_prefix: bool = True) -> Path:
    """Write a random resnet50 RetinaFace state dict that facexlib's init_detection_model accepts.

    The published file was saved from a DataParallel model, so its keys carry a 'module.' prefix
    that facexlib strips on load; `module_prefix=False` writes the bare keys (also accepted).
    """
    path = Path(path)
    with _seeded(seed), warnings.catch_warnings():
        # torchvision's notice about resnet50(pretrained=False) inside facexlib
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"(The parameter 'pretrained'|Arguments other than a weight enum)")
        net = RetinaFace(network_name="resnet50", half=False, device="cpu")
    prefix = "module." if module_prefix else ""
    torch.save({prefix + name: value for name, value in net.state_dict().items()}, path)
    return path


def make_parsenet_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a random ParseNet(512, 512, 19) state dict, the layout of parsing_parsenet.pth."""
    path = Path(path)
    with _seeded(seed):
        net = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    torch.save(net.state_dict(), path)
    return path


def make_weights_dir(directory: str | Path, narrow: float = SMALL_NARROW, seed: int = 0) -> Path:
    """Fill `directory` with all three files under their published names; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    make_gfpgan_checkpoint(directory / GFPGAN_FILE, narrow=narrow, seed=seed)
    make_retinaface_checkpoint(directory / DETECTION_FILE, seed=seed)
    make_parsenet_checkpoint(directory / PARSING_FILE, seed=seed)
    return directory


#: The original GFPGAN (v1, GFPGANv1.pth): GFPGANer's arch='original' configuration.
GFPGANER_ORIGINAL_CONFIG = dict(GFPGANER_CLEAN_CONFIG, fix_decoder=True)
#: The narrowest RestoreFormer that builds: its GroupNorms take 32 groups, so ch >= 32 (the
#: published model has ch=64, a 1024 x 256 codebook and z_channels=256).
SMALL_RESTOREFORMER_CONFIG = dict(ch=32, n_embed=64, embed_dim=32, z_channels=32)


def build_gfpgan_v1(narrow: float = SMALL_NARROW, seed: int = 0, noise_strength: float = 0.1):
    """A random GFPGANv1 (the original architecture, basicsr's StyleGAN2 layers) with non-zero
    noise strengths and biases, as in a trained file. Built with the plain-torch StyleGAN2 ops
    installed (server/stylegan_ops.py): basicsr's compiled ones are absent here."""
    from server import stylegan_ops

    stylegan_ops.install()
    from gfpgan.archs.gfpganv1_arch import GFPGANv1

    with _seeded(seed):
        net = GFPGANv1(narrow=narrow, **GFPGANER_ORIGINAL_CONFIG).eval()
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name.endswith("noise.weight"):
                    param.fill_(noise_strength)
                elif name.endswith("activate.bias"):
                    param.normal_(0.0, 0.05)
    return net


def build_restoreformer(seed: int = 0, **config):
    """A random RestoreFormer of SMALL_RESTOREFORMER_CONFIG (or `config`)."""
    import contextlib
    import io

    from gfpgan.archs.restoreformer_arch import RestoreFormer

    with _seeded(seed), contextlib.redirect_stdout(io.StringIO()):
        return RestoreFormer(**{**SMALL_RESTOREFORMER_CONFIG, **config}).eval()


def make_checkpoint(path: str | Path, net: torch.nn.Module, key: str = "params_ema") -> Path:
    path = Path(path)
    torch.save({key: net.state_dict()}, path)
    return path
