"""The engine with real adapters on a tiny random Llama: batch invariance, the two cache tiers,
and hot deploy while the engine runs."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from loraserve.adapters.format import write_adapter, write_peft
from loraserve.server.adapter_cache import HostCache
from loraserve.server.engine import FinishReason, GenerationRequest, TokenEvent
from loraserve.server.errors import AdapterNotFound, AdapterUnavailable
from loraserve.server.registry import AdapterEntry
from loraserve.server.runtime import Runtime
from loraserve.server.sampling import SamplingParams

from tests.checkpoints import make_llama
from tests.serving import random_adapter, reference_greedy, serving_config, wait_for

N_ADAPTERS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def adapters(model_dir):
    return [
        random_adapter(model_dir, f"task-{i}", seed=i, rank=2 + i % 7) for i in range(N_ADAPTERS)
    ]


@pytest.fixture(scope="module")
def references(model_dir, adapters):
    """Reference greedy outputs per (adapter index or None, prompt index)."""
    return {
        (a, p): reference_greedy(model_dir, None if a is None else adapters[a], PROMPTS[p], NEW)
        for a in [None, *range(N_ADAPTERS)]
        for p in range(len(PROMPTS))
    }


PROMPTS = [[5, 17, 42], [7, 7, 100, 250, 3, 9], [200], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
NEW = 8


def adapter_dir(tmp_path, adapters, n):
    d = tmp_path / "adapters"
    d.mkdir()
    for a in adapters[:n]:
        write_adapter(d / f"{a.name}.safetensors", a)
    return d


def request(adapter: str, p: int, n: int = NEW) -> GenerationRequest:
    return GenerationRequest(tuple(PROMPTS[p]), SamplingParams(max_new_tokens=n), adapter=adapter)


def concurrent(runtime: Runtime, jobs: list[tuple[str, int]]) -> list[list[int]]:
    handles = [runtime.engine.submit(request(a, p)) for a, p in jobs]
    return [h.result().token_ids for h in handles]


def test_mixed_batch_equals_solo_and_the_trainer_reference(
    tmp_path, model_dir, adapters, references
):
    runtime = Runtime(serving_config(model_dir, adapter_dir(tmp_path, adapters, 8))).start()
    try:
        jobs = [(f"task-{i % 8}", i % len(PROMPTS)) for i in range(16)] + [("", 0), ("", 1)]
        batched = concurrent(runtime, jobs)
        solo = [runtime.engine.generate(request(a, p)).token_ids for a, p in jobs]
        assert batched == solo
        for (name, p), got in zip(jobs, batched):
            idx = int(name.split("-")[1]) if name else None
            assert got == references[(idx, p)], (name, p)
        # the adapters really differ from each other and from the base
        assert len({tuple(references[(i, 1)]) for i in [None, *range(8)]}) >= 8
        assert runtime.metrics.batch_size._sum.get() > runtime.metrics.steps._value.get()
    finally:
        runtime.stop()


def test_three_times_more_adapters_than_slots_are_all_served(
    tmp_path, model_dir, adapters, references
):
    runtime = Runtime(
        serving_config(
            model_dir, adapter_dir(tmp_path, adapters, N_ADAPTERS), max_active_adapters=4
        )
    ).start()
    try:
        jobs = [(f"task-{i % N_ADAPTERS}", i % len(PROMPTS)) for i in range(2 * N_ADAPTERS)]
        for (name, p), got in zip(jobs, concurrent(runtime, jobs)):
            assert got == references[(int(name.split("-")[1]), p)], (name, p)
        assert runtime.metrics.cache_evictions.labels("device")._value.get() >= N_ADAPTERS - 4
        assert runtime.cache.resident()["device"] <= 4
    finally:
        runtime.stop()


def test_device_slots_evict_lru_and_never_a_pinned_slot(tmp_path, model_dir, adapters):
    runtime = Runtime(
        serving_config(model_dir, adapter_dir(tmp_path, adapters, 3), max_active_adapters=2)
    )
    runtime.registry.scan()  # puts all three in host memory; engine not started: we drive it
    cache = runtime.cache
    version = {a.name: a.version for a in adapters[:3]}
    slot0, _ = cache.acquire("task-0")
    slot1, _ = cache.acquire("task-1")
    cache.release(slot0)
    cache.release(slot1)  # task-1 is now the most recently used
    slot2, _ = cache.acquire("task-2")
    assert slot2 == slot0  # task-0 was least recently used
    assert cache.device_versions() == {version["task-1"], version["task-2"]}
    again, _ = cache.acquire("task-1")  # hit, pinned again
    assert again == slot1
    assert cache.acquire("task-0") is None  # both slots pinned: it must wait
    assert cache.device_versions() == {version["task-1"], version["task-2"]}
    cache.release(slot2)
    slot, v = cache.acquire("task-0")
    assert slot == slot2 and v == version["task-0"]
    cache.close()


def test_host_cache_respects_count_and_byte_bounds(model_dir, adapters):
    size = adapters[0].nbytes
    host = HostCache(max_adapters=10, max_bytes=int(2.5 * size))
    same_size = [a for a in adapters if a.nbytes == size] or [adapters[0]]
    for a in adapters:
        host.put(a)
        assert host.nbytes <= max(host.max_bytes, a.nbytes)
    assert adapters[-1].version in host.versions()  # the newest always stays
    host = HostCache(max_adapters=2, max_bytes=1 << 40)
    for a in adapters[:3]:
        host.put(a)
    host.get(adapters[1].version)  # touch: now task-2 is least recent
    host.put(adapters[3])
    assert host.versions() == {adapters[1].version, adapters[3].version}
    assert same_size


# ------------------------------------------------------------------------------ hot deploy


@pytest.fixture
def live(tmp_path, model_dir, adapters):
    d = tmp_path / "live"
    d.mkdir()
    runtime = Runtime(serving_config(model_dir, d)).start()
    slow = threading.Event()

    def maybe_slow(module, args):
        if slow.is_set():
            time.sleep(0.03)

    hook = runtime.loaded.model.register_forward_pre_hook(maybe_slow)
    yield runtime, d, slow
    hook.remove()
    runtime.stop()


def servable(runtime: Runtime, name: str):
    def check():
        try:
            runtime.registry.resolve(name)
            return True
        except (AdapterNotFound, AdapterUnavailable):
            return False

    return check


def test_dropped_adapter_is_servable_within_two_seconds(live, adapters, references):
    runtime, d, _ = live
    with pytest.raises(AdapterNotFound):
        runtime.engine.submit(request("task-0", 0))
    t0 = time.monotonic()
    write_adapter(d / "task-0.safetensors", adapters[0])
    wait_for(servable(runtime, "task-0"), timeout=2.0)
    assert time.monotonic() - t0 < 2.0
    assert runtime.engine.generate(request("task-0", 1)).token_ids == references[(0, 1)]


def test_replace_upgrades_new_requests_while_running_ones_finish_on_old_weights(
    live, adapters, references
):
    runtime, d, slow = live
    path = d / "task-1.safetensors"
    write_adapter(path, adapters[1])
    wait_for(servable(runtime, "task-1"))
    slow.set()
    old = runtime.engine.submit(request("task-1", 1))
    events = iter(old)
    first = next(events)
    assert isinstance(first, TokenEvent)
    upgraded = adapters[2].__class__(
        "task-1", adapters[2].config, adapters[2].modules, adapters[2].version, adapters[2].nbytes
    )
    write_adapter(path, upgraded)
    wait_for(lambda: runtime.registry.resolve("task-1").version == adapters[2].version)
    new = runtime.engine.submit(request("task-1", 1))
    rest = list(events)
    slow.clear()
    old_ids = first.token_ids + [t for e in rest if isinstance(e, TokenEvent) for t in e.token_ids]
    assert old_ids == references[(1, 1)]
    assert rest[-1].adapter_version == adapters[1].version
    result = new.result()
    assert result.token_ids == references[(2, 1)]
    assert result.adapter_version == adapters[2].version


def test_delete_retires_new_requests_but_running_ones_finish(live, adapters, references):
    runtime, d, slow = live
    path = d / "task-3.safetensors"
    write_adapter(path, adapters[3])
    wait_for(servable(runtime, "task-3"))
    slow.set()
    running = iter(runtime.engine.submit(request("task-3", 0)))
    first = next(running)
    path.unlink()
    wait_for(lambda: not servable(runtime, "task-3")())
    with pytest.raises(AdapterNotFound):
        runtime.engine.submit(request("task-3", 0))
    slow.clear()
    ids = first.token_ids + [t for e in running if isinstance(e, TokenEvent) for t in e.token_ids]
    assert ids == references[(3, 0)]


def test_corrupt_replacement_keeps_the_working_version(live, adapters, references):
    runtime, d, _ = live
    path = d / "task-4.safetensors"
    write_adapter(path, adapters[4])
    wait_for(servable(runtime, "task-4"))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    wait_for(lambda: "task-4" in runtime.registry.errors())
    assert runtime.registry.resolve("task-4").version == adapters[4].version
    assert runtime.engine.generate(request("task-4", 2)).token_ids == references[(4, 2)]
    assert runtime.metrics.invalid_files._value.get() >= 1


def test_half_written_file_is_refused_until_complete(live, adapters, references):
    runtime, d, _ = live
    data = d.parent / "staging.safetensors"
    write_adapter(data, adapters[5])
    blob = data.read_bytes()
    path = d / "task-5.safetensors"
    with open(path, "wb") as f:  # a writer that does not use temp + rename
        f.write(blob[: len(blob) // 2])
        f.flush()
        wait_for(lambda: "task-5" in runtime.registry.errors())
        with pytest.raises(AdapterUnavailable, match="task-5"):
            runtime.engine.submit(request("task-5", 0))
        f.write(blob[len(blob) // 2 :])
    wait_for(servable(runtime, "task-5"), timeout=2.0)
    assert runtime.engine.generate(request("task-5", 0)).token_ids == references[(5, 0)]


def test_peft_folder_appearing_file_by_file(live, adapters, references, tmp_path):
    runtime, d, _ = live
    staging = write_peft(tmp_path / "peft-staging", adapters[6])
    target = d / "task-6"
    target.mkdir()
    shutil.copy(staging / "adapter_config.json", target / "adapter_config.json")
    wait_for(lambda: "task-6" in runtime.registry.errors())
    shutil.copy(staging / "adapter_model.safetensors", target / "adapter_model.safetensors")
    wait_for(servable(runtime, "task-6"), timeout=2.0)
    assert runtime.engine.generate(request("task-6", 3)).token_ids == references[(6, 3)]


def test_temp_and_dot_files_are_ignored(live, adapters, tmp_path):
    runtime, d, _ = live
    staged = write_adapter(tmp_path / "task-7.safetensors", adapters[7])
    for name in ("task-7.safetensors.tmp", "task-7.partial", ".task-7.safetensors"):
        shutil.copy(staged, d / name)
    time.sleep(0.6)
    assert runtime.registry.entries() == [] and runtime.registry.errors() == {}
    out = runtime.engine.generate(request("", 0))
    assert out.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


def test_a_slow_adapter_load_does_not_stall_other_requests(tmp_path, model_dir, adapters):
    d = adapter_dir(tmp_path, adapters, 2)
    runtime = Runtime(serving_config(model_dir, d, max_cached_adapters=1))
    real_load = runtime.registry.load
    loading, loaded = threading.Event(), threading.Event()

    def slow_load(entry):
        loading.set()
        time.sleep(3)
        adapter = real_load(entry)
        loaded.set()
        return adapter

    runtime.registry.load = slow_load
    runtime.start()  # the host tier keeps only task-1: task-0 must come from disk
    try:
        waiting = runtime.engine.submit(request("task-0", 0))
        assert loading.wait(timeout=5)
        others = [runtime.engine.submit(request(a, 1)) for a in ("", "task-1", "")]
        for h in others:
            h.result()
        assert not loaded.is_set()  # all three were served while task-0 was still loading
        assert waiting.result().token_ids  # and task-0 is served once its load lands
    finally:
        runtime.stop()


def test_disk_reads_are_bounded_per_admission_pass(tmp_path, model_dir, adapters):
    """A queue waiting on many adapters reads at most ``prefetch`` of them from disk at once,
    and an adapter read for a request counts as a host miss when it is placed."""
    runtime = Runtime(
        serving_config(
            model_dir, adapter_dir(tmp_path, adapters, 6), max_active_adapters=2,
            max_cached_adapters=4,
        )
    )  # fmt: skip
    runtime.registry.scan()  # host memory keeps the last four read: task-2 .. task-5
    cache, metrics = runtime.cache, runtime.metrics
    assert cache.prefetch == 2
    gate, reads = threading.Event(), []
    real_load = runtime.registry.load

    def gated_load(entry):
        reads.append(entry.name)
        gate.wait(10)
        return real_load(entry)

    runtime.registry.load = gated_load
    loads_before = metrics.loads.labels("ok")._value.get()
    host = {True: metrics.cache_hits.labels("host"), False: metrics.cache_misses.labels("host")}
    for _ in range(3):  # three passes over the same queue while the reads are in flight
        cache.begin_admission()
        assert [cache.acquire(n) for n in ("task-0", "task-1")] == [None, None]
    assert sorted(reads) == ["task-0", "task-1"]  # each read once, however many passes
    gate.set()
    wait_for(lambda: {a.version for a in adapters[:2]} <= runtime.host.versions())
    cache.begin_admission()
    slot0, _ = cache.acquire("task-0")
    slot1, _ = cache.acquire("task-1")
    assert host[False]._value.get() == 2 and host[True]._value.get() == 0
    assert metrics.loads.labels("ok")._value.get() - loads_before == 2
    # host memory now holds task-4, task-5, task-0, task-1, and both slots are pinned: task-4
    # and task-5 wait for a slot and fill the pass's budget, so task-2 is not read yet
    cache.begin_admission()
    assert [cache.acquire(n) for n in ("task-4", "task-5", "task-2")] == [None] * 3
    assert sorted(reads) == ["task-0", "task-1"]
    cache.release(slot0)
    cache.begin_admission()
    slot, _ = cache.acquire("task-4")
    assert slot == slot0 and host[True]._value.get() == 1  # placed from host memory
    assert cache.acquire("task-2") is None  # budget left: now it is read
    wait_for(lambda: len(reads) == 3)
    cache.close()


def test_disk_reads_also_stop_at_what_host_memory_holds(tmp_path, model_dir, adapters):
    """When half of host memory cannot hold two of them, a pass waits for one read at a time:
    two reads in flight would evict each other's result before either found a slot."""
    runtime = Runtime(
        serving_config(
            model_dir, adapter_dir(tmp_path, adapters, 4), max_active_adapters=4,
            max_cached_bytes=adapters[0].nbytes + adapters[1].nbytes,
        )
    )  # fmt: skip
    cache = runtime.cache
    gate, reads = threading.Event(), []
    real_load = runtime.registry.load

    def gated_load(entry):
        reads.append(entry.name)
        gate.wait(10)
        return real_load(entry)

    runtime.registry.load = gated_load
    for a in adapters[:4]:  # register without reading into host memory
        path = runtime.adapters_dir / f"{a.name}.safetensors"
        entry = AdapterEntry(a.name, path, a.version, a.rank, a.nbytes)
        runtime.registry._current[a.name] = entry
    cache.begin_admission()
    assert [cache.acquire(f"task-{i}") for i in range(4)] == [None] * 4
    assert reads == ["task-0"]
    gate.set()
    cache.close()


def test_a_failed_slot_fill_gives_the_slot_back(tmp_path, model_dir, adapters):
    runtime = Runtime(
        serving_config(model_dir, adapter_dir(tmp_path, adapters, 2), max_active_adapters=1)
    )
    runtime.registry.scan()
    cache, table = runtime.cache, runtime.table
    real_fill = table.fill
    table.fill = lambda slot, weights: (_ for _ in ()).throw(RuntimeError("device out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.acquire("task-0")
    table.fill = real_fill
    slot, version = cache.acquire("task-1")  # the one slot is usable again
    assert slot == 1 and cache.device_versions() == {version}
    cache.close()


def test_a_version_dropped_from_host_memory_is_a_disk_read_again(model_dir, adapters):
    host = HostCache(max_adapters=1, max_bytes=1 << 40)
    dropped = []
    host.on_evict = dropped.append
    host.put(adapters[0])
    host.put(adapters[1])
    assert dropped == [adapters[0].version]
