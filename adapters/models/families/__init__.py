"""The supported base-model families: one `ArchSpec` per module, listed once in `FAMILIES`.

Adding a family: write `families/NAME.py` (its `parse` and `SPEC`) and add `NAME.SPEC` below.
If its block needs an option the shell lacks (a new norm, MLP or attention variant), add that
option to `BlockLayout` and `loraserve.adapters.models.model` once, for every family to use.
"""

from __future__ import annotations

from ..config import UnsupportedModel
from ..specs import ArchSpec
from . import gpt2, llama, phi3, qwen2, qwen3

FAMILIES: tuple[ArchSpec, ...] = (gpt2.SPEC, llama.SPEC, qwen2.SPEC, qwen3.SPEC, phi3.SPEC)

_BY_ARCH = {spec.arch: spec for spec in FAMILIES}
_BY_MODEL_TYPE = {t: spec for spec in FAMILIES for t in spec.model_types}
_BY_ARCHITECTURE = {name: t for spec in FAMILIES for name, t in spec.architectures}
assert len(_BY_ARCH) == len(FAMILIES), "two families share an arch"
assert len(_BY_MODEL_TYPE) == sum(len(s.model_types) for s in FAMILIES), "a model_type twice"


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def spec_for_arch(arch: str) -> ArchSpec:
    if arch not in _BY_ARCH:
        raise UnsupportedModel(f"unknown arch {arch!r} (have {', '.join(sorted(_BY_ARCH))})")
    return _BY_ARCH[arch]


def spec_for_hf_config(d: dict) -> tuple[ArchSpec, str]:
    """(family, model_type) of a config.json dict; `architectures` stands in for model_type."""
    model_type = d.get("model_type") or next(
        (_BY_ARCHITECTURE[n] for n in d.get("architectures") or () if n in _BY_ARCHITECTURE), None
    )
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; loraserve runs "
            f"{', '.join(supported_model_types())}"
        )
    return _BY_MODEL_TYPE[model_type], model_type
