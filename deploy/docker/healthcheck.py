#!/opt/venv/bin/python
"""Container health check: asks the standard gRPC health service whether the model is SERVING.

Exit 0 when SERVING, 1 otherwise (loading, draining, refused, no answer); used by HEALTHCHECK
and, where the service speaks TLS, by Kubernetes exec probes (the kubelet's gRPC probe cannot).
Health needs no token. With TLS on (GFPGAN_TLS_CERT set for the server), it trusts
GFPGAN_TLS_CA and checks the name GFPGAN_TLS_SERVER_NAME (default localhost); with mutual TLS it
presents GFPGAN_CLIENT_CERT / GFPGAN_CLIENT_KEY.
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.security import Security, SecurityConfigError

# The service name that turns SERVING only once the model is loaded and warmed up ("" is the
# whole server); the port follows the same GFPGAN_PORT the server reads.
SERVICE = os.environ.get("GFPGAN_HEALTH_SERVICE", "faceenhance.v1.FaceEnhancer")
ADDRESS = f"127.0.0.1:{os.environ.get('GFPGAN_PORT', '50051')}"


def channel() -> grpc.Channel:
    if not os.environ.get("GFPGAN_TLS_CERT", "").strip():
        return grpc.insecure_channel(ADDRESS)
    security = Security.from_env(tls=True, token=None)
    options = [("grpc.ssl_target_name_override", security.server_name or "localhost")]
    return grpc.secure_channel(ADDRESS, security.channel_credentials(), options=options)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="gfpgan-healthcheck")
    parser.add_argument("--service", default=SERVICE,
                        help='health service name to ask for ("" is the whole server; default '
                             f'{SERVICE}, SERVING only with the model up)')
    service = parser.parse_args(argv).service
    try:
        opened = channel()
    except SecurityConfigError as error:
        print(f"health check: {error}", file=sys.stderr)
        return 1
    with opened:
        try:
            answer = health_pb2_grpc.HealthStub(opened).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=4.0)
        except grpc.RpcError as error:
            print(f"{ADDRESS} {service!r}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{ADDRESS} {service!r}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
