"""Build our plain-PyTorch models, or fill them from a local Hugging Face folder. Never unpickles.

Contract:
- `build_model(config, device, dtype)` returns a randomly initialised `CausalLM` (tests, trainer).
- `load_model(path, device, dtype)` reads `config.json` (+ `generation_config.json` for extra
  EOS ids), `model.safetensors` or the shards listed in `model.safetensors.index.json`, and
  `tokenizer.json` when present. It returns `LoadedModel` whose model is in eval mode with every
  parameter frozen (requires_grad=False): LoRA modules swapped in later bring their own.
- dtype: None -> float32; "auto" -> config.json's dtype (float32 when absent); a torch.dtype or
  its name ("bfloat16") -> that dtype. Logits come out float32 regardless.
- Tensor names are the family's HF names (`config.spec.names`), with or without the root prefix
  (`model.` / `transformer.`: *ForCausalLM vs the bare *Model). Families with `spec.conv1d`
  (GPT-2) have their [in, out] block weights transposed to nn.Linear layout; the spec's
  `ignored_suffixes` (old GPT-2 files' causal masks) and old files' `rotary_emb.inv_freq` are
  skipped. Fused layers (Phi-3's qkv_proj, gate_up_proj) load as stored. Tied embeddings:
  lm_head is the embedding and any lm_head.weight in the file is ignored; untied:
  lm_head.weight is required.
- Every problem is a `ModelLoadError` (a ValueError) naming the file or tensor: missing files,
  pickle-only checkpoints (with how to convert), unreadable safetensors, missing / unexpected /
  wrongly shaped tensors. Unsupported architectures raise `UnsupportedModel` from the config.
- `model_fingerprint(config, tensors)` identifies a base model for adapters: 16 hex chars of
  sha256 over the canonical JSON of the shape fields plus the raw bytes of the first 64
  embedding rows as stored in the file, so it does not depend on the load dtype or device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from loraserve.adapters.tokenizer import Tokenizer
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import ModelConfig, ModelLoadError
from .model import CausalLM

ROPE_BUFFERS = (".rotary_emb.inv_freq",)  # recomputed by RotaryEmbedding, saved by old files
FINGERPRINT_FIELDS = (
    "arch",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
)
CONVERT_HINT = (
    "loraserve never unpickles; convert the folder to safetensors once, e.g. with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
)


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None
    fingerprint: str
    path: Path


def build_model(
    config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> CausalLM:
    """A randomly initialised model (HF's std-0.02 init) for the config."""
    with torch.device(device):
        model = CausalLM(config)
    return model.to(dtype) if dtype is not None else model


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    path = Path(path)
    config = read_config(path)
    dtype = resolve_dtype(dtype, config)
    model = build_model(config, device="meta")  # shapes only: no init of billions of weights
    expected = _expected_shapes(model)
    state, fingerprint = {}, None
    for name, tensor in read_tensors(path, config):  # one stored tensor in host memory at a time
        _check_shape(name, tensor, expected)
        if name == embedding_name(config):
            fingerprint = model_fingerprint(config, {name: tensor})
        # copy=True: safetensors hands out mmap-backed tensors; a file rewritten in place
        # under a running server would otherwise kill it with SIGBUS.
        state[name] = tensor.to(device=device, dtype=dtype, copy=True)
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    model.load_state_dict(state, strict=False, assign=True)  # checked above; tied lm_head absent
    model.tie_weights()
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, config, read_tokenizer(path, config), fingerprint, path)


def read_tokenizer(path: Path, config: ModelConfig) -> Tokenizer | None:
    """tokenizer.json through the tokenizers library; None when the folder has none."""
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        return Tokenizer(path, eos_token_ids=config.eos_token_ids)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ModelLoadError(f"{path / 'tokenizer.json'} could not be read: {e}") from e


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = config.dtype or "float32"
    name = dtype or "float32"
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {name!r} (use float32, bfloat16, float16 or auto)")
    return value


def read_config(path: Path) -> ModelConfig:
    """config.json as a ModelConfig, with generation_config.json's EOS ids appended."""
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = ModelConfig.from_hf(_read_json(path / "config.json"))
    generation = path / "generation_config.json"
    if generation.is_file():
        extra = _read_json(generation).get("eos_token_id")
        extra = extra if isinstance(extra, list) else [] if extra is None else [extra]
        eos = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
        config = config.replace(eos_token_ids=eos)
    return config


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ModelLoadError(f"{file} not found")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON: {e}") from e


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, single file or sharded."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{file} (listed in {index.name}) not found")
        return files
    pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickles:
        raise ModelLoadError(f"{path} holds only {pickles[0]} (a pickle). {CONVERT_HINT}")
    raise ModelLoadError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def read_tensors(path: Path, config: ModelConfig):
    """Yield (our module path, tensor as stored) for every tensor the model uses."""
    files, spec = weight_files(path), config.spec
    prefix = spec.names.root + "."
    ignored = spec.ignored_suffixes + ROPE_BUFFERS
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                keys = f.keys()
                has_prefix = any(key.startswith(prefix) for key in keys)
                for key in keys:
                    if key.endswith(ignored):
                        continue
                    name = key
                    if not has_prefix and not key.startswith("lm_head."):
                        name = prefix + key  # saved from the bare *Model (GPT2Model, ...)
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    tensor = f.get_tensor(key)
                    if spec.conv1d and name.startswith(spec.blocks_prefix) and tensor.ndim == 2:
                        tensor = tensor.t().contiguous()  # Conv1D [in, out] -> [out, in]
                    yield name, tensor
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {e}") from e


def _expected_shapes(model: CausalLM) -> dict[str, torch.Size]:
    expected = {name: t.shape for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]  # it is the embedding
    return expected


def _check_shape(name: str, tensor: Tensor, expected: dict[str, torch.Size]) -> None:
    if name not in expected:
        raise ModelLoadError(f"checkpoint tensor {name!r} has no place in this architecture")
    if tensor.shape != expected[name]:
        raise ModelLoadError(
            f"{name}: checkpoint has shape {list(tensor.shape)}, "
            f"config.json implies {list(expected[name])}"
        )


def embedding_name(config: ModelConfig) -> str:
    return config.spec.embedding_key


def model_fingerprint(config: ModelConfig, tensors: dict[str, Tensor]) -> str:
    """16 hex chars identifying the base: shape fields + first 64 embedding rows as stored."""
    fields = {name: getattr(config, name) for name in FINGERPRINT_FIELDS}
    rows = tensors[embedding_name(config)][:64].detach().contiguous().cpu()
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    h.update(str(rows.dtype).encode())
    h.update(rows.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
