"""The rooms and their doors (README "Layout"): who may import whom, read from the code.

The contract's Python side is shared by everyone and depends on no one; the client reaches the
server only through server/local.py (gfpgan-enhance's in-process mode); the server uses the
client only in its benchmark, which measures the service as a caller does; the adapter never
imports the server. A new arrow fails here until the README's layout says why.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "client", "server", "musetalk_adapter")
HEAVY = ("torch", "torchvision", "gfpgan", "basicsr", "facexlib", "cv2", "grpc")


def _imports(package: str) -> set[tuple[str, str]]:
    """(file, top-level module) for every import in the package, inside functions too."""
    found = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            relative = path.relative_to(ROOT).as_posix()
            found.update((relative, name) for name in names)
    return found


def _arrows(package: str, to: str) -> list[tuple[str, str]]:
    return sorted((f, name) for f, name in _imports(package) if name.split(".")[0] == to)


@pytest.mark.parametrize("other", [p for p in PACKAGES if p != "contract"])
def test_the_contract_depends_on_none_of_its_users(other):
    assert _arrows("contract", other) == []


def test_the_contract_needs_neither_torch_opencv_nor_grpc():
    """Its stubs' gRPC module imports grpc (only the client and the service load that one)."""
    heavy = sorted((f, n) for f, n in _imports("contract") if n.split(".")[0] in HEAVY)
    assert heavy == [("contract/pb/face_enhance_pb2_grpc.py", "grpc")]


def test_the_client_reaches_the_server_only_through_its_in_process_door():
    assert _arrows("client", "server") == [("client/cli.py", "server.local")]


def test_the_server_uses_the_client_only_to_measure_itself_as_a_caller_does():
    assert {f for f, _ in _arrows("server", "client")} == {"server/bench.py"}
    assert {n for _, n in _arrows("server", "client")} == {"client.sync"}


@pytest.mark.parametrize("package", ["server", "client"])
def test_the_service_and_the_client_know_nothing_of_musetalk(package):
    assert _arrows(package, "musetalk_adapter") == []


def test_the_adapter_talks_to_the_service_as_a_client():
    assert _arrows("musetalk_adapter", "server") == []
    assert _arrows("musetalk_adapter", "client") != []


def test_the_image_carries_every_package_the_service_imports():
    """The Dockerfile copies, and .dockerignore lets through, each of our packages server/
    imports (a package left out builds an image that fails at its first import)."""
    needed = {"server"} | {name.split(".")[0] for _, name in _imports("server")} & set(PACKAGES)
    assert needed == {"server", "contract", "client"}
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    for package in sorted(needed):
        assert f"COPY {package}/ {package}/" in dockerfile, package
        assert f"!{package}/" in allowed, package
