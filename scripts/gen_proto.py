"""Regenerate the Python gRPC stubs in contract/pb/ from proto/.

Run after editing a .proto:  make proto  (or: python scripts/gen_proto.py)
tests/test_contract.py fails when the committed stubs no longer match the .proto.

The generator is pinned to grpcio-tools 1.62.3 (protoc 25, gencode for protobuf 4.25), the
newest that writes no runtime-version guard: its stubs load under protobuf 3.20.3 to 7.x and
any grpcio the client supports, while stubs from grpcio-tools >= 1.63 refuse every runtime
older than themselves at import (MuseTalk's environment pins protobuf < 5). grpcio-tools 1.62.3
itself needs protobuf < 5, which the service's own packages do not allow, so it runs from a
folder of its own (GENERATOR_DIR), installed on first use.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "faceenhance/v1/face_enhance.proto"
OUT_DIR = ROOT / "contract" / "pb"
GENERATOR = ("grpcio-tools==1.62.3", "protobuf==4.25.9", "grpcio==1.62.3")
GENERATOR_VERSION = "1.62.3"
GENERATOR_DIR = pathlib.Path(os.environ.get(
    "GFPGAN_PROTO_GENERATOR", "~/.cache/gfpgan-service/grpcio-tools-" + GENERATOR_VERSION)).expanduser()


def generator_path() -> pathlib.Path:
    """The folder holding the pinned generator, installed there with pip on first use."""
    if not (GENERATOR_DIR / "grpc_tools").is_dir():
        GENERATOR_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                        "--target", str(GENERATOR_DIR), *GENERATOR], check=True)
    return GENERATOR_DIR


def generate_pinned(out_dir: pathlib.Path = OUT_DIR) -> list[pathlib.Path]:
    """generate() run with the pinned generator, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(generator_path())}
    code = ("import sys, pathlib; sys.path.insert(1, sys.argv[1]); import gen_proto; "
            "print('\\n'.join(str(p) for p in gen_proto.generate(pathlib.Path(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts"), str(out_dir)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the pinned generator failed: {done.stderr.strip()[-2000:]}")
    return [pathlib.Path(line) for line in done.stdout.split()]


def generate(out_dir: pathlib.Path = OUT_DIR) -> list[pathlib.Path]:
    """Compile the contract into out_dir; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None) or _version_of_grpc_tools()
    if version != GENERATOR_VERSION:
        raise RuntimeError(f"grpc_tools {version} is not the pinned generator {GENERATOR_VERSION}: "
                           "use generate_pinned() (make proto)")

    with tempfile.TemporaryDirectory() as tmp:
        include = pathlib.Path(protoc.__file__).parent / "_proto"
        rc = protoc.main([
            "protoc", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((pathlib.Path(tmp) / "faceenhance" / "v1").glob("face_enhance_pb2*")):
            text = src.read_text()
            # protoc writes absolute imports for the proto package; the stubs live inside
            # the `contract.pb` package, so the grpc module must import its sibling relatively.
            text = re.sub(r"^from faceenhance\.v1 import ", "from . import ", text, flags=re.M)
            dest = out_dir / src.name
            dest.write_text(text)
            written.append(dest)
    return written


def _version_of_grpc_tools() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    for path in generate_pinned():
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    sys.exit(0)
