"""Probe a gRPC server's standard health service; used by container health checks.

    ets health localhost:50051 [--service ets.api.v1.SearchService] [--timeout 3]

Exits 0 when the service reports SERVING, 1 otherwise (with the reason on stderr).
"""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """Return the serving status name of ``service`` at ``address`` (raises grpc.RpcError)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ets health", description="gRPC health probe")
    parser.add_argument("address", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"health: {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    print(status)
    raise SystemExit(0 if status == "SERVING" else 1)


if __name__ == "__main__":
    main()
