"""Small helpers shared by the tests: loopback servers, and the scripts as modules."""
from __future__ import annotations

import asyncio
import importlib.util
import socket
from pathlib import Path

import grpc


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: grpc.health.v1.HealthCheckRequest(service="") and HealthCheckResponse(status=SERVING) on the
#: wire: the check needs no grpcio-health-checking, which client-only environments lack.
_HEALTH_CHECK_ALL = b""
_HEALTH_SERVING = b"\x08\x01"


def serving(address: str) -> bool:
    """True when the standard gRPC health service at `address` says SERVING (for "")."""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            reply = check(_HEALTH_CHECK_ALL, timeout=2)
        except grpc.RpcError:
            return False
    return reply == _HEALTH_SERVING


async def until(condition, timeout: float = 5.0) -> None:
    """Wait (polling the loop) until condition() is true; fail the test after timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def enhance_through_batcher(pipeline, faces, options, max_batch_faces: int):
    """One request of `faces` through a Batcher of its own over `pipeline` (in a fresh event
    loop): its result, and the batcher's ceiling afterwards."""
    from server.batcher import Batcher

    async def serve():
        batcher = Batcher(pipeline, max_batch_faces=max_batch_faces, max_delay_ms=1.0,
                          max_queue_faces=4 * max_batch_faces)
        batcher.start()
        try:
            return await batcher.submit(faces, options), batcher.batch_ceiling
        finally:
            await batcher.close()

    return asyncio.run(serve())
