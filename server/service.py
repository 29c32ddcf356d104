"""The gRPC face of the service: protobuf in, batcher call, protobuf out (grpc.aio).

Errors become status codes in one place, `error_status`; the model and batching live elsewhere.
"""
from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import logging
import time
from typing import AsyncIterator, Callable

import grpc

from contract import codec
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import OUTPUT_SIZES, InvalidRequest, RestorerInfo
from server.batcher import Batcher, DeadlineExceeded, DeviceFull, NotAccepting, PipelineFailed, QueueFull
from server.jobs import ModelInfo
from server.security import RateLimitedLog
from server.settings import Settings
from server.steady import VideoState

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FaceEnhancer"].full_name
#: Requests of one stream that may be decoded, queued or computing at once. Past this the
#: stream stops reading, and HTTP/2 flow control slows the sender instead of us buffering.
MAX_IN_FLIGHT_PER_STREAM = 16
#: Responses above this many bytes are serialised off the event loop.
_ENCODE_OFF_LOOP_BYTES = 8 << 20

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
#: At most one log line per this many seconds about messages that do not parse; the rest are
#: counted (faceenhance_requests_total{outcome="invalid_argument"}) and summed in the next line.
MALFORMED_LOG_INTERVAL_S = 10.0


class Malformed:
    """A message that is not the protobuf it should be. gRPC would log each one with a
    traceback and answer UNKNOWN; the servicer answers INVALID_ARGUMENT instead."""

    request_id = 0

    def __init__(self, size: int, error: Exception):
        self.size = size
        self.error = error

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's spelling
        return False


def _tolerant(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, and whatever else bad bytes raise
            return Malformed(len(data), error)
    return deserialize


def add_to_server(servicer: "FaceEnhancerServicer", server) -> None:
    """Register the servicer like pb_grpc.add_FaceEnhancerServicer_to_server, with request
    parsing that hands malformed bytes to the servicer instead of failing inside gRPC."""
    handlers = {
        "EnhanceBatch": grpc.stream_stream_rpc_method_handler(
            servicer.EnhanceBatch, request_deserializer=_tolerant(pb.EnhanceRequest.FromString),
            response_serializer=pb.EnhanceResponse.SerializeToString),
        "Enhance": grpc.unary_unary_rpc_method_handler(
            servicer.Enhance, request_deserializer=_tolerant(pb.EnhanceRequest.FromString),
            response_serializer=pb.EnhanceResponse.SerializeToString),
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo, request_deserializer=_tolerant(pb.GetInfoRequest.FromString),
            response_serializer=pb.ServiceInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def server_version() -> str:
    try:
        return importlib.metadata.version("gfpgan-service")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+source"


def _deadline(request: pb.EnhanceRequest, context) -> float | None:
    """When (time.monotonic()) the caller stops waiting: the request's timeout_ms, and a unary
    call's gRPC deadline, whichever comes first; None for neither."""
    limits = []
    if request.timeout_ms:
        limits.append(request.timeout_ms / 1000.0)
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        limits.append(remaining)
    return time.monotonic() + min(limits) if limits else None


def error_status(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """The one mapping from what went wrong to (status code, message, metrics outcome)."""
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), "invalid_argument"
    if isinstance(exc, (QueueFull, DeviceFull)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "resource_exhausted"
    if isinstance(exc, NotAccepting):
        return grpc.StatusCode.UNAVAILABLE, str(exc), "unavailable"
    if isinstance(exc, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), "deadline_exceeded"
    if isinstance(exc, PipelineFailed):
        return grpc.StatusCode.INTERNAL, str(exc), "internal"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", "internal"


class FaceEnhancerServicer(pb_grpc.FaceEnhancerServicer):
    """faceenhance.v1.FaceEnhancer over a Batcher that may not exist yet (model still loading).

    batcher_provider() returns the Batcher, or None while starting; info_provider() the
    loaded pipeline's ModelInfo, or None.
    """

    def __init__(self, batcher_provider: Callable[[], Batcher | None], settings: Settings,
                 info_provider: Callable[[], ModelInfo | None], metrics=None,
                 max_in_flight_per_stream: int = MAX_IN_FLIGHT_PER_STREAM):
        self._batcher_provider = batcher_provider
        self._settings = settings
        self._limits = settings.limits()
        self._info_provider = info_provider
        self._metrics = metrics
        self._max_in_flight = max_in_flight_per_stream
        self._stream_readers: set[asyncio.Task] = set()
        self._closing = False
        self._malformed_log = RateLimitedLog(MALFORMED_LOG_INTERVAL_S, log)

    # --- RPCs ------------------------------------------------------------------------------

    async def EnhanceBatch(self, request_iterator, context) -> AsyncIterator[pb.EnhanceResponse]:
        # The reader decodes and queues requests as they come; answers are written in request
        # order, but a refusal or error is written as soon as it is known, ahead of answers
        # still being computed (the contract: match responses by request_id). A caller whose
        # request is refused for a full queue hears so at once, not after the work ahead of it.
        # `slots` bounds how far the reader may run ahead of the writer.
        slots = asyncio.Semaphore(self._max_in_flight)
        writable: asyncio.Queue = asyncio.Queue()  # responses to write, in writing order
        # [task, written] per request, in request order, until its answer is written
        ordered: collections.deque[list] = collections.deque()
        state = {"reading": True}
        video = VideoState()  # this stream's steady_video alignment filter

        def write(entry: list) -> None:
            task, done = entry
            if not done and not task.cancelled():
                entry[1] = True
                writable.put_nowait(task.result())

        def settle(entry: list) -> None:
            task = entry[0]
            if not task.cancelled() and task.result().HasField("error"):
                write(entry)  # errors overtake
            while ordered and ordered[0][0].done():
                write(ordered.popleft())
            _maybe_end()

        def _maybe_end() -> None:
            if not state["reading"] and not ordered:
                writable.put_nowait(None)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    entry = [asyncio.ensure_future(self._answer(request, "EnhanceBatch", video=video)),
                             False]
                    ordered.append(entry)
                    entry[0].add_done_callback(lambda _, entry=entry: settle(entry))
            finally:
                state["reading"] = False
                _maybe_end()

        reader = asyncio.ensure_future(read())
        self._stream_readers.add(reader)
        try:
            while (response := await writable.get()) is not None:
                yield response
                slots.release()
            if reader.cancelled():  # close_streams(): the service is going away
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "the service is shutting down; reconnect (to another replica)")
            reader.result()  # a transport error while reading ends the call with it
        finally:
            self._stream_readers.discard(reader)
            reader.cancel()
            # The caller went away (or the call failed): drop its queued work.
            for task, _ in ordered:
                task.cancel()

    async def Enhance(self, request: pb.EnhanceRequest, context) -> pb.EnhanceResponse:
        response = await self._answer(request, "Enhance", context)
        if response.HasField("error"):
            await context.abort(_CODES_BY_NUMBER[response.error.code], response.error.message)
        return response

    def _max_batch_faces(self) -> int:
        """The batcher's limit: --max-batch-faces, or what auto made of it (server.memory)."""
        batcher = self._batcher_provider()
        if batcher is not None:
            return batcher.max_batch_faces
        value = self._settings.max_batch_faces
        return value if isinstance(value, int) else 0

    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.ServiceInfo:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"not a faceenhance.v1.GetInfoRequest ({request.size} bytes)")
        info = self._info_provider()
        if info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the model is still loading; retry when health says SERVING")
        s = self._settings
        return pb.ServiceInfo(
            model_name=info.model_name, model_version=info.model_version,
            weights_sha256=info.weights_sha256, device=info.device, dtype=info.dtype,
            max_faces_per_request=s.max_faces_per_request, min_face_size=s.min_face_size,
            max_face_size=s.max_face_size, output_sizes=list(OUTPUT_SIZES),
            max_batch_faces=self._max_batch_faces(), server_version=server_version(),
            model_file=info.model_file, arch=info.arch, channel_multiplier=info.channel_multiplier,
            models=[codec.encode_restorer(m) for m in info.models], default_model=info.default_model,
            backgrounds=list(info.backgrounds))

    # --- shutdown ----------------------------------------------------------------------------

    def close_streams(self) -> None:
        """Stop reading every open stream: each writes its answers in flight, then ends UNAVAILABLE."""
        self._closing = True
        for reader in list(self._stream_readers):
            reader.cancel()

    # --- one request -------------------------------------------------------------------------

    def _check_model(self, options) -> RestorerInfo | None:
        """The loaded restorer a request names (None before the model is loaded: the batcher
        refuses the request then anyway); raises InvalidRequest when it is not loaded or does
        not take the options the request sets."""
        info = self._info_provider()
        if info is None:
            return None
        restorer = info.restorer(options.model)
        if restorer is None:
            loaded = ", ".join(m.id for m in info.models) or "only the default (leave model empty)"
            raise InvalidRequest(f"model {options.model!r} is not loaded here; loaded: {loaded}")
        if options.background.value not in info.backgrounds:
            raise InvalidRequest(f"background {options.background.value!r} is not available here "
                                 f"(this service has: {', '.join(info.backgrounds)}); start it with "
                                 f"--bg-upsampler realesrgan-x2 (or -x4) for Real-ESRGAN")
        if options.fidelity_weight is not None and not restorer.fidelity_weight:
            takes = ", ".join(m.id for m in info.models if m.fidelity_weight) or "none loaded here"
            raise InvalidRequest(f"fidelity_weight is a restorer's own weight (CodeFormer's w); "
                                 f"{restorer.id or restorer.name} has none (models with one: {takes}); "
                                 f"use fidelity, the blend after the network")
        if options.random_noise and not restorer.random_noise:
            raise InvalidRequest(f"random_noise needs a GFPGAN model (StyleGAN2 noise); "
                                 f"{restorer.id or restorer.name} has none")
        return restorer

    async def _answer(self, request: pb.EnhanceRequest, rpc: str, context=None,
                      video: VideoState | None = None) -> pb.EnhanceResponse:
        """Decode, enhance and encode one request; every failure becomes an in-band error."""
        request_id = request.request_id
        if self._metrics is not None:
            self._metrics.in_flight.inc()
        outcome = "cancelled"
        try:
            batcher = self._batcher_provider()
            if batcher is None or self._closing:
                raise NotAccepting("the service is starting up (loading the model) or shutting "
                                   "down; retry shortly or on another replica")
            if isinstance(request, Malformed):
                self._malformed_log.warning("%s: a message of %d bytes is not a faceenhance.v1."
                                            "EnhanceRequest: %s", rpc, request.size, request.error)
                raise InvalidRequest(f"not a faceenhance.v1.EnhanceRequest ({request.size} bytes "
                                     f"that do not parse: {request.error})")
            faces, options, landmarks = codec.decode_request(request, self._limits)
            restorer = self._check_model(options)
            steady = (video or VideoState()) if options.steady_video else None
            result = await batcher.submit(faces, options, landmarks,
                                          deadline=_deadline(request, context), video=steady)
            if result.faces.nbytes > _ENCODE_OFF_LOOP_BYTES:
                response = await asyncio.to_thread(codec.encode_response, request_id, result)
            else:
                response = codec.encode_response(request_id, result)
            outcome = "ok"
            if self._metrics is not None:
                model = restorer.id or restorer.name if restorer is not None else options.model
                self._metrics.faces.labels(model=model).inc(len(result.status))
                if steady is not None and steady.reused > steady.reported:
                    self._metrics.reused_alignments.inc(steady.reused - steady.reported)
                    steady.reported = steady.reused
                if steady is not None and steady.masks_reused > steady.masks_reported:
                    self._metrics.reused_masks.inc(steady.masks_reused - steady.masks_reported)
                    steady.masks_reported = steady.masks_reused
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - bad input must never end the stream
            code, message, outcome = error_status(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("request %d failed: %s", request_id, message)
            return codec.error_response(request_id, code.value[0], message)
        finally:
            if self._metrics is not None:
                self._metrics.in_flight.dec()
                self._metrics.requests.labels(rpc=rpc, outcome=outcome).inc()
