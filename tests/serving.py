"""Shared helpers for tests that serve a real (tiny, random) model: random adapters and the
trainer-side reference decode that the server's batched path must reproduce."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from loraserve.adapters.format import Adapter, LoRAConfig, apply_adapter, build_adapter
from loraserve.adapters.lora import linear_shapes
from loraserve.adapters.models import load_model
from loraserve.server.runtime import ServerConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(
    folder: Path, name: str, seed: int, rank: int = 4, targets=TARGETS, strength: float = 0.4
) -> Adapter:
    """A random adapter for the checkpoint in ``folder``, strong enough to change greedy output."""
    loaded = load_model(folder)
    g = torch.Generator().manual_seed(seed)
    config = LoRAConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=tuple(targets),
        base_fingerprint=loaded.fingerprint,
    )
    weights = {
        n: (
            strength * torch.randn(i, rank, generator=g),
            strength * torch.randn(rank, o, generator=g),
        )
        for n, (i, o) in linear_shapes(loaded.model).items()
        if config.targets(n)
    }
    return build_adapter(name, config, weights)


def reference_greedy(
    folder: Path, adapter: Adapter | None, prompt: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy decoding with the trainer's LinearWithLoRA and full recomputation (no cache, no
    batching): what the server must reproduce token for token. Stops at EOS (not returned)."""
    loaded = load_model(folder)
    if adapter is not None:
        apply_adapter(loaded.model, adapter)
    eos = set(loaded.tokenizer.eos_token_ids)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(loaded.model(torch.tensor([ids]))[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
            ids.append(token)
    return out


def serving_device() -> str:
    """Where serving tests run: cpu, or what LORASERVE_TEST_DEVICE names (e.g. cuda on a GPU box).
    fp32 on every device, so greedy outputs are comparable to the CPU reference."""
    return os.environ.get("LORASERVE_TEST_DEVICE", "cpu")


def serving_config(model: Path, adapters: Path, **overrides) -> ServerConfig:
    defaults = dict(
        model=str(model),
        adapters_dir=adapters,
        port=0,
        device=serving_device(),
        dtype="float32",
        max_active_adapters=16,
        max_lora_rank=8,
        max_batch_size=16,
        max_seq_len=64,
        metrics_port=None,
        watch_poll_interval=0.5,
        watch_debounce=0.1,
        drain_grace=5.0,
        drain_linger=0.0,
        compile=serving_compile(),
    )
    return ServerConfig(**{**defaults, **overrides})


def serving_compile() -> str:
    """The decode step of serving tests: eager unless LORASERVE_TEST_COMPILE names a mode
    (``auto``, ``static``, ``inductor``, ``cuda-graphs``): compiling costs seconds per server,
    so the suite runs eager and tests/test_decode_step.py compares the modes; a GPU run sets
    ``cuda-graphs`` to run everything on graphs."""
    return os.environ.get("LORASERVE_TEST_COMPILE", "off")


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; return it, or fail on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
