"""A stand-in FaceEnhancer on real loopback gRPC, with misbehaviour on demand (delay, in-band
errors, dropped streams, stop and restart), for testing the client without the model.
"""
from __future__ import annotations

import asyncio
import socket
import threading

import cv2
import grpc
import numpy as np

from contract import codec
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import FaceStatus, InvalidRequest, RequestLimits

_MAX_MESSAGE_BYTES = RequestLimits().max_response_bytes()
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def fake_enhance(faces: np.ndarray, output_size: int) -> np.ndarray:
    """The fake's "enhancement": nearest-neighbour resize, then invert every channel.

    Unlike the client's Lanczos fallback, so a test can tell them apart; channel-wise, so a
    B/G/R swap anywhere on the way shows.
    """
    return np.stack([255 - cv2.resize(np.ascontiguousarray(face), (output_size, output_size),
                                      interpolation=cv2.INTER_NEAREST)
                     for face in faces])


class FakeServicer(pb_grpc.FaceEnhancerServicer):
    """Answers like the real service; the attributes below change how (set them any time)."""

    def __init__(self):
        # --- behaviour -------------------------------------------------------------------
        #: Seconds to wait before answering each request (one after the other, per stream).
        self.delay_s = 0.0
        #: (grpc.StatusCode, message): answer every request in band with this error instead.
        self.error: tuple[grpc.StatusCode, str] | None = None
        #: Abort the next stream with UNAVAILABLE when its request number N arrives (one-shot).
        self.drop_next_stream_at: int | None = None
        #: Answer nothing on a stream until this many requests have arrived on it.
        self.hold_until = 0
        self.limits = RequestLimits(max_faces_per_request=32, min_face_size=64, max_face_size=512)
        #: What GetInfo says it serves: (model_file, arch, channel_multiplier).
        self.model = ("GFPGANv1.4.pth", "clean", 2)
        #: GetInfo's list of loaded restorers (contract.types.RestorerInfo); empty: none listed.
        self.models: list = []
        #: GetInfo's backgrounds.
        self.backgrounds = ["lanczos"]
        # --- what happened ---------------------------------------------------------------
        self.requests = 0
        self.faces = 0
        self.info_calls = 0
        self.health_watches = 0
        self.streams_opened = 0
        self.answered_ids: list[int] = []
        self.face_counts: list[int] = []  # faces per request, in arrival order
        self.landmarks: list[list[float]] = []
        self.timeouts_ms: list[int] = []  # each request's timeout_ms, in arrival order
        self.first_bytes: list[int | None] = []  # each request's first pixel byte, in arrival order
        self.steady: list[bool] = []  # each request's steady_video option, in arrival order
        self.detect_every: list[int] = []  # and its detect_every (0: unset)
        self.mask_every: list[int] = []  # and its mask_every (0: unset)
        self.model_ids: list[str] = []  # and the restorer it asked for ("" : the default)
        self.background_kinds: list[int] = []  # and its background (pb.Background)
        #: Seconds GetInfo takes to answer.
        self.info_delay_s = 0.0

    def _answer(self, request: pb.EnhanceRequest) -> pb.EnhanceResponse:
        if self.error is not None:
            code, message = self.error
            return codec.error_response(request.request_id, code.value[0], message)
        try:
            faces, options, _ = codec.decode_request(request, self.limits)
        except InvalidRequest as error:
            return codec.error_response(request.request_id, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                        str(error))
        enhanced = fake_enhance(faces, options.output_size)
        return pb.EnhanceResponse(
            request_id=request.request_id, faces=codec.encode_faces(enhanced),
            face_status=[FaceStatus.ENHANCED] * len(enhanced),
            timings=pb.Timings(queue_ms=1.0, compute_ms=2.0))

    def _count(self, request: pb.EnhanceRequest) -> None:
        self.requests += 1
        self.faces += request.faces.count
        self.face_counts.append(request.faces.count)
        self.landmarks.append(list(request.landmarks))
        self.timeouts_ms.append(request.timeout_ms)
        self.first_bytes.append(request.faces.data[0] if request.faces.data else None)
        self.steady.append(request.options.steady_video)
        self.detect_every.append(request.options.detect_every)
        self.mask_every.append(request.options.mask_every)
        self.model_ids.append(request.options.model)
        self.background_kinds.append(request.options.background)

    async def EnhanceBatch(self, request_iterator, context):
        self.streams_opened += 1
        drop_at, self.drop_next_stream_at = self.drop_next_stream_at, None
        arrived: asyncio.Queue = asyncio.Queue()
        received = 0
        enough = asyncio.Event()

        async def receive():
            nonlocal received
            async for request in request_iterator:
                self._count(request)
                received += 1
                if received >= self.hold_until:
                    enough.set()
                arrived.put_nowait(request)
            enough.set()
            arrived.put_nowait(None)

        receiver = asyncio.create_task(receive())
        try:
            answered = 0
            while (request := await arrived.get()) is not None:
                if drop_at is not None and answered + 1 >= drop_at:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake service: stream dropped")
                await enough.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                response = self._answer(request)
                self.answered_ids.append(request.request_id)
                answered += 1
                yield response
        finally:
            receiver.cancel()

    async def Enhance(self, request, context):
        self._count(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        response = self._answer(request)
        if response.HasField("error"):
            await context.abort(_CODES[response.error.code], response.error.message)
        return response

    async def HealthWatch(self, request: bytes, context):
        """grpc.health.v1.Health/Watch in bytes: SERVING (b"\\x08\\x01"), then nothing more."""
        self.health_watches += 1
        yield b"\x08\x01"
        await asyncio.Event().wait()  # until the caller goes away or the server stops

    async def GetInfo(self, request, context):
        self.info_calls += 1
        if self.info_delay_s:
            await asyncio.sleep(self.info_delay_s)
        return pb.ServiceInfo(
            model_name=self.model[0].rsplit(".", 1)[0], model_version="fake 1", weights_sha256="0" * 64, device="cpu",
            dtype="float32", max_faces_per_request=self.limits.max_faces_per_request,
            min_face_size=self.limits.min_face_size, max_face_size=self.limits.max_face_size,
            output_sizes=[256, 512, 1024], max_batch_faces=8, server_version="fake",
            model_file=self.model[0], arch=self.model[1], channel_multiplier=self.model[2],
            models=[codec.encode_restorer(m) for m in self.models],
            default_model=self.models[0].id if self.models else "", backgrounds=self.backgrounds)


class FakeService:
    """A FakeServicer served by grpc.aio on 127.0.0.1, on its own event loop in a thread, so
    tests using the blocking client and tests using asyncio can share it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.servicer = FakeServicer()
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-faceenhance",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "FakeService":
        self._call(self._start())
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (connections and streams are cut); the port can be served again."""
        if self._server is not None:
            self._call(self._server.stop(grace))
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> "FakeService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        # fake.requests, fake.delay_s, ...: the servicer's counters and knobs.
        return getattr(self.__dict__["servicer"], name)

    def __setattr__(self, name, value):
        if "servicer" in self.__dict__ and hasattr(self.servicer, name):
            setattr(self.servicer, name, value)
        else:
            super().__setattr__(name, value)

    async def _start(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ])
        pb_grpc.add_FaceEnhancerServicer_to_server(self.servicer, server)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Watch": grpc.unary_stream_rpc_method_handler(self.servicer.HealthWatch)}),))
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server

    def _call(self, coroutine, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)


def dead_address() -> tuple[socket.socket, str]:
    """A loopback address where nothing listens (connections are refused). Keep the socket
    open while using the address: it holds the port so nothing else takes it."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    return holder, f"127.0.0.1:{holder.getsockname()[1]}"
