"""The in-memory adapter: ``Adapter`` of ``LoRAWeights``, one per adapted linear layer.

- ``modules`` maps OUR module paths (== Hugging Face ``*ForCausalLM`` paths,
  ``model.layers.0.self_attn.q_proj``) to ``LoRAWeights(A: [in, r], B: [r, out], scale)``:
  transposes of PEFT's ``lora_A`` / ``lora_B``, dtype as stored; the layer computes
  ``y += scale * (x @ A) @ B``.
- ``version`` is the content hash of the file the adapter is (or will be) in: sha256, first 16
  hex chars (``_digest``).
- Names match ``NAME_RE`` (``check_name``); the name of a file or folder in the watched folder
  is the adapter's name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from .config import LoRAConfig
from .errors import InvalidAdapterName

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class LoRAWeights:
    """One adapted linear layer, OUR layout: ``y += scale * (x @ A) @ B``."""

    A: Tensor  # [in, r]
    B: Tensor  # [r, out]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[1]


@dataclass(frozen=True)
class Adapter:
    """A whole adapter in memory; ``modules`` keys are OUR module paths."""

    name: str
    config: LoRAConfig
    modules: dict[str, LoRAWeights] = field(hash=False)
    version: str  # sha256 of the file content, 16 hex chars
    nbytes: int  # bytes of A and B tensors
    # the adapter's own chat template (Jinja source), which wins over the base model's
    chat_template: str | None = None

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.modules.values())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidAdapterName(
            f"adapter name {name!r} is not allowed: names match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        )
    return name


def _digest(*chunks: bytes | np.ndarray) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def _nbytes(modules: dict[str, LoRAWeights]) -> int:
    return sum(w.A.nbytes + w.B.nbytes for w in modules.values())
