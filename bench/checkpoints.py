"""Random Llama-style checkpoints and random adapters for the benchmarks, cached on disk.

    ckpt = checkpoint(SMALL, cache)                    HF folder: config.json, model.safetensors,
                                                       tokenizer.json (word-level, no EOS)
    folder = adapter_folder(ckpt, rank=16, n=32, cache)  n PEFT folders task-000 ... task-031

The checkpoint is made by ``transformers`` (``LlamaConfig`` + ``save_pretrained``), so PEFT and
loraserve read the very same files. It has no EOS token, so every request generates exactly
``max_new_tokens`` tokens in both. Adapters adapt every linear layer but ``lm_head`` and are
written as PEFT folders (``loraserve.adapters.format.write_peft``): the one form both PEFT and the
loraserve registry read. The same (spec, rank, index) always gives the same weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from loraserve.adapters.format import LoRAConfig, build_adapter, write_peft
from loraserve.adapters.lora import linear_shapes
from loraserve.adapters.models import load_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix

    @property
    def label(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers"


# ~27M parameters: a 6-layer Llama at hidden 512 (full multi-head attention).
SMALL = ModelSpec("llama-h512", 512, 6, 8, 8, 1408, 8192)
# TinyLlama-1.1B's layer shapes (GQA 32/4 heads, MLP 5632, vocab 32000) with 4 layers: ~0.3B.
LARGE = ModelSpec("llama-h2048", 2048, 4, 32, 4, 5632, 32000)
SPECS = {spec.hidden: spec for spec in (SMALL, LARGE)}
# SmolLM2-135M-Instruct's shapes (30 layers, hidden 576, GQA 9/3, MLP 1536, vocab 49152, tied
# embeddings), random weights: the "real model" of bench/real.py until the GGUF one is served.
SMOLLM2_SHAPED = ModelSpec("smollm2-135m-shaped", 576, 30, 9, 3, 1536, 49152, tied=True)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraserve-bench"


def checkpoint(spec: ModelSpec, cache_dir: Path) -> Path:
    """The checkpoint folder for ``spec``, made once (std-0.02 random weights, seed 0)."""
    folder = cache_dir / spec.name
    done = folder / ".complete"
    if done.is_file() and json.loads(done.read_text()) == asdict(spec):
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM  # bench-time only

    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=spec.tied,
        bos_token_id=None,
        eos_token_id=None,  # no EOS: every request runs to max_new_tokens
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, spec.vocab)
    done.write_text(json.dumps(asdict(spec)))
    return folder


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over ``t0 .. t{vocab-1}``: every id decodes, none is special."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))


def adapter_folder(ckpt: Path, rank: int, n: int, cache_dir: Path) -> Path:
    """A folder of ``n`` PEFT adapters of ``rank`` for ``ckpt`` (``task-000`` ...), made once.

    Adapters are shared between folders: ``(rank, n)`` and ``(rank, m)`` with ``m < n`` hold the
    same first ``m`` adapters.
    """
    folder = cache_dir / f"{ckpt.name}-adapters" / f"r{rank}-n{n}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    loaded = load_model(ckpt)
    shapes = {n: s for n, s in linear_shapes(loaded.model).items() if n.endswith(TARGETS)}
    config = LoRAConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGETS,
        base_fingerprint=loaded.fingerprint,
    )
    del loaded
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_peft(folder / adapter_name(i), random_adapter(config, shapes, rank, seed=i))
    done.write_text(json.dumps({"rank": rank, "n": n}))
    return folder


def adapter_name(i: int) -> str:
    return f"task-{i:03d}"


def random_adapter(
    config: LoRAConfig,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    seed: int,
    name: str | None = None,
):
    """A (A, B) pair per layer with the scale of a trained adapter: |x A B s| ~ 5% of |x W|."""
    g = torch.Generator().manual_seed(1000 * rank + seed)
    weights = {
        name: (
            torch.randn(d_in, rank, generator=g) / d_in**0.5,
            torch.randn(rank, d_out, generator=g) * 0.02 / rank**0.5,
        )
        for name, (d_in, d_out) in shapes.items()
    }
    return build_adapter(name or adapter_name(seed), config, weights)


def adapted_shapes(ckpt: Path) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every layer the bench adapters adapt (built on the meta device)."""
    from loraserve.adapters.models import build_model, read_config

    model = build_model(read_config(ckpt), device="meta")
    return [s for n, s in linear_shapes(model).items() if n.endswith(TARGETS)]


def adapter_bytes(shapes: list[tuple[int, int]], rank: int, element_size: int) -> int:
    """Bytes of one adapter's A and B: ``r * (d_in + d_out)`` values per adapted layer."""
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes) * element_size


def parameter_count(ckpt: Path) -> int:
    from loraserve.adapters.models import build_model, read_config

    model = build_model(read_config(ckpt), device="meta")
    return sum(p.numel() for p in model.parameters())
