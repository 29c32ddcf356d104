"""Faults over real processes: the service (tests/serve_fake.py: the real gfpgan-serve process,
flags, signals and drain, around the fake pipeline) is killed, restarted and overloaded while
real clients use it.

(Also in the suite: SIGTERM with work queued and on the device, tests/test_server.py; an idle
stream past the keepalive window, tests/test_server.py; kill -9 in the middle of a MuseTalk
run, tests/test_musetalk_adapter.py.)
"""
from __future__ import annotations

import asyncio
import signal
import statistics
import time

import grpc
import numpy as np
import pytest

from client import BreakerConfig, EnhanceOptions, FaceEnhanceClient
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from tests.fakes import fake_enhanced, random_faces
from tests.helpers import free_port
from tests.test_server import _start_fake_server, _wait_for_port, request

pytestmark = pytest.mark.timeout(120)
OPTIONS = EnhanceOptions(output_size=256)
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def _stop(process) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_kill_9_then_restart_every_frame_comes_back_and_enhanced_again_soon_after_serving():
    """A client streams frames while the service is killed with SIGKILL and started again on
    the same port: every frame comes back, in order (ENHANCED, or FALLBACK while it was down),
    and frames are ENHANCED again within a few seconds of the new process being SERVING."""
    port = free_port()
    rng = np.random.default_rng(5)
    breaker = BreakerConfig(failure_threshold=2, cooldown_s=30.0, max_cooldown_s=30.0)
    first = _start_fake_server("--port", str(port), FAKE_DELAY_S="0.01")
    second = None
    try:
        _wait_for_port(first)
        sent, answers = [], []
        with FaceEnhanceClient(f"127.0.0.1:{port}", options=OPTIONS, timeout_ms=1000,
                               breaker=breaker) as client:
            def frame():
                faces = random_faces(rng, 2)
                sent.append(faces)
                answers.append(client.enhance(faces))
            for _ in range(5):
                frame()
            first.send_signal(signal.SIGKILL)
            first.wait()
            for _ in range(5):
                frame()
            second = _start_fake_server("--port", str(port), FAKE_DELAY_S="0.01")
            _wait_for_port(second)
            serving_at = time.monotonic()
            while answers[-1].fell_back and time.monotonic() - serving_at < 15:
                frame()
            back_after = time.monotonic() - serving_at
            for _ in range(3):
                frame()
    finally:
        _stop(first)
        if second is not None:
            _stop(second)
    assert len(answers) == len(sent)
    for faces, answer in zip(sent, answers):  # each answer is its own frame's, in order
        expected = fake_enhanced(faces, OPTIONS)[0] if not answer.fell_back else None
        if expected is not None:
            assert (answer.faces == expected).all()
        else:
            assert answer.faces.shape == (2, 256, 256, 3)
    assert not any(a.fell_back for a in answers[:5])
    assert all(a.fell_back for a in answers[5:10])
    assert not any(a.fell_back for a in answers[-3:])
    assert back_after < 5.0, f"enhanced again {back_after:.1f} s after SERVING (breaker cooldown 30 s)"


async def test_overload_at_10x_is_refused_within_50_ms_and_memory_comes_back():
    """Ten times what the queue holds, from 8 streams at once, on a device taking 0.2 s per
    batch: each refusal (RESOURCE_EXHAUSTED, in band) arrives within 50 ms of its request
    (p99), every request gets exactly one answer, and after the load the process's resident
    memory is back within 64 MiB of where it started (the queue holds 32 faces of 64 px)."""
    process = _start_fake_server("--max-queue-faces", "32", "--max-batch-faces", "8",
                                 "--max-faces-per-request", "4", "--max-delay-ms", "1",
                                 FAKE_DELAY_S="0.2")
    try:
        port, _ = _wait_for_port(process)
        faces = random_faces(np.random.default_rng(1), 4)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.FaceEnhancerStub(ch)
            await stub.Enhance(request(0, faces))  # warm
            baseline = _rss_bytes(process.pid)
            streams, per_stream = 8, 10  # 80 requests x 4 faces = 320 faces: 10x the queue
            refusal_s, answered, request_ids = [], 0, set()

            async def one_stream(k: int):
                nonlocal answered
                call = stub.EnhanceBatch()
                sent_at = {}
                for i in range(per_stream):
                    rid = 1000 * (k + 1) + i
                    sent_at[rid] = time.perf_counter()
                    await call.write(request(rid, faces))
                await call.done_writing()
                async for response in call:
                    answered += 1
                    request_ids.add(response.request_id)
                    if response.HasField("error"):
                        assert response.error.code == RESOURCE_EXHAUSTED, response.error.message
                        refusal_s.append(time.perf_counter() - sent_at[response.request_id])

            await asyncio.gather(*(one_stream(k) for k in range(streams)))
            await asyncio.sleep(0.5)
            after = _rss_bytes(process.pid)
            still_up = await stub.GetInfo(pb.GetInfoRequest())
    finally:
        _stop(process)
    assert answered == len(request_ids) == streams * per_stream
    assert len(refusal_s) >= streams * per_stream // 2, "10x the queue was mostly accepted?"
    p99 = statistics.quantiles(refusal_s, n=100)[98] if len(refusal_s) >= 2 else refusal_s[0]
    print(f"overload: {len(refusal_s)} refusals, p50 {statistics.median(refusal_s) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms; RSS {baseline / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert p99 < 0.050, f"refusals took up to {p99 * 1000:.0f} ms (p99)"
    assert after - baseline < 64 * 2**20, f"RSS grew {(after - baseline) / 2**20:.0f} MiB"
    assert still_up.max_faces_per_request == 4
