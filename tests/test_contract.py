"""The contract, the generated stubs, the README and the install stay in step."""
from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent


def compiled_proto(tmp_path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / "contract.pb"
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--descriptor_set_out={out}",
                      str(ROOT / "proto/faceenhance/v1/face_enhance.proto")])
    assert rc == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[-1]
    # the descriptor embedded in generated code leaves out the derived json_name
    for message in compiled.message_type:
        for field in message.field:
            field.ClearField("json_name")
    return compiled


def test_committed_stubs_match_the_proto(tmp_path):
    from client.pb import face_enhance_pb2

    committed = descriptor_pb2.FileDescriptorProto.FromString(face_enhance_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled_proto(tmp_path), "client/pb is stale: run `make proto`"


def test_regenerating_stubs_reproduces_the_committed_files(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    for path in gen_proto.generate(tmp_path):
        committed = (ROOT / "client" / "pb" / path.name).read_text()
        # the header names the protobuf version that generated it; the rest must be identical
        strip = lambda text: re.sub(r"(?m)^# Protobuf Python Version:.*$|^_runtime_version.*$|^\s+\d+,$", "", text)
        assert strip(path.read_text()) == strip(committed), f"{path.name} differs: run `make proto`"


def test_grpc_stubs_expose_every_rpc():
    from client.pb import face_enhance_pb2_grpc

    stub_methods = {"EnhanceBatch", "Enhance", "GetInfo"}
    assert stub_methods <= set(dir(face_enhance_pb2_grpc.FaceEnhancerServicer))


def test_readme_settings_table_is_generated_from_the_settings():
    from server.settings import markdown_table

    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- settings-table:start -->")[1].split("<!-- settings-table:end -->")[0]
    assert table.strip() == markdown_table().strip(), "README settings table is stale"


def test_readme_opens_with_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "docker compose up" in first_block and "docker-compose.cpu.yml" in first_block
    assert "make test" in first_block
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_opencv_gui_build_is_not_installed_beside_headless():
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "opencv-python-headless" in installed
    assert "opencv-python" not in installed


def test_gfpgan_imports_on_current_torchvision():
    code = "import server.compat, gfpgan, basicsr, facexlib; from gfpgan import GFPGANer; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
