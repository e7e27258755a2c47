"""Writing adapters: ``write_adapter`` (``NAME.safetensors``) and ``write_peft`` (a PEFT folder
that ``PeftModel.from_pretrained`` loads).

Both writers are atomic (temp name in the same directory, then ``os.replace``; a folder is
renamed into place whole) and deterministic: the same adapter always gives the same bytes,
hence the same version. Both refuse what every reader would refuse (NaN or huge weights, a
scale that the config's r / alpha cannot reproduce), so a diverged training run fails when it
writes, not later when a server reads the file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .adapter import Adapter
from .peft import FINGERPRINT_KEY, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, _peft_tensors
from .safetensors import _check_weights, _serialize
from .single_file import _single_file_bytes


def _check_scales(adapter: Adapter) -> None:
    """The file stores r/alpha, not scales, and every reader refuses NaN or huge weights:
    refuse to write what could not be read back (a diverged training run, say)."""
    for module, w in adapter.modules.items():
        for part, t in (("lora_A", w.A), ("lora_B", w.B)):
            _check_weights(t, f"{PEFT_PREFIX}{module}.{part}.weight", Path(adapter.name))
        want = adapter.config.scale_for(module)
        if not math.isclose(w.scale, want, rel_tol=1e-9):
            raise ValueError(
                f"adapter {adapter.name!r}: {module} has scale {w.scale} but its config gives "
                f"{want} (r={adapter.config.rank_for(module)}, "
                f"lora_alpha={adapter.config.alpha_for(module)}); fix lora_alpha or alpha_pattern"
            )


def write_adapter(path: str | os.PathLike, adapter: Adapter) -> Path:
    """Write the single-file form ``NAME.safetensors`` atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a single-file adapter must be named NAME.safetensors")
    _check_scales(adapter)
    _atomic_write(path, _single_file_bytes(adapter.config, adapter.modules))
    return path


def write_peft(directory: str | os.PathLike, adapter: Adapter) -> Path:
    """Write a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) atomically.

    The folder is built under a temp name next to ``directory`` and renamed into place; an
    existing folder is first renamed aside, so readers see the old or the new one, never a mix.
    """
    directory = Path(directory)
    _check_scales(adapter)
    config = adapter.config.to_dict()
    config.pop("base_fingerprint", None)  # PEFT warns on unknown keys; it goes in the metadata
    metadata = {"format": "pt"}
    if adapter.config.base_fingerprint is not None:
        metadata[FINGERPRINT_KEY] = adapter.config.base_fingerprint
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / PEFT_WEIGHTS).write_bytes(_serialize(_peft_tensors(adapter.modules), metadata))
        if directory.exists():
            old = Path(
                tempfile.mkdtemp(
                    prefix=f".{directory.name}.", suffix=".old.tmp", dir=directory.parent
                )
            )
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a server running as another user reads it
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
