"""Weights on a fresh machine: which files the service needs, where they come from, getting them.

`ensure_weights` fetches missing known files into place (verified, atomic) or fails fast with
one message that tells the operator exactly what to download and where to put it.

Policy for files already present: they are never re-downloaded and not hashed here (that would
read 330 MB on every start); an empty file counts as missing. `server.model` hashes the GFPGAN
file when it loads it (the hash is reported by the info RPC anyway) and logs a warning if a
known file name has an unexpected hash: operators may deliberately drop in a fine-tuned file.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

#: Seconds to wait for a connection, or for the next bytes of a download, before giving up.
#: Short, so that an offline machine fails at start-up in seconds rather than minutes.
DEFAULT_TIMEOUT_S = 10.0
_CHUNK_BYTES = 1 << 20
_PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class KnownWeights:
    """One published weights file: where it comes from and, where known, its SHA-256."""

    name: str
    url: str
    sha256: str | None
    purpose: str


DETECTION_FILE = "detection_Resnet50_Final.pth"
PARSING_FILE = "parsing_parsenet.pth"
DEFAULT_MODEL_FILE = "GFPGANv1.4.pth"

#: Every file the service knows how to fetch, by file name.
KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    entry.name: entry
    for entry in (
        KnownWeights(
            "GFPGANv1.4.pth",
            "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/GFPGANv1.4.pth",
            "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad",
            "GFPGAN v1.4 face restoration network",
        ),
        KnownWeights(
            "GFPGANv1.3.pth",
            "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.3.pth",
            "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70",
            "GFPGAN v1.3 face restoration network",
        ),
        KnownWeights(
            "GFPGANCleanv1-NoCE-C2.pth",
            "https://github.com/TencentARC/GFPGAN/releases/download/v0.2.0/GFPGANCleanv1-NoCE-C2.pth",
            None,
            "GFPGAN v1.2 face restoration network (clean architecture)",
        ),
        KnownWeights(
            "GFPGANv1.pth",
            "https://github.com/TencentARC/GFPGAN/releases/download/v0.1.0/GFPGANv1.pth",
            None,
            "GFPGAN v1 face restoration network (original architecture, StyleGAN2 ops)",
        ),
        KnownWeights(
            "RestoreFormer.pth",
            "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/RestoreFormer.pth",
            None,
            "RestoreFormer face restoration network",
        ),
        # CodeFormer: S-Lab License 1.0 (non-commercial); loaded only with --enable-codeformer.
        KnownWeights(
            "codeformer.pth",
            "https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
            "1009e537e0c2a07d4cabce6355f53cb66767cd4b4297ec7a4a64ca4b8a5684b7",
            "CodeFormer face restoration network (S-Lab License 1.0, non-commercial)",
        ),
        # Real-ESRGAN publishes no hashes: each of these is from one published manifest.
        KnownWeights(
            "RealESRGAN_x2plus.pth",
            "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
            "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb",
            "Real-ESRGAN x2plus background upsampler (RRDBNet)",
        ),
        KnownWeights(
            "RealESRGAN_x4plus.pth",
            "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
            "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
            "Real-ESRGAN x4plus background upsampler (RRDBNet)",
        ),
        # facexlib publishes no hashes; these two were computed from the release assets and
        # agree across independent published manifests (sizes 109497761 and 85331193 bytes).
        KnownWeights(
            DETECTION_FILE,
            "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
            "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
            "RetinaFace (resnet50) face detector",
        ),
        KnownWeights(
            PARSING_FILE,
            "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth",
            "3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
            "ParseNet face parsing, for the paste-back mask",
        ),
    )
}


#: The restorers the service knows by id (EnhanceOptions.model, --model, --models), by file.
MODEL_FILES = {
    "gfpgan-1.4": "GFPGANv1.4.pth",
    "gfpgan-1.3": "GFPGANv1.3.pth",
    "gfpgan-1.2": "GFPGANCleanv1-NoCE-C2.pth",
    "gfpgan-1": "GFPGANv1.pth",
    "restoreformer": "RestoreFormer.pth",
    "codeformer": "codeformer.pth",
}
#: The background upsamplers by id (--bg-upsampler).
BACKGROUND_FILES = {
    "realesrgan-x2": "RealESRGAN_x2plus.pth",
    "realesrgan-x4": "RealESRGAN_x4plus.pth",
}


@dataclass(frozen=True)
class WeightPaths:
    """Absolute paths of the files the pipeline loads: the default restorer, the detector and
    parser, and the other resident restorers (--models)."""

    gfpgan: Path
    detection: Path
    parsing: Path
    extra_models: tuple[Path, ...] = ()


class WeightsError(RuntimeError):
    """The service cannot get the weights it needs; the message says what to do."""


class WeightsMissing(WeightsError):
    """Files are missing and were not (or could not be) downloaded."""


class WeightsChecksumMismatch(WeightsError):
    """A download's SHA-256 differs from the published one (nothing was kept)."""


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file as lowercase hex, read in chunks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_weights(
    model_path: str | Path,
    weights_dir: str | Path,
    download: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    extra_models: Sequence[str | Path] = (),
) -> WeightPaths:
    """Make sure the GFPGAN file and the detection/parsing files exist; return their paths.

    `model_path` is the GFPGAN checkpoint (any file; if it is missing, its name must be a known
    one to be fetched); the detection and parsing files live in `weights_dir`. Missing known files
    are downloaded unless `download` is False. Raises `WeightsMissing` (one error listing every
    missing file, its URL and its destination) or `WeightsChecksumMismatch`.
    """
    paths = WeightPaths(
        gfpgan=Path(model_path).expanduser().absolute(),
        detection=Path(weights_dir).expanduser().absolute() / DETECTION_FILE,
        parsing=Path(weights_dir).expanduser().absolute() / PARSING_FILE,
        extra_models=tuple(Path(p).expanduser().absolute() for p in extra_models),
    )
    missing = [path for path in (paths.gfpgan, paths.detection, paths.parsing, *paths.extra_models)
               if not _present(path)]
    if not missing:
        return paths

    unknown = [path for path in missing if path.name not in KNOWN_WEIGHTS]
    if unknown or not download:
        reason = (
            "downloading is turned off (--no-download)" if not unknown
            else f"{unknown[0]} is not a file this service knows how to download "
                 f"(known names: {', '.join(sorted(KNOWN_WEIGHTS))}); check --model")
        raise WeightsMissing(_missing_message(missing, reason))

    for position, path in enumerate(missing):
        try:
            download_weights(KNOWN_WEIGHTS[path.name], path, timeout_s=timeout_s)
        except WeightsChecksumMismatch:
            raise
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, disk
            # Offline, the remaining downloads would fail the same way: stop now, report all.
            reason = f"downloading {path.name} failed: {_describe(error)}"
            raise WeightsMissing(_missing_message(missing[position:], reason)) from error
    return paths


def download_weights(entry: KnownWeights, destination: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> Path:
    """Fetch `entry` to `destination`: temp file beside it, SHA-256 check, atomic rename.

    On any failure nothing is left behind: no partial file, and no folder this call created.
    """
    destination = Path(destination)
    created_dirs = _make_parents(destination.parent)
    temp_path: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=destination.parent, prefix=f".{destination.name}.", suffix=".part", delete=False
        ) as temp:
            temp_path = Path(temp.name)
            log.info("downloading %s (%s) from %s to %s", entry.name, entry.purpose, entry.url,
                     destination)
            actual = _stream_to(entry.url, temp, timeout_s)
        if entry.sha256 is not None and actual != entry.sha256:
            raise WeightsChecksumMismatch(
                f"downloaded {entry.name} from {entry.url} has SHA-256 {actual}, expected "
                f"{entry.sha256}; the download was deleted. Retry, or download it yourself, "
                f"check it, and put it at {destination}")
        os.replace(temp_path, destination)
        temp_path = None
        if entry.sha256 is None:
            log.info("downloaded %s, SHA-256 %s (no published hash to check against)",
                     entry.name, actual)
        else:
            log.info("downloaded %s, SHA-256 verified", entry.name)
        return destination
    except BaseException:
        if temp_path is not None:
            temp_path.unlink(missing_ok=True)
        for directory in reversed(created_dirs):
            try:
                directory.rmdir()
            except OSError:
                break  # not empty: someone else put something there
        raise


def known_hash_warning(path: str | Path, sha256: str) -> str | None:
    """A warning if `path` has a known file name but not its published hash; None otherwise."""
    entry = KNOWN_WEIGHTS.get(Path(path).name)
    if entry is None or entry.sha256 is None or entry.sha256 == sha256:
        return None
    return (f"{path} is named like the published {entry.name} but its SHA-256 is {sha256}, not "
            f"{entry.sha256}: it is a different (fine-tuned, corrupted or re-saved) file. If "
            f"that is not intended, delete it and let the service download the published one.")


def _present(path: Path) -> bool:
    # An empty file is what an interrupted copy leaves: treat it as missing, fetch it again.
    return path.is_file() and path.stat().st_size > 0


def _stream_to(url: str, stream, timeout_s: float) -> str:
    """Copy `url` into `stream`, logging progress; return the SHA-256 of what was written."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "gfpgan-service"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done, last_report = 0, time.monotonic()
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except http.client.IncompleteRead as error:
                done += len(error.partial)
                chunk = b""
            if not chunk:
                break
            stream.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if time.monotonic() - last_report >= _PROGRESS_EVERY_S:
                last_report = time.monotonic()
                share = f" ({100 * done / total:.0f}%)" if total else ""
                log.info("  %s: %.1f MiB%s", Path(url).name, done / 2**20, share)
        if total and done != total:
            raise urllib.error.URLError(f"connection closed after {done} of {total} bytes")
    return digest.hexdigest()


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, outermost first."""
    created = []
    for folder in reversed([directory, *directory.parents]):
        if not folder.exists():
            try:
                folder.mkdir()
            except FileExistsError:
                continue  # another replica sharing the volume made it first
            created.append(folder)
    return created


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _missing_message(missing: list[Path], reason: str) -> str:
    lines = [f"missing weights ({reason}). Put each file at the path shown:"]
    for path in missing:
        entry = KNOWN_WEIGHTS.get(path.name)
        source = entry.url if entry else "(no known download: give --model an existing file)"
        sha = f"\n      sha256 {entry.sha256}" if entry and entry.sha256 else ""
        lines.append(f"  - {path.name}\n      from {source}\n      to   {path}{sha}")
    lines.append("Then start the service again (or start it without --no-download and with "
                 "internet access, and it will fetch them).")
    return "\n".join(lines)
