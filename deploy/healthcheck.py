"""Asks a lorafleet server's grpc.health.v1.Health once: exit 0 when SERVING, 1 otherwise.

The image ships it for the pod's probes when the gRPC port speaks TLS (Kubernetes' own gRPC probe
speaks plaintext only); `make image-test` uses it to wait for a container.

    python healthcheck.py --target 127.0.0.1:50051 [--service lorafleet.v1.LoraFleet]
                          [--tls-ca ca.crt --server-name lorafleet-grpc.ns.svc] [--wait 120]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check_once(target: str, service: str, timeout: float, tls_ca: str | None, server_name: str | None) -> str:
    """The status name the server reports for `service`, or the gRPC error's code name."""
    if tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check a lorafleet server's gRPC health.")
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--service", default="", help='health service name ("" is the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for one check")
    p.add_argument("--wait", type=float, default=0.0, help="retry for up to this many seconds until SERVING")
    p.add_argument("--tls-ca", default=None, help="PEM of the CA that signed the server's certificate")
    p.add_argument("--server-name", default=None, help="with --tls-ca: the name the certificate was issued for")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        status = check_once(args.target, args.service, args.timeout, args.tls_ca, args.server_name)
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
