#!/usr/bin/env python3
"""Ask a loraserve replica for its gRPC health (``grpc.health.v1.Health/Check``).

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING while the model loads
or while draining, unknown service, unreachable, timeout, TLS handshake refused): what Docker's
HEALTHCHECK and other exec-style probes expect; 2 for bad arguments. It stands in for
``grpc_health_probe``, using only the ``grpcio-health-checking`` package that loraserve
already depends on.

    # plaintext: the main port, or the health-only port (--health-port) of a TLS server
    python deploy/grpc_health_probe.py --addr 127.0.0.1:50051
    # TLS on the main port; --server-name when the certificate does not name the address
    python deploy/grpc_health_probe.py --addr 127.0.0.1:50051 --tls --ca ca.pem \
        --server-name loraserve.example.com
    # mTLS (server started with --tls-client-ca): also present a client certificate
    python deploy/grpc_health_probe.py --addr 127.0.0.1:50051 --tls --ca ca.pem \
        --cert probe.pem --key probe-key.pem
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "loraserve.v1.LoraInference"


def check(addr: str, service: str, timeout: float, credentials=None, options=()) -> str:
    """The health status name, e.g. "SERVING"; raises ``grpc.RpcError`` when there is none."""
    if credentials is None:
        channel = grpc.insecure_channel(addr, options=options)
    else:
        channel = grpc.secure_channel(addr, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def tls_credentials(a: argparse.Namespace) -> grpc.ChannelCredentials:
    """Server verified against ``--ca`` (the system roots without it); with ``--cert`` and
    ``--key`` the probe also presents a client certificate, which an mTLS server requires."""

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(a.ca), private_key=read(a.key), certificate_chain=read(a.cert)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="host:port of the gRPC server")
    p.add_argument("--service", default=SERVICE, help='service name; "" = the whole server')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    tls = p.add_argument_group("TLS (plaintext unless --tls)")
    tls.add_argument("--tls", action="store_true", help="connect with TLS")
    tls.add_argument("--ca", help="PEM file of the CA that signed the server certificate")
    tls.add_argument("--cert", help="PEM client certificate, for a server that requires mTLS")
    tls.add_argument("--key", help="PEM private key of --cert")
    tls.add_argument(
        "--server-name", help="name to verify the server certificate against (default: host)"
    )
    a = p.parse_args(argv)
    if not a.tls and (a.ca or a.cert or a.key or a.server_name):
        p.error("--ca, --cert, --key and --server-name need --tls")
    if bool(a.cert) != bool(a.key):
        p.error("--cert and --key go together")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    options = [("grpc.ssl_target_name_override", a.server_name)] if a.server_name else []
    try:
        credentials = tls_credentials(a) if a.tls else None
        status = check(a.addr, a.service, a.timeout, credentials, options)
    except OSError as err:  # an unreadable --ca/--cert/--key
        print(f"{a.addr}: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"{a.addr}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(f"{a.addr} {a.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
