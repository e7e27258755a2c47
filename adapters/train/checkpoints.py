"""Resumable checkpoints: ``DIR/step-NNNNNNNN/{state.safetensors, state.json}``, never pickle.

A checkpoint holds the LoRA weights, the AdamW state and the RNG state as safetensors, and the
run's identity (base fingerprint, data hash, schedule, the config fields that decide the
trajectory) and ``Progress`` as JSON; so "stop, then resume" gives the same adapter as one
straight run. Each is written under a temp name and renamed into place. ``load_checkpoint``
refuses a checkpoint of another run, naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from loraserve.adapters.lora import lora_parameters
from torch import nn

from .config import TrainError
from .run import Progress

CHECKPOINT_FORMAT = "loraserve-train-checkpoint/1"


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict
) -> Path:
    """LoRA weights + AdamW state + RNG state as safetensors, the rest as JSON."""
    tensors = {f"lora.{name}": p.detach().cpu() for name, p in lora_parameters(model)}
    params = optimizer.param_groups[0]["params"]
    for i, param in enumerate(params):
        for key, value in optimizer.state[param].items():
            tensors[f"optim.{i}.{key}"] = value.detach().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # a CPU run on a GPU machine leaves CUDA alone
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    final = directory / f"step-{meta['progress']['step']:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors"
        )
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest ``step-*`` checkpoint inside."""
    if (path / "state.json").is_file():
        return path
    if not path.is_dir():
        raise TrainError(f"--resume {path}: no such checkpoint or checkpoint folder")
    steps = [p for p in path.glob("step-*") if (p / "state.json").is_file()]
    if not steps:
        raise TrainError(f"--resume {path}: holds no checkpoint (step-*/state.json)")
    return max(steps, key=lambda p: int(p.name.removeprefix("step-")))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, expect: dict
) -> Progress:
    """Restore LoRA weights, AdamW state and RNG state; refuse a checkpoint of another run."""
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = safetensors.torch.load_file(path / "state.safetensors")
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        raise TrainError(f"--resume {path}: unreadable checkpoint ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume {path}: not a {CHECKPOINT_FORMAT} checkpoint")
    try:
        progress = Progress(**meta["progress"])
    except (KeyError, TypeError):
        raise TrainError(f"--resume {path}: state.json has no valid progress record") from None
    theirs = meta.get("config", {})
    differ = [k for k, v in expect.items() if k != "config" and meta.get(k) != v]
    differ += [k for k, v in expect["config"].items() if theirs.get(k) != v]
    if differ:
        raise TrainError(
            f"--resume {path}: the checkpoint comes from a different run; these differ: "
            f"{', '.join(differ)} (resume with the same data, base and training flags)"
        )
    lora = dict(lora_parameters(model))
    if {f"lora.{n}" for n in lora} != {k for k in tensors if k.startswith("lora.")}:
        raise TrainError(f"--resume {path}: its LoRA modules differ from this run's")
    with torch.no_grad():
        for name, param in lora.items():
            param.copy_(tensors[f"lora.{name}"])
    state = optimizer.state_dict()
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [
        tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors
    ]
    if cuda_states and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return progress
