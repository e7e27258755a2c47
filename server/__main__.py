"""``loraserve-server`` / ``python -m server``: parse flags once into a ``ServerConfig``, serve
until SIGTERM or SIGINT, drain, exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from server.app import LoraServer
from server.resources import available_cpus, parse_bytes
from server.runtime import ServerConfig

DEFAULTS = ServerConfig()


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(
        prog="loraserve-server",
        description="Serve many LoRA adapters on one frozen base model over gRPC.",
    )
    p.add_argument("--model", default="demo", help="'demo' or a Hugging Face model folder")
    p.add_argument(
        "--adapters",
        type=Path,
        default=None,
        help="watched adapters folder (default: the demo adapters with --model demo)",
    )
    p.add_argument("--host", default=DEFAULTS.host)
    p.add_argument("--port", type=int, default=DEFAULTS.port, help="0 picks a free port")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULTS.metrics_port,
        help="Prometheus /metrics port (0 = any free port, -1 = off)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--max-active-adapters",
        type=int,
        default=DEFAULTS.max_active_adapters,
        help="device slots: adapters in one batch at once",
    )
    p.add_argument(
        "--max-cached-adapters",
        type=int,
        default=DEFAULTS.max_cached_adapters,
        help="adapters kept in host memory (LRU)",
    )
    p.add_argument("--max-cached-bytes", type=int, default=DEFAULTS.max_cached_bytes)
    p.add_argument("--max-lora-rank", type=int, default=DEFAULTS.max_lora_rank)
    p.add_argument(
        "--lora-targets",
        default=DEFAULTS.lora_targets,
        help="base layers adapters may target (PEFT target_modules syntax)",
    )
    p.add_argument(
        "--lora-backend", default=DEFAULTS.lora_backend, choices=["segment", "gather", "loop"]
    )
    p.add_argument("--max-batch-size", type=int, default=DEFAULTS.max_batch_size)
    p.add_argument("--max-seq-len", type=int, default=DEFAULTS.max_seq_len)
    p.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue)
    p.add_argument("--prefill-token-budget", type=int, default=DEFAULTS.prefill_token_budget)
    p.add_argument(
        "--max-adapter-labels",
        type=int,
        default=DEFAULTS.max_adapter_labels,
        help="distinct adapter label values in metrics; the rest are '__other__'",
    )
    p.add_argument("--watch-poll-interval", type=float, default=DEFAULTS.watch_poll_interval)
    p.add_argument(
        "--watch-debounce",
        type=float,
        default=DEFAULTS.watch_debounce,
        help="seconds a changed adapter must stay untouched before it is read",
    )
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates (mTLS)")
    p.add_argument(
        "--drain-grace",
        type=float,
        default=DEFAULTS.drain_grace,
        help="seconds running requests get to finish on SIGTERM",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the CPUs this process may use, cgroup quota "
        f"included; here {available_cpus()})",
    )
    p.add_argument(
        "--max-memory",
        type=parse_bytes,
        default=None,
        help="refuse to start when weights + KV cache + slot tables + host adapter cache "
        "exceed this (e.g. 8GiB); the device's free memory is always checked",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also serve grpc.health.v1 in plaintext on this port, for probes that cannot "
        "speak TLS (Kubernetes gRPC probes) when --tls-cert is set",
    )
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return ServerConfig(
        model=a.model,
        adapters_dir=a.adapters,
        host=a.host,
        port=a.port,
        metrics_port=None if a.metrics_port < 0 else a.metrics_port,
        device=a.device,
        dtype=a.dtype,
        max_active_adapters=a.max_active_adapters,
        max_cached_adapters=a.max_cached_adapters,
        max_cached_bytes=a.max_cached_bytes,
        max_lora_rank=a.max_lora_rank,
        lora_targets=a.lora_targets,
        lora_backend=a.lora_backend,
        max_batch_size=a.max_batch_size,
        max_seq_len=a.max_seq_len,
        max_queue=a.max_queue,
        prefill_token_budget=a.prefill_token_budget,
        max_adapter_labels=a.max_adapter_labels,
        watch_poll_interval=a.watch_poll_interval,
        watch_debounce=a.watch_debounce,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_client_ca=a.tls_client_ca,
        drain_grace=a.drain_grace,
        threads=a.threads,
        max_memory=a.max_memory,
        health_port=a.health_port,
    )


async def serve(config: ServerConfig) -> None:
    server = LoraServer(config)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def drain() -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain)
    await server.start()
    await server.wait()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as err:  # bad flags, a taken port, a plan that does not fit
        logging.getLogger("loraserve").error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
