"""Tokenizer wrapper and the incremental detokenizer (no U+FFFD in any delta, nothing lost)."""

import json

import pytest
from loraserve.adapters.tokenizer import IncrementalDetokenizer, Tokenizer

from tests.checkpoints import EOS, byte_level_tokenizer, sentencepiece_tokenizer

MULTIBYTE = "Hi 🙂! 東京で寿司 👩‍💻 ✨ naïve — ok"


@pytest.fixture
def byte_level(tmp_path) -> Tokenizer:
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return Tokenizer(tmp_path)


@pytest.fixture
def sentencepiece(tmp_path) -> Tokenizer:
    sentencepiece_tokenizer().save(str(tmp_path / "tokenizer.json"))
    eos = {"content": "</s>", "lstrip": False}  # the older AddedToken form
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return Tokenizer(tmp_path / "tokenizer.json", eos_token_ids=[7])


def stream(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.push(i) for i in ids], detok.flush()


def test_byte_level_multibyte_text_streams_whole_characters(byte_level):
    ids = byte_level.encode(MULTIBYTE)
    # The test means something only if some token carries part of a character.
    assert any("\ufffd" in byte_level.decode([i]) for i in ids)
    for prompt in ([], byte_level.encode("Prompt: 東")):
        deltas, rest = stream(byte_level, prompt, ids)
        assert not any("\ufffd" in d for d in deltas)
        assert "" in deltas  # something was held back
        assert "".join(deltas) + rest == MULTIBYTE
        assert rest == ""


def test_sentencepiece_keeps_leading_spaces_and_byte_fallback(sentencepiece):
    prompt = sentencepiece.encode("hello")
    assert prompt[0] == sentencepiece.token_to_id("<s>")  # the post-processor adds BOS
    text = "the cat in a Hat 東京 🙂 ok"
    ids = sentencepiece.encode(text, add_special_tokens=False)
    assert "".join(sentencepiece.decode([i]) for i in ids) != " " + text  # naive loses spaces
    deltas, rest = stream(sentencepiece, prompt, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + rest == " " + text


def test_special_tokens_emit_nothing(byte_level):
    eos = byte_level.token_to_id(EOS)
    deltas, rest = stream(byte_level, byte_level.encode("a"), [*byte_level.encode(" b"), eos])
    assert deltas == [" b", ""] and rest == ""


def test_flush_releases_an_incomplete_character(byte_level):
    rocket = byte_level.encode("🚀")
    assert len(rocket) > 1
    detok = IncrementalDetokenizer(byte_level, [])
    assert detok.push(rocket[0]) == ""
    assert detok.flush() == "\ufffd"  # the stream ended mid-character: say so, lose nothing
    assert detok.flush() == ""


def test_tokenizer_basics(byte_level, sentencepiece):
    assert byte_level.decode(byte_level.encode(MULTIBYTE)) == MULTIBYTE
    assert byte_level.eos_token_ids == (byte_level.token_to_id(EOS),)
    assert byte_level.vocab_size == byte_level_tokenizer().get_vocab_size()
    assert sentencepiece.eos_token_ids == (7, 2)  # given ids first, then tokenizer_config's
    ids = sentencepiece.encode("the end")
    assert sentencepiece.decode([*ids, 2]) == "the end"  # specials skipped
