"""gfpgan-enhance: enhance face-crop image files or folders, through a running service or in-process.

With --address only the light client is imported (no torch); --in-process loads the pipeline here.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

from contract.types import OUTPUT_SIZES, Alignment, EnhanceOptions, FaceStatus, InvalidRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Batches kept in flight towards the service while the next ones are read from disk.
_IN_FLIGHT_BATCHES = 4


@dataclass
class _Image:
    source: Path
    output: Path  # where the enhanced face goes (same relative name under --output)
    face: np.ndarray  # (H, W, 3) uint8 BGR, H == W


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfpgan-enhance",
        description="Enhance face crops (png/jpg/webp, one square face per image) with GFPGAN.")
    parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True,
                        help="folder for the results; input names are kept (folders mirrored)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="a running gfpgan-serve, host:port (several: comma-separated)")
    where.add_argument("--in-process", action="store_true",
                       help="load the model in this process instead (needs the server extra)")
    parser.add_argument("--model", default="", help="the restorer: with --address, an id the "
                        "service has loaded (gfpgan-1.4, restoreformer, ...; default: its own "
                        "default); in-process, a checkpoint file or a known id (default "
                        "<weights-dir>/GFPGANv1.4.pth)")
    parser.add_argument("--weights-dir", default=None,
                        help="--in-process: folder of the detection and parsing weights")
    parser.add_argument("--device", default="auto", help="--in-process: auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="--in-process: auto, float32 or bfloat16")
    parser.add_argument("--no-download", action="store_true",
                        help="--in-process: fail instead of downloading missing weights")
    parser.add_argument("--output-size", type=int, default=256, choices=OUTPUT_SIZES,
                        help="side of the enhanced faces in pixels")
    parser.add_argument("--alignment", default="detect", choices=[a.value for a in Alignment],
                        help="detect: find the face; aligned: inputs are already FFHQ-aligned")
    parser.add_argument("--fidelity", type=float, default=0.0,
                        help="0 = fully restored .. 1 = the input (blend), default 0")
    parser.add_argument("--all-faces", action="store_true",
                        help="restore every face found, not only the one nearest the centre")
    parser.add_argument("--steady-video", action="store_true",
                        help="the images are the frames of one video (in file-name order): "
                             "smooth the face alignment over time (detect/landmarks)")
    parser.add_argument("--detect-every", type=int, default=1, metavar="N",
                        help="--steady-video with detect: find the face on every N-th frame only "
                             "and reuse the smoothed alignment between (default 1)")
    parser.add_argument("--mask-every", type=int, default=1, metavar="N",
                        help="--steady-video with detect/landmarks: compute the paste mask (face "
                             "parsing) on every N-th frame only and reuse it between (default 1)")
    parser.add_argument("--random-noise", action="store_true",
                        help="GFPGAN's random StyleGAN noise (outputs then differ run to run)")
    parser.add_argument("--batch-size", type=int, default=8, help="faces per request, default 8")
    parser.add_argument("--timeout-ms", type=float, default=30_000,
                        help="--address: per-batch deadline before the local fallback, default 30000")
    parser.add_argument("--side-by-side", action="store_true",
                        help="also write NAME_compare.png: input resized | enhanced")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    secure = parser.add_argument_group(
        "security (the token comes from GFPGAN_TOKEN or --token-file, never the command line)")
    secure.add_argument("--tls-ca", help="PEM CA of the service's certificate: talk TLS [env GFPGAN_TLS_CA]")
    secure.add_argument("--client-cert", help="PEM client certificate, for mutual TLS [env GFPGAN_CLIENT_CERT]")
    secure.add_argument("--client-key", help="its PEM key [env GFPGAN_CLIENT_KEY]")
    secure.add_argument("--tls-server-name", help="the name in the service's certificate, if not the address's")
    secure.add_argument("--token-file", help="file holding the bearer token [env GFPGAN_TOKEN_FILE]")
    parser.add_argument("--allow-none-enhanced", action="store_true",
                        help="exit 0 even when no face was enhanced (every face fell back or "
                             "had no face found); by default that exits 1")
    return parser


def find_images(inputs: Sequence[str]) -> Iterator[tuple[Path, Path]]:
    """(file, name relative to --output) for each input file and each image in input folders."""
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*")
                               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
                yield file, file.relative_to(path)
        else:
            # A missing or unreadable file is reported when it is read.
            yield path, Path(path.name)


def read_face(path: Path) -> np.ndarray:
    """One image file -> (H, W, 3) uint8 BGR; raises ValueError saying what is wrong."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"{path}: not a readable png/jpg/webp image")
    height, width = image.shape[:2]
    if height != width:
        raise ValueError(f"{path}: the face crop is {width}x{height}; crops must be square "
                         "(crop or pad it first)")
    return image


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    encoded.tofile(str(path))


def side_by_side(face: np.ndarray, enhanced: np.ndarray) -> np.ndarray:
    """The input resized to the output size, then the enhanced face, left to right."""
    size = enhanced.shape[0]
    before = cv2.resize(face, (size, size), interpolation=cv2.INTER_LANCZOS4)
    return np.concatenate([before, enhanced], axis=1)


def _batches(images: Iterator[_Image], batch_size: int) -> Iterator[list[_Image]]:
    """Consecutive images of the same size, at most batch_size per batch."""
    batch: list[_Image] = []
    for image in images:
        if batch and (len(batch) == batch_size or batch[0].face.shape != image.face.shape):
            yield batch
            batch = []
        batch.append(image)
    if batch:
        yield batch


# An enhancer takes (faces, options) and returns a callable that waits for
# (enhanced faces, statuses, why it fell back or None): lets the service mode keep batches in
# flight.
Enhancer = Callable[[np.ndarray, EnhanceOptions],
                    Callable[[], tuple[np.ndarray, list[FaceStatus], "tuple[str, str] | None"]]]


def _service_enhancer(args) -> tuple[Enhancer, Callable[[], None]]:
    from client.sync import FaceEnhanceClient

    from client.security import Security, SecurityConfigError

    try:
        security = Security.from_env(ca_file=args.tls_ca, cert_file=args.client_cert,
                                     key_file=args.client_key, server_name=args.tls_server_name,
                                     token_file=args.token_file)
    except SecurityConfigError as error:
        raise SystemExit(f"error: {error}") from None
    client = FaceEnhanceClient(args.address, timeout_ms=args.timeout_ms,
                               max_in_flight=_IN_FLIGHT_BATCHES, security=security)

    def submit(faces, options):
        future = client.submit(faces, options)

        def wait():
            result = future.result()
            why = ((result.fallback_reason, result.extra.get("fallback_detail", ""))
                   if result.fell_back else None)
            return result.faces, list(result.status), why
        return wait
    return submit, client.close


def _in_process_enhancer(args) -> tuple[Enhancer, Callable[[], None]]:
    # The service's pipeline in this process, through server/local.py alone; torch and the
    # model code are imported only here, so --address works without them.
    from server.local import LocalEnhancer, LocalSetupError

    try:
        enhancer = LocalEnhancer(model=args.model, device=args.device, dtype=args.dtype,
                                 no_download=args.no_download, weights_dir=args.weights_dir)
    except LocalSetupError as exc:
        # Missing weights, a bad file or device: one line saying what to do, not a traceback.
        raise SystemExit(f"error: {exc}") from None

    def submit(faces, options):
        result = enhancer.enhance(faces, options)
        return lambda: (result.faces, result.status, None)
    return submit, lambda: None


def run(args, log=print) -> int:
    """Enhance everything named in args; returns the process exit status."""
    options = EnhanceOptions(output_size=args.output_size, alignment=Alignment(args.alignment),
                             fidelity=args.fidelity, only_center_face=not args.all_faces,
                             random_noise=args.random_noise,
                             steady_video=args.steady_video,
                             detect_every=args.detect_every, mask_every=args.mask_every,
                             model=args.model if args.address else "").validate()
    output_dir = Path(args.output)
    found = list(find_images(args.inputs))
    counts: Counter = Counter()
    problems: list[str] = []

    def readable() -> Iterator[_Image]:
        for source, name in found:
            try:
                yield _Image(source, output_dir / name, read_face(source))
            except ValueError as exc:
                problems.append(str(exc))
                progress.update(1)

    from tqdm import tqdm

    submit, close = (_service_enhancer if args.address else _in_process_enhancer)(args)
    progress = tqdm(total=len(found), unit="face", file=sys.stderr, disable=args.quiet)
    pending: deque = deque()
    fallbacks: Counter = Counter()  # reason -> faces
    details: dict[str, str] = {}

    def finish_oldest() -> None:
        batch, wait = pending.popleft()
        faces, status, why = wait()
        if why is not None:
            fallbacks[why[0]] += len(batch)
            details.setdefault(why[0], why[1])
        for image, enhanced, state in zip(batch, faces, status):
            write_image(image.output, enhanced)
            if args.side_by_side:
                write_image(image.output.with_name(image.output.stem + "_compare.png"),
                            side_by_side(image.face, enhanced))
            counts[FaceStatus(state)] += 1
        progress.update(len(batch))

    try:
        for batch in _batches(readable(), args.batch_size):
            try:
                wait = submit(np.stack([image.face for image in batch]), options)
            except InvalidRequest as exc:
                problems.extend(f"{image.source}: {exc}" for image in batch)
                progress.update(len(batch))
                continue
            pending.append((batch, wait))
            if len(pending) >= _IN_FLIGHT_BATCHES:
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        progress.close()
        close()

    for problem in problems:
        log(f"error: {problem}", file=sys.stderr)
    log(f"enhanced {counts[FaceStatus.ENHANCED]}, no face {counts[FaceStatus.NO_FACE]}, "
        f"fell back {counts[FaceStatus.FALLBACK]}, unreadable {len(problems)} "
        f"(of {len(found)} images) -> {output_dir}", file=sys.stderr)
    for reason, faces in fallbacks.most_common():
        first_line = details[reason].strip().splitlines()[0][:300] if details[reason].strip() else ""
        detail = f": {first_line}" if first_line else ""
        log(f"fell back ({reason}) for {faces} faces, written resized, not enhanced{detail}",
            file=sys.stderr)
    if not found:
        log("error: no png/jpg/webp images in the given inputs", file=sys.stderr)
        return 1
    if found and not counts[FaceStatus.ENHANCED] and not args.allow_none_enhanced:
        log("error: no face was enhanced (the outputs are resized copies); pass "
            "--allow-none-enhanced to accept that", file=sys.stderr)
        return 1
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.alignment == Alignment.LANDMARKS.value:
        parser.error("--alignment landmarks needs 5-point landmarks per face, which image files "
                     "do not carry; use detect or aligned")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.address and (args.weights_dir or args.no_download):
        parser.error("--weights-dir and --no-download only apply with --in-process")
    if args.address and args.model:
        try:
            EnhanceOptions(model=args.model).validate()
        except InvalidRequest as exc:
            parser.error(f"--model with --address names a restorer id the service has loaded: {exc}")
    try:
        EnhanceOptions(fidelity=args.fidelity).validate()
    except InvalidRequest as exc:
        parser.error(f"--fidelity: {exc}")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
