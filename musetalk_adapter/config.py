"""GFPGAN settings for a MuseTalk run: defaults, the `gfpgan:` section of the inference YAML,
then the `--gfpgan_*` flags, in that order of precedence, checked once before the run starts.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace

from contract.types import ARCHS, MAX_DETECT_EVERY, MAX_MASK_EVERY, Alignment, Background, EnhanceOptions, InvalidRequest, ModelSpec

#: --gfpgan_upscale -> the side of the faces that come back (MuseTalk decodes 256x256 faces).
OUTPUT_SIZE_BY_UPSCALE = {1: 256, 2: 512, 4: 1024}
#: The alignments a MuseTalk crop can use: it has no landmarks to send (see MUSETALK.md).
ALIGNMENTS = {"detect": Alignment.DETECT, "aligned": Alignment.ALIGNED}
#: The name of the section in MuseTalk's inference YAML.
YAML_SECTION = "gfpgan"


class SettingsError(ValueError):
    """A GFPGAN setting that cannot work; the message names the setting and what to write."""


@dataclass(frozen=True)
class GFPGANSettings:
    """Everything the adapter needs; field names are the YAML keys."""

    enabled: bool = False
    address: str = "localhost:50051"
    upscale: int = 1
    timeout_ms: float = 2000.0
    fidelity: float = 0.0
    alignment: str = "detect"
    #: Decoded batches in flight to the service before the next decode waits for the oldest;
    #: bounds memory and keeps a slow service from turning every batch into a timeout.
    max_pending_batches: int = 4
    #: Port of this worker's Prometheus page (faces enhanced/fell back, waiting); 0 = off.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    #: Steady video: a run is one video, so the service smooths its faces' alignment over time
    #: (less lip and teeth shimmer). On by default; `steady: false` / --no-gfpgan_steady.
    steady: bool = True
    #: Steady video: detect the face on every N-th frame only and reuse the smoothed alignment
    #: between (MuseTalk's crops come from one box per video); 1 = every frame (default).
    detect_every: int = 1
    #: Steady video: compute the paste mask (face parsing, about half of the service's time per
    #: face) on every N-th frame only and reuse it between; 1 = every frame (default).
    mask_every: int = 1
    # The integration plan's (and GFPGANer's) model keys. The service runs the model; these name
    # the one the run expects, and the run stops at start when the service serves another:
    #: the checkpoint's path as the plan writes it; its file name is what is checked (and its
    #: SHA-256 too, when the file is on this machine).
    model_path: str | None = None
    #: GFPGANer's architecture name: clean, original, bilinear or RestoreFormer.
    arch: str | None = None
    #: The StyleGAN2 decoder's channel multiplier (2 for GFPGAN v1.3/v1.4).
    channel_multiplier: int | None = None
    #: Which of the service's restorers, by id (gfpgan-1.4, gfpgan-1, restoreformer, ...). Unset:
    #: the one model_path / arch / channel_multiplier fit, else the service's default.
    model: str | None = None
    #: Accepted and reported: the device is the service's business (GetInfo says which).
    device: str | None = None
    #: realesrgan (or GFPGANer's RealESRGANer object): the service upsamples the crop around
    #: the face with Real-ESRGAN (it must have one loaded: --bg-upsampler); none: Lanczos.
    bg_upsampler: str | None = None
    # Reaching a service that checks who calls (README, "Security"). The token itself comes
    # from GFPGAN_TOKEN or a file, never from this YAML or the command line.
    #: PEM CA the service's certificate must chain to: turns TLS on (GFPGAN_TLS_CA).
    tls_ca: str | None = None
    #: PEM client certificate and key, for mutual TLS (GFPGAN_CLIENT_CERT / GFPGAN_CLIENT_KEY).
    client_cert: str | None = None
    client_key: str | None = None
    #: The name in the service's certificate, when the address does not say it.
    tls_server_name: str | None = None
    #: A file holding the bearer token (GFPGAN_TOKEN_FILE; or GFPGAN_TOKEN itself).
    token_file: str | None = None

    @property
    def output_size(self) -> int:
        return OUTPUT_SIZE_BY_UPSCALE[self.upscale]

    def model_spec(self) -> ModelSpec:
        """The model the run expects (empty when none of the model keys is set)."""
        return ModelSpec(model_path=self.model_path, arch=self.arch,
                         channel_multiplier=self.channel_multiplier, model=self.model)

    def security(self):
        """The client's credentials: these settings over the GFPGAN_TLS_* / GFPGAN_TOKEN variables."""
        from client.security import Security, SecurityConfigError

        try:
            return Security.from_env(ca_file=self.tls_ca, cert_file=self.client_cert,
                                     key_file=self.client_key, server_name=self.tls_server_name,
                                     token_file=self.token_file)
        except SecurityConfigError as error:
            raise SettingsError(f"gfpgan security setting: {error}") from None

    def enhance_options(self) -> EnhanceOptions:
        return EnhanceOptions(output_size=self.output_size, alignment=ALIGNMENTS[self.alignment],
                              fidelity=float(self.fidelity), steady_video=self.steady,
                              detect_every=int(self.detect_every), mask_every=int(self.mask_every),
                              model=self.model or "",
                              background=Background.REALESRGAN if self.bg_upsampler else Background.LANCZOS)

    def _every(self, key: str, maximum: int, alignment: str, reuses: str) -> int:
        """A steady-video "every N-th frame" setting: 1 (every frame) to `maximum`, and above 1
        only with steady video and detection, since the frames between reuse `reuses`."""
        value = getattr(self, key)
        every = _number(value, key, int)
        if not 1 <= every <= maximum:
            raise SettingsError(f"gfpgan setting '{key}' must be 1 (every frame) to {maximum}; got {value!r}")
        if every > 1 and not (self.steady and alignment == "detect"):
            raise SettingsError(f"gfpgan setting '{key}: {every}' reuses {reuses}: it needs "
                                f"'steady: true' and 'alignment: detect'")
        return every

    def check(self) -> "GFPGANSettings":
        """Return the settings with values normalised; raise SettingsError for a bad one."""
        where = "gfpgan setting"
        if not isinstance(self.enabled, bool):
            raise SettingsError(f"{where} 'enabled' must be true or false; got {self.enabled!r}")
        if not isinstance(self.steady, bool):
            raise SettingsError(f"{where} 'steady' must be true or false; got {self.steady!r}")
        address = str(self.address).strip()
        if not address or any(c.isspace() for c in address):
            raise SettingsError(f"{where} 'address' must be HOST:PORT (or several, comma-separated, "
                                f"or dns:///name:port); got {self.address!r}")
        upscale = _number(self.upscale, "upscale", int)
        if upscale not in OUTPUT_SIZE_BY_UPSCALE:
            raise SettingsError(f"{where} 'upscale' must be 1, 2 or 4 (faces of 256, 512 or 1024 "
                                f"pixels); got {self.upscale!r}")
        timeout_ms = _number(self.timeout_ms, "timeout_ms", float)
        if not timeout_ms > 0:
            raise SettingsError(f"{where} 'timeout_ms' must be more than 0 milliseconds; "
                                f"got {self.timeout_ms!r}")
        fidelity = _number(self.fidelity, "fidelity", float)
        if not 0.0 <= fidelity <= 1.0:
            raise SettingsError(f"{where} 'fidelity' must be between 0 (all GFPGAN) and 1 (all "
                                f"MuseTalk); got {self.fidelity!r}")
        alignment = str(self.alignment).strip().lower()
        if alignment not in ALIGNMENTS:
            raise SettingsError(f"{where} 'alignment' must be one of {', '.join(ALIGNMENTS)}; got "
                                f"{self.alignment!r} (MuseTalk has no 5-point landmarks to send)")
        every = self._every("detect_every", MAX_DETECT_EVERY, alignment,
                            "the steady video alignment between detections")
        mask_every = self._every("mask_every", MAX_MASK_EVERY, alignment,
                                 "the steady video's paste mask between frames")
        pending = _number(self.max_pending_batches, "max_pending_batches", int)
        if pending < 1:
            raise SettingsError(f"{where} 'max_pending_batches' must be 1 or more; got {pending}")
        port = _number(self.metrics_port, "metrics_port", int)
        if not 0 <= port <= 65535:
            raise SettingsError(f"{where} 'metrics_port' must be 0 (off) to 65535; got {port}")
        model_path = None if self.model_path is None else str(self.model_path).strip()
        if model_path == "":
            raise SettingsError(f"{where} 'model_path' must name the checkpoint file, e.g. "
                                f"models/gfpgan/GFPGANv1.4.pth; got an empty value")
        arch = self.arch
        if arch is not None:
            by_lower = {name.lower(): name for name in ARCHS}
            arch = by_lower.get(str(arch).strip().lower())
            if arch is None:
                raise SettingsError(f"{where} 'arch' must be one of {', '.join(ARCHS)} (GFPGANer's "
                                    f"names); got {self.arch!r}")
        multiplier = self.channel_multiplier
        if multiplier is not None:
            multiplier = _number(multiplier, "channel_multiplier", int)
            if multiplier < 1:
                raise SettingsError(f"{where} 'channel_multiplier' must be 1 or more; got {multiplier}")
        background = _named(self.bg_upsampler)
        if background is not None:
            if not background.lower().startswith("realesrgan"):
                raise SettingsError(f"{where} 'bg_upsampler' must be realesrgan (Real-ESRGAN, run by "
                                    f"the service) or none (Lanczos); got {self.bg_upsampler!r}")
            if alignment != "detect":
                raise SettingsError(f"{where} 'bg_upsampler: realesrgan' upsamples the picture around "
                                    f"the face: it needs 'alignment: detect'")
            background = "realesrgan"
        model = _named(self.model)
        try:
            ModelSpec(model_path, arch, multiplier, model=model).validate()
        except InvalidRequest as error:
            raise SettingsError(f"{where}: {error}") from None
        return replace(self, address=address, upscale=upscale, timeout_ms=timeout_ms,
                       fidelity=fidelity, alignment=alignment, max_pending_batches=pending,
                       detect_every=every, mask_every=mask_every,
                       metrics_port=port, metrics_host=str(self.metrics_host),
                       model_path=model_path, arch=arch, channel_multiplier=multiplier, model=model,
                       device=_named(self.device), bg_upsampler=background)


def _number(value, name: str, kind: type):
    """An int or float setting; YAML and flags both give numbers, strings are accepted too."""
    if isinstance(value, bool):
        raise SettingsError(f"gfpgan setting {name!r} must be a number; got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"gfpgan setting {name!r} must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise SettingsError(f"gfpgan setting {name!r} must be a finite number; got {value!r}")
    if kind is int:
        if number != int(number):
            raise SettingsError(f"gfpgan setting {name!r} must be a whole number; got {value!r}")
        return int(number)
    return number


def _named(value) -> str | None:
    """device / bg_upsampler as a name to report: a string, a torch.device, an object."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        return value.strip()
    if type(value).__name__ == "device":  # torch.device, without importing torch
        return str(value)
    return type(value).__name__


_KEYS = tuple(f.name for f in fields(GFPGANSettings))


def from_yaml_section(section, base: GFPGANSettings = GFPGANSettings()) -> GFPGANSettings:
    """Apply the `gfpgan:` mapping of an inference YAML over `base`; unknown keys are refused."""
    if section is None:
        return base
    if not isinstance(section, dict):
        raise SettingsError(f"the '{YAML_SECTION}:' section of the inference YAML must be a mapping "
                            f"of settings ({', '.join(_KEYS)}); got {section!r}")
    unknown = sorted(str(k) for k in section if k not in _KEYS)
    if unknown:
        raise SettingsError(f"unknown key(s) in the '{YAML_SECTION}:' section of the inference YAML: "
                            f"{', '.join(unknown)}; the known keys are {', '.join(_KEYS)}")
    return replace(base, **section)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the --gfpgan_* flags (each also spelled with dashes) to MuseTalk's or our parser.
    Every default is None, so that a flag left out does not override the YAML."""
    group = parser.add_argument_group("GFPGAN face enhancement (through the gfpgan-service)")
    group.add_argument("--enable_gfpgan", "--enable-gfpgan", dest="gfpgan_enabled",
                       action=argparse.BooleanOptionalAction, default=None,
                       help="enhance every decoded face through the service")
    group.add_argument("--gfpgan_steady", "--gfpgan-steady", dest="gfpgan_steady",
                       action=argparse.BooleanOptionalAction, default=None,
                       help="smooth the faces' alignment over the video (default on)")
    flags = (
        ("address", str, "service address HOST:PORT, several comma-separated, or dns:///name:port"),
        ("upscale", int, "1, 2 or 4: faces come back 256, 512 or 1024 pixels wide"),
        ("timeout_ms", float, "per-batch deadline; past it the batch is resized locally instead"),
        ("fidelity", float, "0..1, how much of MuseTalk's own face is kept (0 = all GFPGAN)"),
        ("alignment", str, "detect (find and align the face, default) or aligned (crop as is)"),
        ("max_pending_batches", int, "decoded batches in flight before decoding waits"),
        ("detect_every", int, "steady video: detect the face every N-th frame only, reusing the "
                              "smoothed alignment between (default 1: every frame)"),
        ("mask_every", int, "steady video: compute the paste mask every N-th frame only, reusing "
                            "it between (default 1: every frame)"),
        ("metrics_port", int, "Prometheus page of this worker on this port (0 = off)"),
        ("metrics_host", str, "address the Prometheus page listens on"),
        ("arch", str, "the architecture the run expects (GFPGANer's names: clean, original, "
                      "bilinear, RestoreFormer); checked against the service at start"),
        ("channel_multiplier", int, "the channel multiplier the run expects (2 for v1.3/v1.4); "
                                    "checked against the service at start"),
        ("tls_ca", str, "PEM CA of the service's certificate: talk TLS (env GFPGAN_TLS_CA)"),
        ("client_cert", str, "PEM client certificate for mutual TLS (env GFPGAN_CLIENT_CERT)"),
        ("client_key", str, "its PEM key (env GFPGAN_CLIENT_KEY)"),
        ("tls_server_name", str, "the name in the service's certificate, if not the address's"),
        ("token_file", str, "file with the bearer token (env GFPGAN_TOKEN_FILE, or GFPGAN_TOKEN)"),
    )
    for name, kind, text in flags:
        group.add_argument(f"--gfpgan_{name}", f"--gfpgan-{name.replace('_', '-')}",
                           dest=f"gfpgan_{name}", type=kind, default=None, help=text)
    group.add_argument("--gfpgan_model_id", "--gfpgan-model-id", dest="gfpgan_model", default=None,
                       help="which of the service's restorers, by id: gfpgan-1.4, gfpgan-1.3, "
                            "gfpgan-1.2, gfpgan-1, restoreformer (YAML key: model)")
    group.add_argument("--gfpgan_model", "--gfpgan-model", "--gfpgan_model_path",
                       "--gfpgan-model-path", dest="gfpgan_model_path", default=None,
                       help="the checkpoint the run expects, e.g. models/gfpgan/GFPGANv1.4.pth; "
                            "its file name (and SHA-256, where the file is here) is checked "
                            "against the service's at start")
    return parser


def from_args(args: argparse.Namespace, base: GFPGANSettings = GFPGANSettings()) -> GFPGANSettings:
    """Apply the flags that were given (not None) over `base`."""
    given = {}
    for key in _KEYS:
        value = getattr(args, f"gfpgan_{key}", None)
        if value is not None:
            given[key] = value
    return replace(base, **given)


def resolve(yaml_document=None, args: argparse.Namespace | None = None,
            base: GFPGANSettings = GFPGANSettings()) -> GFPGANSettings:
    """base < the YAML's `gfpgan:` section < flags, checked; raises SettingsError."""
    settings = base
    if yaml_document is not None:
        if not isinstance(yaml_document, dict):
            raise SettingsError("the inference YAML must be a mapping at the top level")
        settings = from_yaml_section(yaml_document.get(YAML_SECTION), settings)
    if args is not None:
        settings = from_args(args, settings)
    return settings.check()


def load_yaml(path) -> dict:
    """The inference YAML as plain data; a file that is missing or not YAML fails clearly."""
    import yaml  # MuseTalk's OmegaConf depends on PyYAML, so it is there wherever MuseTalk runs

    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as error:
        raise SettingsError(f"cannot read the inference YAML {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"the inference YAML {path} is not valid YAML: {error}") from None
    return document if document is not None else {}
