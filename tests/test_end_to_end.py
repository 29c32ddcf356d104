"""The real service process, real pipeline (random-valued weights) and real client, over loopback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import FaceEnhanceClient
from contract.codec import decode_response, encode_request
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import Alignment, EnhanceOptions, FaceStatus
from server.jobs import Job
from server.weights import sha256_file
from tests.checkpoints import GFPGAN_FILE
from tests.device import TEST_DEVICE
from tests.faces import make_faces, template_landmarks, weights_with_detector
from tests.helpers import free_port, serving

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights(tmp_path_factory, small_weights):
    return weights_with_detector(tmp_path_factory.mktemp("e2e_weights"), small_weights)


@pytest.fixture(scope="module")
def service(weights):
    """`gfpgan-serve` as its own process, on the test device in float32, with downloads off."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from server.app import main; main()", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--model", str(weights / GFPGAN_FILE),
         "--weights-dir", str(weights), "--device", str(TEST_DEVICE), "--dtype", "float32", "--no-download", "--max-batch-faces", "4",
         "--max-delay-ms", "20", "--drain-grace-s", "60"],
        cwd=ROOT, env={**os.environ, "GRPC_VERBOSITY": "ERROR"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while not serving(address):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "service did not become SERVING"
        time.sleep(0.5)
    yield address, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def local(weights):
    """The same pipeline in-process, to know what the service should answer."""
    from server.pipeline import build_pipeline
    from server.settings import Settings

    return build_pipeline(Settings(model=str(weights / GFPGAN_FILE), weights_dir=str(weights),
                                   device=str(TEST_DEVICE), dtype="float32", no_download=True))


def test_info_reports_the_loaded_weights(service, weights):
    address, _ = service
    with FaceEnhanceClient(address) as client:
        info = client.info()
    assert info.weights_sha256 == sha256_file(weights / GFPGAN_FILE)
    assert info.device.split(":")[0] == TEST_DEVICE.type and info.dtype == "float32"
    assert info.model_name == "GFPGANv1.4"


def test_concurrent_clients_get_their_own_faces_in_order(service, local):
    """Three clients stream at once; every batch comes back, in order, equal to the pipeline's."""
    address, _ = service
    options = EnhanceOptions(alignment=Alignment.ALIGNED)
    batches = {c: [make_faces(2, seed=100 + 10 * c + i)[..., ::-1][..., ::-1] for i in range(3)] for c in range(3)}
    answers: dict[int, list] = {}

    def run(c):
        with FaceEnhanceClient(address, options=options, timeout_ms=120_000) as client:
            futures = [client.submit(faces) for faces in batches[c]]  # all in flight at once
            answers[c] = [f.result() for f in futures]

    threads = [threading.Thread(target=run, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for c in range(3):
        for faces, result in zip(batches[c], answers[c]):
            assert not result.fell_back, result.fallback_reason
            [expected] = local.enhance([Job(faces, options)])
            assert result.status == [FaceStatus.ENHANCED] * 2
            # batched with other clients' faces vs alone: float summation order only
            assert np.abs(result.faces.astype(int) - expected.faces).max() <= 1


def test_detect_and_landmarks_through_the_unary_call(service, local):
    address, _ = service
    faces = make_faces(1, seed=7)
    points = template_landmarks(1, seed=7)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FaceEnhancerStub(channel)
        for options, landmarks in ((EnhanceOptions(output_size=512), None),
                                   (EnhanceOptions(alignment=Alignment.LANDMARKS), points)):
            response = stub.Enhance(encode_request(9, faces, options, landmarks), timeout=120)
            assert response.request_id == 9 and not response.HasField("error")
            result = decode_response(response)
            [expected] = local.enhance([Job(faces, options, landmarks)])
            assert result.status == expected.status
            assert np.abs(result.faces.astype(int) - expected.faces).max() <= 1
            assert response.timings.compute_ms > 0


def test_sigterm_finishes_accepted_work_and_exits_zero(service):
    address, proc = service
    options = EnhanceOptions(alignment=Alignment.ALIGNED)
    with FaceEnhanceClient(address, options=options, timeout_ms=120_000) as client:
        futures = [client.submit(make_faces(2, seed=50 + i)) for i in range(3)]
        time.sleep(0.5)  # let the requests reach the server's queue
        proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert all(not r.fell_back and r.status == [FaceStatus.ENHANCED] * 2 for r in results)
    assert proc.wait(timeout=120) == 0
