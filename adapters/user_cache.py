"""Where loraserve keeps what it builds once per machine: ``user_cache_dir(kind, env)``."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(kind: str, override_env: str) -> Path:
    """``$override_env`` when set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)/loraserve/``kind``."""
    override = os.environ.get(override_env)
    if override:
        return Path(override)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "loraserve" / kind
