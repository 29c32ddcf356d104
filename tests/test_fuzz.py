"""Property-based fuzzing (Hypothesis) of the codec and of the service over real loopback gRPC.

- The codec, given any EnhanceRequest (random fields, and mutations of a valid one), returns
  a well-formed request or raises InvalidRequest: never another exception.
- The service, given random and mutated requests and raw bytes on a stream, answers each one
  with a defined outcome (the faces, or an in-band error with a known code), stays up, and a
  good stream beside the offender gets every answer, in order, untouched.
"""
from __future__ import annotations

import asyncio
import math
import threading

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import codec
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import InvalidRequest, RequestLimits
from server.app import FaceEnhanceServer
from server.settings import Settings
from tests.fakes import FakePipeline, fake_enhanced

LIMITS = RequestLimits(max_faces_per_request=4, min_face_size=8, max_face_size=32)
KNOWN_CODES = {grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
               grpc.StatusCode.DEADLINE_EXCEEDED.value[0], grpc.StatusCode.UNAVAILABLE.value[0]}

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
small_ints = st.integers(min_value=-3, max_value=70)


@st.composite
def requests(draw) -> pb.EnhanceRequest:
    """Anything from a valid request to nonsense: each field drawn from around its edges."""
    count, height, width, channels = (draw(small_ints) for _ in range(4))
    count, height, width, channels = (max(0, v) for v in (count, height, width, channels))
    size = count * height * width * channels
    # Past gRPC's message limit the stream itself is refused (tests/test_server.py covers that):
    # big batches keep their header and carry too few bytes.
    sizes = [size, max(0, size - 1), size + 1, 0] if size <= 20_000 else [0, 100]
    data_len = draw(st.sampled_from(sizes))
    request = pb.EnhanceRequest(
        request_id=draw(st.integers(0, 2**64 - 1)),
        faces=pb.FaceBatch(count=count, height=height, width=width, channels=channels,
                           data=draw(st.binary(min_size=data_len, max_size=data_len))
                           if data_len <= 512 else bytes(data_len)),
        timeout_ms=draw(st.sampled_from([0, 1, 1000])))
    options = request.options
    options.output_size = draw(st.sampled_from([0, 1, 256, 300, 512, 1024, 2**31]))
    options.alignment = draw(st.integers(0, 5))
    options.fidelity = draw(floats)
    if draw(st.booleans()):
        options.only_center_face = draw(st.booleans())
    options.random_noise = draw(st.booleans())
    request.landmarks.extend(draw(st.lists(floats, max_size=count * 10 + 2)))
    return request


def valid_request(faces: np.ndarray, request_id: int) -> pb.EnhanceRequest:
    return codec.encode_request(request_id, faces, __import__("client").EnhanceOptions())


@st.composite
def mutated(draw) -> bytes:
    """A valid request's bytes with a few bytes flipped, cut or appended."""
    faces = np.random.default_rng(draw(st.integers(0, 1000))).integers(0, 256, (1, 8, 8, 3), np.uint8)
    data = bytearray(valid_request(faces, draw(st.integers(0, 1000))).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "append"]))
        if kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut" and data:
            data = data[:draw(st.integers(0, len(data) - 1))]
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# --- the codec -----------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(requests())
def test_the_codec_returns_a_well_formed_request_or_raises_invalid_request(request):
    try:
        faces, options, landmarks = codec.decode_request(request, LIMITS)
    except InvalidRequest as error:
        assert str(error)  # says what is wrong
        return
    n = request.faces.count
    assert faces.shape == (n, request.faces.height, request.faces.width, 3) and faces.dtype == np.uint8
    assert LIMITS.min_face_size <= faces.shape[1] <= LIMITS.max_face_size and n <= LIMITS.max_faces_per_request
    assert options.output_size in (256, 512, 1024) and math.isfinite(options.fidelity)
    assert 0 <= options.fidelity <= 1
    if landmarks is not None:
        assert landmarks.shape == (n, 5, 2) and np.isfinite(landmarks).all()
        assert (landmarks >= 0).all() and (landmarks <= faces.shape[1]).all()


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_mutated_bytes_parse_into_something_the_codec_judges_or_fail_to_parse(data):
    try:
        request = pb.EnhanceRequest.FromString(data)
    except Exception:  # noqa: BLE001 - the service's tolerant parser turns this into INVALID_ARGUMENT
        return
    try:
        codec.decode_request(request, LIMITS)
    except InvalidRequest:
        pass


# --- the service over loopback gRPC --------------------------------------------------------------

class _Service:
    """A FaceEnhanceServer with the fake pipeline, on its own event loop in a thread."""

    def __init__(self):
        self.pipeline = FakePipeline()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings_ = Settings(host="127.0.0.1", port=0, metrics_port=0, max_batch_faces=4,
                             max_delay_ms=1.0, max_queue_faces=16, max_faces_per_request=4,
                             min_face_size=8, max_face_size=32, drain_grace_s=1.0)
        self.app = FaceEnhanceServer(settings_, self.pipeline.factory)
        self._call(self._start())

    async def _start(self):
        await self.app.start()
        await asyncio.wait_for(self.app.ready.wait(), 10)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self):
        self._call(self.app.shutdown(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def service():
    running = _Service()
    yield running
    running.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(requests().map(lambda r: r.SerializeToString()), mutated(),
                          st.binary(max_size=64)), min_size=1, max_size=12),
       st.integers(0, 2**32))
def test_the_service_answers_every_message_stays_up_and_a_good_stream_beside_loses_nothing(
        service, offender_messages, seed):
    rng = np.random.default_rng(seed)
    good = [rng.integers(0, 256, (int(rng.integers(1, 5)), 16, 16, 3), np.uint8) for _ in range(4)]
    address = f"127.0.0.1:{service.app.port}"
    with grpc.insecure_channel(address) as bad_channel, grpc.insecure_channel(address) as good_channel:
        raw = bad_channel.stream_stream("/faceenhance.v1.FaceEnhancer/EnhanceBatch")
        neighbour = pb_grpc.FaceEnhancerStub(good_channel).EnhanceBatch(
            iter([valid_request(faces, 1000 + i) for i, faces in enumerate(good)]), timeout=30)
        answers = [pb.EnhanceResponse.FromString(r) for r in raw(iter(offender_messages), timeout=30)]
        neighbour_answers = list(neighbour)
        # still up: a plain request after all that is answered
        after = pb_grpc.FaceEnhancerStub(good_channel).Enhance(valid_request(good[0], 7), timeout=30)
    assert len(answers) == len(offender_messages)
    for answer in answers:
        if answer.HasField("error"):
            assert answer.error.code in KNOWN_CODES and answer.error.message
        else:
            assert len(answer.face_status) == answer.faces.count > 0
    assert [a.request_id for a in neighbour_answers] == [1000 + i for i in range(len(good))]
    options = __import__("client").EnhanceOptions()
    for answer, faces in zip(neighbour_answers, good):
        assert not answer.HasField("error"), answer.error.message
        decoded = np.frombuffer(answer.faces.data, np.uint8).reshape(faces.shape[0], 256, 256, 3)
        assert (decoded == fake_enhanced(faces, options)[0]).all()
    assert after.request_id == 7 and not after.HasField("error")
