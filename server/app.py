"""The gfpgan-serve process: gRPC server, health, reflection, metrics page, model start-up, drain.

`main()` is the console entry point; `serve()` runs until SIGTERM/SIGINT and drains.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, NoReturn, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.batcher import DEVICE_THREAD_PREFIX, Batcher
from server.jobs import ModelInfo, Pipeline
from server.metrics import Metrics
from server.security import SecurityError, TokenAuth, is_loopback, read_tokens, server_credentials
from server.service import SERVICE_NAME, FaceEnhancerServicer, add_to_server
from server.settings import Settings

log = logging.getLogger("gfpgan-serve")

PipelineFactory = Callable[[Settings], Pipeline]
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


#: The most often a client may ping a connection that carries no data (an open but idle
#: EnhanceBatch stream) before the server answers with GOAWAY "too_many_pings". gRPC's default is
#: 5 minutes; the client pings every 30 s (client/targets.py KEEPALIVE_TIME_MS).
MIN_CLIENT_PING_INTERVAL_MS = 10_000


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    limits = settings.limits()
    return [
        # The largest valid request and response: 32 faces of 256 px are 6.3 MB already,
        # over gRPC's 4 MB default. Anything larger is refused by gRPC (RESOURCE_EXHAUSTED).
        ("grpc.max_receive_message_length", limits.max_request_bytes()),
        ("grpc.max_send_message_length", limits.max_response_bytes()),
        # Ping idle connections so a vanished client (and its stream's work) is noticed.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients keep long-lived streams alive with pings every 10 s or more. (This is gRPC
        # core's name for it; the "min_recv_..." spelling some guides give is silently ignored.
        # tests/test_server.py checks that the setting takes effect.)
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        # A second server on the same port is an operator mistake: fail instead of sharing it.
        ("grpc.so_reuseport", 0),
    ]


def _build_pipeline(settings: Settings) -> Pipeline:
    # Imported here: the real pipeline pulls in torch and gfpgan, which tests with a fake skip.
    from server.pipeline import build_pipeline

    return build_pipeline(settings)


async def _in_daemon_thread(function, *args):
    """Run a blocking call off the loop in a daemon thread, so a stop during it is not held up."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(exc, result):
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(result)

    def run():
        exc, result = None, None
        try:
            result = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            exc = error
        try:
            loop.call_soon_threadsafe(settle, exc, result)
        except RuntimeError:
            pass  # the loop closed while we ran: nobody is waiting any more

    threading.Thread(target=run, name=f"faceenhance-{function.__name__}", daemon=True).start()
    return await future


class FaceEnhanceServer:
    """One service instance: listens first, loads and warms the model, serves, then drains.

    `await start()` returns once the port is bound (health NOT_SERVING); `ready` is set when
    SERVING; `await shutdown()` drains; `run()` waits for the load and a stop request.
    """

    def __init__(self, settings: Settings, pipeline_factory: PipelineFactory | None = None):
        self.settings = settings
        self._pipeline_factory = pipeline_factory or _build_pipeline
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        self.pipeline: Pipeline | None = None
        self.batcher: Batcher | None = None
        self.servicer = FaceEnhancerServicer(
            lambda: self.batcher, settings, self._model_info, metrics=self.metrics)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_http = None
        self.ready = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self._loading: asyncio.Task | None = None
        self._draining: asyncio.Task | None = None
        self._force_stop = False
        self._shutdown_done = False

    def _model_info(self) -> ModelInfo | None:
        return self.pipeline.info if self.pipeline is not None and self.ready.is_set() else None

    async def start(self) -> None:
        s = self.settings
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _NOT_SERVING)
        interceptors = []
        if s.auth_tokens_file:
            interceptors.append(TokenAuth(read_tokens(s.auth_tokens_file),
                                          on_denied=lambda method: self.metrics.unauthenticated.inc()))
        credentials = server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        self.server = grpc.aio.server(interceptors=interceptors, options=grpc_options(s))
        add_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        try:
            self.port = (self.server.add_secure_port(address, credentials) if credentials
                         else self.server.add_insecure_port(address))
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"could not listen on {address} for gRPC: is the port in use or the "
                          "address wrong? choose another --port / --host")
        if s.metrics_enabled:
            try:
                self._metrics_http, self.metrics_port = self.metrics.start_http_server(
                    s.host, s.metrics_port)
            except OSError as exc:
                raise OSError(f"could not serve metrics on {s.host}:{s.metrics_port}: {exc}; "
                              "choose another --metrics-port (0 turns metrics off)") from None
        await self.server.start()
        security = ("mutual TLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext") + (
            ", bearer tokens" if s.auth_tokens_file else ", no token")
        log.info("listening on %s:%d (gRPC, %s)%s; loading the model", s.host, self.port, security,
                 f", metrics on :{self.metrics_port}/metrics" if s.metrics_enabled else "")
        if not is_loopback(s.host) and not (s.auth_tokens_file or s.tls_client_ca):
            log.warning("listening on %s with no token and no client certificates: anyone who can "
                        "reach port %d can use this service; set --auth-tokens-file and "
                        "--tls-cert/--tls-key (README: Security)", s.host, self.port)
        self._loading = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        s = self.settings
        started = time.monotonic()
        pipeline = await _in_daemon_thread(self._pipeline_factory, s)
        self.pipeline = pipeline
        max_batch_faces = s.max_batch_faces
        if max_batch_faces == "auto":
            # measured before the warm-up captures the graphs, which it sizes
            from server.memory import auto_max_batch_faces

            max_batch_faces, why = await _in_daemon_thread(auto_max_batch_faces, pipeline)
            log.info("--max-batch-faces auto: %s", why)
            if hasattr(pipeline, "set_graph_max_batch"):
                pipeline.set_graph_max_batch(max_batch_faces)
        if s.warmup:
            await _in_daemon_thread(pipeline.warmup)
        self.batcher = Batcher(pipeline, max_batch_faces, s.max_delay_ms, s.max_queue_faces,
                               metrics=self.metrics, overlap=s.overlap_batches == "on")
        self.batcher.start()
        self.metrics.set_model(pipeline.info)
        self.metrics.redetected_images.read = lambda: getattr(pipeline, "redetected_images", 0)
        fallbacks = list(getattr(pipeline, "fallbacks", []))
        self.metrics.speed_fallbacks.set(len(fallbacks))
        if fallbacks:
            log.warning("serving slower than the settings ask, these forms did not take effect: %s",
                        "; ".join(fallbacks))
        if self.stop_requested.is_set():
            return
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _SERVING)
        self.ready.set()
        info = pipeline.info
        log.info("SERVING on %s:%d: %s (%s) sha256 %s on %s as %s; max_batch_faces=%d "
                 "max_delay_ms=%g overlap_batches=%s max_queue_faces=%d max_faces_per_request=%d face sizes "
                 "%d..%d; ready in %.1f s", s.host, self.port, info.model_name, info.model_version,
                 info.weights_sha256[:12], info.device, info.dtype, max_batch_faces,
                 s.max_delay_ms, s.overlap_batches, s.max_queue_faces, s.max_faces_per_request, s.min_face_size,
                 s.max_face_size, time.monotonic() - started)

    async def run(self) -> int:
        """Wait for the model and then for a stop request; drain; the process exit status."""
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({self._loading, stop}, return_when=asyncio.FIRST_COMPLETED)
            if self._loading.done() and self._loading.exception() is not None:
                exc = self._loading.exception()
                log.error("could not start: %s: %s", type(exc).__name__, exc)
                log.debug("start-up failure", exc_info=exc)
                await self.shutdown(grace=0.0)
                return 1
            await stop
        finally:
            stop.cancel()
        await self.shutdown()
        return 0

    def request_stop(self) -> None:
        if self.stop_requested.is_set():
            log.warning("second stop signal: not waiting for work in flight")
            self._force_stop = True
            if self._draining is not None:
                self._draining.cancel()
            return
        log.info("stop requested: refusing new work, finishing what is in flight")
        self.stop_requested.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new work, finish accepted work within the grace, stop."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        self.stop_requested.set()
        grace = self.settings.drain_grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()  # stopped before the model was ready: nothing to drain
        await self.health.enter_graceful_shutdown()
        if self.batcher is not None and not self._force_stop:
            self._draining = asyncio.ensure_future(self.batcher.drain(grace))
            try:
                finished = await self._draining
            except asyncio.CancelledError:
                finished = False
            if not finished:
                log.warning("drain grace of %.1f s ran out with work still queued or on the "
                            "device: those callers are answered UNAVAILABLE", grace)
        if self.batcher is not None:
            # Whatever did not finish is answered now, while the streams can still carry it.
            self.batcher.abandon()
            await asyncio.sleep(0)
        # Streams write their last answers and end; then gRPC refuses anything new. The extra
        # half second lets answers computed just in time reach the wire.
        self.servicer.close_streams()
        left = 0.0 if self._force_stop else max(0.0, deadline - time.monotonic())
        await self.server.stop(left + 0.5)
        if self.batcher is not None:
            await self.batcher.close()
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()
        log.info("stopped")


async def serve(settings: Settings, pipeline_factory: PipelineFactory | None = None) -> int:
    """Run the service until SIGTERM/SIGINT, then drain. Returns the process exit status."""
    app = FaceEnhanceServer(settings, pipeline_factory)
    restore = stop_on_signals(asyncio.get_running_loop(), app.request_stop)
    try:
        try:
            await app.start()
        except (OSError, SecurityError) as exc:
            log.error("could not start: %s", exc)
            return 1
        return await app.run()
    finally:
        restore()


#: What stops the service: SIGTERM (docker stop, Kubernetes), Ctrl-C, and on Windows Ctrl-Break.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGBREAK") if hasattr(signal, name))


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> Callable[[], None]:
    """Run `stop` on the loop for each of STOP_SIGNALS; returns what puts the handlers back.

    Windows' event loops have no add_signal_handler (NotImplementedError): there a plain
    handler hands the stop to the loop, which Ctrl-C wakes (asyncio's wakeup fd), so the service
    drains there as it does on Linux instead of failing to start."""
    restores = []
    for signum in STOP_SIGNALS:
        try:
            loop.add_signal_handler(signum, stop)
            restores.append(lambda signum=signum: loop.remove_signal_handler(signum))
        except NotImplementedError:
            previous = signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop))
            restores.append(lambda signum=signum, previous=previous: signal.signal(signum, previous))

    def restore() -> None:
        for undo in restores:
            undo()

    return restore


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_process(settings: Settings, pipeline_factory: PipelineFactory | None = None) -> NoReturn:
    """serve() as the whole process, ending within the drain grace: a batch still on the
    device (its callers already answered UNAVAILABLE) does not hold the exit, as the device
    thread would if Python joined it at exit."""
    code = asyncio.run(serve(settings, pipeline_factory))
    busy = [t for t in threading.enumerate() if t.name.startswith(DEVICE_THREAD_PREFIX)]
    for thread in busy:
        thread.join(timeout=0.2)  # an idle device thread ends at once
    if any(thread.is_alive() for thread in busy):
        log.warning("exiting with a device batch still computing (nobody waits for it)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level)
    run_process(settings)


if __name__ == "__main__":
    main()
