"""Adapters in memory, to and from a model: ``build_adapter`` from weights,
``adapter_from_model`` from a trained model's ``LinearWithLoRA`` layers, and ``apply_adapter``
into a model (the trainer and tests; the server fills slot tables instead).

``build_adapter`` gives the adapter the version ``read_adapter`` will report after
``write_adapter``: the hash of its single-file bytes.
"""

from __future__ import annotations

import math

import torch
from loraserve.adapters.lora import LinearWithLoRA, linear_shapes
from torch import Tensor, nn

from .adapter import Adapter, LoRAWeights, _digest, _nbytes, check_name
from .config import LoRAConfig
from .errors import MissingWeights, ShapeMismatch
from .single_file import _single_file_bytes
from .validate import validate_adapter


def build_adapter(
    name: str, config: LoRAConfig, weights: dict[str, tuple[Tensor, Tensor]]
) -> Adapter:
    """An ``Adapter`` from ``{module: (A [in, r], B [r, out])}``; scales come from ``config``.

    ``version`` is the hash of the single-file form, i.e. what ``read_adapter`` will report
    after ``write_adapter``.
    """
    check_name(name)
    if not weights:
        raise MissingWeights(f"adapter {name!r} has no LoRA weights")
    modules = {}
    for module, (A, B) in weights.items():
        A, B = A.detach(), B.detach()
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
            raise ShapeMismatch(
                f"adapter {name!r}: {module} has A{list(A.shape)}, B{list(B.shape)}; "
                "need A [in, r] and B [r, out]"
            )
        if A.shape[1] != config.rank_for(module):
            raise ShapeMismatch(
                f"adapter {name!r}: {module} has rank {A.shape[1]} but the config gives "
                f"r={config.rank_for(module)} (r / rank_pattern)"
            )
        modules[module] = LoRAWeights(A, B, config.scale_for(module))
    data = _single_file_bytes(config, modules)
    return Adapter(name, config, modules, _digest(data), _nbytes(modules))


def adapter_from_model(model: nn.Module, name: str, config: LoRAConfig) -> Adapter:
    """Collect every ``LinearWithLoRA`` of ``model`` into an adapter (the inverse of apply)."""
    weights = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            if not math.isclose(module.lora.scale, config.scale_for(module_name), rel_tol=1e-9):
                raise ValueError(
                    f"{module_name} runs with scale {module.lora.scale} but the config gives "
                    f"{config.scale_for(module_name)}; the file could not reproduce it"
                )
            weights[module_name] = (module.lora.A, module.lora.B)
    return build_adapter(name, config, weights)


def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Swap each adapted Linear of ``model`` for a ``LinearWithLoRA`` holding the adapter. In place.

    A layer that already holds a LoRA gets this adapter instead (its frozen linear is reused).
    """
    validate_adapter(adapter, linear_shapes(model))
    for name, w in adapter.modules.items():
        module = model.get_submodule(name)
        linear = module.linear if isinstance(module, LinearWithLoRA) else module
        layer = LinearWithLoRA(linear, w.rank, alpha=w.scale, scale=w.scale)
        with torch.no_grad():
            layer.lora.A.copy_(w.A)
            layer.lora.B.copy_(w.B)
        model.set_submodule(name, layer)
    return model
