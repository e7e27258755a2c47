"""Chat, log-probabilities and scoring over real gRPC, against transformers (+ PEFT) as oracle.

- Chat renders the model's template as transformers' ``apply_chat_template`` does, token for
  token (ChatML with SmolLM2's template, a Llama-3-style and a Qwen2.5-style one, written into
  test folders), and generates exactly what Generate does from those ids; an adapter's own
  template wins; no template is FAILED_PRECONDITION, a template's refusal INVALID_ARGUMENT.
- ``logprobs`` / ``prompt_logprobs`` equal ``log_softmax`` of transformers' logits within 1e-4,
  with and without an adapter (PEFT); sampled tokens' are of the distribution sampled from.
- Score sums the continuation's log-probabilities; several continuations batch together.
"""

from __future__ import annotations

import json
import math

import grpc
import pytest
import torch
from loraserve.adapters.format import write_adapter, write_peft
from loraserve.v1 import inference_pb2 as pb

from tests.checkpoints import EOS, byte_level_tokenizer, hf_model, make_llama
from tests.grpc_server import ServerThread
from tests.serving import random_adapter, serving_config
from tests.test_chat_template import LLAMA3, QWEN25, SMOLLM2  # the models' real templates

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
REFUSING = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
)
SPECIAL = [IM_START, IM_END, "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
SPECIAL += ["<|eot_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "jumps over the lazy dog."},
        {"role": "user", "content": "café naïve 🙂"},
    ],
]


def chat_model(folder, template: str | None, bos: str | None = None):
    """A tiny Llama whose tokenizer knows the chat special tokens, with ``template``."""
    model = make_llama(folder)
    tok = byte_level_tokenizer()
    tok = type(tok).from_str(tok.to_str())  # a copy: the cached one stays as it is
    tok.add_special_tokens(SPECIAL)
    tok.save(str(model / "tokenizer.json"))
    config = {"eos_token": IM_END, "tokenizer_class": "PreTrainedTokenizerFast"}
    if bos:
        config["bos_token"] = bos
    if template is not None:
        config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tok.token_to_id(IM_END), tok.token_to_id(EOS)]
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return model


def hf_chat_ids(model, messages, add_generation_prompt=True) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a dict


def chat_pb(messages, adapter="", **params) -> pb.ChatRequest:
    return pb.ChatRequest(
        adapter=adapter,
        messages=[pb.ChatMessage(**m) for m in messages],
        params=pb.SamplingParams(**params),
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on a ChatML model, with a plain adapter and one that carries its own template."""
    root = tmp_path_factory.mktemp("chat")
    model = chat_model(root / "m", SMOLLM2)
    adapters = root / "adapters"
    adapters.mkdir()
    write_adapter(adapters / "plain.safetensors", random_adapter(model, "plain", seed=3))
    write_peft(adapters / "own", random_adapter(model, "own", seed=4))
    (adapters / "own" / "chat_template.jinja").write_text(QWEN25)
    server = ServerThread(serving_config(model, adapters, max_seq_len=128))
    yield model, adapters, server
    server.stop()


def test_chat_ids_equal_transformers_apply_chat_template(served):
    """Chat's prompt is transformers' ids, and it generates what Generate does from them."""
    model, _, server = served
    stub = server.stub()
    for messages in CONVERSATIONS:
        want = hf_chat_ids(model, messages)
        chat = stub.Chat(chat_pb(messages, max_new_tokens=6, prompt_logprobs=0))
        assert chat.prompt_tokens == len(want)
        assert [v.token_id for v in chat.prompt_logprobs] == want[1:]
        generated = stub.Generate(
            pb.GenerateRequest(prompt_token_ids=want, params=pb.SamplingParams(max_new_tokens=6))
        )
        assert list(chat.token_ids) == list(generated.token_ids)
        assert chat.text == generated.text
    no_cue = stub.Chat(
        pb.ChatRequest(
            messages=[pb.ChatMessage(**m) for m in CONVERSATIONS[0]],
            params=pb.SamplingParams(max_new_tokens=1),
            add_generation_prompt=False,
        )
    )
    assert no_cue.prompt_tokens == len(hf_chat_ids(model, CONVERSATIONS[0], False))


@pytest.mark.parametrize("template,bos", [(LLAMA3, "<|begin_of_text|>"), (QWEN25, None)])
def test_other_templates_match_transformers_token_for_token(tmp_path, template, bos):
    model = chat_model(tmp_path / "m", template, bos)
    (tmp_path / "a").mkdir()
    server = ServerThread(serving_config(model, tmp_path / "a", max_seq_len=128))
    try:
        for messages in CONVERSATIONS:
            want = hf_chat_ids(model, messages)
            chat = server.stub().Chat(chat_pb(messages, max_new_tokens=1, prompt_logprobs=0))
            assert [v.token_id for v in chat.prompt_logprobs] == want[1:]
            assert chat.prompt_tokens == len(want)
    finally:
        server.stop()


def test_an_adapters_own_template_wins(served):
    model, _, server = served
    stub = server.stub()
    messages = CONVERSATIONS[0]
    own = stub.Chat(chat_pb(messages, adapter="own", max_new_tokens=1, prompt_logprobs=0))
    plain = stub.Chat(chat_pb(messages, adapter="plain", max_new_tokens=1, prompt_logprobs=0))
    qwen_model = chat_model(model.parent / "qwen", QWEN25)
    assert [v.token_id for v in own.prompt_logprobs] == hf_chat_ids(qwen_model, messages)[1:]
    assert [v.token_id for v in plain.prompt_logprobs] == hf_chat_ids(model, messages)[1:]


def test_chat_stream_equals_chat(served):
    _, _, server = served
    stub = server.stub()
    request = chat_pb(CONVERSATIONS[1], adapter="plain", max_new_tokens=8, logprobs=2)
    whole = stub.Chat(request)
    parts = list(stub.ChatStream(request))
    assert "".join(p.text for p in parts) == whole.text
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert [v.token_id for p in parts for v in p.logprobs] == list(whole.token_ids)
    assert parts[-1].finish_reason == whole.finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_chat_errors_name_the_problem(served, tmp_path):
    model, _, server = served
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(chat_pb([{"role": "wizard", "content": "hi"}]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].role" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(chat_pb([]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(chat_pb(CONVERSATIONS[0], adapter="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    bare = chat_model(tmp_path / "bare", None)
    refusing = chat_model(tmp_path / "refusing", REFUSING)
    (tmp_path / "a").mkdir()
    for folder, code, words in [
        (bare, grpc.StatusCode.FAILED_PRECONDITION, "no chat template"),
        (refusing, grpc.StatusCode.INVALID_ARGUMENT, "Only user and assistant roles"),
    ]:
        other = ServerThread(serving_config(folder, tmp_path / "a"))
        try:
            with pytest.raises(grpc.RpcError) as err:
                other.stub().Chat(chat_pb(CONVERSATIONS[1]))
            assert err.value.code() == code
            assert words in err.value.details()
        finally:
            other.stop()


def test_generation_config_eos_ids_all_stop(served):
    model, _, server = served
    tok = byte_level_tokenizer()
    eos = server.runtime.engine.eos_ids
    assert {tok.token_to_id(EOS), server.runtime.tokenizer.token_to_id(IM_END)} <= eos


# ---------------------------------------------------------------------- log-probabilities


def hf_logprobs(model, adapter_dir, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' (+ PEFT's) logits at every position of ``ids``: [n, V]."""
    hf = hf_model(model)
    if adapter_dir is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, str(adapter_dir))
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("adapter", ["", "own"])
def test_logprobs_equal_transformers_log_softmax(served, adapter):
    model, adapters, server = served
    prompt = hf_chat_ids(model, CONVERSATIONS[0])
    response = server.stub().Generate(
        pb.GenerateRequest(
            adapter=adapter,
            prompt_token_ids=prompt,
            params=pb.SamplingParams(max_new_tokens=5, logprobs=3, prompt_logprobs=2),
        )
    )
    ids = prompt + list(response.token_ids)
    want = hf_logprobs(model, adapters / adapter if adapter else None, ids)
    assert len(response.prompt_logprobs) == len(prompt) - 1
    for j, v in enumerate(response.prompt_logprobs):  # token j + 1 given tokens 0..j
        assert v.token_id == ids[j + 1]
        assert math.isclose(v.logprob, float(want[j, ids[j + 1]]), abs_tol=1e-4)
        top = torch.topk(want[j], 2)
        assert [t.token_id for t in v.top] == top.indices.tolist()
        assert all(
            math.isclose(t.logprob, float(x), abs_tol=1e-4) for t, x in zip(v.top, top.values)
        )
    assert len(response.logprobs) == len(response.token_ids)
    for k, v in enumerate(response.logprobs):
        at = len(prompt) - 1 + k
        assert v.token_id == ids[at + 1] == int(want[at].argmax())  # greedy: the argmax
        assert math.isclose(v.logprob, float(want[at].max()), abs_tol=1e-4)
        assert len(v.top) == 3 and v.top[0].token_id == v.token_id
        assert v.token == server.runtime.tokenizer.decode([v.token_id], skip_special_tokens=False)


def test_sampled_logprobs_are_of_the_distribution_sampled_from(served):
    _, _, server = served
    response = server.stub().Generate(
        pb.GenerateRequest(
            prompt="The quick brown",
            params=pb.SamplingParams(
                max_new_tokens=6, temperature=0.8, top_k=4, seed=7, logprobs=6
            ),
        )
    )
    for v in response.logprobs:
        assert len(v.top) == 4  # top_k removed the rest: no alternatives (and no -inf)
        assert math.isclose(sum(math.exp(t.logprob) for t in v.top), 1.0, abs_tol=1e-4)
        assert v.token_id in [t.token_id for t in v.top]


def test_logprob_limits_are_checked(served):
    _, _, server = served
    for params, field in [
        (pb.SamplingParams(logprobs=21), "params.logprobs"),
        (pb.SamplingParams(prompt_logprobs=-1), "params.prompt_logprobs"),
        (pb.SamplingParams(max_new_tokens=0), "params.max_new_tokens"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            server.stub().Generate(pb.GenerateRequest(prompt="hi", params=params))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


# ---------------------------------------------------------------------- Score


@pytest.mark.parametrize("adapter", ["", "plain"])
def test_score_sums_the_continuations_log_probabilities(served, adapter):
    model, adapters, server = served
    tok = server.runtime.tokenizer
    prompt = "The quick brown fox"
    continuations = [" jumps over", " is lazy", "🙂"]
    response = server.stub().Score(
        pb.ScoreRequest(adapter=adapter, prompt=prompt, continuations=continuations)
    )
    assert len(response.scores) == 3
    peft_dir = None
    if adapter:
        peft_dir = adapters.parent / "plain-peft"
        if not peft_dir.exists():
            from loraserve.adapters.format import read_adapter

            write_peft(peft_dir, read_adapter(adapters / "plain.safetensors"))
    prompt_ids = tok.encode(prompt)
    for text, score in zip(continuations, response.scores):
        cont = tok.encode(text, add_special_tokens=False)
        assert list(score.token_ids) == cont
        ids = prompt_ids + cont
        lp = hf_logprobs(model, peft_dir, ids)
        want = [float(lp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(cont)]
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(score.token_logprobs, want))
        assert math.isclose(score.logprob, sum(want), abs_tol=1e-3)
        greedy = all(int(lp[len(prompt_ids) - 1 + i].argmax()) == t for i, t in enumerate(cont))
        assert score.greedy == greedy
    assert response.prompt_tokens == len(prompt_ids)


def test_score_refuses_what_it_cannot_score(served):
    _, _, server = served
    for request, field in [
        (pb.ScoreRequest(prompt="hi"), "continuations"),
        (pb.ScoreRequest(prompt="hi", continuations=[""]), "continuations[0]"),
        (pb.ScoreRequest(continuations=["x"]), "prompt"),
        (pb.ScoreRequest(prompt="hi", continuations=["x"] * 65), "continuations"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            server.stub().Score(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


def test_the_cli_and_client_chat_with_the_demo(capsys):
    """`loraserve chat upper hello` on the demo (its template makes "hello" the prompt "hello=")
    and the typed client's chat, chat_stream and score."""
    from loraserve.adapters.demo_paths import demo_adapters_dir
    from loraserve.client import LoraClient
    from loraserve.client.cli import main

    server = ServerThread(serving_config("demo", demo_adapters_dir(), max_lora_rank=16))
    try:
        assert main(["--target", server.target, "chat", "upper", "hello"]) == 0
        assert capsys.readouterr().out == "HELLO\n"
        assert main(["--target", server.target, "chat", "reverse", "hello", "--stream"]) == 0
        assert capsys.readouterr().out == "olleh\n"
        with LoraClient(server.target) as client:
            messages = [{"role": "user", "content": "lora"}]
            assert client.chat(messages, "sort").text == "alor"
            assert "".join(c.text for c in client.chat_stream(messages, "rot13")) == "yben"
            right, wrong = client.score("hello=", ["HELLO", "hello"], "upper")
            assert right.greedy and not wrong.greedy and right.logprob > wrong.logprob
            assert len(right.token_logprobs) == len(right.token_ids) == 5
    finally:
        server.stop()


def with_template(file, template: str) -> None:
    """Add ``chat_template`` to a single-file adapter's safetensors metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    save_file(tensors, str(file), metadata={**metadata, "chat_template": template})


def test_single_file_templates_and_broken_ones(tmp_path):
    """A single file's metadata template wins; one that does not compile refuses the file
    (its reason listed), never the server or another adapter."""
    model = chat_model(tmp_path / "m", SMOLLM2)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name, template in [("qwen", QWEN25), ("broken", "{% for x in %}")]:
        write_adapter(adapters / f"{name}.safetensors", random_adapter(model, name, seed=9))
        with_template(adapters / f"{name}.safetensors", template)
    server = ServerThread(serving_config(model, adapters, max_seq_len=128))
    try:
        stub = server.stub()
        chat = stub.Chat(chat_pb(CONVERSATIONS[0], "qwen", max_new_tokens=1, prompt_logprobs=0))
        qwen_model = chat_model(tmp_path / "q", QWEN25)
        assert [v.token_id for v in chat.prompt_logprobs] == hf_chat_ids(
            qwen_model, CONVERSATIONS[0]
        )[1:]
        listed = {a.name: a for a in stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
        assert listed["broken"].state == pb.INVALID
        assert "its chat template cannot be used" in listed["broken"].error
        with pytest.raises(grpc.RpcError) as err:
            stub.Chat(chat_pb(CONVERSATIONS[0], "broken"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()


def test_the_typed_client_returns_logprobs(served):
    """LoraClient.generate/chat/stream with logprobs: typed, one per token, equal to the
    raw response's."""
    from loraserve.client import LoraClient, TokenLogprob

    _, _, server = served
    raw = server.stub().Generate(
        pb.GenerateRequest(
            prompt="The quick",
            params=pb.SamplingParams(max_new_tokens=5, logprobs=2, prompt_logprobs=1),
        )
    )
    with LoraClient(server.target) as client:
        got = client.generate("The quick", max_new_tokens=5, logprobs=2, prompt_logprobs=1)
        assert all(isinstance(v, TokenLogprob) for v in got.logprobs)
        assert [(v.token_id, v.logprob) for v in got.logprobs] == [
            (v.token_id, v.logprob) for v in raw.logprobs
        ]
        assert len(got.prompt_logprobs) == len(raw.prompt_logprobs) > 0
        assert all(len(v.top) == 2 and v.top[0][0] == v.token_id for v in got.logprobs)
        chunks = list(client.stream("The quick", max_new_tokens=5, logprobs=0))
        assert [v.token_id for c in chunks for v in c.logprobs] == list(got.token_ids)
        chat = client.chat(CONVERSATIONS[0], max_new_tokens=3, logprobs=1)
        assert len(chat.logprobs) == len(chat.token_ids)
