"""Engine scheduling against a mock model: fast, no weights, fully predictable."""

import threading
import time

import pytest
from loraserve.server.engine import (
    Engine,
    EngineConfig,
    FinishEvent,
    FinishReason,
    GenerationRequest,
)
from loraserve.server.errors import InvalidRequest, QueueFull, ShuttingDown
from loraserve.server.sampling import SamplingParams

from tests.mock_model import EOS, MockModel, MockTokenizer


def make_engine(**cfg) -> tuple[Engine, MockModel]:
    model = MockModel()
    config = EngineConfig(**{"max_batch_size": 4, "max_seq_len": 32, "max_queue": 8, **cfg})
    return Engine(model, None, MockTokenizer(), config), model


def req(prompt, n=4, **params) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=n, **params))


def drain(engine: Engine, limit: int = 200) -> None:
    for _ in range(limit):
        if not engine.busy():
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_generates_the_mock_sequence_and_finishes_on_length():
    engine, _ = make_engine()
    handle = engine.submit(req([0, 1, 2], n=4))
    drain(engine)
    out = handle.result()
    assert out.token_ids == [3, 4, 5, 6]
    assert out.text == "defg"
    assert out.finish_reason is FinishReason.LENGTH
    assert (out.prompt_tokens, out.completion_tokens) == (3, 4)


def test_eos_stops_and_is_not_in_text_or_ids():
    engine, _ = make_engine()
    handle = engine.submit(req([36], n=10))  # 37, 38, then EOS=39
    drain(engine)
    out = handle.result()
    assert out.token_ids == [37, 38]
    assert out.finish_reason is FinishReason.STOP
    assert out.completion_tokens == 3


def test_stop_string_ends_generation_and_is_not_emitted():
    engine, _ = make_engine()
    # prompt ends in 0 ('a'): generates b c d e f ...; stop at "de"
    handle = engine.submit(req([0], n=10, stop=("de", "zz")))
    drain(engine)
    out = handle.result()
    assert out.text == "bc"
    assert out.finish_reason is FinishReason.STOP


def test_a_stop_prefix_that_never_completes_is_emitted_at_the_end():
    engine, _ = make_engine()
    handle = engine.submit(req([0], n=3, stop=("dx",)))  # b c d, "d" held back then flushed
    events = []
    drain(engine)
    events = list(handle)
    text = "".join(e.text for e in events if not isinstance(e, FinishEvent))
    assert text == "bcd"


def test_admission_is_in_arrival_order_and_bounded_by_free_rows():
    engine, model = make_engine(max_batch_size=2)
    handles = [engine.submit(req([i], n=3)) for i in range(4)]
    engine.step()
    assert model.calls[0]["shape"] == (2, 1)  # the first two prefill together
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 2
    drain(engine)
    firsts = [h.result().token_ids[0] for h in handles]
    assert firsts == [1, 2, 3, 4]
    # the last two could only start once rows were freed
    prefills = [c for c in model.calls if c["positions"][0][0] == 0]
    assert [c["shape"][0] for c in prefills] == [2, 2]


def test_prefill_budget_limits_prompt_tokens_per_step_but_never_starves():
    engine, model = make_engine(prefill_token_budget=10)
    engine.submit(req(range(6), n=5))
    engine.submit(req(range(6), n=5))
    engine.submit(req(range(12), n=5))  # longer than the whole budget: still admitted, alone
    engine.step()
    assert model.calls[-1]["shape"] == (1, 6)
    engine.step()  # second prompt prefills, first one decodes in the same step
    assert [c["shape"] for c in model.calls[-2:]] == [(1, 6), (1, 1)]
    engine.step()
    assert model.calls[-2]["shape"] == (1, 12)
    assert model.calls[-1]["shape"] == (2, 1)
    drain(engine)


def test_cancel_frees_the_row_at_the_next_step():
    engine, _ = make_engine(max_batch_size=1)
    first = engine.submit(req([0], n=20))
    second = engine.submit(req([5], n=2))
    engine.step()
    assert engine.stats()["kv_rows_used"] == 1
    first.cancel()
    engine.step()  # reaps the first and admits the second into its row
    assert engine.stats()["running"] == 1
    drain(engine)
    events = list(first)
    assert events[-1].reason is FinishReason.CANCELLED
    assert second.result().token_ids == [6, 7]
    assert engine.stats()["kv_rows_used"] == 0


def test_cancelling_a_queued_request_removes_it():
    engine, _ = make_engine(max_batch_size=1)
    engine.submit(req([0], n=3))
    queued = engine.submit(req([1], n=3))
    queued.cancel()
    engine.step()
    assert engine.stats()["waiting"] == 0
    assert list(queued)[-1].reason is FinishReason.CANCELLED


def test_deadline_cancels():
    engine, _ = make_engine()
    handle = engine.submit(
        GenerationRequest((0,), SamplingParams(max_new_tokens=20), deadline=time.monotonic() - 1)
    )
    engine.step()
    assert list(handle)[-1].reason is FinishReason.CANCELLED
    assert engine.stats()["running"] == 0


def test_queue_full_is_refused_at_submit():
    engine, _ = make_engine(max_queue=2)
    engine.submit(req([0]))
    engine.submit(req([0]))
    with pytest.raises(QueueFull):
        engine.submit(req([0]))


@pytest.mark.parametrize(
    "request_, field",
    [
        (req([]), "prompt"),
        (req(range(32)), "prompt"),
        (req([0, 99]), "prompt_token_ids"),
        (req([0], n=0), "params.max_new_tokens"),
        (req([0], n=10_000), "params.max_new_tokens"),
        (req([0], temperature=-1.0), "params.temperature"),
        (req([0], temperature=float("nan")), "params.temperature"),
        (req([0], temperature=1e-45), "params.temperature"),  # positive, but unsampleable
        (req([0], temperature=float("inf")), "params.temperature"),
        (req([0], top_p=0.0), "params.top_p"),
        (req([0], top_p=1.5), "params.top_p"),
        (req([0], top_k=-2), "params.top_k"),
        (req([0], stop=("",)), "params.stop"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(request_, field):
    engine, _ = make_engine()
    with pytest.raises(InvalidRequest) as err:
        engine.submit(request_)
    assert err.value.field == field
    assert str(err.value).startswith(field)


def test_prompt_too_long_says_the_limit():
    engine, _ = make_engine()
    with pytest.raises(InvalidRequest, match="max_seq_len 32"):
        engine.submit(req(range(32)))


def test_generation_stops_at_the_end_of_the_kv_row():
    engine, _ = make_engine(max_seq_len=8)
    handle = engine.submit(req([0] * 5, n=8))  # positions 5, 6, 7 remain
    drain(engine)
    out = handle.result()
    assert out.finish_reason is FinishReason.LENGTH
    assert out.prompt_tokens + out.completion_tokens == 8
    assert len(out.token_ids) == 3


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    def run(others: int) -> list[int]:
        engine, _ = make_engine(max_batch_size=8)
        h = engine.submit(req([3], n=8, temperature=1.5, seed=1234))
        for i in range(others):
            engine.submit(req([i], n=8, temperature=1.0))
        drain(engine)
        return h.result().token_ids

    alone = run(0)
    assert run(0) == alone
    assert run(5) == alone
    engine, _ = make_engine()
    h = engine.submit(req([3], n=8, temperature=1.5, seed=99))
    drain(engine)
    assert h.result().token_ids != alone


def test_a_failing_forward_fails_its_requests_not_the_engine():
    engine, model = make_engine()
    model.fail_on_token = 20
    bad = engine.submit(req([18], n=5))  # 19, then 20 triggers the failure
    drain(engine)
    with pytest.raises(Exception, match="internal error"):
        bad.result()
    model.fail_on_token = None
    good = engine.submit(req([0], n=2))
    drain(engine)
    assert good.result().token_ids == [1, 2]


def test_threaded_engine_serves_concurrent_callers_and_drains_on_shutdown():
    engine, _ = make_engine(max_batch_size=4, max_queue=16)
    engine.model.delay = 0.002
    engine.start()
    results = {}

    def call(i):
        results[i] = engine.generate(req([i], n=5)).token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {i: [i + 1, i + 2, i + 3, i + 4, i + 5] for i in range(10)}
    slow = engine.submit(req([0], n=30))
    engine.shutdown(grace=10)
    assert slow.result().finish_reason is FinishReason.LENGTH  # drained, not cut
    with pytest.raises(ShuttingDown):
        engine.submit(req([0]))
    assert EOS not in slow.result().token_ids


def test_a_failure_while_placing_an_adapter_fails_that_request_only():
    class BrokenAdapters:
        def resolve(self, name):
            return name

        def acquire(self, name):
            raise RuntimeError("slot fill exploded")

        def release(self, slot):
            pass

        def set_row_slots(self, row_slots, seq_len, device):
            pass

    engine = Engine(
        MockModel(),
        None,
        MockTokenizer(),
        EngineConfig(max_batch_size=2),
        adapters=BrokenAdapters(),
    )
    bad = engine.submit(GenerationRequest((1,), SamplingParams(max_new_tokens=2), adapter="x"))
    good = engine.submit(req([3], n=2))
    drain(engine)
    with pytest.raises(Exception, match="internal error: slot fill exploded"):
        bad.result()
    assert good.result().token_ids == [4, 5]


def test_a_caller_whose_callback_fails_does_not_hurt_the_batch():
    engine, _ = make_engine()

    def explode(event):
        raise RuntimeError("the caller's loop is gone")

    bad = engine.submit(req([5], n=4), on_event=explode)
    good = [engine.submit(req([p], n=4)) for p in (0, 10)]
    drain(engine)
    assert [h.result().token_ids for h in good] == [[1, 2, 3, 4], [11, 12, 13, 14]]
    assert bad.request is not None and engine.stats()["running"] == 0  # freed, not leaked
    assert len(engine._free_rows) == engine.config.max_batch_size


def test_stop_tail_holds_back_exactly_the_longest_stop_prefix():
    import random

    from loraserve.server.engine import StopTail

    def naive(text, stops):
        return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    rng = random.Random(0)
    for _ in range(2000):
        stops = tuple("".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(3))
        tail, text = StopTail(stops), ""
        for _ in range(6):
            piece = "".join(rng.choices("abc", k=rng.randint(0, 3)))
            text += piece
            held = tail.feed(piece)
            if not any(s in text for s in stops):  # the engine stops at a whole match first
                assert held == naive(text, stops), (text, stops)
