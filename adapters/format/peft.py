"""PEFT's layout of LoRA tensors, and the mapping to and from our modules.

- A PEFT folder is ``adapter_config.json`` + ``adapter_model.safetensors``, as
  ``save_pretrained`` leaves it. Its tensors are keyed
  ``base_model.model.<module>.lora_A[.<adapter>].weight: [r, in]`` and ``...lora_B...: [out, r]``
  (Linear layout even for GPT-2's Conv1D); our single-file form keeps exactly these tensors.
- ``_plan_modules`` checks, from the safetensors header alone, that the tensors are one
  adapter's A/B pairs with the config's ranks and a sane scale each (at most ``MAX_SCALE``),
  and plans each module's (A key, B key, scale); ``_modules_from_body`` then views the weights
  in the data, transposed to our ``LoRAWeights`` layout. Anything else (DoRA, embeddings,
  ``modules_to_save``, several adapters in one file) is ``UnsupportedAdapter``.
- ``_peft_tensors`` is the inverse, for the writers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from loraserve.adapters.lora import MatchBudget, PatternError
from torch import Tensor

from .adapter import LoRAWeights
from .config import LoRAConfig
from .errors import (
    CorruptAdapterFile,
    InvalidAdapterConfig,
    MissingWeights,
    ShapeMismatch,
    UnsupportedAdapter,
)
from .safetensors import _Entry, _Header, _tensor

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FINGERPRINT_KEY = "loraserve.base_fingerprint"  # PEFT folder written by us: fingerprint only
# A trained LoRA has a scale of order 1 to 100; beyond this it is a corrupt or hostile file.
MAX_SCALE = 1e6

_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")


def _parse_key(key: str, path: Path) -> tuple[str, str, str | None]:
    """``base_model.model.<module>.lora_A[.<adapter>].weight`` -> (module, "lora_A", adapter)."""
    stripped = key.removeprefix(PEFT_PREFIX)
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        raise UnsupportedAdapter(f"{path}: embedding LoRA is not supported (tensor {key!r})")
    if "lora_magnitude_vector" in key:
        raise UnsupportedAdapter(f"{path}: DoRA is not supported (tensor {key!r})")
    if "modules_to_save" in key:
        raise UnsupportedAdapter(f"{path}: modules_to_save is not supported (tensor {key!r})")
    match = _LORA_KEY.fullmatch(stripped)
    if match is None:
        raise UnsupportedAdapter(
            f"{path}: tensor {key!r} is not a LoRA A/B weight (trained biases, embeddings or "
            "other base weights are not supported)"
        )
    return match["module"], match["part"], match["adapter"]


# A module's (lora_A key, lora_B key, scale), planned from the header before the data is read.
_Plan = dict[str, tuple[str, str, float]]


def _plan_modules(tensors: dict[str, _Entry], config: LoRAConfig, path: Path) -> _Plan:
    """Check from the header alone that the tensors are one adapter's LoRA A/B pairs with the
    config's ranks and sane scales; the data is read only when this passes."""
    parsed = {key: _parse_key(key, path) for key in tensors}
    adapter_names = {adapter_name for _, _, adapter_name in parsed.values()}
    if len(adapter_names) > 1:
        raise UnsupportedAdapter(
            f"{path}: holds several adapters ({sorted(map(str, adapter_names))}); save one per file"
        )
    parts: dict[str, dict[str, str]] = {}
    for key, (module, part, _) in parsed.items():
        if part in parts.setdefault(module, {}):
            raise CorruptAdapterFile(f"{path}: {module}.{part} appears twice")
        parts[module][part] = key
    if not parts:
        raise MissingWeights(f"{path}: holds no LoRA weights")
    budget = MatchBudget()  # one budget for all of this file's pattern matching
    plan = {}
    for module in sorted(parts):
        found = parts[module]
        for part in ("lora_A", "lora_B"):
            if part not in found:
                raise MissingWeights(f"{path}: {module} has no {part}.weight")
        a, b = tensors[found["lora_A"]].shape, tensors[found["lora_B"]].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:  # PEFT layout: a [r, in], b [out, r]
            raise ShapeMismatch(
                f"{path}: {module} has lora_A {list(a)} and lora_B {list(b)}; "
                "need lora_A [r, in] and lora_B [out, r]"
            )
        try:
            r, scale = config.rank_for(module, budget), config.scale_for(module, budget)
        except PatternError as e:
            raise InvalidAdapterConfig(f"{path}: {e}") from None
        if a[0] != r:
            raise ShapeMismatch(
                f"{path}: {module} has rank {a[0]} in the file but the config gives r={r}"
            )
        if not abs(scale) <= MAX_SCALE:  # also catches NaN
            raise InvalidAdapterConfig(
                f"{path}: {module} gets scale {scale:g} (lora_alpha / r, after rank_pattern, "
                f"alpha_pattern and use_rslora): a scale that is not finite or over "
                f"{MAX_SCALE:g} in magnitude cannot be a trained LoRA"
            )
        plan[module] = (found["lora_A"], found["lora_B"], scale)
    return plan


def _modules_from_body(
    plan: _Plan, header: _Header, body: np.ndarray, path: Path
) -> dict[str, LoRAWeights]:
    modules = {}
    for module, (a_key, b_key, scale) in plan.items():
        a = _tensor(body, a_key, header.tensors[a_key], path)  # [r, in]
        b = _tensor(body, b_key, header.tensors[b_key], path)  # [out, r]
        # Views, not copies: the serving slot tables store A as [r, in] and B as [r, out]
        # rows, so filling a slot from the file's layout is a plain copy (copying here cost a
        # third of reading an adapter).
        modules[module] = LoRAWeights(A=a.T, B=b.T, scale=scale)
    return modules


def _peft_tensors(modules: dict[str, LoRAWeights]) -> dict[str, Tensor]:
    tensors = {}
    for module, w in modules.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = w.A.T  # [r, in]
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = w.B.T  # [out, r]
    return tensors
