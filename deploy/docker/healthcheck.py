#!/opt/venv/bin/python
"""Container health check: asks the standard gRPC health service whether the model is SERVING.

Exit 0 when SERVING, 1 otherwise (loading, draining, refused, no answer); used by HEALTHCHECK.
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The service name that turns SERVING only once the model is loaded and warmed up ("" is the
# whole server); the port follows the same GFPGAN_PORT the server reads.
SERVICE = os.environ.get("GFPGAN_HEALTH_SERVICE", "faceenhance.v1.FaceEnhancer")
ADDRESS = f"127.0.0.1:{os.environ.get('GFPGAN_PORT', '50051')}"


def main() -> int:
    with grpc.insecure_channel(ADDRESS) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=4.0)
        except grpc.RpcError as error:
            print(f"{ADDRESS} {SERVICE!r}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{ADDRESS} {SERVICE!r}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
