"""The embedded demo (``--model demo``): the shipped files load, the served text path gives the
training-time token ids, each shipped adapter does its task through the server engine in mixed
batches, and the recipe that rebuilds it all is deterministic and learns.

The shipped model is tiny (0.8M parameters), so everything here runs on CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string

import pytest
import torch
from loraserve.adapters.demo_paths import DEMO_DIR, demo_adapters_dir, demo_base_dir
from loraserve.adapters.demo_recipe import (
    ADAPTER_TASKS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB,
    Recipe,
    adapter_records,
    build_base,
    build_demo,
    build_tokenizer,
    encode_record,
    eval_words,
    make_batch,
    pretrain,
    pretraining_records,
    read_jsonl,
    task_record,
    write_tokenizer,
)
from loraserve.adapters.format import read_adapter, validate_adapter
from loraserve.adapters.lora import linear_shapes
from loraserve.adapters.models import load_model
from loraserve.adapters.train import Record, collate, tokenize_records
from loraserve.server.engine import FinishReason, GenerationRequest
from loraserve.server.runtime import Runtime, ServerConfig
from loraserve.server.sampling import SamplingParams
from loraserve.v1 import inference_pb2 as pb

from tests.grpc_server import ServerThread
from tests.serving import serving_compile

SAMPLE = 40  # eval records per adapter sent through the server
DEMO_SERVER = ServerConfig(
    model="demo",
    adapters_dir=demo_adapters_dir(),
    device="cpu",
    dtype="float32",
    port=0,
    metrics_port=None,
    max_lora_rank=16,
    max_seq_len=64,
    compile=serving_compile(),
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo():
    return load_model(demo_base_dir())


@pytest.fixture(scope="module")
def runtime():
    runtime = Runtime(DEMO_SERVER).start()
    yield runtime
    runtime.stop(grace=5)


def evals(task: str) -> list[dict]:
    return read_jsonl(DEMO_DIR / "eval" / f"{task}.jsonl")


def request(tokenizer, prompt: str, adapter: str) -> GenerationRequest:
    ids = tuple(tokenizer.encode(prompt))  # what the gRPC servicer does with prompt text
    return GenerationRequest(ids, SamplingParams(max_new_tokens=16), adapter=adapter)


# --------------------------------------------------------------------------------------------
# The shipped files


def test_shipped_demo_loads_and_its_tokenizer_round_trips(demo):
    config, tok = demo.config, demo.tokenizer
    assert (config.arch, config.vocab_size, config.eos_token_ids) == ("llama", 98, (EOS_ID,))
    assert config.tie_word_embeddings and config.max_position_embeddings == 64
    assert tok.eos_token_ids == (EOS_ID,)
    # encode adds <bos> (the post-processor), one id per character
    assert tok.encode("hello=") == [BOS_ID] + [VOCAB[c] for c in "hello="]
    text = "".join(chr(c) for c in range(32, 127))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab", add_special_tokens=False) + [EOS_ID, PAD_ID]) == "ab"
    # the shipped tokenizer is the one the recipe builds
    shipped = json.loads((demo_base_dir() / "tokenizer.json").read_text())
    assert shipped == json.loads(build_tokenizer().to_str())
    for path in sorted(demo_adapters_dir().glob("*.safetensors")):
        adapter = read_adapter(path)
        validate_adapter(adapter, linear_shapes(demo.model), demo.fingerprint, max_rank=16)
    assert sorted(p.stem for p in demo_adapters_dir().glob("*.safetensors")) == sorted(
        ADAPTER_TASKS
    )


def test_served_prompt_ids_are_the_training_ids(demo):
    """The trainer tokenizes records, the server tokenizes prompt text, the recipe pretrains
    the base on its own encoding: all three must give the same ids."""
    tok = demo.tokenizer
    record = task_record("upper", "hello", named=False)
    (example,) = tokenize_records([Record("x:1", record["completion"], record["prompt"])], tok, 64)
    ids, start = encode_record(tok, record)
    assert list(example.ids) == ids == [BOS_ID, *(VOCAB[c] for c in "hello=HELLO"), EOS_ID]
    assert example.start == start == len(tok.encode(record["prompt"]))
    # the base-pretraining batch puts its loss on the same tokens as the trainer's
    inputs, targets = make_batch([(ids, start)])
    batch = collate([example], pad_id=PAD_ID)
    assert torch.equal(inputs, batch.inputs) and torch.equal(targets, batch.targets)


def test_shipped_data_is_what_the_recipe_makes():
    recipe = Recipe()
    words = eval_words(recipe)
    held_out = set(words)
    for task in ADAPTER_TASKS:
        assert evals(task) == [task_record(task, w, named=False) for w in words]
        train = read_jsonl(DEMO_DIR / "train" / f"{task}.jsonl")
        assert train == adapter_records(recipe, task, held_out)
        assert not {r["prompt"].removesuffix("=") for r in train} & held_out


# --------------------------------------------------------------------------------------------
# The demo through the server engine


def test_each_adapter_does_its_task_in_mixed_batches(runtime):
    """SAMPLE eval records per adapter plus the base on every eval set, all submitted at once,
    so the engine's batches mix adapters; greedy exact match, and EOS ends each answer."""
    tok = runtime.tokenizer
    jobs = [(task, r) for task in ADAPTER_TASKS for r in evals(task)[:SAMPLE]]
    jobs += [("", r) for task in ADAPTER_TASKS for r in evals(task)[:10]]
    handles = [runtime.engine.submit(request(tok, r["prompt"], a)) for a, r in jobs]
    results = [h.result() for h in handles]
    hits = {}
    for (adapter, record), out in zip(jobs, results):
        ok = out.text == record["completion"] and out.finish_reason == FinishReason.STOP
        hits.setdefault(adapter, []).append(ok)
    for adapter, ok in hits.items():
        accuracy = sum(ok) / len(ok)
        if adapter:
            assert accuracy >= 0.95, (adapter, accuracy)
        else:
            assert accuracy <= 0.2, ("base", accuracy)
    # the base copies a bare prompt: it answers, and stops at EOS
    base = [out for (adapter, _), out in zip(jobs, results) if not adapter]
    assert all(out.finish_reason == FinishReason.STOP for out in base)


def test_demo_batch_invariance(runtime):
    """Concurrent requests across the four adapters and the base, bare and named prompts of
    different lengths: each equals its solo greedy output."""
    tok = runtime.tokenizer
    prompts = ["hello=", "zebra=", "abcdefghijkl=", "sort: banana=", "upper: mixed=", "qr="]
    jobs = [(a, p) for p in prompts for a in ("", *ADAPTER_TASKS)]  # 30 requests
    handles = [runtime.engine.submit(request(tok, p, a)) for a, p in jobs]
    batched = [h.result().token_ids for h in handles]
    solo = [runtime.engine.generate(request(tok, p, a)).token_ids for a, p in jobs]
    assert batched == solo
    answers = {a: tok.decode(ids) for (a, p), ids in zip(jobs, batched) if p == "zebra="}
    assert answers == {
        "": "zebra",
        "upper": "ZEBRA",
        "reverse": "arbez",
        "sort": "aberz",
        "rot13": "mroen",
    }


def test_demo_over_grpc_with_prompt_text():
    """The served text path end to end: prompt text -> the tokenizer's ids (with <bos>) ->
    one answer per adapter, ended by EOS."""
    server = ServerThread(DEMO_SERVER)
    try:
        stub = server.stub()
        want = {
            "": "hello",
            "upper": "HELLO",
            "reverse": "olleh",
            "sort": "ehllo",
            "rot13": "uryyb",
        }
        for adapter, text in want.items():
            params = pb.SamplingParams(max_new_tokens=32)
            reply = stub.Generate(
                pb.GenerateRequest(adapter=adapter, prompt="hello=", params=params)
            )
            assert (reply.text, reply.finish_reason) == (text, pb.STOP), adapter
            assert (reply.prompt_tokens, reply.completion_tokens) == (7, 6)  # <bos>..., ...<eos>
        named = pb.GenerateRequest(prompt="upper: hello=", params=pb.SamplingParams())
        assert stub.Generate(named).text == "HELLO"  # the base does a task the prompt names
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# The recipe, on a tiny config

TINY = dataclasses.replace(
    Recipe(),
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    base_steps=60,
    base_batch_size=16,
    base_warmup=5,
    base_lr=1e-2,
)


def test_pretraining_learns_and_is_deterministic(tmp_path):
    tok = write_tokenizer(tmp_path, TINY.max_positions)
    runs = []
    for _ in range(2):
        model = build_base(TINY)
        losses = pretrain(model, tok, pretraining_records(TINY, set()), TINY, log_every=0)
        runs.append((losses, model.state_dict()))
    (losses, weights), (losses2, weights2) = runs
    assert losses == losses2
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    other = build_base(dataclasses.replace(TINY, seed=1)).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])


def test_recipe_data_holds_out_the_eval_words():
    words = eval_words(TINY)
    assert len(set(words)) == TINY.n_eval
    assert all(set(w) <= set(string.ascii_lowercase) for w in words)
    held_out = set(words[:50])
    stream = pretraining_records(dataclasses.replace(TINY, seed=3), held_out)
    seen = [next(stream) for _ in range(2000)]
    assert not {r["prompt"].split(" ")[-1].removesuffix("=") for r in seen} & held_out
    bare = sum(":" not in r["prompt"] for r in seen) / len(seen)
    assert 0.15 < bare < 0.25  # unmarked_fraction = 0.2


def test_transformers_reads_the_shipped_demo(demo):
    """config.json, model.safetensors and the tokenizer are a valid Hugging Face Llama folder:
    transformers (a test-only oracle) gives our logits and our token ids."""
    import transformers  # a test dependency: a missing one fails, never skips

    folder = str(demo_base_dir())
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "sort: banana=aaabnn"
    ids = demo.tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, demo.model(x), atol=1e-4, rtol=1e-4)


def test_the_whole_recipe_runs_and_rebuilds_the_same_bytes(tmp_path, capsys):
    """build_demo end to end on a micro recipe (a few steps per stage), twice into the same
    folder: the same bytes in every file but report.json, and files the server accepts."""
    micro = dataclasses.replace(
        TINY, base_steps=4, n_eval=16, n_adapter_train=32, adapter_epochs=1, adapter_warmup=1
    )
    digests = []
    for _ in range(2):
        report = build_demo(tmp_path, micro)
        files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "report.json")
        digests.append(
            {p.relative_to(tmp_path): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        )
    assert digests[0] == digests[1]
    base = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    base += ("loraserve_train.json",)
    expected = {f"base/{name}" for name in base}
    expected |= {f"adapters/{t}.safetensors" for t in ADAPTER_TASKS}
    expected |= {f"{d}/{t}.jsonl" for t in ADAPTER_TASKS for d in ("train", "eval")}
    assert {str(p) for p in digests[0]} == expected
    assert set(report["accuracy"]) == {"base", *ADAPTER_TASKS, "base, task named"}
    assert json.loads((tmp_path / "report.json").read_text())["recipe"]["base_steps"] == 4
    loaded = load_model(tmp_path / "base")
    for task in ADAPTER_TASKS:
        adapter = read_adapter(tmp_path / "adapters" / f"{task}.safetensors")
        validate_adapter(adapter, linear_shapes(loaded.model), loaded.fingerprint)
        assert adapter.config.r == micro.rank and adapter.config.target_modules == "all-linear"
    assert "base pretraining" in capsys.readouterr().out
