"""No host sync inside a forward: the engine routes on the host and hands the model everything
it would otherwise read back from the device (each row's adapter slot, the KV read window).

On a GPU such a read-back stalls the step and forbids CUDA graphs; on the CPU it is still a
Python-level conversion. The guard turns every Tensor -> Python conversion (``item``,
``tolist``, ``bool``/``int``/``float``/``index``) into an error while the engine routes and runs
the model, for prefill and decode, mixed adapters and base rows, with every LoRA backend.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from loraserve.adapters.format import write_adapter
from loraserve.server.engine import GenerationRequest
from loraserve.server.runtime import Runtime
from loraserve.server.sampling import SamplingParams

from tests.checkpoints import make_llama
from tests.serving import random_adapter, serving_config

CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def forbid_host_sync():
    saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def guard(name):
        def refuse(self, *args, **kwargs):
            raise AssertionError(f"host sync inside the forward: Tensor.{name}")

        return refuse

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


class Guarded(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        with forbid_host_sync():
            return self.inner(*args, **kwargs)


def test_the_guard_catches_a_sync():
    with forbid_host_sync(), pytest.raises(AssertionError, match="Tensor.item"):
        torch.ones(2).sum().item()
    assert torch.ones(1).item() == 1.0  # restored


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    model = make_llama(tmp_path_factory.mktemp("model"))
    folder = tmp_path_factory.mktemp("adapters")
    for i in range(3):
        write_adapter(folder / f"a{i}.safetensors", random_adapter(model, f"a{i}", seed=40 + i))
    return model, folder


@pytest.mark.parametrize("backend", ["gather", "segment", "loop"])
def test_prefill_and_decode_never_read_the_device(model_and_adapters, backend):
    model, folder = model_and_adapters
    runtime = Runtime(serving_config(model, folder, lora_backend=backend)).start()
    try:
        jobs = [("a0", [5, 6, 7]), ("a1", [9]), ("", [3, 4]), ("a2", [8, 8, 8, 8]), ("a0", [2])]

        def run_all():
            handles = [
                runtime.engine.submit(
                    GenerationRequest(tuple(p), SamplingParams(max_new_tokens=5), adapter=a)
                )
                for a, p in jobs
            ]
            return [h.result().token_ids for h in handles]

        free = run_all()
        engine = runtime.engine
        guarded = Guarded(engine.model)
        engine.model = guarded
        route = engine.adapters.set_row_slots

        def guarded_route(*args):
            with forbid_host_sync():
                route(*args)

        engine.adapters.set_row_slots = guarded_route
        assert run_all() == free  # every request succeeded, with the same tokens
        assert guarded.calls >= 5  # prefill and decode steps ran under the guard
    finally:
        runtime.stop()
