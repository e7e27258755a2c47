"""Shared fixtures. Checkpoint builders live in tests/checkpoints.py (importable by any test)."""

from pathlib import Path

import pytest

from tests.checkpoints import make_gpt2, make_llama, make_qwen2


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_llama(checkpoint_root) -> Path:
    """A tiny random Llama folder (GQA, untied), built once per session. Treat as read-only."""
    return make_llama(checkpoint_root)


@pytest.fixture(scope="session")
def tiny_gpt2(checkpoint_root) -> Path:
    """A tiny random GPT-2 folder (tied embeddings), built once per session. Read-only."""
    return make_gpt2(checkpoint_root)


@pytest.fixture(scope="session")
def tiny_qwen2(checkpoint_root) -> Path:
    """A tiny random Qwen2 folder (q/k/v bias), built once per session. Read-only."""
    return make_qwen2(checkpoint_root)
