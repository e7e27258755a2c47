"""Where the embedded demo lives inside the package: ``adapters/demo/base`` (a Hugging Face
style folder: config.json, model.safetensors, tokenizer.json) and ``adapters/demo/adapters``
(one ``NAME.safetensors`` per task). ``make demo-assets`` rebuilds both."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def demo_base_dir() -> Path:
    return DEMO_DIR / "base"


def demo_adapters_dir() -> Path:
    return DEMO_DIR / "adapters"
