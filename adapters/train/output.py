"""What a run writes: the adapter and the JSON log, both atomically, and the checks that
make a run fail before training rather than after it when an output cannot be written.

The adapter goes through ``loraserve.adapters.format``: ``write_adapter`` (``NAME.safetensors``) or
``write_peft`` (a PEFT folder), recording r, lora_alpha, use_rslora, target_modules and the
base fingerprint; the version returned is the one ``read_adapter`` reports for the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from loraserve.adapters.format import (
    InvalidAdapter,
    LoRAConfig,
    adapter_from_model,
    check_name,
    read_adapter,
    write_adapter,
    write_peft,
)

from .config import TrainConfig, TrainError, _jsonable

if TYPE_CHECKING:
    from .run import Run, TrainResult


def check_output_paths(config: TrainConfig) -> None:
    """Fail before training, not after it, when an output cannot be written."""
    out = config.out
    if config.format == "safetensors":
        if out.suffix != ".safetensors":
            raise TrainError(
                f"--out {out}: a single-file adapter is named NAME.safetensors "
                "(or pass --format peft to write a PEFT folder)"
            )
        if out.is_dir():
            raise TrainError(f"--out {out}: is a directory")
    else:
        if out.suffix == ".safetensors":
            raise TrainError(f"--out {out}: --format peft writes a folder; drop the suffix")
        if out.exists() and not out.is_dir():
            raise TrainError(f"--out {out}: exists and is not a folder")
    try:
        check_name(out.name.removesuffix(".safetensors"))
    except InvalidAdapter as e:
        raise TrainError(f"--out {out}: {e}") from None
    _check_writable(out.parent, "--out")
    if config.log_json is not None:
        _check_writable(config.log_json.parent, "--log-json")
    if config.checkpoint_dir is not None:
        _check_writable(config.checkpoint_dir, "--checkpoint-dir")


def _check_writable(directory: Path, flag: str) -> None:
    """``directory`` exists and takes a file, or the nearest existing ancestor is writable."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainError(f"{flag}: cannot write under {directory}: {existing} is not a directory")
    if existing == directory:
        try:  # a real probe: os.access says yes to root even on a read-only mount
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise TrainError(f"{flag}: cannot write in {directory} ({e.strerror})") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"{flag}: cannot create {directory}: {existing} is not writable")


def write_output(run: Run) -> tuple[Path, str]:
    """Write the adapter atomically; returns (path, version as read back)."""
    config, model = run.config, run.loaded.model
    lora_config = LoRAConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        use_rslora=config.rslora,
        target_modules=run.targets,
        base_fingerprint=run.loaded.fingerprint,
        # the folder's name, not its path: the file's bytes must not depend on where it was built
        base_model=config.base if config.base == "demo" else Path(config.base).name,
        fan_in_fan_out=model.config.spec.conv1d,  # what PEFT sets for Conv1D bases (GPT-2)
    )
    name = config.out.name.removesuffix(".safetensors")
    adapter = adapter_from_model(model, name, lora_config)
    if config.format == "peft":
        path = write_peft(config.out, adapter)
    else:
        path = write_adapter(config.out, adapter)
    return path, read_adapter(path, name).version


def write_log(path: Path, config: TrainConfig, result: TrainResult) -> None:
    """Config, outcome, loss curve and evals as one JSON file (written atomically)."""
    summary = {k: v for k, v in asdict(result).items() if k not in ("history", "evals")}
    log = {
        "config": config.to_dict(),
        "result": _jsonable(summary),
        "steps": result.history,
        "evals": result.evals,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(log, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
