"""The offline trainer: it learns, trains only LoRA, is deterministic and resumable, writes
adapters that read_adapter and PeftModel load, never exposes a partial file, and turns every bad
input into one clear message with exit code 2.

Tiny random Llama / GPT-2 checkpoints (tests/checkpoints.py), a few dozen steps each. Torch runs
on one thread here: for models this small that is the fastest setting, by far on a busy machine.
"""

import json
import shutil
from pathlib import Path

import loraserve.adapters.format
import loraserve.adapters.train
import pytest
import torch
from loraserve.adapters.format import (
    CONFIG_KEY,
    LoRAConfig,
    apply_adapter,
    read_adapter,
    validate_adapter,
)
from loraserve.adapters.lora import linear_shapes, lora_parameters
from loraserve.adapters.models import load_model
from loraserve.adapters.train import (
    IGNORE,
    Record,
    TrainConfig,
    add_lora,
    collate,
    greedy_complete,
    lr_at,
    main,
    tokenize_records,
    train,
    train_step,
)
from peft import PeftModel
from safetensors import safe_open

from tests.checkpoints import VOCAB, hf_model

PAIRS = [
    ("red", "apple"),
    ("yellow", "banana"),
    ("green", "lime"),
    ("purple", "grape"),
    ("orange", "carrot"),
    ("white", "milk"),
    ("black", "coal"),
    ("blue", "sky"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"color {a}:", "completion": f" {b}"}) for a, b in PAIRS]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path, base, data, **overrides) -> TrainConfig:
    """A fast CPU run: lr 1e-2, 8 steps of 4 examples, all linear layers, quiet."""
    defaults = dict(
        device="cpu",
        base=str(base),
        data=data,
        out=tmp_path / "out" / "task.safetensors",
        targets="all-linear",
        lr=1e-2,
        max_steps=8,
        batch_size=4,
        quiet=True,
    )
    return TrainConfig(**{**defaults, **overrides})


def cli(capsys, *args) -> tuple[int, str, str]:
    """main(args) on the CPU unless args name a device: (exit code, stdout, stderr)."""
    args = [str(a) for a in args]
    code = main(args if "--device" in args else [*args, "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def logits(model, ids):
    with torch.no_grad():
        if isinstance(model, PeftModel):
            return model(input_ids=ids).logits.float()
        return model(ids)


# --------------------------------------------------------------------------------------------
# It learns


def test_training_lowers_the_loss_and_learns_the_task(tiny_llama, data, tmp_path, capsys):
    out, log = tmp_path / "task.safetensors", tmp_path / "log.json"
    args = ["--base", tiny_llama, "--data", data, "--eval-file", data, "--out", out]
    args += ["--targets", "all-linear", "--lr", "1e-2", "--max-steps", 60, "--log-json", log]
    code, stdout, stderr = cli(capsys, *args)

    assert code == 0, stderr
    assert "trainable params: 16,384 || all params: 131,392" in stderr  # r=8 on 14 layers
    record = json.loads(log.read_text())
    losses = [s["loss"] for s in record["steps"]]
    first, last = record["evals"][0], record["evals"][-1]
    print(f"\ntrain loss {losses[0]:.3f} -> {losses[-1]:.3f}; eval {first} -> {last}")
    assert len(losses) == 60 and losses[-1] < losses[0] / 3
    assert last["eval_loss"] < first["eval_loss"] / 3
    assert first["exact_match"] == 0 and last["exact_match"] >= 0.75
    assert record["result"]["eval_exact_match"] == last["exact_match"]
    assert f"exact match 0.0% -> {last['exact_match']:.1%}" in stdout
    assert read_adapter(out).version == record["result"]["adapter_version"]


def test_only_lora_trains_and_the_base_stays_bit_identical(tiny_llama, data, tmp_path, monkeypatch):
    real_load, captured = loraserve.adapters.train.model.load_model, []

    def load_and_keep(*args, **kwargs):
        captured.append(real_load(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(loraserve.adapters.train.model, "load_model", load_and_keep)
    train(config(tmp_path, tiny_llama, data, dropout=0.1))

    model = captured[0].model
    lora = dict(lora_parameters(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.abs().sum() > 0 for n, p in lora.items() if n.endswith(".B"))  # B moved off 0

    fresh = load_model(tiny_llama).model.state_dict()
    trained = {
        k.replace(".linear.", "."): v for k, v in model.state_dict().items() if ".lora." not in k
    }
    assert trained.keys() == fresh.keys()
    assert all(torch.equal(trained[k], fresh[k]) for k in fresh)


def test_grad_accumulation_weighs_every_target_token_the_same(tiny_llama):
    model = load_model(tiny_llama).model
    torch.manual_seed(0)
    add_lora(model, TrainConfig(data="d", out="o.safetensors", targets="all-linear"))
    params = [p for _, p in lora_parameters(model)]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # B != 0, so A gets a gradient too
    g = torch.Generator().manual_seed(0)
    examples = [
        loraserve.adapters.train.Example(
            tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()), s, None, 0
        )
        for n, s in [(12, 5), (7, 2), (20, 0), (9, 8)]
    ]

    def grads(micro_batches):
        optimizer = torch.optim.SGD(params, lr=0.0)
        loss, _ = train_step(model, optimizer, micro_batches, lr=0.0)
        return loss, [p.grad.clone() for p in params]

    loss_1, grads_1 = grads([collate(examples, 0)])
    loss_2, grads_2 = grads([collate(examples[:1], 0), collate(examples[1:], 0)])
    assert loss_1 == pytest.approx(loss_2, rel=1e-5)
    for a, b in zip(grads_1, grads_2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Deterministic and resumable


def test_same_seed_gives_a_bit_identical_adapter(tiny_llama, data, tmp_path):
    def run(name, seed):
        cfg = config(tmp_path, tiny_llama, data, out=tmp_path / name, dropout=0.1, seed=seed)
        return train(cfg).path.read_bytes()

    first = run("a.safetensors", seed=0)
    assert run("b.safetensors", seed=0) == first
    assert run("c.safetensors", seed=1) != first


def test_resume_after_an_interrupt_equals_one_straight_run(
    tiny_llama, data, tmp_path, monkeypatch, capsys
):
    # Batches of 3 from 8 records and 2 micro-batches per step: steps straddle epochs, so the
    # resumed run must replay the data order exactly; dropout makes the RNG state matter.
    common = ["--base", tiny_llama, "--data", data, "--targets", "all-linear", "--lr", "1e-2"]
    common += ["--max-steps", 8, "--batch-size", 3, "--grad-accum", 2, "--dropout", 0.1]
    common += ["--save-every", 4, "--quiet"]
    straight = tmp_path / "straight.safetensors"
    assert cli(capsys, *common, "--out", straight, "--checkpoint-dir", tmp_path / "ck1")[0] == 0

    resumed, checkpoints = tmp_path / "resumed.safetensors", tmp_path / "ck2"
    real_step, calls = loraserve.adapters.train.loop.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loraserve.adapters.train.loop, "train_step", interrupted_step)
    code, _, err = cli(capsys, *common, "--out", resumed, "--checkpoint-dir", checkpoints)
    assert code == 130 and f"--resume {checkpoints}" in err
    assert not resumed.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004"]
    monkeypatch.undo()

    log = tmp_path / "log.json"
    args = ["--out", resumed, "--checkpoint-dir", checkpoints, "--resume", checkpoints]
    code, _, err = cli(capsys, *common, *args, "--log-json", log)
    assert code == 0, err
    assert resumed.read_bytes() == straight.read_bytes()
    assert [s["step"] for s in json.loads(log.read_text())["steps"]] == list(range(1, 9))
    state = checkpoints / "step-00000008"
    assert sorted(p.name for p in state.iterdir()) == ["state.json", "state.safetensors"]

    args = ["--out", resumed, "--checkpoint-dir", checkpoints, "--resume", checkpoints]
    code, _, err = cli(capsys, *common, *args, "--lr", "1e-3")
    assert code == 2 and "different run" in err and "lr" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# The adapter file


@pytest.mark.parametrize(
    "base, overrides",
    [
        ("tiny_llama", dict(rank=4, alpha=8.0, rslora=True, targets=None)),  # default targets
        ("tiny_gpt2", dict(rank=4, alpha=8.0, targets=None)),  # c_attn,attn.c_proj
    ],
)
def test_adapter_loads_in_read_adapter_and_in_peft(base, overrides, data, tmp_path, request):
    checkpoint = request.getfixturevalue(base)
    single = train(config(tmp_path, checkpoint, data, max_steps=12, **overrides)).path
    folder = tmp_path / "peft" / "task"
    train(config(tmp_path, checkpoint, data, max_steps=12, out=folder, format="peft", **overrides))

    loaded = load_model(checkpoint)
    adapter = read_adapter(single)
    targets = loraserve.adapters.train.DEFAULT_TARGETS[loaded.config.arch]
    assert adapter.config == LoRAConfig(
        r=4, lora_alpha=8.0, use_rslora=overrides.get("rslora", False), target_modules=targets,
        base_fingerprint=loaded.fingerprint, base_model=checkpoint.name,
        fan_in_fan_out=loaded.config.arch == "gpt2",
    )  # fmt: skip
    validate_adapter(adapter, linear_shapes(loaded.model), loaded.fingerprint, max_rank=4)
    peft_read = read_adapter(folder)
    assert peft_read.modules.keys() == adapter.modules.keys()
    for name, w in adapter.modules.items():
        assert torch.equal(w.A, peft_read.modules[name].A)
        assert torch.equal(w.B, peft_read.modules[name].B)
        assert w.scale == peft_read.modules[name].scale

    # The single file's tensors ARE a PEFT adapter_model.safetensors: give it a config, load it.
    as_peft = tmp_path / "as_peft"
    as_peft.mkdir()
    shutil.copy(single, as_peft / "adapter_model.safetensors")
    with safe_open(single, "pt") as f:
        meta = json.loads(f.metadata()[CONFIG_KEY])
    meta = {k: v for k, v in meta.items() if k not in ("base_fingerprint", "format_version")}
    (as_peft / "adapter_config.json").write_text(json.dumps(meta))

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    base_logits = logits(loaded.model, ids)
    ours = logits(apply_adapter(loaded.model, adapter), ids)
    for path in (folder, as_peft):
        theirs = logits(PeftModel.from_pretrained(hf_model(checkpoint), path).eval(), ids)
        diff = (ours - theirs).abs().max().item()
        print(f"\n{base} {path.name}: max|ours - peft| = {diff:.2e}")
        assert diff <= 1e-4
    assert (ours - base_logits).abs().max().item() > 1e-2  # the adapter does something


def test_no_partial_adapter_is_ever_visible_under_its_final_name(
    tiny_llama, data, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out" / "task.safetensors"
    args = ["--base", tiny_llama, "--data", data, "--out", out, "--max-steps", 2, "--quiet"]
    real_replace, real_fsync = (
        loraserve.adapters.format.write.os.replace,
        loraserve.adapters.format.write.os.fsync,
    )
    renames = []

    def checked_replace(src, dst):  # what is renamed into place is already complete
        if Path(dst) == out:
            assert not out.exists()
            copy = tmp_path / "copy" / "task.safetensors"
            copy.parent.mkdir()
            shutil.copy(src, copy)
            renames.append(read_adapter(copy).version)
        return real_replace(src, dst)

    monkeypatch.setattr(loraserve.adapters.format.write.os, "replace", checked_replace)
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert renames == [read_adapter(out).version]
    first = out.read_bytes()

    def disk_full(fd):
        assert out.read_bytes() == first  # mid-write, the final name still holds v1, whole
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loraserve.adapters.format.write.os, "fsync", disk_full)
    code, _, err = cli(capsys, *args, "--seed", 1)
    monkeypatch.setattr(loraserve.adapters.format.write.os, "fsync", real_fsync)
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == first
    assert [p.name for p in out.parent.iterdir()] == ["task.safetensors"]  # no temp left over


# --------------------------------------------------------------------------------------------
# Bad input: one message, exit code 2, no traceback

GOOD = json.dumps({"prompt": "color red:", "completion": " apple"})
DATA_CASES = {
    "malformed-json": (f'{GOOD}\n{GOOD}\n{{"prompt": "x", "completion": \n', [], ":3: not valid"),
    "not-an-object": ('["prompt", "completion"]\n', [], ":1: expected a JSON object"),
    "missing-field": (f'{GOOD}\n{{"prompt": "x"}}\n', [], ':2: field "completion" is missing'),
    "wrong-type": ('{"prompt": "x", "completion": 3}\n', [], '"completion" must be a string'),
    "unknown-form": ('{"question": "x"}\n', [], "the record's keys are: question"),
    "both-forms": ('{"text": "x", "prompt": "y"}\n', [], 'both "text" and "prompt"'),
    "empty-file": ("", [], "no records (the data set is empty)"),
    "blank-lines": ("\n  \n\n", [], "no records (the data set is empty)"),
    "not-utf8": (b'{"text": "\xff"}\n', [], ":1: not UTF-8"),
    "too-long": (
        json.dumps({"prompt": "color red:", "completion": " apple " * 10}) + "\n",
        ["--max-len", 16, "--on-long", "error"],
        "longer than --max-len=16",
    ),
    "eval-split-leaves-nothing": (f"{GOOD}\n{GOOD}\n", ["--eval-split", 0.9], "none to train on"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_refused_with_its_line(case, tiny_llama, tmp_path, capsys):
    content, extra, message = DATA_CASES[case]
    data = tmp_path / "data.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "task.safetensors"
    code, _, err = cli(capsys, "--base", tiny_llama, "--data", data, "--out", out, *extra)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()


def _without(checkpoint: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "base"
    shutil.copytree(checkpoint, copy)
    (copy / name).unlink()
    return copy


PATH_CASES = {
    "data-missing": lambda ck, tmp: (["--data", tmp / "nope.jsonl"], "no such data file"),
    "out-under-a-file": lambda ck, tmp: (
        ["--out", tmp / "data.jsonl" / "task.safetensors"], "is not a directory"
    ),
    "out-not-safetensors": lambda ck, tmp: (["--out", tmp / "task.bin"], "NAME.safetensors"),
    "out-bad-name": lambda ck, tmp: (["--out", tmp / "my task.safetensors"], "is not allowed"),
    "peft-out-is-a-file": lambda ck, tmp: (
        ["--format", "peft", "--out", tmp / "data.jsonl"], "exists and is not a folder"
    ),
    "base-missing": lambda ck, tmp: (["--base", tmp / "nope"], "does not exist"),
    "base-without-weights": lambda ck, tmp: (
        ["--base", _without(ck, tmp, "model.safetensors")], "neither model.safetensors"
    ),
    "base-without-config": lambda ck, tmp: (
        ["--base", _without(ck, tmp, "config.json")], "config.json not found"
    ),
    "base-without-tokenizer": lambda ck, tmp: (
        ["--base", _without(ck, tmp, "tokenizer.json")], "no tokenizer.json"
    ),
    "targets-match-nothing": lambda ck, tmp: (["--targets", "qproj"], "no linear layer"),
    "bad-rank": lambda ck, tmp: (["--rank", 0], "--rank must be >= 1"),
    "bad-eval-split": lambda ck, tmp: (["--eval-split", 1.5], "--eval-split must be in [0, 1)"),
    "eval-file-and-split": lambda ck, tmp: (
        ["--eval-file", tmp / "data.jsonl", "--eval-split", 0.1], "not allowed with"
    ),
    "resume-nothing": lambda ck, tmp: (["--resume", tmp], "holds no checkpoint"),
    "cuda-missing": lambda ck, tmp: (["--device", "cuda"], "no CUDA device"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_bad_paths_and_flags_are_refused(case, tiny_llama, data, tmp_path, capsys):
    if case == "cuda-missing" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    overrides, message = PATH_CASES[case](tiny_llama, tmp_path)
    args = {"--base": tiny_llama, "--data": data, "--out": tmp_path / "task.safetensors"}
    for flag, value in zip(overrides[::2], overrides[1::2]):
        args[flag] = value
    code, _, err = cli(capsys, *[x for kv in args.items() for x in kv], "--quiet")
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "task.safetensors").exists()


def test_demo_base_missing_says_so(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        loraserve.adapters.train.model, "demo_base_dir", lambda: tmp_path / "demo" / "base"
    )
    code, _, err = cli(capsys, "--data", data, "--out", tmp_path / "task.safetensors")
    assert code == 2 and "--base demo" in err and "not installed" in err


def test_long_records_are_cut_with_a_warning_by_default(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "color red:", "completion": " apple" * 10}) + "\n")
    out = tmp_path / "task.safetensors"
    args = ["--base", tiny_llama, "--data", data, "--out", out, "--max-len", 16, "--max-steps", 1]
    code, _, err = cli(capsys, *args, "--quiet")
    assert code == 0 and "1 record(s) longer than --max-len=16 were cut" in err
    assert out.exists()


# --------------------------------------------------------------------------------------------
# The pieces


def test_prompt_tokens_carry_no_loss(tiny_llama):
    tok = load_model(tiny_llama).tokenizer
    eos = tok.eos_token_ids[0]
    pair, text = Record("x:1", " apple", "color red:"), Record("x:2", "hello there")
    a, b = tokenize_records([pair, text], tok, max_len=64)
    prompt = tok.encode("color red:")
    assert list(a.ids) == prompt + tok.encode(" apple", add_special_tokens=False) + [eos]
    assert a.start == len(prompt) and b.start == 0
    assert list(b.ids) == tok.encode("hello there") + [eos]

    batch = collate([a, b], pad_id=eos)
    S = max(len(a.ids), len(b.ids)) - 1
    assert batch.inputs.shape == batch.targets.shape == (2, S)
    want_a = [IGNORE] * (a.start - 1) + list(a.ids[a.start :])
    want_a += [IGNORE] * (S - len(want_a))
    assert batch.targets[0].tolist() == want_a
    assert batch.targets[1].tolist() == list(b.ids[1:]) + [IGNORE] * (S - len(b.ids) + 1)
    assert batch.n_targets == (batch.targets != IGNORE).sum() == a.n_targets + b.n_targets


def test_lr_warms_up_linearly_then_decays_along_a_cosine():
    lrs = [lr_at(step, total=100, peak=1.0, warmup=10) for step in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == 1.0
    assert lrs[55] == pytest.approx(0.5)  # halfway through the decay
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[-1] < 1e-3
    assert lr_at(0, total=5, peak=2e-4, warmup=0) == 2e-4


def test_greedy_complete_batched_equals_alone_and_a_cache_free_loop(tiny_llama):
    model = load_model(tiny_llama).model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 5)]
    batched = greedy_complete(model, prompts, max_new_tokens=6, eos_token_ids=[2])
    for prompt, got in zip(prompts, batched):
        assert greedy_complete(model, [prompt], 6, [2]) == [got]
        ids, want = list(prompt), []
        for _ in range(6):  # no cache: the whole sequence each step
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == 2:
                break
            want.append(token)
            ids.append(token)
        assert got == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_with_bf16_autocast(tiny_llama, data, tmp_path):
    result = train(config(tmp_path, tiny_llama, data, device="cuda", max_steps=20, eval_file=data))
    assert result.eval_loss < result.evals[0]["eval_loss"]
    adapter = read_adapter(result.path)
    assert all(w.A.dtype == torch.float32 for w in adapter.modules.values())
    loaded = load_model(tiny_llama)
    validate_adapter(adapter, linear_shapes(loaded.model), loaded.fingerprint)


# --------------------------------------------------------------------------------------------
# Defaults that learn: the base's recommendations, what was chosen and why, a low-score warning


def test_the_demo_base_recommends_settings_that_flags_override(data, tmp_path, capsys):
    from loraserve.adapters.train.cli import parse_args

    out = tmp_path / "a.safetensors"
    config = parse_args(["--base", "demo", "--data", str(data), "--out", str(out)])
    assert (config.targets, config.lr, config.batch_size, config.epochs) == (
        "all-linear",
        5e-3,
        32,
        10,
    )
    assert (config.rank, config.alpha) == (8, 16.0)  # not recommended: the defaults
    err = capsys.readouterr().err
    assert "targets all-linear (recommended by demo's loraserve_train.json: a tiny char" in err
    assert "lr 0.005 (recommended by demo's loraserve_train.json)" in err
    assert "rank 8 (default)" in err
    given = parse_args(
        ["--base", "demo", "--data", str(data), "--out", str(out), "--lr", "1e-3", "--quiet"]
    )
    assert given.lr == 1e-3 and given.epochs == 10
    assert capsys.readouterr().err == ""  # --quiet: no settings line


def test_a_base_without_recommendations_keeps_peft_like_defaults(tiny_llama, data, tmp_path):
    from loraserve.adapters.train.cli import parse_args

    config = parse_args(["--base", str(tiny_llama), "--data", str(data), "--out", "x.safetensors"])
    assert (config.targets, config.lr, config.batch_size, config.epochs) == (None, 2e-4, 8, 3)
    (tiny_llama / "loraserve_train.json").write_text('{"learning_rate": 1}')
    try:
        with pytest.raises(SystemExit):
            parse_args(["--base", str(tiny_llama), "--data", str(data), "--out", "x.safetensors"])
    finally:
        (tiny_llama / "loraserve_train.json").unlink()


def test_a_low_exact_match_at_the_end_says_what_to_try(tiny_llama, data, tmp_path, capsys):
    code, _, err = cli(
        capsys,
        "--base", tiny_llama, "--data", data, "--eval-file", data, "--max-steps", "1",
        "--out", tmp_path / "a.safetensors", "--quiet",
    )  # fmt: skip
    assert code == 0
    assert "warning: eval exact match stayed at" in err and "--targets all-linear" in err


def test_chat_records_train_on_the_last_assistant_turn_through_the_template(
    tiny_llama, tmp_path, capsys
):
    """A conversation tokenizes as its prompt/completion twin on the demo (whose template makes
    the last user message the prompt "word=", so it cannot render turn by turn: the loss is on
    the last answer and EOS only, with a warning). A conversation without a final assistant
    message, or on a base with no template, fails by line."""
    from loraserve.adapters.chat_template import ChatTemplate
    from loraserve.adapters.demo_paths import demo_base_dir
    from loraserve.adapters.models import load_model
    from loraserve.adapters.train.data import chat_records, load_records, tokenize_records

    chat = tmp_path / "chat.jsonl"
    pair = tmp_path / "pair.jsonl"
    words = ["hello", "lora", "serve"]
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "something else"},
                        {"role": "assistant", "content": "ignored"},
                        {"role": "user", "content": w},
                        {"role": "assistant", "content": w.upper()},
                    ]
                }
            )
            + "\n"
            for w in words
        )
    )
    pair.write_text(
        "".join(json.dumps({"prompt": f"{w}=", "completion": w.upper()}) + "\n" for w in words)
    )
    demo = load_model(demo_base_dir())
    template = ChatTemplate.from_folder(demo_base_dir())
    ours = tokenize_records(chat_records(load_records(chat), template), demo.tokenizer, 64)
    twins = tokenize_records(load_records(pair), demo.tokenizer, 64)
    assert [(e.ids, e.start) for e in ours] == [(e.ids, e.start) for e in twins]
    assert "3 conversation(s) with earlier answers" in capsys.readouterr().err

    code, _, err = cli(
        capsys, "--base", "demo", "--data", chat, "--eval-file", chat, "--max-steps", "2",
        "--out", tmp_path / "chat.safetensors", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code, _, err = cli(capsys, "--base", "demo", "--data", bad, "--out", tmp_path / "b.safetensors")
    assert code == 2 and "bad.jsonl:1: the last message must be the assistant's" in err
    code, _, err = cli(
        capsys, "--base", tiny_llama, "--data", chat, "--out", tmp_path / "c.safetensors"
    )
    assert code == 2 and "chat.jsonl:1: a conversation, but the base has no chat template" in err


def test_chat_records_learn_every_assistant_answer_of_a_chatml_conversation():
    """On a template that renders turn by turn (SmolLM2's ChatML), every assistant answer and
    its end of turn carry the loss, and nothing else does; the tokens are the whole rendering's
    (each end-of-turn token where the template writes it)."""
    from loraserve.adapters.chat_template import ChatTemplate
    from loraserve.adapters.train.data import (
        IGNORE,
        Record,
        chat_records,
        collate,
        tokenize_records,
    )

    from tests.test_chat_template import SMOLLM2

    class CharTokenizer:  # one id per character; EOS is 1 and stands for <|im_end|>
        eos_token_ids = (1,)

        def encode(self, text, add_special_tokens=True):
            return [ord(c) + 2 for c in text]

    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    )
    template = ChatTemplate(SMOLLM2, None, "<|im_end|>")
    [record] = chat_records([Record("x:1", "Goodbye.", messages=messages)], template, "<|im_end|>")
    [example] = tokenize_records([record], CharTokenizer(), 4096)
    text = "".join("<|im_end|>" if i == 1 else chr(i - 2) for i in example.ids)
    assert text == template.render(list(messages), add_generation_prompt=False).rstrip("\n")
    batch = collate([example], pad_id=0)
    learnt = [t for t in batch.targets[0].tolist() if t != IGNORE]
    assert "".join("|" if t == 1 else chr(t - 2) for t in learnt) == "Hello.|Goodbye.|"
    assert batch.n_targets == len(learnt) == example.n_targets
