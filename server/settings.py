"""The service's one typed settings object, filled from flags, then GFPGAN_* variables, then defaults.

`python -m server.settings --markdown` prints the table the README carries; `--help` lists the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from contract.types import RequestLimits

ENV_PREFIX = "GFPGAN_"
DEFAULT_MODEL_FILE = "GFPGANv1.4.pth"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def default_weights_dir() -> str:
    """Absolute, per-user, and never the current directory (GFPGANer's own default is)."""
    return str(Path("~/.cache/gfpgan-service/weights").expanduser().resolve())


@dataclass(frozen=True)
class Settings:
    """Everything an operator can set. Build with `Settings.from_args()`; every field is final."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    model: str = ""  # "" until from_args fills in <weights_dir>/GFPGANv1.4.pth
    models: str = ""  # more resident restorers: ids or files, comma-separated
    bg_upsampler: str = ""  # Real-ESRGAN for `background: realesrgan`: an id or a file
    weights_dir: str = dataclasses.field(default_factory=default_weights_dir)
    device: str = "auto"
    dtype: str = "auto"
    max_batch_faces: int | str = "auto"  # a number, or auto: sized at start (server.memory)
    max_delay_ms: float = 5.0
    overlap_batches: str = "off"
    max_queue_faces: int = 256
    max_faces_per_request: int = 32
    min_face_size: int = 64
    max_face_size: int = 512
    enable_codeformer: bool = False  # CodeFormer is non-commercial: loaded only when set
    no_download: bool = False
    log_level: str = "INFO"
    drain_grace_s: float = 30.0
    warmup: bool = True
    modconv: str = "auto"
    cuda_graphs: str = "auto"
    channels_last: str = "auto"
    paste_mask: str = "parse"
    resample: str = "torch"
    resample_dtype: str = "auto"
    modulate_dtype: str = "auto"
    activations: str = "promote"
    fold_norms: str = "auto"
    gfpgan_forward: str = "auto"
    fixed_selection: str = "auto"
    fixed_detection: str = "auto"
    parse_channels_last: str = "auto"
    parse_padding: str = "auto"
    parse_upsample: str = "auto"
    gfpgan_upsample: str = "auto"
    decoder_channels_last: str = "auto"
    compile: str = "auto"
    compile_detector: str = "auto"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_tokens_file: str = ""

    def __post_init__(self):
        # Direct construction (tests, embedding) gets the same defaults, checks and spellings
        # ("fp32" -> "float32", 5 -> 5.0) as the command line.
        for spec in SPECS:
            if spec.check is not None:
                try:
                    object.__setattr__(self, spec.name, spec.check(str(getattr(self, spec.name))))
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    raise ValueError(f"{spec.flag}: {exc}") from None
        weights_dir = _absolute(self.weights_dir)
        object.__setattr__(self, "weights_dir", weights_dir)
        model = self.model or str(Path(weights_dir) / DEFAULT_MODEL_FILE)
        object.__setattr__(self, "model", _model_path(model, weights_dir))
        extra = [_model_path(m.strip(), weights_dir) for m in str(self.models).split(",") if m.strip()]
        object.__setattr__(self, "models", ",".join(dict.fromkeys(m for m in extra if m != self.model)))
        if str(self.bg_upsampler).strip():
            object.__setattr__(self, "bg_upsampler", _model_path(str(self.bg_upsampler).strip(), weights_dir))
        problem = _cross_check(self)
        if problem:
            raise ValueError(problem)

    def speed_options(self, device_type: str):
        """The pipeline's speed forms (server/speed.py) these settings choose on `device_type`.

        "auto" picks what was measured faster on each device (BENCHMARKS.md). On both: the
        unfused modulated convolution with the whole of GFPGAN channels-last, decoder included
        (0.80x GFPGAN's time at batch 4 on the CPU, 0.87x at 16 on an H200), and ParseNet
        channels-last without padding passes and with its x2 layers as phases (0.59x ParseNet's
        time on the CPU, 0.68x on the H200). On CUDA also CUDA graphs, fixed-size selection and
        torch.compile (2.1-2.7x the faces/s on the H200), when Triton can build there
        (speed.compile_toolchain_problem); each compiled pass is checked against the eager one at
        warm-up, and one that differs runs eagerly (FacePipeline._check_compiled)."""
        from server.speed import SpeedOptions, compile_toolchain_problem

        cuda = device_type == "cuda"
        def pick(value: str, auto: str) -> str:
            return auto if value == "auto" else value
        def on(value: str, auto: bool) -> bool:
            return pick(value, "on" if auto else "off") == "on"
        modconv = pick(self.modconv, "unfused")
        unfused = modconv == "unfused"  # channels-last GFPGAN needs it (the fused form views groups)
        return SpeedOptions(modconv=modconv, cuda_graphs=on(self.cuda_graphs, cuda),
                            channels_last=on(self.channels_last, True) and unfused,
                            paste_mask=self.paste_mask, resample=self.resample,
                            resample_dtype=pick(self.resample_dtype, "compute"),
                            modulate_dtype=pick(self.modulate_dtype, "compute"),
                            activations=self.activations, fold_norms=on(self.fold_norms, True),
                            gfpgan_forward=pick(self.gfpgan_forward, "lean"),
                            fixed_selection=on(self.fixed_selection, cuda or self.fixed_detection == "on"),
                            fixed_detection=on(self.fixed_detection, cuda and on(self.fixed_selection, cuda)),
                            parse_channels_last=on(self.parse_channels_last, True),
                            parse_padding=pick(self.parse_padding, "border"),
                            parse_upsample=pick(self.parse_upsample, "phases"),
                            gfpgan_upsample=pick(self.gfpgan_upsample, "resample"),
                            decoder_channels_last=on(self.decoder_channels_last, True) and unfused,
                            compile=self.compile == "on" or (self.compile == "auto" and cuda and unfused
                                                             and compile_toolchain_problem() is None),
                            compile_detector=on(self.compile_detector, False))

    def limits(self) -> RequestLimits:
        return RequestLimits(max_faces_per_request=self.max_faces_per_request,
                             min_face_size=self.min_face_size, max_face_size=self.max_face_size)

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port != 0

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> "Settings":
        """Parse flags (argv, default sys.argv[1:]) over GFPGAN_* variables (default os.environ).

        A bad value exits with status 2 and a message naming the flag or variable, as argparse does.
        """
        environ = os.environ if environ is None else environ
        parser = build_parser()
        args = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for spec in SPECS:
            given = getattr(args, spec.name, None)
            if given is not None:
                values[spec.name] = given
            elif spec.env in environ and environ[spec.env].strip() != "":
                try:
                    values[spec.name] = spec.parse(environ[spec.env])
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    parser.error(f"environment variable {spec.env}={environ[spec.env]!r}: {exc}")
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))


# --- parsing and checking of single values -------------------------------------------------

def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _model_path(value: str, weights_dir: str) -> str:
    """A restorer id ("restoreformer") -> its file in the weights folder; a path -> absolute."""
    from server.weights import BACKGROUND_FILES, MODEL_FILES

    known = {**MODEL_FILES, **BACKGROUND_FILES}
    if value in known:
        return str(Path(weights_dir) / known[value])
    return _absolute(value)


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            where = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _int_or_auto(low: int, high: int) -> Callable[[str], int | str]:
    whole = _int_in(low, high)

    def parse(text: str) -> int | str:
        if str(text).strip().lower() == "auto":
            return "auto"
        try:
            return whole(text)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{error} (or auto)") from None
    parse.__name__ = "integer or auto"
    return parse


def _float_at_least(low: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _device(text: str) -> str:
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda"):
        return value
    if value.startswith("cuda:") and value[5:].isdigit():
        return value
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")


def _dtype(text: str) -> str:
    value = text.strip().lower()
    aliases = {"fp32": "float32", "bf16": "bfloat16"}
    value = aliases.get(value, value)
    if value in ("auto", "float32", "bfloat16"):
        return value
    if value in ("float16", "fp16", "half"):
        raise argparse.ArgumentTypeError(
            "float16 is not offered: GFPGAN is reported to give blank or solid-colour faces in "
            "fp16; use bfloat16 (the CUDA default) or float32")
    raise argparse.ArgumentTypeError(f"must be auto, float32 or bfloat16, got {text!r}")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if "on" in allowed:  # on/off settings also take the boolean spellings
            value = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off",
                     "no": "off"}.get(value, value)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}, got {text!r}")
        return value
    parse.__name__ = "choice"
    return parse


def _log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return value


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0), got {text!r}")


def _cross_check(s: Settings) -> str | None:
    """Checks between fields; None when all is well."""
    if s.min_face_size > s.max_face_size:
        return (f"--min-face-size ({s.min_face_size}) is larger than --max-face-size "
                f"({s.max_face_size})")
    if s.max_queue_faces < s.max_faces_per_request:
        return (f"--max-queue-faces ({s.max_queue_faces}) must be at least --max-faces-per-request "
                f"({s.max_faces_per_request}), or the largest allowed request could never be queued")
    if s.channels_last == "on" and s.modconv == "fused":
        return ("--channels-last needs --modconv unfused: the fused form folds the batch into "
                "channels with a view that a channels-last tensor cannot take")
    if s.decoder_channels_last == "on" and s.modconv == "fused":
        return ("--decoder-channels-last on needs --modconv unfused (or auto): the fused form "
                "builds a weight per face and views it as groups, which NHWC cannot take")
    if s.gfpgan_upsample == "phases" and (s.modconv == "fused" or s.gfpgan_forward == "gfpgan"):
        return ("--gfpgan-upsample phases needs --modconv unfused and --gfpgan-forward lean (or "
                "auto): it is part of the lean forward of the unfused modulated convolution")
    if s.fixed_detection == "on" and s.fixed_selection == "off":
        return ("--fixed-detection on needs --fixed-selection on (or auto): it detects one row per "
                "image, which only the fixed-size selection takes")
    if s.compile == "on" and s.modconv == "fused":
        return ("--compile on needs --modconv unfused (or auto): the fused form's grouped "
                "convolution has a group per face, another compiled graph for every batch size")
    if s.metrics_port != 0 and s.metrics_port == s.port:
        return f"--metrics-port and --port are both {s.port}; give them different ports"
    if bool(s.tls_cert) != bool(s.tls_key):
        return "--tls-cert and --tls-key go together: give both (PEM files) or neither"
    if s.tls_client_ca and not s.tls_cert:
        return "--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key"
    return None


@dataclass(frozen=True)
class _Spec:
    """One setting as the command line, the environment and the README see it."""

    name: str
    parse: Callable[[str], Any]
    help: str
    default_text: str
    check: Callable[[str], Any] | None = None  # re-applied (and normalises) values set in code
    boolean: str | None = None  # "flag": --x sets True; "both": --x / --no-x

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SPECS: tuple[_Spec, ...] = (
    _Spec("host", str, "Address the gRPC and metrics servers listen on. The default reaches this "
          "machine only; 0.0.0.0 (the container image's setting) reaches every interface: "
          "turn on --auth-tokens-file and TLS first (README: Security).", "127.0.0.1"),
    _Spec("port", _int_in(0, 65535), "gRPC port (0 picks a free one and logs it).", "50051",
          check=_int_in(0, 65535)),
    _Spec("metrics_port", _int_in(0, 65535),
          "Port of the Prometheus text page (/metrics); 0 turns it off.", "9090",
          check=_int_in(0, 65535)),
    _Spec("model", str, "The default restorer: a checkpoint file (relative paths are taken from "
          "the current directory at start-up and made absolute) or a known id (gfpgan-1.4, "
          "gfpgan-1.3, gfpgan-1.2, gfpgan-1, restoreformer: its file in --weights-dir).",
          "<weights-dir>/GFPGANv1.4.pth"),
    _Spec("models", str, "More restorers to keep resident beside --model, comma-separated ids "
          "or files, e.g. restoreformer,gfpgan-1.3; a request picks one with its `model` option.",
          "none"),
    _Spec("bg_upsampler", str, "Real-ESRGAN for requests with background realesrgan: "
          "realesrgan-x2, realesrgan-x4 (their files in --weights-dir) or a checkpoint file.",
          "none"),
    _Spec("weights_dir", str, "Folder for the detection and face-parsing weights, and for "
          "downloads (made absolute at start-up).", "~/.cache/gfpgan-service/weights"),
    _Spec("device", _device, "Where the pipeline runs: auto (CUDA when present, else CPU), cpu, "
          "cuda or cuda:N.", "auto", check=_device),
    _Spec("dtype", _dtype, "Network compute type: auto (bfloat16 on CUDA and on CPUs that "
          "compute it natively, AVX512-BF16 or AMX; float32 on other CPUs), float32 or bfloat16. "
          "float16 is refused (unsafe for GFPGAN).", "auto", check=_dtype),
    _Spec("max_batch_faces", _int_or_auto(1, 1024), "Most faces run through the network at once; "
          "larger requests are split across batches. auto: on CUDA the largest batch (up to 32) "
          "whose memory, measured on the card at start, fits in half of it with what the service "
          "already holds, with a quarter to spare (32 on an 80 GiB card: MuseTalk's realtime batch "
          "of 20 in one pass); 8 on the CPU. A batch the device runs out of memory on runs again in halves, and the "
          "limit doubles back every 30 s without running out.", "auto",
          check=_int_or_auto(1, 1024)),
    _Spec("max_delay_ms", _float_at_least(0.0), "Longest a batch waits for more faces after its "
          "first arrives, in milliseconds.", "5.0", check=_float_at_least(0.0)),
    _Spec("overlap_batches", _choice("on", "off"), "Queue the next batch on the device while the "
          "last one computes, when the queue already holds a full batch (at most two on the device "
          "at once): the device does not wait for the host's work between batches (its upload, "
          "detection launches and results). For CUDA; on the CPU the device is the host and it "
          "gains nothing. off until a GPU run measures it (gfpgan-bench --methods service-overlap).",
          "off", check=_choice("on", "off")),
    _Spec("max_queue_faces", _int_in(1), "Faces waiting in the shared queue before new requests "
          "are refused with RESOURCE_EXHAUSTED.", "256", check=_int_in(1)),
    _Spec("max_faces_per_request", _int_in(1, 4096), "Most faces in one request.", "32",
          check=_int_in(1, 4096)),
    _Spec("min_face_size", _int_in(1, 4096), "Smallest accepted face side, in pixels.", "64",
          check=_int_in(1, 4096)),
    _Spec("max_face_size", _int_in(1, 4096), "Largest accepted face side, in pixels.", "512",
          check=_int_in(1, 4096)),
    _Spec("enable_codeformer", _boolean, "Allow loading CodeFormer (--model/--models codeformer): "
          "its weights and code are under the S-Lab License 1.0, non-commercial use only. Needs "
          "the codeformer extra.", "false", boolean="flag"),
    _Spec("no_download", _boolean, "Never download missing weights; fail at start-up with what "
          "to fetch and where to put it.", "false", boolean="flag"),
    _Spec("log_level", _log_level, "Logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
          "INFO", check=_log_level),
    _Spec("drain_grace_s", _float_at_least(0.0), "On SIGTERM/SIGINT, seconds to finish work "
          "already accepted before exiting.", "30.0", check=_float_at_least(0.0)),
    _Spec("warmup", _boolean, "Run one batch through the model before reporting SERVING "
          "(--no-warmup skips it).", "true", boolean="both"),
    _Spec("modconv", _choice("auto", "fused", "unfused"), "GFPGAN's modulated convolutions: fused "
          "(a weight per face, one grouped convolution, as GFPGAN does) or unfused (one "
          "shared-weight convolution, the style applied to the input and output channels); same "
          "faces. auto: unfused (measured faster on an H200 and, with the channels-last forms, on "
          "the CPU).", "auto",
          check=_choice("auto", "fused", "unfused")),
    _Spec("cuda_graphs", _choice("auto", "on", "off"), "Capture GFPGAN and ParseNet as CUDA graphs "
          "at warm-up, one per batch-size bucket up to --max-batch-faces (at most 32). auto: on "
          "with CUDA; on with the CPU is a warning and no effect.", "auto",
          check=_choice("auto", "on", "off")),
    _Spec("channels_last", _choice("auto", "on", "off"), "Run GFPGAN's convolutions channels-last "
          "(NHWC; with the unfused form only). auto: on.", "auto",
          check=_choice("auto", "on", "off")),
    _Spec("paste_mask", _choice("parse", "box"), "Mask that pastes a restored face back: parse "
          "(ParseNet's face regions, as GFPGANer does) or box (facexlib's feathered box, no "
          "ParseNet pass: faster, and the hair and neck edges come from the restored crop).",
          "parse", check=_choice("parse", "box")),
    _Spec("resample", _choice("torch", "fast"), "How the networks upsample, downsample and pad: "
          "torch (F.interpolate, ReflectionPad2d) or fast (the same values from slices and "
          "elementwise ops; on the H200 it speeds up GFPGAN's own forms 8-17 percent but not the CUDA "
          "defaults: BENCHMARKS.md).", "torch", check=_choice("torch", "fast")),
    _Spec("resample_dtype", _choice("auto", "autocast", "compute"), "The type the networks' "
          "bilinear and nearest resamplings run in with --dtype bfloat16: autocast (as its lists "
          "say: on CUDA a bfloat16 map is cast up to float32, resampled into a float32 copy and "
          "cast back down by the convolution that reads it) or compute (a bfloat16 map resampled "
          "in bfloat16: the same pixels to the bit, since both round once where the convolution "
          "would; a fifth of those bytes: 15 percent of GFPGAN's bytes a face, 32 with --activations "
          "compute, a third of ParseNet's). On the CPU both are the same. auto: compute.", "auto", check=_choice("auto", "autocast", "compute")),
    _Spec("modulate_dtype", _choice("auto", "autocast", "compute"), "The type GFPGAN's unfused "
          "modulated convolutions write a float32 map scaled by its style in, with --dtype bfloat16 "
          "and --activations promote: autocast (float32, which autocast then casts for the "
          "convolution: two passes) or compute (bfloat16, written by the multiply itself where no "
          "resampling comes between: one pass that rounds as the cast would, so the same pixels to "
          "the bit; 10 percent of GFPGAN's bytes a face). auto: compute.", "auto",
          check=_choice("auto", "autocast", "compute")),
    _Spec("activations", _choice("promote", "compute"), "GFPGAN's activations between "
          "convolutions with --dtype bfloat16: promote (float32, as GFPGAN's float32 noise and bias "
          "make them) or compute (kept in bfloat16: 6-11 percent faster on the H200, one more bf16 rounding "
          "per layer, whose effect on real faces is not yet judged).", "promote",
          check=_choice("promote", "compute")),
    _Spec("fold_norms", _choice("auto", "on", "off"), "Fold RetinaFace's and ParseNet's batch "
          "norms into the convolutions before them and drop ParseNet's multiplications by one (the "
          "same sums, fewer passes and bytes; faces within rounding). auto: on.", "auto",
          check=_choice("auto", "on", "off")),
    _Spec("gfpgan_forward", _choice("auto", "gfpgan", "lean"), "GFPGAN v1.2-v1.4's forward: gfpgan "
          "(as GFPGAN writes it) or lean (no training-time copies of the SFT conditions, SFT in "
          "place, each StyleConv's demodulation from precomputed weight energies and its gain, bias "
          "and noise in two multiply-adds: fewer passes, the same sums within rounding). auto: lean.",
          "auto", check=_choice("auto", "gfpgan", "lean")),
    _Spec("fixed_selection", _choice("auto", "on", "off"), "DETECT batches that want one face per "
          "image take it as a fixed-size row (a never-pasted placeholder for a faceless image) "
          "instead of selecting the faces: one wait for the device fewer per batch, a wasted "
          "restoration per faceless image. auto: on with CUDA, off on the CPU (where a wait costs "
          "nothing and a restoration seconds).", "auto", check=_choice("auto", "on", "off")),
    _Spec("fixed_detection", _choice("auto", "on", "off"), "With --fixed-selection, DETECT batches "
          "detect without waiting for the device either: each image's 256 best-scored candidates "
          "are suppressed as a fixed-size overlap matrix (the faces torchvision's NMS keeps, in "
          "RetinaFace's CUDA graph) instead of selecting the candidates above the threshold and "
          "running NMS on them, two waits per batch. An image it cannot vouch for (more "
          "candidates, or more faces left after NMS than its 8 rounds settle) is detected again "
          "the waiting way (faceenhance_redetected_images). auto: on with --fixed-selection on "
          "CUDA; on turns --fixed-selection auto on too.", "auto", check=_choice("auto", "on", "off")),
    _Spec("parse_channels_last", _choice("auto", "on", "off"), "Run ParseNet's convolutions "
          "channels-last too (NHWC). auto: on (with the two ParseNet forms below, 0.59-0.61x ParseNet's "
          "time on the CPU, 0.68x on an H200 in bf16 at batch 16).", "auto",
          check=_choice("auto", "on", "off")),
    _Spec("parse_padding", _choice("auto", "reflect", "border"), "ParseNet's reflection padding: "
          "reflect, a padding pass before each of its 46 convolutions (its own form); border, each "
          "convolution on a map of 128x128 or more zero-padded with no padding pass, then its "
          "first and last rows and columns, the only outputs the padding reaches, computed again "
          "from thin reflected strips (the same masks within float rounding; a third fewer bytes "
          "written, more, smaller kernels). The padding passes took over a third of ParseNet's "
          "time on an H200, and border 0.73x ParseNet's time there. auto: border.",
          "auto", check=_choice("auto", "reflect", "border")),
    _Spec("parse_upsample", _choice("auto", "nearest", "phases"), "ParseNet's 8 x2 layers: nearest, as "
          "it writes them (upsample to a copy 4 times the input, pad it, 3x3 convolution); phases, "
          "the same outputs as four 2x2 convolutions of the input itself, one per output phase, run as "
          "one convolution: no upsampled copy and 16 taps per four outputs instead of 36 (those layers are 43 percent "
          "of ParseNet's FLOPs). The same masks within float rounding. auto: phases (on an H200, on "
          "its own, 0.92x ParseNet's time).", "auto",
          check=_choice("auto", "nearest", "phases")),
    _Spec("gfpgan_upsample", _choice("auto", "resample", "phases"), "GFPGAN's 14 x2 layers (its U-Net's "
          "up blocks, its decoder's upsampling StyleConvs): resample, as it writes them (a bilinear x2 "
          "to a map 4 times the input, then a 3x3 convolution); phases, the same outputs as four "
          "3x3 convolutions of the input itself, one per output phase, run as one convolution (no "
          "upsampled map; an up block's 1x1 skip before its x2). The same faces within float "
          "rounding. Those x2 resamplings took a third of GFPGAN's time on an H200. Needs the "
          "unfused modulated convolution and the lean forward. auto: resample (until a GPU run "
          "times phases).", "auto", check=_choice("auto", "resample", "phases")),
    _Spec("decoder_channels_last", _choice("auto", "on", "off"), "Run the StyleGAN decoder's modulated "
          "convolutions channels-last too (their weights; --channels-last lays out the others), so "
          "that the decoder, most of GFPGAN, runs NHWC instead of NCHW. Takes the unfused form "
          "where --modconv is auto, and refuses fused. auto: on (with the unfused form and "
          "--channels-last, 0.80x GFPGAN's time on the CPU, 0.87x on an H200 in bf16).",
          "auto", check=_choice("auto", "on", "off")),
    _Spec("compile", _choice("auto", "on", "off"), "Compile GFPGAN's and ParseNet's passes with "
          "torch.compile at warm-up (once for every batch size; the CUDA graphs, when on, capture "
          "the compiled code): the elementwise work, padding, resampling and layout changes "
          "between convolutions fused into fewer kernels. Warm-up takes longer (on an H200 29 s "
          "more the first time, 7 s from Inductor's cache: keep TORCHINDUCTOR_CACHE_DIR on a "
          "volume). At warm-up each compiled pass is checked against the eager pass on the same "
          "input; one that fails to compile, or whose faces are further from float32's than "
          "twice the eager pass's plus half a level, runs eagerly and is logged. auto: on with "
          "CUDA where Triton is installed and finds a C compiler and Python's headers, which it "
          "builds its launcher with (on Windows, pip install triton-windows brings both): 2.1-2.7x "
          "the faces/s at batch 8 and 32 on an H200, 2026-11-30. Off on the CPU (Inductor's C++ build of GFPGAN takes minutes there) and with --modconv "
          "fused.",
          "auto", check=_choice("auto", "on", "off")),
    _Spec("compile_detector", _choice("auto", "on", "off"), "Compile RetinaFace's pass too, as "
          "--compile compiles GFPGAN's and ParseNet's, for 256x256 images (other sizes detect "
          "eagerly), inside its CUDA graph when on. At warm-up the compiled pass is checked "
          "against the eager one on the same images; one that fails to compile, or moves an "
          "anchor's box or landmarks more than 0.05 px on average or 0.5 px at the 99.9th "
          "percentile, or its face score more than 0.01, runs eagerly and is logged. auto: off (until a "
          "GPU run times it: RetinaFace is the one network of a DETECT batch that --compile "
          "leaves eager).", "auto", check=_choice("auto", "on", "off")),
    _Spec("tls_cert", str, "PEM certificate chain: serve gRPC over TLS (with --tls-key).", "(none: "
          "plaintext)"),
    _Spec("tls_key", str, "PEM private key of --tls-cert.", "(none)"),
    _Spec("tls_client_ca", str, "PEM CA certificate(s): mutual TLS, every client must present a "
          "certificate signed by one of them.", "(none)"),
    _Spec("auth_tokens_file", str, "File of bearer tokens, one per line (16+ characters): every "
          "call but health must carry 'authorization: Bearer <token>' with one of them.",
          "(none: no token needed)"),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
assert set(SPEC_BY_NAME) == {f.name for f in dataclasses.fields(Settings)}, "a setting lacks a spec"


def build_parser(prog: str = "gfpgan-serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="GFPGAN face enhancement as a batched gRPC service (faceenhance.v1).",
        epilog=f"Every flag can also be set by an environment variable {ENV_PREFIX}<NAME> "
               f"(e.g. {ENV_PREFIX}MAX_BATCH_FACES=16, {ENV_PREFIX}NO_DOWNLOAD=1); a flag wins "
               "over the variable, the variable over the default.")
    for spec in SPECS:
        help_text = f"{spec.help} [env {spec.env}; default {spec.default_text}]"
        if spec.boolean == "flag":
            parser.add_argument(spec.flag, dest=spec.name, action="store_const", const=True,
                                default=None, help=help_text)
        elif spec.boolean == "both":
            parser.add_argument(spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(spec.flag, dest=spec.name, type=spec.parse, default=None,
                                metavar=spec.name.upper(), help=help_text)
    return parser


def markdown_table() -> str:
    """The README's settings table, generated so it cannot drift from the code."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in SPECS:
        flag = f"`{spec.flag}` / `--no-{spec.flag[2:]}`" if spec.boolean == "both" else f"`{spec.flag}`"
        rows.append(f"| {flag} | `{spec.env}` | `{spec.default_text}` | {spec.help} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--markdown"]:
        sys.stdout.write(markdown_table())
        return
    print(Settings.from_args(args))


if __name__ == "__main__":
    main()
