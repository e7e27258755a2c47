"""Tiny random Hugging Face checkpoints for tests (no hub access needed).

Each `make_*(tmp_path, **overrides) -> Path` builds a random transformers model from a tiny
config (hidden 64, 2 layers, vocab 320) updated with `overrides` (HF config keys), re-draws every
weight (std 0.1; norm weights 1 + N(0, 0.1); biases non-zero, so a bias or norm bug shows in the
logits), saves it with `save_pretrained(..., safe_serialization=True)` into `tmp_path / name`
together with a tokenizer.json + tokenizer_config.json, and returns that folder. The same `seed`
gives the same weights. `save_kwargs` go to save_pretrained (e.g. max_shard_size="20KB").

    make_gpt2(tmp_path, bare=False)   GPT2LMHeadModel, or GPT2Model (no `transformer.` prefix)
    make_llama(tmp_path)              GQA 4q/2kv heads, untied embeddings
    make_qwen2(tmp_path)              q/k/v bias, GQA
    make_mistral(tmp_path)            no sliding window
    make_qwen3(tmp_path)              q/k RMSNorm per head, head_dim 32 != hidden / heads, GQA
    make_phi3(tmp_path)               fused qkv_proj / gate_up_proj, GQA, untied
    hf_model(folder)                  the transformers oracle for a folder, float32, eval mode
    byte_level_tokenizer()            GPT-2-style byte-level BPE trained here (vocab <= 300)
    sentencepiece_tokenizer()         Llama-2-style: Metaspace, byte fallback, BOS post-processor

transformers is a test-only oracle: only tests import this module.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 320
EOS = "<|endoftext|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adapters share one frozen base model; the server batches them together.",
    "Hello, world! How are you today? I am fine, thank you.",
    "東京は日本の首都です。 北京是中国的首都。",
    "Emoji are four bytes in UTF-8: 🙂 🚀 ✨ and even 👩‍💻.",
    "café naïve résumé — “quotes” and ünïcödé",
] * 20

LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_gpt2(
    tmp_path: Path,
    *,
    bare: bool = False,
    name: str = "gpt2",
    seed: int = 0,
    save_kwargs: dict | None = None,
    **overrides,
) -> Path:
    """bare=True saves GPT2Model: keys `h.0...` / `wte.weight`, no lm_head, no prefix."""
    tiny = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    config = GPT2Config(**{**tiny, "bos_token_id": 0, "eos_token_id": 0, **overrides})
    model = _random(GPT2LMHeadModel, config, seed)
    return _save(model.transformer if bare else model, tmp_path / name, "byte_level", save_kwargs)


def make_llama(
    tmp_path: Path,
    *,
    name: str = "llama",
    seed: int = 0,
    save_kwargs: dict | None = None,
    **overrides,
) -> Path:
    config = LlamaConfig(**{**LLAMA_LIKE, "bos_token_id": 1, "eos_token_id": 2, **overrides})
    model = _random(LlamaForCausalLM, config, seed)
    return _save(model, tmp_path / name, "sentencepiece", save_kwargs)


def make_qwen2(
    tmp_path: Path,
    *,
    name: str = "qwen2",
    seed: int = 0,
    save_kwargs: dict | None = None,
    **overrides,
) -> Path:
    config = Qwen2Config(**{**LLAMA_LIKE, "bos_token_id": 0, "eos_token_id": 0, **overrides})
    model = _random(Qwen2ForCausalLM, config, seed)
    return _save(model, tmp_path / name, "byte_level", save_kwargs)


def make_mistral(
    tmp_path: Path,
    *,
    name: str = "mistral",
    seed: int = 0,
    save_kwargs: dict | None = None,
    **overrides,
) -> Path:
    config = MistralConfig(
        **{**LLAMA_LIKE, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    )
    model = _random(MistralForCausalLM, config, seed)
    return _save(model, tmp_path / name, "sentencepiece", save_kwargs)


def make_qwen3(
    tmp_path: Path,
    *,
    name: str = "qwen3",
    seed: int = 0,
    save_kwargs: dict | None = None,
    **overrides,
) -> Path:
    config = Qwen3Config(
        **{**LLAMA_LIKE, "head_dim": 32, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    )
    model = _random(Qwen3ForCausalLM, config, seed)
    return _save(model, tmp_path / name, "byte_level", save_kwargs)


def make_phi3(
    tmp_path: Path,
    *,
    name: str = "phi3",
    seed: int = 0,
    save_kwargs: dict | None = None,
    **overrides,
) -> Path:
    """Plain RoPE (no longrope); `partial_rotary_factor=0.5` rotates half of each head."""
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # defaults exceed VOCAB
    config = Phi3Config(**{**LLAMA_LIKE, **ids, **overrides})
    model = _random(Phi3ForCausalLM, config, seed)
    return _save(model, tmp_path / name, "sentencepiece", save_kwargs)


def hf_model(folder: Path) -> PreTrainedModel:
    """The transformers oracle for a checkpoint folder (float32, eval mode)."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures") == ["GPT2Model"]:
        return GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _random(cls: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_((1.0 if is_norm_weight else 0.0) + 0.1 * torch.randn_like(p))
    return model


def _save(model: PreTrainedModel, folder: Path, tokenizer: str, save_kwargs: dict | None) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **(save_kwargs or {}))
    if tokenizer == "byte_level":
        tok, eos = byte_level_tokenizer(), EOS
    else:
        tok, eos = sentencepiece_tokenizer(), "</s>"
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return folder


@lru_cache
def byte_level_tokenizer() -> tokenizers.Tokenizer:
    """GPT-2-style byte-level BPE: any text encodes; a rare CJK char or emoji spans tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= VOCAB
    return tok


@lru_cache
def sentencepiece_tokenizer() -> tokenizers.Tokenizer:
    """Llama-2-style tokenizer.json: "▁" for spaces, <0xNN> byte fallback, BOS prepended.

    Its decoder strips the leading space of whatever it decodes, so decoding tokens one by one
    loses spaces: the case the incremental detokenizer's context window exists for.
    """
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'-", "▁t", "he", "▁the", "▁a"]
    for piece in [*pieces, "in", "▁in"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("▁", "in")]
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.get_vocab_size() <= VOCAB
    return tok
