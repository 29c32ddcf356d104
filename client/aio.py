"""The asyncio client: validates faces, splits big batches, sends them over long-lived
streams to healthy targets, and falls back to a local resize when the service cannot answer.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc
import numpy as np

from client.breaker import BreakerConfig
from client.fallback import fallback_result
from client.metrics import ClientMetrics
from client.security import Security
from client.targets import StreamBroken, Target, parse_targets, reason_for_code
from contract import codec
from contract.pb import face_enhance_pb2 as pb
from contract.types import (
    NUM_LANDMARKS,
    Alignment,
    EnhanceOptions,
    EnhanceResult,
    InvalidRequest,
    ModelSpec,
    RequestLimits,
    RestorerInfo,
)

log = logging.getLogger(__name__)

_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
#: After a failed GetInfo, batches are split by the default limit for this long before asking again.
_INFO_RETRY_S = 5.0
#: A target found serving another model than expect_model is asked again after this long (it
#: may have been redeployed); one serving the right model is asked again after its breaker opens.
_WRONG_MODEL_RECHECK_S = 30.0


@dataclass(frozen=True)
class ServiceInfo:
    """What a service reported about itself (GetInfo)."""

    target: str
    model_name: str
    model_version: str
    weights_sha256: str
    device: str
    dtype: str
    max_faces_per_request: int
    min_face_size: int
    max_face_size: int
    output_sizes: tuple[int, ...]
    max_batch_faces: int
    server_version: str
    model_file: str = ""
    arch: str = ""
    channel_multiplier: int = 0
    #: Every restorer it has loaded (the default first), and the default's id.
    models: tuple[RestorerInfo, ...] = ()
    default_model: str = ""
    #: The backgrounds it offers: "lanczos", and "realesrgan" when it has one loaded.
    backgrounds: tuple[str, ...] = ()

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(max_faces_per_request=self.max_faces_per_request,
                             min_face_size=self.min_face_size, max_face_size=self.max_face_size)

    @classmethod
    def from_pb(cls, target: str, msg: pb.ServiceInfo) -> "ServiceInfo":
        return cls(target=target, model_name=msg.model_name, model_version=msg.model_version,
                   weights_sha256=msg.weights_sha256, device=msg.device, dtype=msg.dtype,
                   max_faces_per_request=msg.max_faces_per_request,
                   min_face_size=msg.min_face_size, max_face_size=msg.max_face_size,
                   output_sizes=tuple(msg.output_sizes), max_batch_faces=msg.max_batch_faces,
                   server_version=msg.server_version, model_file=msg.model_file, arch=msg.arch,
                   channel_multiplier=msg.channel_multiplier,
                   models=tuple(codec.decode_restorer(m) for m in msg.models),
                   default_model=msg.default_model, backgrounds=tuple(msg.backgrounds))


class ServiceUnreachable(ConnectionError):
    """No target answered a call that has no local fallback (info())."""


class AccessDenied(ServiceUnreachable):
    """A service answered UNAUTHENTICATED or PERMISSION_DENIED: the token (or certificate) is
    missing or not one it accepts. Not a transient fault: fix the credentials."""


class WrongModel(Exception):
    """A target serves another model than the client's expect_model; it gets no faces."""


class AsyncFaceEnhanceClient:
    """Enhance batches of faces through one or more FaceEnhancer services.

    `enhance()` never raises for service trouble (timeout, unavailable, overloaded, broken
    stream): the batch comes back resized locally and marked `fell_back`. It raises
    `InvalidRequest` for a caller error (wrong dtype or shape, bad options or landmarks).

    With `expect_model` (a ModelSpec), each target is asked what it serves (GetInfo) before
    its first batch; one that serves another model gets no faces, and where no target serves
    it the batch falls back with reason "wrong_model".
    """

    def __init__(self, targets: str | Sequence[str], *, options: EnhanceOptions = EnhanceOptions(),
                 timeout_ms: float = 1000, streams_per_target: int = 1, max_in_flight: int = 4,
                 breaker: BreakerConfig = BreakerConfig(), registry=None,
                 expect_model: ModelSpec | None = None, security: Security | None = None):
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0; got {timeout_ms}")
        self.options = options.validate()
        self.expect_model = expect_model.validate() if expect_model else None
        self.timeout_ms = timeout_ms
        self.security = (security or Security()).validate()
        self.targets = [Target(address, streams=streams_per_target, max_in_flight=max_in_flight,
                               breaker=breaker, security=self.security)
                        for address in parse_targets(targets)]
        for target in self.targets:
            if self.security.plaintext_token_to(target.address):
                log.warning("the token goes to %s without TLS: anyone on the way can read it; "
                            "set a CA (GFPGAN_TLS_CA) or GFPGAN_TLS=1", target.address)
        self.metrics = ClientMetrics(registry)
        self._request_ids = itertools.count(1)
        self._next_target = 0
        self._info: ServiceInfo | None = None
        self._info_retry_at = 0.0
        self._info_asking: asyncio.Future | None = None
        self._steady_target: Target | None = None  # where this client's steady video goes
        self._closed = False

    # --- public API -------------------------------------------------------------------

    async def enhance(self, faces, options: EnhanceOptions | None = None, landmarks=None,
                      timeout_ms: float | None = None) -> EnhanceResult:
        """Enhance (N, H, W, 3) uint8 BGR faces; returns (N, out, out, 3) faces in order."""
        started = time.perf_counter()
        try:
            faces, options, landmarks = self.check(faces, options, landmarks)
            result = await self._enhance_checked(faces, options, landmarks, timeout_ms)
        except InvalidRequest:
            self.metrics.observe_invalid(time.perf_counter() - started)
            raise
        self.metrics.observe(result, time.perf_counter() - started)
        return result

    async def info(self, timeout_ms: float | None = None) -> ServiceInfo:
        """Ask the first target that answers what it serves; raises ServiceUnreachable."""
        self._check_open()
        timeout = (timeout_ms or self.timeout_ms) / 1000
        errors, denied = [], False
        for target in self.targets:
            try:
                msg = await target.get_info(timeout)
            except grpc.aio.AioRpcError as error:
                errors.append(f"{target.address}: {error.code().name} {error.details()}")
                denied |= error.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                           grpc.StatusCode.PERMISSION_DENIED)
                continue
            self._info = self._learn(target, ServiceInfo.from_pb(target.address, msg))
            return self._info
        if denied:
            raise AccessDenied("the face-enhance service refused this client's credentials (set "
                               "the token: GFPGAN_TOKEN or GFPGAN_TOKEN_FILE; or the client "
                               "certificate): " + "; ".join(errors))
        raise ServiceUnreachable("no face-enhance service answered GetInfo; is it running? "
                                 + "; ".join(errors))

    def stats(self) -> dict:
        """Counts since the client was made, plus each target's breaker and traffic."""
        stats = self.metrics.snapshot()
        stats["targets"] = {
            target.address: {"breaker": target.breaker.state, "requests": target.requests_sent,
                             "failures": target.failures, "streams_opened": target.streams_opened}
            for target in self.targets
        }
        return stats

    async def close(self) -> None:
        self._closed = True
        for target in self.targets:
            await target.close()

    async def __aenter__(self) -> "AsyncFaceEnhanceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- the batch path -----------------------------------------------------------------

    def check(self, faces, options: EnhanceOptions | None, landmarks):
        """Catch the caller's mistakes here, before anything is sent; raises InvalidRequest."""
        self._check_open()
        faces = codec.as_face_array(faces)
        if faces.shape[1] != faces.shape[2]:
            raise InvalidRequest(f"faces must be square (height == width); got "
                                 f"{faces.shape[1]}x{faces.shape[2]}: crop or pad them first")
        options = (options or self.options).validate()
        if options.alignment is Alignment.LANDMARKS:
            if landmarks is None:
                raise InvalidRequest("alignment LANDMARKS needs landmarks: (N, 5, 2) points per face")
            landmarks = np.asarray(landmarks, dtype=np.float32)
            if landmarks.size != faces.shape[0] * NUM_LANDMARKS * 2:
                raise InvalidRequest(f"landmarks must be (N, {NUM_LANDMARKS}, 2) for N = "
                                     f"{faces.shape[0]} faces; got shape {landmarks.shape}")
            landmarks = landmarks.reshape(faces.shape[0], NUM_LANDMARKS, 2)
            if not np.isfinite(landmarks).all():
                raise InvalidRequest("landmarks contain NaN or infinity")
        elif landmarks is not None:
            raise InvalidRequest("landmarks are only used with alignment LANDMARKS; "
                                 "pass options=EnhanceOptions(alignment=Alignment.LANDMARKS)")
        return faces, options, landmarks

    async def _enhance_checked(self, faces: np.ndarray, options: EnhanceOptions,
                               landmarks: np.ndarray | None, timeout_ms: float | None) -> EnhanceResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_ms or self.timeout_ms) / 1000
        per_request = await self._max_faces_per_request(deadline)
        starts = range(0, faces.shape[0], per_request)
        if len(starts) == 1:
            return await self._enhance_part(faces, options, landmarks, deadline)
        # Parts go out together (pipelined, maybe to different targets) and come back in order.
        # (gather rather than asyncio.TaskGroup, which Python 3.10 lacks: MuseTalk runs there.)
        tasks = [asyncio.ensure_future(self._enhance_part(
            faces[s:s + per_request], options,
            None if landmarks is None else landmarks[s:s + per_request], deadline))
            for s in starts]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one part failed (or we were cancelled): stop the others
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return _join(results)

    async def _enhance_part(self, faces: np.ndarray, options: EnhanceOptions,
                            landmarks: np.ndarray | None, deadline: float) -> EnhanceResult:
        """One request's worth of faces: try healthy targets in turn until the deadline."""
        loop = asyncio.get_running_loop()
        request = codec.encode_request(next(self._request_ids), faces, options, landmarks)
        tried: list[Target] = []
        reason, detail = None, ""
        while True:
            if loop.time() >= deadline:
                reason = reason or "timeout"
                break
            if self._closed:
                reason, detail = reason or "unavailable", detail or "the client was closed"
                break
            # steady video: one video stays on one target (and one stream), where its state is
            target = self._pick_target(exclude=tried,
                                       prefer=self._steady_target if options.steady_video else None)
            if target is None:
                reason = reason or "circuit_open"
                break
            tried.append(target)
            outcome = "abandoned"
            try:
                await _until(deadline, self._check_model(target, deadline))
                if not request.options.model and self.expect_model is not None and self.expect_model.model:
                    request.options.model = self.expect_model.model  # chosen by the spec
                # the service drops the work if it cannot start it before we stop waiting
                request.timeout_ms = max(1, math.ceil((deadline - loop.time()) * 1000))
                response = await _until(deadline, target.request(request, sticky=options.steady_video))
                if response.HasField("error"):
                    if response.error.code == _INVALID_ARGUMENT:
                        outcome = "success"  # the service is healthy; the request is wrong
                        raise InvalidRequest(f"the service rejected the request: {response.error.message}")
                    code = _CODE_BY_NUMBER.get(response.error.code)
                    raise StreamBroken(reason_for_code(code, in_band=True),
                                       response.error.message)
                result = _decode(response, faces.shape[0], options.output_size)
                outcome = "success"
                if options.steady_video:
                    self._steady_target = target
                return result
            except TimeoutError:
                outcome, reason = "failure", "timeout"
                detail = f"{target.address}: no answer within the deadline"
                break
            except StreamBroken as broken:
                if broken.by_client:
                    # This client closed the stream under the batch: its circuit opened on
                    # other batches' failures (the breaker has counted them, and now skips the
                    # target: circuit_open), or another batch's write was cut off at its
                    # deadline. Not this target's failure: the batch goes again, maybe to the
                    # same target, while its deadline lasts.
                    if broken.reason == "circuit_open":
                        reason, detail = broken.reason, f"{target.address}: {broken}"
                    tried.remove(target)
                    continue
                # A fast refusal (unavailable, overloaded, broken stream): try another target.
                outcome, reason, detail = "failure", broken.reason, f"{target.address}: {broken}"
            except WrongModel as wrong:
                reason, detail = "wrong_model", str(wrong)  # another target may serve it
            finally:
                self._record(target, outcome)
        return await asyncio.to_thread(fallback_result, faces, options.output_size, reason, detail)

    def _pick_target(self, exclude: list[Target], prefer: Target | None = None) -> Target | None:
        """`prefer` when its breaker lets a batch through, else the next target round-robin
        whose breaker does."""
        if prefer is not None and prefer not in exclude and prefer.breaker.allow():
            return prefer
        n = len(self.targets)
        for i in range(n):
            index = (self._next_target + i) % n
            target = self.targets[index]
            if target in exclude or not target.breaker.allow():
                continue
            self._next_target = index + 1
            return target
        return None

    def _record(self, target: Target, outcome: str) -> None:
        if outcome == "success":
            target.breaker.record_success()
            target.stop_health_watch()
        elif outcome == "failure":
            target.failures += 1
            if target.breaker.record_failure():
                # Open circuit: drop its streams, so the probe later starts on a fresh one, and
                # what it serves, which a restart may have changed. The batches still waiting on
                # them fall back as the circuit's (or go to another target), not as a broken
                # transport.
                target.reset_streams(StreamBroken(
                    "circuit_open", "the circuit opened on other batches' failures and closed this "
                    "batch's stream", by_client=True))
                target.info = None
                target.watch_health()
        else:
            target.breaker.release()

    async def _max_faces_per_request(self, deadline: float) -> int:
        """The service's limit, learned once from GetInfo (the contract's default until then).
        Batches that start while it is being asked wait for that answer (within their budget)
        rather than overtake the first batch: a stream's batches go out in the order given,
        which steady video relies on."""
        loop = asyncio.get_running_loop()
        # Leave at least half the batch's time for the batch itself.
        budget = (deadline - loop.time()) / 2
        if self._info is None and budget > 0:
            if self._info_asking is None and loop.time() >= self._info_retry_at:
                self._info_retry_at = loop.time() + _INFO_RETRY_S
                self._info_asking = asyncio.ensure_future(self._ask_info(deadline))
                self._info_asking.add_done_callback(lambda _: setattr(self, "_info_asking", None))
            if self._info_asking is not None:
                try:
                    await _until(loop.time() + budget, asyncio.shield(self._info_asking))
                except TimeoutError:
                    pass
        if self._info is not None and self._info.max_faces_per_request > 0:
            return self._info.max_faces_per_request
        return RequestLimits().max_faces_per_request

    async def _ask_info(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        for target in [t for t in self.targets if t.breaker.state == "closed"]:
            try:
                msg = await target.get_info(max(deadline - loop.time(), 0) / 2)
            except grpc.aio.AioRpcError:
                continue  # the batch itself will find out, and fall back, if all are down
            self._info = self._learn(target, ServiceInfo.from_pb(target.address, msg))
            return

    async def _check_model(self, target: Target, deadline: float) -> None:
        """Raise WrongModel when `target` serves another model than expect_model (asked once,
        then again after a while for a wrong one); StreamBroken when it cannot be asked."""
        if self.expect_model is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if target.info is None or (target.model_problem and now >= target.info_expires):
            try:
                msg = await target.get_info(max(deadline - now, 0.001) / 2)
            except grpc.aio.AioRpcError as error:
                raise StreamBroken(reason_for_code(error.code()),
                                   f"GetInfo: {error.details()}") from None
            self._learn(target, ServiceInfo.from_pb(target.address, msg))
        if target.model_problem:
            raise WrongModel(f"{target.address}: {target.model_problem}")

    def _learn(self, target: Target, info: ServiceInfo) -> ServiceInfo:
        """Keep what `target` said it serves (and, with expect_model, how that differs)."""
        target.info = info
        if self.expect_model is not None:
            chosen = self.expect_model.choose(info)
            if chosen and self.expect_model.model is None and not self.options.model:
                # The spec named a file or an arch: the first service that has it says which id
                # it is; from then on the client asks for that id and checks every target for it.
                self.expect_model = replace(self.expect_model, model=chosen)
                self.options = replace(self.options, model=chosen)
            target.model_problem = "; ".join(self.expect_model.mismatches(info)) or None
            target.info_expires = asyncio.get_running_loop().time() + _WRONG_MODEL_RECHECK_S
        return info

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this client is closed; make a new one")


def _decode(response: pb.EnhanceResponse, count: int, output_size: int) -> EnhanceResult:
    """A successful response -> EnhanceResult; a malformed one is the service's fault."""
    try:
        result = codec.decode_response(response)
    except (InvalidRequest, ValueError) as error:
        raise StreamBroken("internal", f"the service answered a malformed batch: {error}") from None
    if result.faces.shape != (count, output_size, output_size, 3) or len(result.status) != count:
        raise StreamBroken("internal", f"the service answered {result.faces.shape} with "
                           f"{len(result.status)} statuses for {count} faces of {output_size}")
    # A writable array of its own, like the fallback's (the decoded view is read-only bytes).
    result.faces = result.faces.copy()
    return result


def _join(parts: list[EnhanceResult]) -> EnhanceResult:
    """Results of a split batch -> one result, faces in the original order."""
    reasons = [p.fallback_reason for p in parts if p.fell_back]
    return EnhanceResult(
        faces=np.concatenate([p.faces for p in parts]),
        status=[s for p in parts for s in p.status],
        fell_back=bool(reasons),
        fallback_reason=reasons[0] if reasons else None,
        queue_ms=max(p.queue_ms for p in parts),
        compute_ms=sum(p.compute_ms for p in parts),
    )


__all__ = ["AsyncFaceEnhanceClient", "ServiceInfo", "ServiceUnreachable"]


async def _until(deadline: float, awaitable):
    """await `awaitable`, raising TimeoutError at `deadline` (event-loop time).

    asyncio.timeout_at on Python 3.11+, in the calling task; Python 3.10 (MuseTalk's) lacks it,
    so there asyncio.wait_for, whose asyncio.TimeoutError is not TimeoutError before 3.11."""
    if hasattr(asyncio, "timeout_at"):
        async with asyncio.timeout_at(deadline):
            return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))
    except asyncio.TimeoutError:
        raise TimeoutError("no answer before the deadline") from None
