"""How the client talks to each service address: one gRPC channel per target, long-lived
EnhanceBatch streams on it with responses matched to waiting batches, and a breaker.
"""
from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence

import grpc

from client.breaker import BreakerConfig, CircuitBreaker
from client.security import Security
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import RequestLimits

#: Target schemes that can name several backends (resolved by gRPC, spread by round_robin).
BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")

#: Client keepalive: a ping every KEEPALIVE_TIME_MS on an open stream notices a dead peer that
#: never closed the connection. The service must accept pings this often (its
#: grpc.http2.min_ping_interval_without_data_ms, server.app.MIN_CLIENT_PING_INTERVAL_MS, must be
#: <= this).
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

#: The standard health service's Watch, called with bytes: the client needs no
#: grpcio-health-checking for two tiny messages.
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
_SERVICE = pb.DESCRIPTOR.services_by_name["FaceEnhancer"].full_name.encode()
#: HealthCheckRequest(service="faceenhance.v1.FaceEnhancer") on the wire.
HEALTH_REQUEST = b"\x0a" + bytes([len(_SERVICE)]) + _SERVICE
#: HealthCheckResponse.ServingStatus.SERVING
SERVING = 1
#: While a circuit is open, a Watch that fails is opened again after this long (doubling).
_WATCH_RETRY_S = (0.1, 2.0)


def health_status(reply: bytes) -> int:
    """HealthCheckResponse bytes -> its status number (0, UNKNOWN, when absent)."""
    return reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0


def channel_options(limits: RequestLimits = RequestLimits()) -> list[tuple[str, object]]:
    """Channel arguments: messages up to the largest valid response, keepalive, fast reconnect."""
    max_bytes = max(limits.max_request_bytes(), limits.max_response_bytes())
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's default reconnect backoff grows to 120 s; a restarted replica should be used
        # again within seconds (the breaker already limits how often a dead one is tried).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        # Channels share connections process-wide by default, so one channel's failed attempt
        # (a replica that was down, a port reused by a new server) would hold back the others'
        # until its backoff ends; each client keeps its own.
        ("grpc.use_local_subchannel_pool", 1),
        # A name that resolves to several replicas spreads new calls (streams) over all of them.
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    ]


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """"host:port", a list of them, or one "dns:///name:port" -> the list of channel targets."""
    if isinstance(targets, str):
        targets = [targets]
    targets = [t.strip() for t in targets]
    if not targets or not all(targets):
        raise ValueError('targets must be "host:port", a list of them, or "dns:///name:port"; '
                         f"got {targets!r}")
    if len(targets) > 1 and any(t.startswith(BALANCED_SCHEMES) for t in targets):
        raise ValueError(f"give either a list of host:port addresses or one dns:/// name, not both: "
                         f"{targets!r}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets has duplicates: {targets!r}")
    return targets


class StreamBroken(Exception):
    """A stream ended or failed before this request's answer came; `reason` says how.

    `by_client`: this client closed the stream under the request (its circuit opened, another
    batch's write was cut off at its deadline, or the client is closing): not the service's
    failure, and the request may be sent again while its deadline lasts."""

    def __init__(self, reason: str, detail: str = "", by_client: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.by_client = by_client


def reason_for_code(code: grpc.StatusCode | None, *, in_band: bool = False) -> str:
    """gRPC status -> fallback reason.

    "internal" is kept for the service saying so in band: as the status of a whole call,
    gRPC also reports a failed connection as INTERNAL, which is a transport failure.
    """
    reasons = {
        grpc.StatusCode.UNAVAILABLE: "unavailable",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
        grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
        grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
        grpc.StatusCode.PERMISSION_DENIED: "unauthenticated",
    }
    return reasons.get(code, "internal" if in_band else "transport")


class _OpenCall:
    """One EnhanceBatch call: the requests written on it wait here for their responses."""

    def __init__(self, call):
        self.call = call
        self.pending: dict[int, asyncio.Future] = {}
        self.write_lock = asyncio.Lock()  # one write at a time on a gRPC stream
        self.broken: StreamBroken | None = None
        self.reader = asyncio.get_running_loop().create_task(self._read_responses())

    async def _read_responses(self) -> None:
        broken = StreamBroken("transport", "the service closed the stream")
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    code = await self.call.code()
                    if code != grpc.StatusCode.OK:
                        broken = StreamBroken(reason_for_code(code), await self.call.details() or "")
                    break
                waiter = self.pending.pop(response.request_id, None)
                # No waiter: the batch timed out and fell back already; drop the late answer.
                if waiter is not None and not waiter.done():
                    waiter.set_result(response)
        except grpc.aio.AioRpcError as error:
            broken = StreamBroken(reason_for_code(error.code()), error.details() or "")
        except asyncio.CancelledError:
            broken = StreamBroken("transport", "the stream was closed by the client")
            raise
        except Exception as error:  # noqa: BLE001 - any transport failure ends this stream only
            broken = StreamBroken("transport", repr(error))
        finally:
            self.fail_pending(broken)

    def fail_pending(self, broken: StreamBroken) -> None:
        self.broken = self.broken or broken
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_result(broken)

    def close(self, broken: StreamBroken | None = None) -> None:
        """End the call; its waiting requests are answered `broken` (by default: reset by
        this client, which they may be sent again after)."""
        self.fail_pending(broken or StreamBroken("transport", "the stream was reset by the client",
                                                 by_client=True))
        self.call.cancel()
        self.reader.cancel()


class _Write:
    """One request written on an open call, as a task of its own, one write at a time."""

    def __init__(self, current: _OpenCall, request: pb.EnhanceRequest):
        self.current = current
        self.started = False
        self.task = asyncio.ensure_future(self._run(request))

    async def _run(self, request: pb.EnhanceRequest) -> None:
        current = self.current
        try:
            async with current.write_lock:
                self.started = True
                await current.call.write(request)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the stream failed under us
            if isinstance(error, grpc.aio.AioRpcError):
                reason, detail = reason_for_code(error.code()), error.details() or ""
            else:
                reason, detail = "transport", repr(error)
            current.fail_pending(StreamBroken(reason, detail))
            current.call.cancel()

    def abandon(self) -> None:
        """The caller stopped waiting: a write not yet started is dropped; one cut off half-way
        leaves the stream unusable, so the stream is closed (the next request opens another)."""
        if self.task.done():
            return
        self.task.cancel()
        if self.started:
            self.current.close()


class BatchStream:
    """A long-lived EnhanceBatch stream, opened lazily and again after it breaks, carrying
    up to `max_in_flight` requests at once."""

    def __init__(self, stub: pb_grpc.FaceEnhancerStub, max_in_flight: int, metadata=()):
        self._stub = stub
        self._metadata = metadata
        self._slots = asyncio.Semaphore(max_in_flight)
        self._open: _OpenCall | None = None
        self.opened = 0  # how many calls this stream has opened (1 + reconnects)

    @property
    def in_flight(self) -> int:
        return len(self._open.pending) if self._open is not None else 0

    def _current(self) -> _OpenCall:
        if self._open is None or self._open.broken is not None or self._open.call.done():
            if self._open is not None:
                self._open.close()
            self._open = _OpenCall(self._stub.EnhanceBatch(metadata=self._metadata or None))
            self.opened += 1
        return self._open

    async def request(self, request: pb.EnhanceRequest) -> pb.EnhanceResponse:
        """Send one request and wait for its response; raises StreamBroken.

        The caller bounds the wait (asyncio.timeout); a cancelled wait forgets the request,
        so a late response is dropped. The answer is awaited beside the write, not after it: a
        stream that ends answers its waiting requests at once, and a write on a call that died
        under it may never finish (grpcio before grpc/grpc#34148).
        """
        async with self._slots:
            current = self._current()
            waiter = asyncio.get_running_loop().create_future()
            current.pending[request.request_id] = waiter
            writing = _Write(current, request)
            try:
                await asyncio.wait((writing.task, waiter), return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    await waiter  # written (or failed, which answers it): now the response
                elif not writing.task.done():
                    if isinstance(waiter.result(), StreamBroken):
                        writing.task.cancel()  # the call is over; its write will not be
                    else:
                        await writing.task  # answered, so written: it is finishing
            except asyncio.CancelledError:
                writing.abandon()
                raise
            finally:
                current.pending.pop(request.request_id, None)
        answer = waiter.result()
        if isinstance(answer, StreamBroken):
            raise answer
        return answer

    def reset(self, broken: StreamBroken | None = None) -> asyncio.Task | None:
        """Drop the open call (if any); the next request opens a new one. Its waiting requests
        are answered `broken` (see _OpenCall.close).

        Returns the cancelled call's reader task, for a caller that wants to wait for it.
        """
        if self._open is None:
            return None
        reader = self._open.reader
        self._open.close(broken)
        self._open = None
        return reader


class Target:
    """One channel target ("host:port" or "dns:///name:port"), its streams and its breaker."""

    def __init__(self, address: str, *, streams: int, max_in_flight: int,
                 breaker: BreakerConfig, limits: RequestLimits = RequestLimits(),
                 security: Security = Security()):
        if streams < 1 or max_in_flight < 1:
            raise ValueError(f"streams_per_target and max_in_flight must be >= 1; "
                             f"got {streams} and {max_in_flight}")
        self.address = address
        self.security = security
        #: Sent with every call (the bearer token, when there is one).
        self.metadata = security.call_metadata()
        self.breaker = CircuitBreaker(breaker)
        self.requests_sent = 0
        self.failures = 0
        #: What it serves, once asked (only when the client expects a model), and how that
        #: differs from the expected one (None: it is the one).
        self.info = None
        self.model_problem: str | None = None
        self.info_expires = 0.0
        self._stream_count = streams
        self._max_in_flight = max_in_flight
        self._limits = limits
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.FaceEnhancerStub | None = None
        self._streams: list[BatchStream] = []
        self._next_stream = itertools.count()
        self._closed = False
        self._watcher: asyncio.Task | None = None

    @property
    def stub(self) -> pb_grpc.FaceEnhancerStub:
        """The channel, created on first use inside the event loop that will drive it."""
        if self._stub is None:
            options = channel_options(self._limits) + self.security.channel_options()
            credentials = self.security.channel_credentials()
            self._channel = (grpc.aio.secure_channel(self.address, credentials, options=options)
                             if credentials is not None
                             else grpc.aio.insecure_channel(self.address, options=options))
            self._stub = pb_grpc.FaceEnhancerStub(self._channel)
            # All streams are created together so that round_robin puts them on different
            # replicas (a stream stays on the replica it was opened on).
            self._streams = [BatchStream(self._stub, self._max_in_flight, self.metadata)
                             for _ in range(self._stream_count)]
        return self._stub

    async def get_info(self, timeout: float) -> pb.ServiceInfo:
        """GetInfo on this target, with its credentials; raises grpc.aio.AioRpcError."""
        return await self.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout,
                                       metadata=self.metadata or None)

    def pick_stream(self) -> BatchStream:
        """The stream with the fewest requests in flight, round-robin among equals."""
        self.stub  # noqa: B018 - creates the channel and streams on first use
        start = next(self._next_stream) % len(self._streams)
        order = self._streams[start:] + self._streams[:start]
        return min(order, key=lambda stream: stream.in_flight)

    async def request(self, request: pb.EnhanceRequest, sticky: bool = False) -> pb.EnhanceResponse:
        """Send on the least busy stream, or with `sticky` always on the first one (steady
        video: the service keeps a video's state per stream)."""
        if self._closed:
            raise StreamBroken("unavailable", "the client was closed")
        self.requests_sent += 1
        if sticky:
            self.stub  # noqa: B018 - creates the channel and its streams on first use
            stream = self._streams[0]
        else:
            stream = self.pick_stream()
        return await stream.request(request)

    def watch_health(self) -> None:
        """While the circuit is open, follow the target's Health/Watch and close the circuit the
        moment it comes back: SERVING after being unreachable or not serving. A restarted
        replica is used again at once, not after the breaker's cooldown (up to max_cooldown_s).
        A target that stays SERVING throughout (up, but too slow) is left to the breaker."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_health())

    def stop_health_watch(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch_health(self) -> None:
        delay, was_down = _WATCH_RETRY_S[0], False
        while not self._closed and self.breaker.state != "closed":
            # a channel that is not connected means the target went away (a slow but living
            # target keeps its connection, and is left to the breaker)
            was_down |= self.channel.get_state() != grpc.ChannelConnectivity.READY
            try:
                # wait_for_ready: while the target is down the call waits for the channel to
                # connect (gRPC's reconnect backoff is capped at 2 s: channel_options) rather
                # than failing at once and leaving the retry to a sleep of ours
                watch = self.channel.unary_stream(HEALTH_WATCH)(
                    HEALTH_REQUEST, metadata=self.metadata or None, wait_for_ready=True)
                async for reply in watch:
                    delay = _WATCH_RETRY_S[0]
                    if health_status(reply) != SERVING:
                        was_down = True
                    elif was_down:
                        self.breaker.serving_again()
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return  # no health service there: the breaker's probes decide
            was_down = True  # the watch ended or could not start: the target went away
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WATCH_RETRY_S[1])

    @property
    def channel(self) -> grpc.aio.Channel:
        self.stub  # noqa: B018 - creates the channel on first use
        return self._channel

    def reset_streams(self, broken: StreamBroken | None = None) -> None:
        """Close this target's streams so the next batch opens fresh ones (maybe on another
        replica); the batches waiting on them are answered `broken`."""
        for stream in self._streams:
            stream.reset(broken)

    @property
    def streams_opened(self) -> int:
        return sum(stream.opened for stream in self._streams)

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        readers = [reader for reader in (stream.reset() for stream in self._streams) if reader]
        # let the cancelled readers finish, so none is left pending when the loop closes
        await asyncio.gather(*readers, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
