"""Loading the networks from local files: the face restorer (recognised from its keys: GFPGAN
v1.2-v1.4 "clean", GFPGAN v1 "original", RestoreFormer), RetinaFace, ParseNet.

Files are read with `torch.load(weights_only=True)` only; every failure is a `ModelLoadError`
naming the file and what was expected. Nothing here downloads or looks at the working directory.
"""
from __future__ import annotations

import logging
import pickle
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import server.compat  # noqa: F401  (must precede gfpgan/basicsr/facexlib)
import torch
from facexlib.detection.retinaface import RetinaFace
from facexlib.parsing.parsenet import ParseNet
from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

from contract.types import RestorerInfo
from server.jobs import ModelInfo
from server.weights import KNOWN_WEIGHTS, WeightPaths, known_hash_warning, sha256_file

log = logging.getLogger(__name__)

#: The only face size the service runs: GFPGAN v1.3/v1.4 restore 512x512 template-aligned faces.
FACE_SIZE = 512
ARCHITECTURE = "GFPGANv1Clean"
#: The same architecture in GFPGANer's words (its `arch` argument), as callers configure it.
GFPGANER_ARCH = "clean"
_EXPECTED_GFPGAN = ("a face restorer checkpoint: GFPGAN v1.3/v1.4 (GFPGANv1Clean, e.g. GFPGANv1.4.pth), "
                    "v1.2 (GFPGANCleanv1-NoCE-C2.pth), v1 (GFPGANv1.pth) or RestoreFormer "
                    "(RestoreFormer.pth)")
#: CodeFormer's weights and code: non-commercial use only, so it loads only when enabled.
CODEFORMER_LICENCE = "S-Lab-1.0 (non-commercial)"
#: Each architecture: (class name, GFPGANer's arch name, licence of the weights and code).
ARCHITECTURES = {
    "clean": ("GFPGANv1Clean", "clean", "Apache-2.0"),
    "original": ("GFPGANv1", "original", "Apache-2.0"),
    "restoreformer": ("RestoreFormer", "RestoreFormer", "Apache-2.0"),
    "codeformer": ("CodeFormer", "CodeFormer", CODEFORMER_LICENCE),
}
_EXPECTED_DETECTION = "facexlib's RetinaFace resnet50 weights (detection_Resnet50_Final.pth)"
_EXPECTED_PARSING = "facexlib's ParseNet weights (parsing_parsenet.pth)"

# Keys every GFPGANv1Clean state dict has, whatever its width: enough to recognise the family.
_GFPGAN_SIGNATURE = (
    "conv_body_first.weight",
    "final_linear.weight",
    "condition_scale.0.0.weight",
    "stylegan_decoder.constant_input.weight",
    "stylegan_decoder.style_mlp.1.weight",
    "stylegan_decoder.to_rgbs.0.modulated_conv.weight",
)


class ModelLoadError(RuntimeError):
    """A weights file could not be loaded; the message names the file and what was expected."""


@dataclass
class Restorer:
    """A loaded face restorer (GFPGAN v1 to v1.4, RestoreFormer or CodeFormer) and what it is:
    the rest of the service talks to this.

    `net` is in eval mode on its device with gradients off, and is called as `net(x, **kwargs)[0]`;
    `config` holds the constructor arguments recognised from the file (GFPGAN's out_size,
    num_style_feat, channel_multiplier, narrow, ...; RestoreFormer's and CodeFormer's sizes).
    """

    net: torch.nn.Module
    name: str  # "GFPGANv1.4"
    version: str  # "1.4", or "custom" for a file of unknown origin
    sha256: str
    config: dict[str, Any]
    path: Path
    architecture: str = ARCHITECTURE
    #: Input and output: (N, 3, 512, 512) RGB in [-1, 1].
    face_size: int = FACE_SIZE
    #: bf16 works; fp16 is reported to give blank or solid-colour faces (GFPGAN #483).
    supports_bfloat16: bool = True
    supports_half: bool = False
    #: Things the operator should hear about (e.g. a known file name with another hash); the
    #: caller logs them.
    warnings: list[str] = field(default_factory=list)
    #: GFPGANer's name for the architecture (its `arch` argument): clean, original, RestoreFormer.
    arch: str = GFPGANER_ARCH
    licence: str = "Apache-2.0"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def has_noise(self) -> bool:
        """A StyleGAN2 decoder with per-layer noise (GFPGAN): `random_noise` means something."""
        return hasattr(self.net, "stylegan_decoder")

    @property
    def id(self) -> str:
        return model_id(self.name)

    def restorer_info(self) -> RestorerInfo:
        """This restorer as GetInfo lists it."""
        return RestorerInfo(id=self.id, name=self.name, version=self.version, arch=self.arch,
                            weights_sha256=self.sha256, model_file=self.path.name,
                            channel_multiplier=int(self.config.get("channel_multiplier", 0)),
                            licence=self.licence, native_size=self.face_size,
                            random_noise=self.has_noise, fidelity_weight=self.arch == "CodeFormer")

    def model_info(self, dtype: torch.dtype | str) -> ModelInfo:
        """What GetInfo and the model_info metric report, for the dtype the pipeline runs in."""
        dtype_name = str(dtype).removeprefix("torch.")
        return ModelInfo(model_name=self.name, model_version=self.version,
                         weights_sha256=self.sha256, device=str(self.device), dtype=dtype_name,
                         model_file=self.path.name, arch=self.arch,
                         channel_multiplier=int(self.config.get("channel_multiplier", 0)))


@dataclass
class LoadedModels:
    """Everything the pipeline runs, loaded once per process and shared by every batch."""

    gfpgan: Restorer
    detector: RetinaFace
    parser: ParseNet


def load_models(paths: WeightPaths, device: torch.device | str, allow_codeformer: bool = False) -> LoadedModels:
    """Load the default restorer, RetinaFace and ParseNet from `paths` (see
    `server.weights.ensure_weights`)."""
    return LoadedModels(
        gfpgan=load_restorer(paths.gfpgan, device, allow_codeformer=allow_codeformer),
        detector=load_retinaface(paths.detection, device),
        parser=load_parsenet(paths.parsing, device),
    )


# -- GFPGAN -------------------------------------------------------------------------------------


class CodeFormerNet(torch.nn.Module):
    """CodeFormer behind the restorers' call, `net(x, **kwargs)[0]`, with its fidelity weight
    `w` (0: most restored, 1: most faithful) and CodeFormer's own inference settings (adain)."""

    takes_fidelity_weight = True

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.codeformer = net

    def forward(self, x: torch.Tensor, w: float = 0.5, **_ignored) -> tuple[torch.Tensor]:
        return (self.codeformer(x, weight=float(w))[0],)


def load_restorer(path: str | Path, device: torch.device | str, allow_codeformer: bool = False) -> Restorer:
    """Load a face restorer checkpoint (`params_ema`, else `params`) onto `device`, its
    architecture and sizes recognised from the state dict's keys and shapes: GFPGANv1Clean (v1.2,
    v1.3, v1.4) of any width, the original GFPGANv1 (StyleGAN2 ops in plain torch,
    server/stylegan_ops.py) or RestoreFormer. Anything else is refused, naming what it looks like."""
    path = Path(path)
    checkpoint = _read_checkpoint(path, _EXPECTED_GFPGAN)
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(
            f"{path} holds a {type(checkpoint).__name__}, not a dict; expected {_EXPECTED_GFPGAN}, "
            "which is a dict with a 'params_ema' or 'params' state dict")
    key = "params_ema" if "params_ema" in checkpoint else "params" if "params" in checkpoint else None
    if key is None:
        found = ", ".join(map(repr, list(checkpoint)[:5])) or "none"
        hint = (" (it looks like a bare state dict: save it as {'params_ema': state_dict})"
                if "stylegan_decoder.constant_input.weight" in checkpoint
                or "encoder.conv_in.weight" in checkpoint else "")
        raise ModelLoadError(
            f"{path} has no 'params_ema' or 'params' entry (keys found: {found}){hint}; "
            f"expected {_EXPECTED_GFPGAN}")
    state_dict = checkpoint[key]
    if not isinstance(state_dict, dict):
        raise ModelLoadError(f"{path}: '{key}' holds a {type(state_dict).__name__}, not a state "
                             f"dict; expected {_EXPECTED_GFPGAN}")

    family = _family(state_dict)
    if family is None:
        _check_gfpgan_keys(path, state_dict)  # raises, naming what the file looks like
    if family == "codeformer":
        if not allow_codeformer:
            raise ModelLoadError(
                f"{path} is CodeFormer, whose weights and code are under the S-Lab License 1.0 "
                f"(non-commercial use only): the service loads it only when started with "
                f"--enable-codeformer (and installed with the codeformer extra)")
        net, config = _build_codeformer(state_dict, path)
    elif family == "restoreformer":
        config = restoreformer_config(state_dict, path)
        net = _build_restoreformer(config)
    else:
        config = gfpgan_config(state_dict, path)
        if config["out_size"] != FACE_SIZE:
            raise ModelLoadError(
                f"{path} is a GFPGAN for {config['out_size']}x{config['out_size']} faces; this "
                f"service runs the {FACE_SIZE}x{FACE_SIZE} networks only")
        net = build_gfpgan_net(family, config)
    architecture, arch, licence = ARCHITECTURES[family]
    expected = f"{architecture} ({_EXPECTED_GFPGAN})"
    _load_strict(net.codeformer if family == "codeformer" else net, state_dict, path, expected)
    net = _ready(net, device)

    sha256 = sha256_file(path)
    name, version = _identify(path, sha256)
    notes = [w for w in [known_hash_warning(path, sha256)] if w]  # the caller logs them
    log.info("loaded %s (%s, %s) from %s, sha256 %s, on %s", name, architecture, key, path,
             sha256[:12], device)
    return Restorer(net=net, name=name, version=version, sha256=sha256, config=config,
                       path=path.absolute(), warnings=notes, architecture=architecture, arch=arch,
                       licence=licence)



def _family(state_dict: dict) -> str | None:
    """clean, original or restoreformer, from keys only GFPGANv1Clean, GFPGANv1 or RestoreFormer have."""
    if all(key in state_dict for key in _GFPGAN_SIGNATURE):
        return "clean"
    if ("conv_body_first.0.weight" in state_dict and "stylegan_decoder.constant_input.weight" in state_dict
            and "final_linear.weight" in state_dict):
        return "original"
    if all(key in state_dict for key in ("encoder.conv_in.weight", "quantize.embedding.weight",
                                          "quant_conv.weight", "decoder.conv_out.weight")):
        return "restoreformer"
    if all(key in state_dict for key in ("position_emb", "idx_pred_layer.1.weight", "quantize.embedding.weight",
                                          "ft_layers.0.self_attn.in_proj_weight", "encoder.blocks.0.weight")):
        return "codeformer"
    return None


def _build_codeformer(state_dict: dict, path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """CodeFormer through spandrel, which reads its sizes off the state dict (transformer width
    and depth, codebook size, which levels are fused); the architecture itself comes from
    spandrel-extra-arches (CodeFormer's own licence). The attention head count leaves no trace
    in the weights: spandrel assumes the published 8."""
    try:
        import spandrel
        import spandrel_extra_arches
    except ImportError as error:
        raise ModelLoadError(f"{path} is CodeFormer, which needs the codeformer extra: pip install "
                             f"'gfpgan-service[codeformer]' ({error})") from None
    spandrel_extra_arches.install(ignore_duplicates=True)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except Exception as error:  # noqa: BLE001 - spandrel raises several kinds for a bad file
        raise ModelLoadError(f"{path} looks like CodeFormer but does not load ({type(error).__name__}: "
                             f"{error})") from None
    net = descriptor.model
    config = dict(dim_embd=int(state_dict["position_emb"].shape[1]),
                  codebook_size=int(state_dict["idx_pred_layer.1.weight"].shape[0]),
                  n_layers=len(_indices(state_dict, "ft_layers.", ".self_attn.in_proj_weight")),
                  connect_list=list(net.connect_list), n_head=8)
    return CodeFormerNet(net), config


def build_gfpgan_net(family: str, config: dict[str, Any]) -> torch.nn.Module:
    """GFPGANv1Clean ("clean") or GFPGANv1 ("original", with the plain-torch StyleGAN2 ops)."""
    if family == "clean":
        return GFPGANv1Clean(decoder_load_path=None, fix_decoder=False, input_is_latent=True, **config)
    from server import stylegan_ops

    stylegan_ops.install()
    from gfpgan.archs.gfpganv1_arch import GFPGANv1

    return GFPGANv1(decoder_load_path=None, fix_decoder=True, input_is_latent=True, **config)


def restoreformer_config(state_dict: dict[str, torch.Tensor], path: str | Path = "<state dict>") -> dict[str, Any]:
    """RestoreFormer's constructor arguments, read off the state dict. The number of attention
    heads (head_size) leaves no trace in the weights: the published model's 8 is assumed."""
    try:
        ch = int(state_dict["encoder.conv_in.weight"].shape[0])
        levels = _indices(state_dict, "encoder.down.", ".block.0.conv1.weight")
        widths = [int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
        blocks = _indices(state_dict, "encoder.down.0.block.", ".conv1.weight")
        n_embed, embed_dim = (int(v) for v in state_dict["quantize.embedding.weight"].shape)
        z_channels = int(state_dict["quant_conv.weight"].shape[1])
        z_out = int(state_dict["encoder.conv_out.weight"].shape[0])
        attn = tuple(512 // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.norm1.weight" in state_dict)
    except (KeyError, IndexError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot read RestoreFormer's layer sizes ({type(error).__name__}: "
                             f"{error}); expected {_EXPECTED_GFPGAN}") from None
    return dict(n_embed=n_embed, embed_dim=embed_dim, ch=ch,
                ch_mult=tuple(w // ch for w in widths), num_res_blocks=len(blocks),
                attn_resolutions=attn, resolution=FACE_SIZE, z_channels=z_channels,
                double_z=z_out == 2 * z_channels,
                enable_mid="encoder.mid.block_1.conv1.weight" in state_dict, head_size=8)


def _build_restoreformer(config: dict[str, Any]) -> torch.nn.Module:
    import contextlib
    import io

    from gfpgan.archs.restoreformer_arch import RestoreFormer

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Working with z of shape ..."
        return RestoreFormer(**config)


def gfpgan_config(state_dict: dict[str, torch.Tensor], path: str | Path = "<state dict>") -> dict[str, Any]:
    """GFPGANv1Clean's constructor arguments, read off the state dict's keys and shapes.

    Widths follow from the architecture's channel table: the decoder's 4x4 level has
    int(512 * narrow) channels, its 512x512 level int(32 * channel_multiplier * narrow); there is
    one to-RGB layer per level from 8x8 up to out_size.
    """
    decoder = "stylegan_decoder."
    try:
        to_rgbs = _indices(state_dict, decoder + "to_rgbs.", ".modulated_conv.weight")
        mlp = _indices(state_dict, decoder + "style_mlp.", ".weight")
        narrow = state_dict[decoder + "constant_input.weight"].shape[1] / 512
        last_rgb = state_dict[f"{decoder}to_rgbs.{to_rgbs[-1]}.modulated_conv.weight"].shape[2]
        channel_multiplier = round(last_rgb / (32 * narrow))
        out_size = 2 ** (len(to_rgbs) + 2)
        num_style_feat = int(state_dict[decoder + "style_mlp.1.weight"].shape[1])
        num_latents = int(state_dict["final_linear.weight"].shape[0]) // num_style_feat
        sft_in, sft_out = (state_dict[f"condition_scale.0.{i}.weight"].shape[0] for i in (0, 2))
    except (KeyError, IndexError, ZeroDivisionError, AttributeError) as error:
        raise ModelLoadError(f"{path}: cannot read the layer sizes ({type(error).__name__}: "
                             f"{error}); expected {_EXPECTED_GFPGAN}") from None
    if narrow <= 0 or channel_multiplier < 1:
        raise ModelLoadError(f"{path}: layer widths do not fit GFPGANv1Clean (narrow={narrow}, "
                             f"channel_multiplier={channel_multiplier}); expected {_EXPECTED_GFPGAN}")
    return dict(
        out_size=out_size,
        num_style_feat=num_style_feat,
        channel_multiplier=int(channel_multiplier),
        narrow=narrow,
        num_mlp=len(mlp),
        # One style vector per decoder layer (v1.3/v1.4) or one shared by all of them.
        different_w=num_latents > 1,
        # SFT on half the channels makes the condition layers keep their width.
        sft_half=sft_out == sft_in,
    )


def _check_gfpgan_keys(path: Path, state_dict: dict) -> None:
    missing = [key for key in _GFPGAN_SIGNATURE if key not in state_dict]
    if not missing:
        return
    expected = _reference_gfpgan_keys()
    # The signature keys first: they say most about what a GFPGANv1Clean file looks like.
    absent = missing + sorted(expected - state_dict.keys() - set(missing))
    unexpected = sorted(state_dict.keys() - expected)
    raise ModelLoadError(
        f"{path} is not {_EXPECTED_GFPGAN}{_guess_family(state_dict)}: "
        f"{len(absent)} expected keys missing (e.g. {', '.join(absent[:4])}); "
        f"{len(unexpected)} unexpected keys (e.g. {', '.join(map(str, unexpected[:4]))})")


def _guess_family(state_dict: dict) -> str:
    keys = list(state_dict)
    if any(k.startswith("conv_body_first.0.") or ".activate.bias" in k for k in keys):
        return " (it looks like the original GFPGAN v1, GFPGANv1.pth, with layers missing)"
    if "position_emb" in state_dict or any(k.startswith("ft_layers.") for k in keys):
        return " (it looks like CodeFormer, with layers missing)"
    if any(k.startswith(("quantize.", "encoder.conv_in.")) for k in keys):
        return " (it looks like a VQ-based restorer such as RestoreFormer, with layers missing)"
    return ""


@lru_cache(maxsize=1)
def _reference_gfpgan_keys() -> frozenset[str]:
    # Key names do not depend on the width, so the narrowest network that builds will do.
    net = GFPGANv1Clean(out_size=FACE_SIZE, num_style_feat=512, channel_multiplier=2,
                        decoder_load_path=None, fix_decoder=False, num_mlp=8, input_is_latent=True,
                        different_w=True, narrow=1 / 32, sft_half=True)
    return frozenset(net.state_dict())


def _indices(state_dict: dict, prefix: str, suffix: str) -> list[int]:
    """The N in every key `<prefix>N<suffix>`, sorted."""
    regex = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    return sorted(int(m.group(1)) for key in state_dict if (m := regex.fullmatch(key)))


#: Published file names that do not say their version the GFPGANv<version> way.
_NAMES_BY_STEM = {"GFPGANCleanv1-NoCE-C2": ("GFPGANv1.2", "1.2"), "RestoreFormer": ("RestoreFormer", "1.0"),
                  "codeformer": ("CodeFormer", "0.1.0")}


def _identify(path: Path, sha256: str) -> tuple[str, str]:
    """(name, version): from the published hash when it matches, else from the file name."""
    stem = path.stem
    for entry in KNOWN_WEIGHTS.values():
        if entry.sha256 == sha256:
            stem = Path(entry.name).stem
            break
    if stem in _NAMES_BY_STEM:
        return _NAMES_BY_STEM[stem]
    match = re.fullmatch(r"GFPGANv(\d+(?:\.\d+)*)", stem)
    return stem, match.group(1) if match else "custom"


def model_id(name: str) -> str:
    """The id requests name a model by: "gfpgan-1.4", "gfpgan-1", "restoreformer", or the
    file's stem in lower case for a file of unknown origin."""
    match = re.fullmatch(r"GFPGANv(\d+(?:\.\d+)*)", name)
    return f"gfpgan-{match.group(1)}" if match else name.lower()


# -- facexlib's detector and parser -------------------------------------------------------------


def load_retinaface(path: str | Path, device: torch.device | str) -> RetinaFace:
    """facexlib's RetinaFace (resnet50, fp32) with the weights in `path`, on `device`."""
    path = Path(path)
    state_dict = _read_state_dict(path, _EXPECTED_DETECTION)
    # The published file was saved from DataParallel; facexlib strips the prefix the same way.
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    with warnings.catch_warnings():
        # torchvision's notice about resnet50(pretrained=False) inside facexlib: not actionable.
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"(The parameter 'pretrained'|Arguments other than a weight enum)")
        net = RetinaFace(network_name="resnet50", half=False, device=torch.device(device))
    _load_strict(net, state_dict, path, _EXPECTED_DETECTION)
    return _ready(net, device)


def load_parsenet(path: str | Path, device: torch.device | str) -> ParseNet:
    """facexlib's ParseNet (512 in and out, 19 classes) with the weights in `path`, on `device`."""
    path = Path(path)
    state_dict = _read_state_dict(path, _EXPECTED_PARSING)
    net = ParseNet(in_size=512, out_size=512, parsing_ch=19)
    _load_strict(net, state_dict, path, _EXPECTED_PARSING)
    return _ready(net, device)


# -- shared -------------------------------------------------------------------------------------


def _read_checkpoint(path: Path, expected: str) -> Any:
    """torch.load(weights_only=True), with every failure turned into a ModelLoadError."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist; expected {expected} there "
                             "(see --model / --weights-dir, or let the service download it)")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"weights file {path} is empty (an interrupted copy?); expected "
                             f"{expected}: delete it and download it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused:
            raise ModelLoadError(
                f"{path} contains Python objects other than tensors ({refused.group(1)}), which "
                f"are refused: unpickling them could run code. Expected {expected}; re-save just "
                "the state dict with torch.save") from None
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint (it does not unpickle; an HTML "
                             f"error page or another format?); expected {expected}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{path} could not be read ({first_line}): the file is truncated or "
                             f"damaged; expected {expected}. Download it again") from None


def _read_state_dict(path: Path, expected: str) -> dict[str, torch.Tensor]:
    state_dict = _read_checkpoint(path, expected)
    if not isinstance(state_dict, dict) or not all(
            isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ModelLoadError(f"{path} is not a state dict of tensors; expected {expected}")
    return state_dict


def _load_strict(net: torch.nn.Module, state_dict: dict, path: Path, expected: str) -> None:
    try:
        result = net.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches are raised even when not strict
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = "; ".join(mismatches[:3]) or str(error).splitlines()[0]
        raise ModelLoadError(f"{path} does not fit {expected}: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{path} does not fit {expected}: {len(result.missing_keys)} keys missing "
            f"(e.g. {', '.join(result.missing_keys[:4])}), {len(result.unexpected_keys)} "
            f"unexpected (e.g. {', '.join(result.unexpected_keys[:4])})")


def _ready(net: torch.nn.Module, device: torch.device | str):
    """Inference only: eval mode, no gradients, on the device."""
    net.eval().requires_grad_(False)
    return net.to(torch.device(device))
