"""Client for the faceenhance.v1 gRPC service: sync and asyncio clients with local fallback.

Light on purpose: numpy, grpcio, protobuf, OpenCV and prometheus-client only, no torch.
"""
from __future__ import annotations

import importlib

from contract.types import (
    Alignment,
    EnhanceOptions,
    EnhanceResult,
    FaceStatus,
    InvalidRequest,
    ModelSpec,
    RequestLimits,
)

# The clients pull in grpc and OpenCV: loaded on first use, so that `import client` for the
# contract's types (contract.types, shared with the service) stays cheap.
_LAZY = {
    "AsyncFaceEnhanceClient": "client.aio",
    "ServiceInfo": "client.aio",
    "ServiceUnreachable": "client.aio",
    "WrongModel": "client.aio",
    "AccessDenied": "client.aio",
    "Security": "client.security",
    "FaceEnhanceClient": "client.sync",
    "BreakerConfig": "client.breaker",
    "FALLBACK_REASONS": "client.fallback",
}

__all__ = ["Alignment", "EnhanceOptions", "EnhanceResult", "FaceStatus", "InvalidRequest",
           "ModelSpec", "RequestLimits", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'client' has no attribute {name!r}")
