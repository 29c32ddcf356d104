"""Console entry points of the service's commands, safe to run from a client-only install.

`pip install gfpgan-service` installs the client and these commands; the service's own
packages come with the `server` extra. Without them, `gfpgan-serve` and `gfpgan-bench` say so
in one line and exit with status 2, instead of a traceback from deep inside an import.
"""
from __future__ import annotations

import importlib.util
import sys

#: import name -> the package that brings it, for the message.
SERVER_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "scipy": "scipy",
    "gfpgan": "gfpgan",
    "basicsr": "basicsr",
    "facexlib": "facexlib",
}


def missing_server_packages() -> list[str]:
    return [package for module, package in SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


def _require_server(command: str) -> None:
    if sys.version_info < (3, 11):
        sys.stderr.write(f"{command}: the service needs Python 3.11 or newer (this is "
                         f"{sys.version.split()[0]}); the client and the MuseTalk adapter run on 3.10.\n")
        raise SystemExit(2)
    missing = missing_server_packages()
    if missing:
        sys.stderr.write(
            f"{command}: this is a client-only install (missing: {', '.join(missing)}). Install the "
            "service with `make install` in a checkout, or `pip install 'gfpgan-service[server]'` "
            "then `pip install --no-deps -r requirements/gfpgan-nodeps.txt`.\n")
        raise SystemExit(2)


def serve() -> None:
    _require_server("gfpgan-serve")
    from server.app import main
    main()


def bench() -> None:
    _require_server("gfpgan-bench")
    from server.bench import main
    main()
