#!/usr/bin/env python3
"""Ask a loraserve replica for its gRPC health (``grpc.health.v1.Health/Check``).

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING while the model loads
or while draining, unknown service, unreachable, timeout): what Docker's HEALTHCHECK and other
exec-style probes expect. It stands in for ``grpc_health_probe``, using only the
``grpcio-health-checking`` package that loraserve already depends on.

    python deploy/grpc_health_probe.py --addr 127.0.0.1:50051
    python deploy/grpc_health_probe.py --addr host:443 --tls --ca ca.pem --service ""
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "loraserve.v1.LoraInference"


def check(addr: str, service: str, timeout: float, credentials=None) -> str:
    """The health status name, e.g. "SERVING"; raises ``grpc.RpcError`` when there is none."""
    if credentials is None:
        channel = grpc.insecure_channel(addr)
    else:
        channel = grpc.secure_channel(addr, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the gRPC server")
    p.add_argument("--service", default=SERVICE, help='service name; "" = the whole server')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca", help="PEM file of the CA that signed the server certificate")
    a = p.parse_args(argv)
    credentials = None
    if a.tls:
        root = Path(a.ca).read_bytes() if a.ca else None
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    try:
        status = check(a.addr, a.service, a.timeout, credentials)
    except grpc.RpcError as err:
        print(f"{a.addr}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"{a.addr} {a.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
