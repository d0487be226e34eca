"""gRPC API of the ETS services, generated from proto/ets/api/v1 by scripts/gen_proto.sh."""
