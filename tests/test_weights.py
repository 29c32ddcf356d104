"""Weights on a fresh machine: missing files are fetched and verified, or the operator is told how.

Downloads come from a local HTTP server on 127.0.0.1 (the registry's URLs are pointed at it).
"""
from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading
from pathlib import Path

import pytest

from server import weights
from server.weights import (
    DETECTION_FILE,
    KNOWN_WEIGHTS,
    PARSING_FILE,
    KnownWeights,
    WeightsChecksumMismatch,
    WeightsMissing,
    ensure_weights,
    sha256_file,
)

GFPGAN = "GFPGANv1.4.pth"
ALL_FILES = (GFPGAN, DETECTION_FILE, PARSING_FILE)
# Small stand-ins: the downloader does not care what the bytes mean, only that they arrive intact.
CONTENT = {name: (name.encode() + b":" + bytes(range(256))) * (400 + i) for i, name in enumerate(ALL_FILES)}


class _Server:
    """A static file server in a thread, counting the requests it gets per path."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[str] = []
        self.truncate: set[str] = set()  # paths that announce more bytes than they send
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                name = self.path.lstrip("/")
                server.requests.append(name)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in server.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    served = _Server(CONTENT)
    yield served
    served.close()


def _point_registry_at(monkeypatch, base_url: str, sha256: dict[str, str | None]):
    for name in ALL_FILES:
        entry = KNOWN_WEIGHTS[name]
        monkeypatch.setitem(KNOWN_WEIGHTS, name,
                            KnownWeights(name, f"{base_url}/{name}", sha256.get(name), entry.purpose))


@pytest.fixture
def registry(monkeypatch, server):
    """The registry pointed at the local server; GFPGAN has a known hash, facexlib's files none."""
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    _point_registry_at(monkeypatch, server.url, {GFPGAN: hashlib.sha256(CONTENT[GFPGAN]).hexdigest()})
    return server


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The process's working directory, which nothing may be written to."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert list(cwd.iterdir()) == [], "something was written relative to the working directory"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends: connections are refused


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*")) if directory.exists() else []


# -- fetching ---------------------------------------------------------------------------------


def test_a_fresh_machine_gets_every_missing_file_downloaded_into_place(registry, tmp_path, workdir, caplog):
    weights_dir = tmp_path / "models" / "weights"
    caplog.set_level(logging.INFO, logger="server.weights")
    paths = ensure_weights(weights_dir / GFPGAN, weights_dir, download=True)
    assert (paths.gfpgan, paths.detection, paths.parsing) == tuple(weights_dir / n for n in ALL_FILES)
    for name in ALL_FILES:
        assert (weights_dir / name).read_bytes() == CONTENT[name]
    assert _leftovers(weights_dir) == sorted(ALL_FILES)  # no temporary files left
    assert sorted(registry.requests) == sorted(ALL_FILES)
    # Files without a published hash get theirs logged, so an operator can pin it.
    assert hashlib.sha256(CONTENT[DETECTION_FILE]).hexdigest() in caplog.text


def test_the_model_can_live_outside_the_weights_dir(registry, tmp_path, workdir):
    model = tmp_path / "gfpgan" / GFPGAN
    paths = ensure_weights(model, tmp_path / "facexlib")
    assert paths.gfpgan == model and model.read_bytes() == CONTENT[GFPGAN]
    assert paths.detection == tmp_path / "facexlib" / DETECTION_FILE


def test_files_already_present_are_not_downloaded_again(registry, tmp_path, workdir):
    ensure_weights(tmp_path / GFPGAN, tmp_path)
    requests_after_first_start = len(registry.requests)
    paths = ensure_weights(tmp_path / GFPGAN, tmp_path, download=True)
    assert len(registry.requests) == requests_after_first_start == 3
    assert paths.parsing.read_bytes() == CONTENT[PARSING_FILE]


def test_only_the_missing_file_is_fetched(registry, tmp_path, workdir):
    (tmp_path / GFPGAN).write_bytes(b"the operator's own weights")
    (tmp_path / DETECTION_FILE).write_bytes(CONTENT[DETECTION_FILE])
    ensure_weights(tmp_path / GFPGAN, tmp_path)
    assert registry.requests == [PARSING_FILE]
    assert (tmp_path / GFPGAN).read_bytes() == b"the operator's own weights"


def test_an_empty_file_left_by_an_interrupted_copy_is_fetched_again(registry, tmp_path, workdir):
    for name in ALL_FILES:
        (tmp_path / name).write_bytes(CONTENT[name])
    (tmp_path / DETECTION_FILE).write_bytes(b"")
    ensure_weights(tmp_path / GFPGAN, tmp_path)
    assert registry.requests == [DETECTION_FILE]
    assert (tmp_path / DETECTION_FILE).read_bytes() == CONTENT[DETECTION_FILE]


def test_sha256_file_is_the_sha256_of_the_contents(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# -- verification -----------------------------------------------------------------------------


def test_a_download_with_the_wrong_hash_is_deleted_and_the_error_names_file_and_both_hashes(
        registry, tmp_path, workdir, monkeypatch):
    wrong = "0" * 64
    _point_registry_at(monkeypatch, registry.url, {GFPGAN: wrong})
    weights_dir = tmp_path / "new" / "weights"
    with pytest.raises(WeightsChecksumMismatch) as caught:
        ensure_weights(weights_dir / GFPGAN, weights_dir)
    message = str(caught.value)
    assert GFPGAN in message and wrong in message
    assert hashlib.sha256(CONTENT[GFPGAN]).hexdigest() in message
    assert str(weights_dir / GFPGAN) in message  # where to put a file checked by hand
    assert not (tmp_path / "new").exists()  # no file, no partial file, no folder we made


def test_a_connection_that_drops_mid_download_leaves_no_partial_file(registry, tmp_path, workdir):
    registry.truncate.add(GFPGAN)
    with pytest.raises(WeightsMissing) as caught:
        ensure_weights(tmp_path / GFPGAN, tmp_path)
    assert "connection closed after" in str(caught.value)
    assert _leftovers(tmp_path) == ["cwd"]


# -- failing clearly --------------------------------------------------------------------------


def _assert_lists_every_file(message: str, weights_dir: Path):
    for name in ALL_FILES:
        assert KNOWN_WEIGHTS[name].url in message, f"no URL for {name}: {message}"
        assert str(weights_dir / name) in message, f"no destination for {name}: {message}"


def test_with_downloads_off_one_error_lists_each_missing_file_its_url_and_destination(
        registry, tmp_path, workdir):
    weights_dir = tmp_path / "weights"
    with pytest.raises(WeightsMissing) as caught:
        ensure_weights(weights_dir / GFPGAN, weights_dir, download=False)
    message = str(caught.value)
    assert "--no-download" in message
    _assert_lists_every_file(message, weights_dir)
    assert KNOWN_WEIGHTS[GFPGAN].sha256 in message  # so a hand download can be checked
    assert registry.requests == []
    assert not weights_dir.exists()


def test_offline_the_first_failed_download_stops_and_reports_every_missing_file(
        monkeypatch, tmp_path, workdir):
    _point_registry_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}", {})
    weights_dir = tmp_path / "weights"
    with pytest.raises(WeightsMissing) as caught:
        ensure_weights(weights_dir / GFPGAN, weights_dir, timeout_s=5)
    message = str(caught.value)
    assert f"downloading {GFPGAN} failed" in message and "refused" in message.lower()
    _assert_lists_every_file(message, weights_dir)
    assert not weights_dir.exists()  # no empty folder left behind


def test_a_file_the_source_does_not_have_is_reported_with_the_http_status(registry, tmp_path, workdir):
    del registry.files[PARSING_FILE]
    with pytest.raises(WeightsMissing) as caught:
        ensure_weights(tmp_path / GFPGAN, tmp_path)
    message = str(caught.value)
    assert f"downloading {PARSING_FILE} failed: HTTP 404" in message
    assert str(tmp_path / PARSING_FILE) in message
    # What did arrive is complete and stays: the next start only needs the rest.
    assert (tmp_path / GFPGAN).read_bytes() == CONTENT[GFPGAN]
    assert str(tmp_path / GFPGAN) not in message


def test_a_missing_model_with_an_unknown_name_is_an_error_before_any_download(registry, tmp_path, workdir):
    model = tmp_path / "my-finetune.pth"
    with pytest.raises(WeightsMissing) as caught:
        ensure_weights(model, tmp_path / "weights", download=True)
    message = str(caught.value)
    assert str(model) in message and "not a file this service knows how to download" in message
    assert "--model" in message
    assert registry.requests == []


def test_relative_paths_are_resolved_once_and_reported_absolute(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsMissing) as caught:
        ensure_weights(Path("w") / GFPGAN, "w", download=False)
    assert str(tmp_path / "w" / DETECTION_FILE) in str(caught.value)
    assert not (tmp_path / "w").exists()


def test_the_registry_holds_the_published_files_and_hashes():
    assert KNOWN_WEIGHTS["GFPGANv1.4.pth"].sha256 == \
        "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad"
    assert KNOWN_WEIGHTS["GFPGANv1.3.pth"].sha256 == \
        "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70"
    assert KNOWN_WEIGHTS[DETECTION_FILE].url.endswith("/v0.1.0/detection_Resnet50_Final.pth")
    assert KNOWN_WEIGHTS[PARSING_FILE].url.endswith("/v0.2.2/parsing_parsenet.pth")
    assert all(entry.url.startswith("https://github.com/") for entry in weights.KNOWN_WEIGHTS.values())


def test_the_init_containers_fetch_reads_every_model_the_service_will_load(tmp_path, small_weights):
    """deploy/docker/fetch_weights.py (Kubernetes' init container) reads the same GFPGAN_*
    variables as gfpgan-serve: the other restorers (GFPGAN_MODELS) and the background upsampler
    (GFPGAN_BG_UPSAMPLER) are fetched and checked too, not only the default model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    for name in ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"):
        os.symlink(small_weights / name, tmp_path / name)
    for name in ("RestoreFormer.pth", "RealESRGAN_x2plus.pth"):
        (tmp_path / name).write_bytes(b"stand-in")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GFPGAN_WEIGHTS_DIR": str(tmp_path), "GFPGAN_MODELS": "restoreformer",
           "GFPGAN_BG_UPSAMPLER": "realesrgan-x2", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "deploy/docker/fetch_weights.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ready = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ready:")]
    # RestoreFormer has no published hash; every other file here is a random-valued stand-in
    # under a name whose hash is known: each is checked and warned about, none is skipped
    assert {Path(p).name for p in ready} == {"RestoreFormer.pth"}
    for name in ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth",
                 "RealESRGAN_x2plus.pth"):
        assert name in done.stderr, name
