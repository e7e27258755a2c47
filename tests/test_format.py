"""Adapter files: exact round trips, PEFT's scale rules, and one specific error per bad file.

PEFT appears here only as an oracle (its pattern matcher); the parity of whole models against
``PeftModel`` lives in ``test_peft_parity.py``.
"""

import hashlib
import json
import math
import os
import pickle

import pytest
import torch
from loraserve.adapters.format import (
    CONFIG_KEY,
    AdapterTooLarge,
    CorruptAdapterFile,
    FingerprintMismatch,
    InvalidAdapter,
    InvalidAdapterConfig,
    InvalidAdapterName,
    LoRAConfig,
    MissingWeights,
    RankTooLarge,
    ShapeMismatch,
    UnknownTargetModule,
    UnsupportedAdapter,
    build_adapter,
    read_adapter,
    validate_adapter,
    write_adapter,
    write_peft,
)
from peft.utils.other import get_pattern_key

HIDDEN, KV, FFN, LAYERS = 64, 32, 128, 2
PROJ_SHAPES = {  # (in, out) of a Llama-style decoder layer with GQA
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, FFN),
    "mlp.up_proj": (HIDDEN, FFN),
    "mlp.down_proj": (FFN, HIDDEN),
}
SHAPES = {
    f"model.layers.{i}.{proj}": shape for i in range(LAYERS) for proj, shape in PROJ_SHAPES.items()
}
SHAPES["lm_head"] = (HIDDEN, 100)
FINGERPRINT = "0123456789abcdef"


def make_adapter(
    name="demo",
    targets=("q_proj", "v_proj"),
    dtype=torch.float32,
    seed=0,
    **config_kwargs,
):
    config = LoRAConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, **config_kwargs})
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for module, (n_in, n_out) in SHAPES.items():
        if config.targets(module):
            r = config.rank_for(module)
            A = torch.randn(n_in, r, generator=g).to(dtype)  # [in, r]
            B = torch.randn(r, n_out, generator=g).to(dtype)  # [r, out]
            weights[module] = (A, B)
    return build_adapter(name, config, weights)


def peft_folder(tmp_path, config: dict, tensors: dict, name="peft") -> str:
    """A PEFT folder as ``save_pretrained`` writes it (keys ``base_model.model.<module>...``)."""
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def peft_lora_tensors(module="model.layers.0.self_attn.q_proj", r=4, n_in=HIDDEN, n_out=HIDDEN):
    return {
        f"base_model.model.{module}.lora_A.weight": torch.randn(r, n_in),
        f"base_model.model.{module}.lora_B.weight": torch.randn(n_out, r),
    }


PEFT_CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj"],
    "bias": "none",
    "use_dora": False,
    "modules_to_save": None,
}


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_file_round_trips_exactly(tmp_path, dtype):
    adapter = make_adapter(
        dtype=dtype,
        targets=("q_proj", "v_proj", "down_proj"),
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 3.5},
        base_fingerprint=FINGERPRINT,
        base_model="tiny-llama",
    )
    path = write_adapter(tmp_path / "demo.safetensors", adapter)
    back = read_adapter(path)

    assert back.name == "demo"
    assert back.config == adapter.config
    assert back.modules.keys() == adapter.modules.keys()
    for module, w in adapter.modules.items():
        got = back.modules[module]
        assert got.A.dtype == dtype and got.A.shape == w.A.shape
        assert torch.equal(got.A, w.A) and torch.equal(got.B, w.B)
        assert got.scale == w.scale
    assert back.version == adapter.version  # build_adapter hashes the single-file form
    assert back.nbytes == adapter.nbytes
    assert back.rank == 4

    # Deterministic bytes: writing what was read gives the same file.
    first = path.read_bytes()
    write_adapter(tmp_path / "again.safetensors", back)
    assert (tmp_path / "again.safetensors").read_bytes() == first


def test_single_file_is_a_peft_state_dict_plus_metadata(tmp_path):
    from safetensors import safe_open

    adapter = make_adapter(base_fingerprint=FINGERPRINT)
    path = write_adapter(tmp_path / "demo.safetensors", adapter)
    with safe_open(str(path), "pt") as f:  # safetensors' own reader accepts our writer
        keys = set(f.keys())
        meta = f.metadata()
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * len(adapter.modules)
    w = adapter.modules["model.layers.1.self_attn.v_proj"]
    assert torch.equal(a, w.A.T)  # PEFT layout [r, in]
    config = json.loads(meta[CONFIG_KEY])
    assert meta["format"] == "pt"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_fingerprint"] == FINGERPRINT


def test_version_is_the_sha256_of_the_bytes(tmp_path):
    adapter = make_adapter(base_fingerprint=FINGERPRINT)
    path = write_adapter(tmp_path / "demo.safetensors", adapter)
    assert read_adapter(path).version == hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    folder = write_peft(tmp_path / "demo", adapter)
    content = (folder / "adapter_config.json").read_bytes()
    content += (folder / "adapter_model.safetensors").read_bytes()
    back = read_adapter(folder)
    assert back.version == hashlib.sha256(content).hexdigest()[:16]

    other = make_adapter(seed=1, base_fingerprint=FINGERPRINT)
    assert other.version != adapter.version


def test_peft_folder_round_trip_keeps_weights_scales_and_fingerprint(tmp_path):
    adapter = make_adapter(
        targets=("q_proj", "up_proj"),
        rank_pattern={"up_proj": 2},
        alpha_pattern={"q_proj": 2},
        base_fingerprint=FINGERPRINT,
    )
    folder = write_peft(tmp_path / "demo", adapter)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert "base_fingerprint" not in config  # PEFT would warn about an unknown key
    back = read_adapter(folder)
    assert back.config == adapter.config
    for module, w in adapter.modules.items():
        assert torch.equal(back.modules[module].A, w.A) and torch.equal(back.modules[module].B, w.B)
        assert back.modules[module].scale == w.scale


def test_writers_are_atomic_and_replace(tmp_path):
    first, second = make_adapter(seed=0), make_adapter(seed=1)
    write_adapter(tmp_path / "a.safetensors", first)
    write_adapter(tmp_path / "a.safetensors", second)
    write_peft(tmp_path / "a", first)
    write_peft(tmp_path / "a", second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.safetensors"]  # no temp left
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    module = "model.layers.0.self_attn.q_proj"
    for path in (tmp_path / "a.safetensors", tmp_path / "a"):
        assert torch.equal(read_adapter(path).modules[module].A, second.modules[module].A)


def test_reads_unmodified_peft_folder_with_adapter_name_segment(tmp_path):
    tensors = {
        k.replace("lora_A.weight", "lora_A.default.weight").replace(
            "lora_B.weight", "lora_B.default.weight"
        ): v
        for k, v in peft_lora_tensors().items()
    }
    adapter = read_adapter(peft_folder(tmp_path, PEFT_CONFIG, tensors))
    w = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert w.A.shape == (HIDDEN, 4) and w.B.shape == (4, HIDDEN)
    assert torch.equal(w.A, tensors[next(iter(tensors))].T)
    assert w.scale == 2.0
    assert adapter.config.base_fingerprint is None


def test_writer_refuses_a_scale_the_file_cannot_record(tmp_path):
    adapter = make_adapter()
    module = next(iter(adapter.modules))
    w = adapter.modules[module]
    adapter.modules[module] = type(w)(w.A, w.B, scale=w.scale * 3)
    with pytest.raises(ValueError, match="fix lora_alpha"):
        write_adapter(tmp_path / "x.safetensors", adapter)


# --------------------------------------------------------------------------------------------
# Scale: PEFT's rules, PEFT's pattern matcher as the oracle


def test_scale_is_alpha_over_r_or_sqrt_r():
    assert LoRAConfig(r=8, lora_alpha=16).scale_for("x.q_proj") == 2.0
    rslora = LoRAConfig(r=8, lora_alpha=16, use_rslora=True)
    assert rslora.scale_for("x.q_proj") == 16 / math.sqrt(8)


PATTERNS = {
    "q_proj": 2,  # a suffix after a dot
    "layers.1.mlp.down_proj": 16,  # a longer suffix
    r"model\.layers\.0\.self_attn\.(k|v)_proj": 3,  # a regex over the full name
    "proj": 5,  # matches nothing: not at a dot boundary
}
NAMES = list(SHAPES) + ["model.layers.0.self_attn.xq_proj"]


@pytest.mark.parametrize("name", NAMES)
def test_rank_and_alpha_patterns_match_like_peft(name):
    config = LoRAConfig(r=8, lora_alpha=7, rank_pattern=PATTERNS, alpha_pattern=PATTERNS)
    key = get_pattern_key(PATTERNS.keys(), name)
    expected = PATTERNS.get(key)
    assert config.rank_for(name) == (expected if expected is not None else 8)
    assert config.alpha_for(name) == (expected if expected is not None else 7)
    r, alpha = config.rank_for(name), config.alpha_for(name)
    assert config.scale_for(name) == alpha / r


def test_pattern_order_decides_like_peft():
    patterns = {"layers.0.self_attn.q_proj": 1, "q_proj": 2}
    config = LoRAConfig(r=8, lora_alpha=8, rank_pattern=patterns)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        assert config.rank_for(name) == patterns[get_pattern_key(patterns.keys(), name)]


def test_targets_follow_peft_target_modules_semantics():
    by_suffix = LoRAConfig(r=4, lora_alpha=4, target_modules=("q_proj", "mlp.up_proj"))
    assert by_suffix.targets("model.layers.0.self_attn.q_proj")
    assert by_suffix.targets("model.layers.1.mlp.up_proj")
    assert not by_suffix.targets("model.layers.0.self_attn.xq_proj")
    by_regex = LoRAConfig(r=4, lora_alpha=4, target_modules=r".*layers\.1\..*_proj")
    assert by_regex.targets("model.layers.1.mlp.up_proj")
    assert not by_regex.targets("model.layers.0.mlp.up_proj")
    layered = LoRAConfig(r=4, lora_alpha=4, target_modules=("q_proj",), layers_to_transform=(1,))
    assert layered.targets("model.layers.1.self_attn.q_proj")
    assert not layered.targets("model.layers.0.self_attn.q_proj")
    excluded = LoRAConfig(
        r=4, lora_alpha=4, target_modules="all-linear", exclude_modules=("down_proj",)
    )
    assert excluded.targets("model.layers.0.mlp.up_proj")
    assert not excluded.targets("model.layers.0.mlp.down_proj")
    assert not excluded.targets("lm_head")


# --------------------------------------------------------------------------------------------
# Bad files: each problem its own type and a message that names it


def test_every_error_is_an_invalid_adapter_value_error():
    for cls in (CorruptAdapterFile, UnsupportedAdapter, UnknownTargetModule, MissingWeights):
        assert issubclass(cls, InvalidAdapter) and issubclass(cls, ValueError)
    for cls in (ShapeMismatch, RankTooLarge, FingerprintMismatch, AdapterTooLarge):
        assert issubclass(cls, InvalidAdapter)


@pytest.mark.parametrize("name", ["-lead", ".hidden", "a b", "x" * 129, "ü", "a/b", ""])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidAdapterName, match="not allowed"):
        build_adapter(name, LoRAConfig(r=1, lora_alpha=1), {})
    with pytest.raises(InvalidAdapterName):
        read_adapter(tmp_path / "ok.safetensors", name=name)


def test_good_names_pass(tmp_path):
    for name in ("a", "A0", "task-1_v2.final", "x" * 128):
        assert build_adapter(name, LoRAConfig(r=4, lora_alpha=8), make_weights()).name == name


def make_weights():
    return {"model.layers.0.self_attn.q_proj": (torch.randn(HIDDEN, 4), torch.randn(4, HIDDEN))}


@pytest.fixture
def good_file(tmp_path):
    return write_adapter(tmp_path / "good.safetensors", make_adapter(name="good"))


@pytest.mark.parametrize(
    "cut, message",
    [
        (lambda b: b[: len(b) - 100], "truncated"),  # lost the end of the tensor data
        (lambda b: b[:200], "does not fit"),  # lost part of the header
        (lambda b: b[:5], "too short"),
        (lambda b: b"", "too short"),
        (lambda b: b + b"junk", "after the last tensor"),
        (lambda b: b[:9] + b"}" + b[10:], "not valid JSON"),
        (lambda b: (2**62).to_bytes(8, "little") + b[8:], "does not fit"),
        (lambda b: os.urandom(len(b)), "safetensors"),
    ],
)
def test_corrupt_single_files(good_file, cut, message):
    good_file.write_bytes(cut(good_file.read_bytes()))
    with pytest.raises(CorruptAdapterFile, match=message):
        read_adapter(good_file)


def test_header_offsets_that_overlap_are_corrupt(tmp_path, good_file):
    data = good_file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    text = json.dumps(header).encode()
    good_file.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    with pytest.raises(CorruptAdapterFile, match="overlaps or has gaps|after the last tensor"):
        read_adapter(good_file)


def test_size_cap(good_file):
    with pytest.raises(AdapterTooLarge, match="limit"):
        read_adapter(good_file, max_bytes=1000)


def test_single_file_without_config_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file(peft_lora_tensors(), str(path), metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterConfig, match=f"no '{CONFIG_KEY}'"):
        read_adapter(path)


def test_newer_format_version_is_refused(tmp_path, good_file):
    from safetensors.torch import load_file, save_file

    with open(good_file, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    config = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][CONFIG_KEY])
    path = tmp_path / "future.safetensors"
    metadata = {CONFIG_KEY: json.dumps({**config, "format_version": 99})}
    save_file(load_file(good_file), str(path), metadata=metadata)
    with pytest.raises(UnsupportedAdapter, match="format_version 99"):
        read_adapter(path)


class Boom:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/loraserve-test-pickle-ran",))


def test_pickles_are_refused_with_how_to_convert(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    (tmp_path / "x.bin").write_bytes(pickle.dumps(Boom()))
    for path in (folder, tmp_path / "x.bin"):
        with pytest.raises(UnsupportedAdapter, match="never loaded") as e:
            read_adapter(path)
        assert "save_file" in str(e.value) and "weights_only=True" in str(e.value)
    assert not os.path.exists("/tmp/loraserve-test-pickle-ran")


def test_peft_folder_missing_parts(tmp_path):
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidAdapterConfig, match="no adapter_config.json"):
        read_adapter(no_config)
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    with pytest.raises(MissingWeights, match="no adapter_model.safetensors"):
        read_adapter(no_weights)
    folder = peft_folder(tmp_path, PEFT_CONFIG, peft_lora_tensors())
    (folder / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(InvalidAdapterConfig, match="not valid JSON"):
        read_adapter(folder)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"use_dora": True}, UnsupportedAdapter, "DoRA"),
        ({"bias": "all"}, UnsupportedAdapter, "bias='all'"),
        ({"bias": "lora_only"}, UnsupportedAdapter, "bias='lora_only'"),
        ({"modules_to_save": ["lm_head"]}, UnsupportedAdapter, "modules_to_save"),
        ({"lora_bias": True}, UnsupportedAdapter, "lora_bias"),
        ({"target_parameters": ["mlp.experts"]}, UnsupportedAdapter, "target_parameters"),
        ({"peft_type": "LOHA"}, UnsupportedAdapter, "LOHA"),
        ({"init_lora_weights": "pissa_niter_4"}, UnsupportedAdapter, "changed the base weights"),
        ({"r": 0}, InvalidAdapterConfig, "r must be a positive integer"),
        ({"lora_alpha": "big"}, InvalidAdapterConfig, "lora_alpha"),
        ({"rank_pattern": {"q_proj": -1}}, InvalidAdapterConfig, "rank_pattern"),
        ({"target_modules": "(unclosed"}, InvalidAdapterConfig, "not a valid regex"),
    ],
)
def test_bad_configs(tmp_path, changes, error, message):
    folder = peft_folder(tmp_path, {**PEFT_CONFIG, **changes}, peft_lora_tensors())
    with pytest.raises(error, match=message):
        read_adapter(folder)


def test_several_unsupported_features_are_all_named(tmp_path):
    config = {**PEFT_CONFIG, "use_dora": True, "bias": "all", "modules_to_save": ["score"]}
    with pytest.raises(UnsupportedAdapter) as e:
        read_adapter(peft_folder(tmp_path, config, peft_lora_tensors()))
    assert all(word in str(e.value) for word in ("DoRA", "bias='all'", "modules_to_save"))


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (
            {"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 100)},
            UnsupportedAdapter,
            "embedding LoRA",
        ),
        (
            {f"{Q}.lora_magnitude_vector": torch.ones(64)},
            UnsupportedAdapter,
            "DoRA",
        ),
        (
            {f"{Q}.bias": torch.zeros(64)},
            UnsupportedAdapter,
            "not a LoRA A/B weight",
        ),
        (
            {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(4, 64)},
            MissingWeights,
            "k_proj has no lora_B",
        ),
        (
            {f"{Q}.lora_B.weight": torch.randn(64, 2)},
            ShapeMismatch,
            r"lora_A \[4, 64\] and lora_B \[64, 2\]",
        ),
        (
            {f"{Q}.lora_A.weight": torch.ones(4, 64).int()},
            UnsupportedAdapter,
            "dtype I32",
        ),
    ],
)
def test_bad_tensors(tmp_path, extra, error, message):
    tensors = {**peft_lora_tensors(), **extra}
    with pytest.raises(error, match=message):
        read_adapter(peft_folder(tmp_path, PEFT_CONFIG, tensors))


def test_rank_in_file_must_match_config(tmp_path):
    config = {**PEFT_CONFIG, "rank_pattern": {"q_proj": 8}}
    with pytest.raises(ShapeMismatch, match="rank 4 in the file but the config gives r=8"):
        read_adapter(peft_folder(tmp_path, config, peft_lora_tensors(r=4)))


def test_several_adapters_in_one_file_are_refused(tmp_path):
    tensors = peft_lora_tensors()
    tensors.update(
        {k.replace("lora_A.weight", "lora_A.other.weight"): v.clone() for k, v in tensors.items()}
    )
    with pytest.raises(UnsupportedAdapter, match="several adapters"):
        read_adapter(peft_folder(tmp_path, PEFT_CONFIG, tensors))


# --------------------------------------------------------------------------------------------
# Validation against a base model


def test_valid_adapter_passes():
    adapter = make_adapter(base_fingerprint=FINGERPRINT)
    validate_adapter(adapter, SHAPES, fingerprint=FINGERPRINT, max_rank=4)
    validate_adapter(adapter, SHAPES)  # nothing to compare against: fine
    peft_style = make_adapter()  # no fingerprint recorded: any base
    validate_adapter(peft_style, SHAPES, fingerprint="ffffffffffffffff")


def test_unknown_module():
    adapter = make_adapter()
    shapes = {k: v for k, v in SHAPES.items() if "layers.1." not in k}  # a one-layer base
    with pytest.raises(UnknownTargetModule, match=r"model\.layers\.1\.self_attn\.q_proj"):
        validate_adapter(adapter, shapes)


def test_shape_mismatch_names_module_and_sizes():
    adapter = make_adapter()
    shapes = {**SHAPES, "model.layers.0.self_attn.v_proj": (HIDDEN, 48)}
    with pytest.raises(ShapeMismatch, match=r"v_proj is 64 -> 48 in the base model.*B \[r, 32\]"):
        validate_adapter(adapter, shapes)


def test_missing_targeted_module():
    adapter = make_adapter()
    del adapter.modules["model.layers.1.self_attn.v_proj"]
    with pytest.raises(MissingWeights, match=r"selects model\.layers\.1\.self_attn\.v_proj"):
        validate_adapter(adapter, SHAPES)


def test_rank_limit():
    with pytest.raises(RankTooLarge, match="rank 4, above this server's max rank 2"):
        validate_adapter(make_adapter(), SHAPES, max_rank=2)


def test_fingerprint_mismatch():
    adapter = make_adapter(base_fingerprint=FINGERPRINT, base_model="tiny-llama")
    with pytest.raises(FingerprintMismatch, match="0123456789abcdef.*ffffffffffffffff"):
        validate_adapter(adapter, SHAPES, fingerprint="ffffffffffffffff")
