"""Generated protobuf and gRPC stubs for faceenhance.v1 (do not edit; see scripts/gen_proto.py)."""
