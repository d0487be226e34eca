"""Generated protobuf and gRPC stubs (do not edit; run scripts/gen_proto.sh)."""
