"""How the client checks the service and proves itself: TLS (with a CA of your own, or the
system's), a client certificate for mutual TLS, and a bearer token sent with every call.

`Security.from_env()` reads GFPGAN_TLS_CA, GFPGAN_CLIENT_CERT, GFPGAN_CLIENT_KEY, GFPGAN_TLS (1:
TLS with the system's CAs), GFPGAN_TLS_SERVER_NAME, and GFPGAN_TOKEN or GFPGAN_TOKEN_FILE: the
MuseTalk adapter, gfpgan-enhance and the container's health check use it, so that secrets stay
out of command lines and YAML. (GFPGAN_TLS_CERT / GFPGAN_TLS_KEY are the service's own.)
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import grpc


class SecurityConfigError(ValueError):
    """A TLS or token setting that cannot work; the message names it."""


@dataclass(frozen=True)
class Security:
    """Plaintext and no token unless set. Any of ca_file, cert_file, key_file turns TLS on."""

    tls: bool = False
    #: PEM CA certificate(s) the service's certificate must chain to (default: the system's).
    ca_file: str | None = None
    #: PEM client certificate and key, for a service that asks for them (mutual TLS).
    cert_file: str | None = None
    key_file: str | None = None
    #: Sent as `authorization: Bearer <token>` with every call.
    token: str | None = None
    #: The name the service's certificate is issued for, when the address does not say it
    #: (an IP address, a tunnel).
    server_name: str | None = None

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.ca_file or self.cert_file or self.key_file)

    def validate(self) -> "Security":
        if bool(self.cert_file) != bool(self.key_file):
            raise SecurityConfigError("a client certificate needs its key: give both cert_file and "
                                      "key_file (GFPGAN_CLIENT_CERT and GFPGAN_CLIENT_KEY), or neither")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise SecurityConfigError(f"TLS {name} {path} is not a readable file")
        if self.token is not None and (not self.token.strip() or any(c.isspace() for c in self.token.strip())):
            raise SecurityConfigError("the token must be one word with no whitespace")
        return self

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC's TLS credentials, or None for a plaintext channel."""
        if not self.uses_tls:
            return None
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file),
                                            private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))

    def channel_options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token.strip()}"),) if self.token else ()

    def plaintext_token_to(self, address: str) -> bool:
        """True when this would send the token unencrypted to another machine."""
        if not self.token or self.uses_tls:
            return False
        host = address.rsplit(":", 1)[0].strip("[]")
        if host.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
            return not host.startswith("unix:")
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Security":
        """The GFPGAN_TLS_* / GFPGAN_TOKEN(_FILE) variables, then `overrides` (None: not given)."""
        environ = os.environ if environ is None else environ
        get = lambda name: environ.get(name, "").strip() or None  # noqa: E731
        token = get("GFPGAN_TOKEN")
        token_file = get("GFPGAN_TOKEN_FILE")
        values = dict(tls=(get("GFPGAN_TLS") or "0").lower() in ("1", "true", "yes", "on"),
                      ca_file=get("GFPGAN_TLS_CA"), cert_file=get("GFPGAN_CLIENT_CERT"),
                      key_file=get("GFPGAN_CLIENT_KEY"), server_name=get("GFPGAN_TLS_SERVER_NAME"))
        token_file = overrides.pop("token_file", None) or token_file
        if token_file:
            token = read_token_file(token_file)
        if token:
            values["token"] = token
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values).validate()


def read_token_file(path: str) -> str:
    """The first non-blank, non-comment line of a token file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise SecurityConfigError(f"token file {path}: cannot read it ({error.strerror})") from None
    for line in lines:
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise SecurityConfigError(f"token file {path} holds no token")
