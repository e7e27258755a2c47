"""Hostile adapter files: each one fails only itself, fast, with a reason, and costs little.

Every file here is crafted byte by byte (``_serialize`` + a config dict) so that it can say what
no writer of ours would: non-finite or absurd weights and scales, configs of the wrong types or
nested past the stack, regexes that backtrack for minutes, a base checkpoint dropped into the
adapters folder. PEFT appears only as the oracle for pattern semantics.
"""

import json
import math
import random
import threading
import time
import tracemalloc

import loraserve.adapters.format as fmt
import pytest
import torch
from loraserve.adapters.format import (
    CONFIG_KEY,
    PEFT_PREFIX,
    AdapterTooLarge,
    CorruptAdapterFile,
    InvalidAdapter,
    InvalidAdapterConfig,
    LoRAConfig,
    MissingWeights,
    NonFiniteWeights,
    ShapeMismatch,
    UnsupportedAdapter,
    WeightsOutOfRange,
    _peft_tensors,
    _serialize,
    build_adapter,
    read_adapter,
    validate_adapter,
    write_adapter,
    write_peft,
)
from loraserve.adapters.lora import match_target
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

HIDDEN = 8
MODULE = "model.layers.0.self_attn.q_proj"
A_KEY = f"{PEFT_PREFIX}{MODULE}.lora_A.weight"
B_KEY = f"{PEFT_PREFIX}{MODULE}.lora_B.weight"


def lora_tensors(module=MODULE, r=4, dtype=torch.float32, seed=0):
    """PEFT layout: ``lora_A [r, in]``, ``lora_B [out, r]``."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{PEFT_PREFIX}{module}.lora_A.weight": torch.randn(r, HIDDEN, generator=g).to(dtype),
        f"{PEFT_PREFIX}{module}.lora_B.weight": torch.randn(HIDDEN, r, generator=g).to(dtype),
    }


def config_dict(**changes) -> dict:
    """A single-file config (PEFT fields + format_version) with ``changes`` applied."""
    config = LoRAConfig(r=4, lora_alpha=8, target_modules=("q_proj",))
    return {"format_version": 1, **config.to_dict(), **changes}


def raw_file(tmp_path, tensors, config, name="x"):
    """A single-file adapter with exactly these tensors and this config (dict or raw text)."""
    text = config if isinstance(config, str) else json.dumps(config)
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(_serialize(tensors, {"format": "pt", CONFIG_KEY: text}))
    return path


def raw_folder(tmp_path, tensors, config, name="peft"):
    """A PEFT folder with exactly these tensors and this ``adapter_config.json`` (dict or text)."""
    folder = tmp_path / name
    folder.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "adapter_config.json").write_text(text)
    (folder / "adapter_model.safetensors").write_bytes(_serialize(tensors, {"format": "pt"}))
    return folder


# --------------------------------------------------------------------------------------------
# 1. Weights and scales no trained LoRA has


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, dtype, bad):
    A, B = torch.randn(HIDDEN, 4), torch.randn(4, HIDDEN)
    B[2, 5] = bad  # lora_B.weight is B^T: [out, r]
    adapter = build_adapter(
        "x", LoRAConfig(r=4, lora_alpha=8), {MODULE: (A.to(dtype), B.to(dtype))}
    )
    path = raw_file(tmp_path, _peft_tensors(adapter.modules), config_dict())  # writers refuse it
    with pytest.raises(NonFiniteWeights, match="NaN" if math.isnan(bad) else "infinite") as e:
        read_adapter(path)
    assert B_KEY in str(e.value) and A_KEY not in str(e.value)


@pytest.mark.parametrize(
    "dtype, value", [(torch.float32, 1e30), (torch.float64, -1e30), (torch.bfloat16, 1e5)]
)
def test_weights_beyond_float16_are_refused(tmp_path, dtype, value):
    weights = {
        MODULE: (torch.full((HIDDEN, 4), value, dtype=dtype), torch.ones(4, HIDDEN, dtype=dtype))
    }
    adapter = build_adapter("x", LoRAConfig(r=4, lora_alpha=8), weights)
    path = raw_file(tmp_path, _peft_tensors(adapter.modules), config_dict())  # writers refuse it
    with pytest.raises(WeightsOutOfRange, match="cannot be a trained LoRA") as e:
        read_adapter(path)
    assert A_KEY in str(e.value) and "overflow half precision" in str(e.value)


def test_weights_at_the_float16_limit_are_accepted(tmp_path):
    weights = {MODULE: (torch.full((HIDDEN, 4), -65504.0), torch.full((4, HIDDEN), 65504.0))}
    adapter = build_adapter("x", LoRAConfig(r=4, lora_alpha=8), weights)
    back = read_adapter(write_adapter(tmp_path / "x.safetensors", adapter))
    assert torch.equal(back.modules[MODULE].B, weights[MODULE][1])


@pytest.mark.parametrize(
    "changes",
    [
        {"lora_alpha": 1e9},  # scale 2.5e8
        {"alpha_pattern": {"q_proj": -1e12}},  # only this module's scale is absurd
        {"r": 1, "lora_alpha": 4e6, "use_rslora": True},
    ],
)
def test_absurd_scales_are_refused(tmp_path, changes):
    r = changes.get("r", 4)
    path = raw_file(tmp_path, lora_tensors(r=r), config_dict(**changes))
    with pytest.raises(InvalidAdapterConfig, match=rf"{MODULE} gets scale .*over 1e\+06"):
        read_adapter(path)


# --------------------------------------------------------------------------------------------
# 2. Nothing but InvalidAdapter comes out of a bad file


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layers_pattern": 5}, "layers_pattern must be a string or a list of strings"),
        ({"layers_pattern": ["layers", 5]}, "layers_pattern must be a string or a list"),
        ({"lora_alpha": 10**400}, "lora_alpha must be a finite number"),
        ({"alpha_pattern": {"q_proj": 10**400}}, "alpha_pattern must map patterns to finite"),
        ({"lora_alpha": math.nan}, "lora_alpha must be a finite number"),
        ({"r": 10**6}, "r must be a positive integer up to 65536"),
        ({"r": True}, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj": 70000}}, "rank_pattern must map patterns to ranks"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must map patterns"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"base_model_name_or_path": ["x"]}, "base_model_name_or_path must be a string"),
        ({"base_fingerprint": 5}, "base_fingerprint must be a string"),
        ({"target_modules": 5}, "target_modules must be a list of names or a regex"),
        ({"exclude_modules": [1]}, "exclude_modules must be a list of names or a regex"),
        ({"layers_to_transform": [0, "1"]}, "layers_to_transform must be an int or a list"),
    ],
)
def test_config_values_of_the_wrong_type_or_range(tmp_path, changes, message):
    folder = raw_folder(tmp_path, lora_tensors(), config_dict(**changes))
    with pytest.raises(InvalidAdapterConfig, match=message):
        read_adapter(folder)


@pytest.mark.parametrize("version", [0, -1, 2, "1", 1.0, None])
def test_format_version_must_be_a_known_int(tmp_path, version):
    path = raw_file(tmp_path, lora_tensors(), config_dict(format_version=version))
    with pytest.raises(UnsupportedAdapter, match="format_version"):
        read_adapter(path)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["peft config", "metadata config", "config value", "header"])
def test_deeply_nested_json_is_refused(tmp_path, where):
    if where == "peft config":
        path, error = raw_folder(tmp_path, lora_tensors(), DEEP), InvalidAdapterConfig
    elif where == "metadata config":
        path, error = raw_file(tmp_path, lora_tensors(), DEEP), InvalidAdapterConfig
    elif where == "config value":
        text = json.dumps(config_dict(target_modules="PLACEHOLDER")).replace('"PLACEHOLDER"', DEEP)
        path, error = raw_folder(tmp_path, lora_tensors(), text), InvalidAdapterConfig
    else:
        header = b'{"x":' + DEEP.encode() + b"}"
        path, error = tmp_path / "x.safetensors", CorruptAdapterFile
        path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(error, match="nested too deeply"):
        read_adapter(path)


def test_a_reader_bug_is_still_an_invalid_adapter(tmp_path, monkeypatch):
    path = raw_file(tmp_path, lora_tensors(), config_dict())

    def broken(*args):
        raise KeyError("boom")

    monkeypatch.setattr(fmt.read, "_plan_modules", broken)  # where read_adapter looks it up
    with pytest.raises(CorruptAdapterFile, match=r"could not be read: KeyError: .*boom") as e:
        read_adapter(path)
    assert isinstance(e.value.__cause__, KeyError)


def test_oserror_is_not_disguised(tmp_path, monkeypatch):
    path = raw_file(tmp_path, lora_tensors(), config_dict())

    def unreadable(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fmt.read, "_read_header", unreadable)
    with pytest.raises(PermissionError):
        read_adapter(path)


# Bytes a JSON or safetensors mutation is most likely to turn into something surprising.
_INTERESTING = b'0123456789-+.eE[]{}",:\\ntfu \x00\x7f\xff'


def _mutants(data: bytes, rng: random.Random, focus: int, n: int):
    """``n`` single-byte mutations (most within ``data[:focus]``) and truncations of ``data``."""
    for i in range(n):
        if i % 4 == 3:
            yield data[: rng.randrange(len(data))]
            continue
        pos = rng.randrange(focus if i % 4 else len(data))
        byte = rng.choice(_INTERESTING) if rng.random() < 0.7 else rng.randrange(256)
        yield data[:pos] + bytes([byte]) + data[pos + 1 :]


def _read_or_invalid(path) -> str:
    try:
        read_adapter(path)
        return "ok"
    except InvalidAdapter as e:
        return type(e).__name__


def test_fuzzed_single_files_raise_only_invalid_adapter(tmp_path):
    config = LoRAConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"), use_rslora=True)
    weights = {
        f"model.layers.{i}.self_attn.{p}": (torch.randn(HIDDEN, 2), torch.randn(2, HIDDEN))
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    data = (
        write_adapter(tmp_path / "good.safetensors", build_adapter("good", config, weights))
    ).read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    outcomes = []
    for mutant in _mutants(data, rng, header_end, 200):
        path = tmp_path / "m.safetensors"
        path.write_bytes(mutant)
        outcomes.append(_read_or_invalid(path))  # anything else fails the test
    assert len(set(outcomes)) > 3  # the mutations reached several different checks


def test_fuzzed_peft_configs_raise_only_invalid_adapter(tmp_path):
    config = LoRAConfig(
        r=4,
        lora_alpha=8,
        target_modules=("q_proj",),
        rank_pattern={"layers.0.self_attn.q_proj": 4},
        alpha_pattern={"q_proj": 16},
        layers_to_transform=(0,),
        layers_pattern=("layers",),
    )
    weights = {MODULE: (torch.randn(HIDDEN, 4), torch.randn(4, HIDDEN))}
    folder = write_peft(tmp_path / "good", build_adapter("good", config, weights))
    text = (folder / "adapter_config.json").read_bytes()
    rng = random.Random(1)
    outcomes = []
    for mutant in _mutants(text, rng, len(text), 200):
        (folder / "adapter_config.json").write_bytes(mutant)
        outcomes.append(_read_or_invalid(folder))
    assert "ok" in outcomes and "InvalidAdapterConfig" in outcomes


# --------------------------------------------------------------------------------------------
# 3. Regular expressions from a file cost a bounded time and never hold the GIL


class Ticker(threading.Thread):
    """Counts loop iterations and the longest stall between two; stalls if the GIL is held."""

    def __init__(self):
        super().__init__(daemon=True)
        self.ticks, self.longest_stall = 0, 0.0
        self.done = threading.Event()

    def run(self):
        last = time.perf_counter()
        while not self.done.is_set():
            now = time.perf_counter()
            self.longest_stall = max(self.longest_stall, now - last)
            last = now
            self.ticks += 1


def timed_with_ticker(fn):
    """(exception raised by ``fn``, seconds it took, the ticker) with a ticker running alongside."""
    ticker = Ticker()
    ticker.start()
    while ticker.ticks == 0:
        time.sleep(0.001)
    start_ticks, t0 = ticker.ticks, time.perf_counter()
    try:
        fn()
        error = None
    except Exception as e:
        error = e
    seconds = time.perf_counter() - t0
    ticker.done.set()
    ticker.join()
    ticker.ticks -= start_ticks
    return error, seconds, ticker


# (a|aa)+ on "aaa...ab" backtracks over every way to split the a's (Fibonacci many): ~10 s in
# re for 37 a's, growing 1.6x per a. (\w|.)*\d backtracks 2^n on a name with no digit at its end.
CATASTROPHIC = {
    "rank_pattern": ("x." + "a" * 37 + "b", {"rank_pattern": {"(a|aa)+": 4}}, "rank_pattern key"),
    "target_modules": ("model.layers.0.self_attn.c_qkv", {"target_modules": r"(\w|.)*\d"}, ""),
}


@pytest.mark.parametrize("case", list(CATASTROPHIC))
def test_catastrophic_patterns_are_refused_fast_without_holding_the_gil(tmp_path, case):
    module, changes, what = CATASTROPHIC[case]
    path = raw_file(tmp_path, lora_tensors(module=module), config_dict(**changes))

    def read_and_validate():
        adapter = read_adapter(path)  # rank_pattern: refused here
        validate_adapter(adapter, {module: (HIDDEN, HIDDEN)})  # target_modules: refused here

    error, seconds, ticker = timed_with_ticker(read_and_validate)
    assert isinstance(error, InvalidAdapterConfig), error
    assert "was too costly to match" in str(error) and what in str(error)
    pattern = next(iter(changes[case])) if case == "rank_pattern" else changes[case]
    assert repr(pattern) in str(error)
    assert seconds < 2
    assert ticker.ticks > 1000  # another thread kept running meanwhile...
    assert ticker.longest_stall < 0.25  # ...never stopped for long: the GIL was released


def test_operator_patterns_are_bounded_too():
    error, seconds, ticker = timed_with_ticker(lambda: match_target(MODULE[:30], r"(\w|.)*\d"))
    assert isinstance(error, ValueError) and "too costly to match" in str(error)
    assert seconds < 2 and ticker.longest_stall < 0.25
    with pytest.raises(ValueError, match="not a valid regex"):
        match_target(MODULE, "(unclosed")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank_pattern": {"q" * 513: 4}}, "rank_pattern key 'qqq.* is 513 characters"),
        ({"alpha_pattern": {f"k{i}": 1 for i in range(1025)}}, "1025 entries; at most 1024"),
        ({"target_modules": [f"m{i}" for i in range(1025)]}, "1025 entries; at most 1024"),
        ({"target_modules": ["q" * 600]}, "a name over 512 characters"),
        ({"layers_pattern": ["l"] * 1025}, "1025 entries"),
        # `regex` would unroll this to a million copies when compiling it (2 GB, seconds)
        ({"target_modules": "(?:q{1000}){1000}"}, "counted repeats too large to compile"),
        ({"rank_pattern": {"(?:(?:a{100}){100}){100}": 4}}, "too large to compile"),
        # fuzzy matching in `regex`, literal text in re: the two would disagree
        ({"exclude_modules": "q_proj{e<=1}"}, "re reads differently"),
        ({"layers_pattern": "[[:alpha:]]+"}, "re reads differently"),
        ({"rank_pattern": {"(unclosed": 4}}, "not a valid regex"),
    ],
)
def test_pattern_caps(tmp_path, changes, message):
    path = raw_file(tmp_path, lora_tensors(), config_dict(**changes))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidAdapterConfig, match=message):
            read_adapter(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20


def test_long_module_names_are_refused(tmp_path):
    path = raw_file(tmp_path, lora_tensors(module="m." + "a" * 600), config_dict())
    with pytest.raises(InvalidAdapterConfig, match="limited to 512"):
        read_adapter(path)


NAMES = [f"model.layers.{i}.{p}" for i in (0, 1, 12) for p in ("self_attn.q_proj", "mlp.up_proj")]
KEYS = [r"(q|k)_proj", r"layers\.1\d*\..*", r"\w+p_proj", "a)|(.*up_proj", r"(\w)\w*_proj", "mlp"]


@pytest.mark.parametrize("name", NAMES)
def test_bounded_matching_keeps_peft_semantics(name):
    patterns = {key: i + 1 for i, key in enumerate(KEYS)}
    config = LoRAConfig(r=8, lora_alpha=8, rank_pattern=patterns)
    assert config.rank_for(name) == patterns.get(get_pattern_key(KEYS, name), 8)
    for targets, layers, layers_pattern in [
        (r".*\.(q_proj|up_proj)", None, None),
        (r".*layers\.1\d?\..*", None, None),
        (["q_proj", "mlp.up_proj"], [1, 12], ["layers"]),
        (["q_proj", "up_proj"], [1, 12], ["nope", "lay.rs"]),
        (["q_proj", "up_proj"], [0], None),
    ]:
        ours = LoRAConfig(
            r=8,
            lora_alpha=8,
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            layers_to_transform=layers and tuple(layers),
            layers_pattern=layers_pattern and tuple(layers_pattern),
        )
        peft = PeftLoraConfig(
            target_modules=targets, layers_to_transform=layers, layers_pattern=layers_pattern
        )
        assert ours.targets(name) == bool(check_target_module_exists(peft, name))


# --------------------------------------------------------------------------------------------
# 4. Big files: everything is checked from the header before the data is read

BIG = 200 << 20


def sparse_safetensors(path, tensors: dict[str, tuple[str, list[int]]], metadata: dict):
    """A safetensors file declaring ``tensors`` (name -> (dtype, shape)) whose data is a hole:
    ``truncate`` makes it as large as declared without writing (or storing) the bytes."""
    header, offset = {"__metadata__": metadata}, 0
    for key, (dtype, shape) in tensors.items():
        size = math.prod(shape) * {"F32": 4, "F16": 2}[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return path


BIG_FILES = {
    "base checkpoint": (
        {"model.embed_tokens.weight": ("F32", [51200, 1024])},
        UnsupportedAdapter,
        "'model.embed_tokens.weight' is not a LoRA A/B weight",
    ),
    "rank not the config's": (
        {A_KEY: ("F32", [8, BIG // 64]), B_KEY: ("F32", [HIDDEN, 8])},
        ShapeMismatch,
        "rank 8 in the file but the config gives r=4",
    ),
    "unpaired A and B": (
        {A_KEY: ("F32", [4, BIG // 16]), B_KEY: ("F32", [HIDDEN, 3])},
        ShapeMismatch,
        "need lora_A",
    ),
    "no lora_B": ({A_KEY: ("F32", [4, BIG // 16])}, MissingWeights, "has no lora_B"),
}


@pytest.mark.parametrize("form", ["single file", "peft folder"])
@pytest.mark.parametrize("case", list(BIG_FILES))
def test_big_files_are_refused_from_the_header_alone(tmp_path, case, form):
    tensors, error, message = BIG_FILES[case]
    if form == "single file":
        path = sparse_safetensors(
            tmp_path / "big.safetensors",
            tensors,
            {"format": "pt", CONFIG_KEY: json.dumps(config_dict())},
        )
    else:
        path = tmp_path / "big"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(config_dict()))
        sparse_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    tracemalloc.start()
    try:
        with pytest.raises(error, match=message):
            read_adapter(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the ~200 MB of data were never read


def test_max_bytes_is_checked_before_reading(tmp_path):
    path = sparse_safetensors(
        tmp_path / "big.safetensors",
        {A_KEY: ("F32", [4, BIG // 16]), B_KEY: ("F32", [HIDDEN, 4])},
        {"format": "pt", CONFIG_KEY: json.dumps(config_dict())},
    )
    tracemalloc.start()
    try:
        with pytest.raises(AdapterTooLarge, match="limit"):
            read_adapter(path, max_bytes=BIG // 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_unaligned_tensors_are_read_exactly_and_aligned(tmp_path):
    a = torch.randn(1, 3).half()  # [r, in], 6 bytes...
    b = torch.randn(HIDDEN, 1)  # ...so this float32 tensor's data starts at byte 6
    path = raw_file(tmp_path, {A_KEY: a, B_KEY: b}, config_dict(r=1))
    w = read_adapter(path).modules[MODULE]
    assert torch.equal(w.A, a.T) and torch.equal(w.B, b.T)
    assert w.B.data_ptr() % 4 == 0  # copied to aligned memory, not a view at an odd address


def test_writers_refuse_what_readers_would_refuse(tmp_path):
    """A diverged training run fails when it writes, not later when a server reads the file."""
    weights = {MODULE: (torch.full((HIDDEN, 4), float("nan")), torch.zeros(4, HIDDEN))}
    adapter = build_adapter("diverged", LoRAConfig(r=4, lora_alpha=8), weights)
    with pytest.raises(NonFiniteWeights, match="lora_A"):
        write_adapter(tmp_path / "diverged.safetensors", adapter)
    with pytest.raises(NonFiniteWeights):
        write_peft(tmp_path / "diverged", adapter)
    assert not list(tmp_path.iterdir())
