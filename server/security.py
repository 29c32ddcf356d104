"""Who may use the service: TLS and mutual TLS (gRPC's own credentials), and bearer tokens.

Transport security is gRPC's: `server_credentials()` builds it from PEM files named in the
settings. Tokens are checked by `TokenAuth`, a server interceptor: every call except the
standard health service must carry `authorization: Bearer <token>` matching one of the
configured tokens (compared in constant time, against every token).
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

#: Calls that need no token: orchestrators and load balancers probe health without secrets.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
#: At most one warning per this many seconds about refused calls; the rest are counted.
_DENIED_LOG_INTERVAL_S = 10.0


class SecurityError(ValueError):
    """A TLS or token file that cannot be used; the message names the file and the setting."""


def _read(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(f"{setting} {path}: cannot read it ({error.strerror})") from None
    if not data.strip():
        raise SecurityError(f"{setting} {path} is empty")
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS with this certificate chain and key; with client_ca_file, mutual TLS: every client
    must present a certificate signed by that CA."""
    cert, key = _read(cert_file, "--tls-cert"), _read(key_file, "--tls-key")
    for data, setting, marker in ((cert, "--tls-cert", b"CERTIFICATE"), (key, "--tls-key", b"PRIVATE KEY")):
        if b"-----BEGIN" not in data or marker not in data:
            raise SecurityError(f"{setting} must be a PEM file holding a {marker.decode().lower()}")
    client_ca = _read(client_ca_file, "--tls-client-ca") if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def read_tokens(path: str) -> list[str]:
    """One token per line; blank lines and lines starting with # are skipped."""
    lines = _read(path, "--auth-tokens-file").decode("utf-8", errors="strict").splitlines()
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise SecurityError(f"--auth-tokens-file {path} holds no token (one per line)")
    short = [i for i, token in enumerate(tokens) if len(token) < 16]
    if short:
        raise SecurityError(f"--auth-tokens-file {path}: token {short[0] + 1} is shorter than 16 "
                            f"characters; use long random ones (e.g. openssl rand -hex 32)")
    if any(any(c.isspace() for c in token) for token in tokens):
        raise SecurityError(f"--auth-tokens-file {path}: a token contains whitespace")
    return tokens


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RateLimitedLog:
    """One warning per interval; what was left out is counted into the next one."""

    def __init__(self, interval_s: float, logger: logging.Logger):
        self.interval_s = interval_s
        self._log = logger
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more since the last such line)" if self._suppressed else ""
        self._log.warning(message + more, *args)
        self._next, self._suppressed = now + self.interval_s, 0


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call without a valid `authorization: Bearer` token,
    except the health service. `on_denied(method)` counts a refusal (metrics)."""

    def __init__(self, tokens: list[str], on_denied=None):
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._tokens = [token.encode() for token in tokens]
        self._on_denied = on_denied
        self._denied_log = RateLimitedLog(_DENIED_LOG_INTERVAL_S, log)

    def valid(self, header: str) -> bool:
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer":
            supplied = ""
        supplied_bytes = supplied.strip().encode()
        # Every token is compared, each in constant time: neither which token matched nor how
        # much of one did shows in the time taken.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(supplied_bytes, token)
        return matched

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        handler = await continuation(handler_call_details)
        if handler is None or self.valid(header):
            return handler
        self._denied(method, "no token" if not header else "a token that is not valid")
        return _denying(handler, "missing or invalid token: send the metadata 'authorization: "
                                 "Bearer <token>' with a token the service was given")

    def _denied(self, method: str, what: str) -> None:
        if self._on_denied is not None:
            self._on_denied(method)
        self._denied_log.warning("refused %s: %s", method, what)


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED at once."""
    code = grpc.StatusCode.UNAUTHENTICATED
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.response_streaming:
        async def deny_streaming(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises; this makes the function a generator

        factory = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                   else grpc.unary_stream_rpc_method_handler)
        return factory(deny_streaming, **kwargs)

    async def deny(request, context):
        await context.abort(code, message)

    factory = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
               else grpc.unary_unary_rpc_method_handler)
    return factory(deny, **kwargs)
