"""The contract, the generated stubs, the README and the install stay in step."""
from __future__ import annotations

import importlib.metadata
import pathlib
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
    from contract.pb import face_enhance_pb2

    committed = descriptor_pb2.FileDescriptorProto.FromString(face_enhance_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled_proto(tmp_path), "contract/pb is stale: run `make proto`"


def _gen_proto():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    return gen_proto


def test_regenerating_stubs_with_the_pinned_generator_reproduces_the_committed_files(tmp_path):
    for path in _gen_proto().generate_pinned(tmp_path):
        committed = (ROOT / "contract" / "pb" / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} differs: run `make proto`"


def test_stubs_carry_no_runtime_version_guard():
    """Stubs from a newer generator refuse every protobuf/grpcio older than themselves at import."""
    pb2 = (ROOT / "contract" / "pb" / "face_enhance_pb2.py").read_text()
    pb2_grpc = (ROOT / "contract" / "pb" / "face_enhance_pb2_grpc.py").read_text()
    assert "_runtime_version" not in pb2 and "# Protobuf Python Version: 4.25.1" in pb2
    assert "GRPC_GENERATED_VERSION" not in pb2_grpc


OLDEST_PROTOBUF = "3.20.3"  # what MuseTalk's tensorflow 2.12 allows at the bottom (>=3.20.3,<5)


def test_stubs_and_codec_work_under_the_oldest_supported_protobuf(tmp_path):
    """protobuf 3.20.3 (pure Python) ahead of the installed one: the stubs load and a request
    and a response survive the codec; the newest runtime is the one this suite runs on."""
    target = pathlib.Path("~/.cache/gfpgan-service/protobuf-" + OLDEST_PROTOBUF).expanduser()
    if not (target / "google" / "protobuf").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        f"protobuf=={OLDEST_PROTOBUF}"], check=True, timeout=300)
    code = """
import numpy as np, google.protobuf
from contract import codec
from contract.types import EnhanceOptions, Alignment, EnhanceResult, FaceStatus
from contract.pb import face_enhance_pb2_grpc
faces = np.arange(2 * 64 * 64 * 3, dtype=np.uint8).reshape(2, 64, 64, 3)
req = codec.encode_request(5, faces, EnhanceOptions(alignment=Alignment.ALIGNED, output_size=512))
back = type(req).FromString(req.SerializeToString())
assert back == req and back.faces.data == faces.tobytes()
resp = codec.encode_response(5, EnhanceResult(faces, [FaceStatus.ENHANCED] * 2))
result = codec.decode_response(type(resp).FromString(resp.SerializeToString()))
assert np.array_equal(result.faces, faces) and result.status == [FaceStatus.ENHANCED] * 2
print(google.protobuf.__version__)
"""
    env = {**__import__("os").environ, "PYTHONPATH": f"{target}:{ROOT}",
           "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == OLDEST_PROTOBUF


def test_grpc_stubs_expose_every_rpc():
    from contract.pb import face_enhance_pb2_grpc

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


def test_service_commands_in_a_client_only_install_say_what_to_install_in_one_line():
    """gfpgan-serve with the server extra missing (torch blocked): one line, exit 2, no traceback."""
    code = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'grpc_health'):
            raise ImportError(name)
sys.meta_path.insert(0, Blocked())
import importlib.util
_find = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split('.')[0] in ('torch', 'grpc_health'):
        return None
    return _find(name, package)
importlib.util.find_spec = find_spec
from server.entry import serve
serve()
"""
    done = subprocess.run([sys.executable, "-c", code, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "client-only install (missing: torch, grpcio-health-checking)" in lines[0]
    assert "gfpgan-service[server]" in lines[0] and "Traceback" not in done.stderr


def test_service_commands_on_python_3_10_say_the_service_needs_3_11(monkeypatch, capsys):
    import pytest

    from server import entry

    monkeypatch.setattr(entry.sys, "version_info", (3, 10, 13, "final", 0))
    with pytest.raises(SystemExit) as stopped:
        entry.serve()
    assert stopped.value.code == 2
    assert "needs Python 3.11 or newer" in capsys.readouterr().err


def test_the_client_adds_no_opencv_of_its_own():
    """MuseTalk's environment has opencv-python; a second distribution would overwrite cv2/."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("opencv")]
    assert any(d.startswith("opencv-python-headless") for d in project["optional-dependencies"]["opencv"])
    assert any(d.startswith("opencv-python-headless") for d in project["optional-dependencies"]["server"])
    assert project["requires-python"] == ">=3.10"
