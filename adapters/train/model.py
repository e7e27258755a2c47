"""The model being trained: the frozen base on the ``TrainDevice``, with LoRA swapped in.

``load_base`` loads a Hugging Face folder (or the embedded demo) and insists on a tokenizer with
an EOS token. ``add_lora`` swaps ``LinearWithLoRA`` into the targeted linear layers (by default
the family's ``lora_targets``), initialised from torch's global RNG, with float32 master
weights, and freezes everything else: only the LoRA ``A`` and ``B`` train, and the base weights
are never written to.
"""

from __future__ import annotations

from pathlib import Path

from loraserve.adapters.demo_paths import demo_base_dir
from loraserve.adapters.lora import (
    ALL_LINEAR,
    lora_parameters,
    mark_only_lora_trainable,
    replace_linear_with_lora,
    target_names,
)
from loraserve.adapters.models import LoadedModel, load_model
from loraserve.adapters.models.families import FAMILIES
from loraserve.adapters.models.names import model_folder
from torch import nn

from .config import TrainConfig, TrainError
from .device import TrainDevice

# Default LoRA targets per arch: each family's spec says (every attention projection, the usual
# starting point; PEFT's own defaults adapt only q/v). Kept as a table for older callers.
DEFAULT_TARGETS = {spec.arch: spec.lora_targets for spec in FAMILIES}


def base_path(base: str) -> Path:
    """The folder ``--base`` names: "demo", "smollm2", a ``.gguf`` file or a folder, as the
    server's ``--model`` (``loraserve.adapters.models.names``)."""
    if base == "demo":  # looked up here, so a test can point it elsewhere
        path = demo_base_dir()
        if not (path / "config.json").is_file():
            raise TrainError(
                f"--base demo: the embedded demo base model is not installed ({path} is "
                "missing); build the demo assets first, or pass --base PATH to a Hugging Face "
                "model folder"
            )
        return path
    try:
        return model_folder(base)
    except (OSError, ValueError) as e:
        raise TrainError(f"--base {base}: {e}") from None


def load_base(base: str, train_device: TrainDevice) -> LoadedModel:
    """``load_model`` of the folder (or the demo), with a tokenizer that knows its EOS."""
    path = base_path(base)
    loaded = load_model(path, train_device.device, train_device.base_dtype)
    if loaded.tokenizer is None:
        raise TrainError(f"{path}: no tokenizer.json; the trainer needs the base's tokenizer")
    if not loaded.tokenizer.eos_token_ids:
        raise TrainError(
            f"{path}: no EOS token (config.json eos_token_id, generation_config.json or "
            "tokenizer_config.json eos_token); completions need one to end"
        )
    return loaded


def add_lora(model: nn.Module, config: TrainConfig) -> tuple[str, ...] | str:
    """Swap LoRA into ``model`` (init from torch's global RNG), freeze all else; the targets."""
    targets = config.targets or model.config.spec.lora_targets
    if not target_names(model, targets):
        linear = sorted({name.rsplit(".", 1)[-1] for name in target_names(model, ALL_LINEAR)})
        raise TrainError(
            f"--targets {','.join(targets) if isinstance(targets, tuple) else targets}: no "
            f"linear layer of this {model.config.arch} model matches; its layers are named "
            f"{', '.join(linear)} (or use all-linear)"
        )
    replace_linear_with_lora(
        model, config.rank, config.alpha, targets, scale=config.scale, dropout=config.dropout
    )
    for _, param in lora_parameters(model):
        param.data = param.data.float()  # master weights in float32 even on a bfloat16 base
    mark_only_lora_trainable(model)
    return targets


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a tied embedding counts once."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
