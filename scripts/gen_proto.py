"""Regenerate the Python gRPC stubs in client/pb/ from proto/.

Run after editing a .proto:  python scripts/gen_proto.py
tests/test_contract.py fails when the committed stubs no longer match the .proto.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "faceenhance/v1/face_enhance.proto"
OUT_DIR = ROOT / "client" / "pb"


def generate(out_dir: pathlib.Path = OUT_DIR) -> list[pathlib.Path]:
    """Compile the contract into out_dir; return the files written."""
    from grpc_tools import protoc  # dev-only dependency

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
            # the `client.pb` package, so the grpc module must import its sibling relatively.
            text = re.sub(r"^from faceenhance\.v1 import ", "from . import ", text, flags=re.M)
            dest = out_dir / src.name
            dest.write_text(text)
            written.append(dest)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(ROOT))
    sys.exit(0)
