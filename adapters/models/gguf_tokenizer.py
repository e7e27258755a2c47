"""A GGUF file's tokenizer metadata rebuilt as a Hugging Face `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and
special ids under ``tokenizer.*`` keys. ``tokenizer_from_gguf(reader)`` turns them into the
tokenizer that transformers' own GGUF loading builds (``AutoTokenizer.from_pretrained(folder,
gguf_file=name)``, read from transformers 5.x ``integrations/gguf/gguf_tokenizer_mapping.py``:
``get_gguf_tokenizer``, ``convert_gguf_tokenizer``, ``byte_level_tokenizer``,
``sentencepiece_tokenizer``, ``get_merges``/``generate_merges``, ``add_gguf_special_tokens``,
``set_split_regex``; then ``TokenizersBackend.__init__``/``_post_init``/
``update_post_processor``). Same ids out of ``encode``, same text out of ``decode``; the tests
compare the two serializations whole.

Contract:
- ``tokenizer.ggml.model`` "gpt2" (byte-level BPE: SmolLM2, Qwen2, Llama 3) and "llama"
  (sentencepiece-style BPE with byte fallback: Llama 2, Mistral) are built; any other model, and
  "llama" under an architecture transformers builds differently (Gemma, Phi-3), raises
  ``UnsupportedGGUFTokenizer`` naming it. Malformed metadata raises ``InvalidGGUFTokenizer``.
- ``GGUFTokenizer.tokenizer`` encodes with the special tokens the file asks for
  (``add_bos_token``/``add_eos_token``) in its post-processor and decodes without cleanup;
  ``tokenizer_config()`` is the tokenizer_config.json that makes transformers load the saved
  tokenizer.json back the same way.
- Parity includes transformers' quirks: the tokenizer can hold more ids than the file's token
  list (a class-default special such as "<|endoftext|>" the vocabulary lacks; a byte-level
  BOS/EOS spelled outside the byte alphabet, as DeepSeek's are, is added again raw at a new id
  and BOS/EOS then encode to it). ``eos_token_ids`` are the file's ids. A caller serving a model
  should compare ``tokenizer.get_vocab_size()`` with the model's embedding rows.
- Not modelled: transformers picks the tokenizer *class* from ``general.architecture``; for
  ``llama`` and ``qwen2`` that class adds nothing to the backend built here, other classes may.
  Nor its Mistral regex patch, which looks for a config.json next to the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# llama.cpp's token types (gguf.TokenType); NORMAL, UNKNOWN, UNUSED and BYTE stay plain vocab.
CONTROL = 3
USER_DEFINED = 4

SPIECE_SPACE = "\u2581"
# The named special tokens transformers' tokenizer classes default to before the file's own are
# known. It adds them to the backend whether or not the vocabulary has them, so a vocabulary
# without one grows by a token (Llama 3's gets "<|endoftext|>" at id 128256). Kept for parity.
CLASS_DEFAULT_SPECIALS = {"gpt2": ("<|endoftext|>",), "llama": ("<s>", "</s>", "<unk>")}
# Architectures whose "llama" (sentencepiece) vocabulary transformers builds another way.
OTHER_SENTENCEPIECE_BUILDS = {"gemma", "gemma2", "gemma3", "phi3"}

# ``tokenizer.ggml.pre`` -> the split regex a byte-level vocabulary's merges were learned on.
# Pre-tokenizers not listed keep GPT-2's own regex (ByteLevel use_regex=True).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3,
    ),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}  # fmt: skip


class UnsupportedGGUFTokenizer(ValueError):
    """The file's tokenizer model (``tokenizer.ggml.model``) is one we cannot build exactly."""


class InvalidGGUFTokenizer(ValueError):
    """The file's tokenizer metadata is missing or inconsistent (the message says what)."""


@dataclass(frozen=True)
class GGUFTokenizer:
    tokenizer: tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    eos_token_ids: tuple[int, ...]  # EOS id, then EOT id if the file names one
    chat_template: str | None  # tokenizer.chat_template
    add_bos_token: bool  # as the post-processor does it (False when there is no BOS token)
    add_eos_token: bool = False

    def tokenizer_config(self) -> dict:
        """tokenizer_config.json for ``tokenizer.save("tokenizer.json")``: transformers rebuilds the
        post-processor from these flags and tokens on load, so they must say what it does."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config


def tokenizer_from_gguf(reader: Any) -> GGUFTokenizer:
    """The tokenizer a ``gguf.GGUFReader``'s metadata describes (see the module docstring)."""
    meta = _Metadata(reader)
    model_name = meta.get("tokenizer.ggml.model")
    architecture = meta.get("general.architecture")
    if model_name not in CLASS_DEFAULT_SPECIALS:
        raise UnsupportedGGUFTokenizer(
            f"GGUF tokenizer model {model_name!r} is not supported "
            f"(supported: {', '.join(sorted(CLASS_DEFAULT_SPECIALS))})"
        )
    if model_name == "llama" and architecture in OTHER_SENTENCEPIECE_BUILDS:
        raise UnsupportedGGUFTokenizer(
            f"GGUF tokenizer model 'llama' under architecture {architecture!r} is not supported"
        )
    tokens = meta.strings("tokenizer.ggml.tokens", required=True)
    token_types = meta.ints("tokenizer.ggml.token_type")
    merges = meta.merges()
    if model_name == "gpt2":
        if merges is None:
            raise InvalidGGUFTokenizer("a byte-level (gpt2) GGUF tokenizer has no merges")
        tok = _byte_level(tokens, merges)
    else:
        if merges is None:
            merges = _merges_from_scores(tokens, meta.floats("tokenizer.ggml.scores", len(tokens)))
        tok = _sentencepiece(tokens, merges)

    named = {name: meta.token(key, tokens) for name, key in _NAMED_IDS.items()}
    _add_special_tokens(tok, model_name, tokens, token_types, named)
    split = SPLIT_REGEX.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:  # transformers applies this whatever the model, so do we
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
    # A flag without its token is dropped (transformers' update_post_processor does the same).
    bos, eos = named["bos_token"], named["eos_token"]
    add_bos = bos is not None and bool(
        meta.get("tokenizer.ggml.add_bos_token", model_name == "llama")
    )
    add_eos = eos is not None and bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _post_processor(tok, bos if add_bos else None, eos if add_eos else None)

    eos_ids = [meta.token_id(key, len(tokens)) for key in ("eos_token_id", "eot_token_id")]
    chat_template = meta.get("tokenizer.chat_template")
    return GGUFTokenizer(
        tokenizer=tok,
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        chat_template=chat_template if isinstance(chat_template, str) else None,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        **named,
    )


_NAMED_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


class _Metadata:
    """Typed, checked access to a reader's ``fields`` (``reader.fields[key].contents()``)."""

    def __init__(self, reader: Any):
        self.fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def strings(self, key: str, required: bool = False) -> list[str] | None:
        value = self.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise InvalidGGUFTokenizer(f"{key} is not a non-empty list of strings")
        return value

    def ints(self, key: str) -> list[int]:
        value = self.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise InvalidGGUFTokenizer(f"{key} is not a list of integers")
        return value  # shorter than the vocabulary: the rest count as normal, as in transformers

    def floats(self, key: str, count: int) -> list[float]:
        value = self.get(key)
        if not isinstance(value, list) or len(value) != count:
            raise InvalidGGUFTokenizer(f"{key} must hold one score per token ({count})")
        return [float(v) for v in value]

    def merges(self) -> list[tuple[str, str]] | None:
        value = self.strings("tokenizer.ggml.merges")
        if value is None:
            return None
        pairs = [tuple(m.split(" ")) for m in value]
        bad = next((m for m, p in zip(value, pairs) if len(p) != 2), None)
        if bad is not None:
            raise InvalidGGUFTokenizer(f"tokenizer.ggml.merges entry {bad!r} is not two tokens")
        return pairs  # type: ignore[return-value]

    def token_id(self, name: str, vocab_size: int) -> int | None:
        value = self.get(f"tokenizer.ggml.{name}")
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < vocab_size:
            raise InvalidGGUFTokenizer(f"tokenizer.ggml.{name} = {value!r} is not a token id")
        return value

    def token(self, name: str, tokens: list[str]) -> str | None:
        token_id = self.token_id(name, len(tokens))
        return None if token_id is None else tokens[token_id]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    68 bytes (controls, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update((b, chr(0x100 + n)) for n, b in enumerate(shifted))
    return dict(sorted(table.items()))


def _byte_level(tokens: list[str], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    # llama.cpp writes a few vocabularies' tokens as raw text rather than in the byte alphabet;
    # respell those (their UTF-8 bytes through the table) so the merges and the bytes find them.
    table = byte_alphabet()
    alphabet = set(table.values())

    def spelled(token: str) -> str:
        if alphabet.issuperset(token):
            return token
        return "".join(table[b] for b in token.encode("utf-8"))

    vocab = {spelled(token): index for index, token in enumerate(tokens)}
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    # "first": the leading "\u2581" only at the very start, not after each special token.
    vocab = {token: index for index, token in enumerate(tokens)}
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_SPACE, prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a sentencepiece vocabulary implies, best first.

    Semantics (transformers' ``generate_merges``): every split of a token into two vocabulary
    tokens is a merge; those of one token are ordered by the ids of (left, right); then all are
    ordered by (the merged token's score, len(left), len(right)) descending, stably. A token
    listed twice takes its last id and its last score, in the place of its first listing.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    found: list[tuple[str, str, float]] = []
    for token, score in score_of.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(left, right) for left, right in splits if left in vocab and right in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend((left, right, score) for left, right in splits)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_special_tokens(
    tok: tokenizers.Tokenizer,
    model_name: str,
    tokens: list[str],
    token_types: list[int],
    named: dict[str, str | None],
) -> None:
    """Added tokens, in transformers' order: the order decides the ids of tokens the
    vocabulary lacks, and an added token is matched whole in text before the model runs."""
    # 1. The tokenizer class's own defaults, as AddedToken(special=True).
    tok.add_tokens([AddedToken(t, special=True) for t in CLASS_DEFAULT_SPECIALS[model_name]])
    # 2. CONTROL tokens as special. In a byte-level vocabulary one spelled outside the byte
    #    alphabet is a llama.cpp mislabel and stays plain vocabulary.
    alphabet = set(byte_alphabet().values()) if model_name == "gpt2" else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind == CONTROL and (alphabet is None or alphabet.issuperset(token))
    ]
    if control:
        tok.add_special_tokens(control)
    # 3. USER_DEFINED tokens (e.g. "<think>") as added, not special, if the vocabulary spells them.
    known = tok.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types)
        if kind == USER_DEFINED and token in known
    ]
    if user:
        tok.add_tokens(user)
    # 4. The file's BOS/EOS/UNK/PAD, as the file spells them (a byte-level token respelled in
    #    step 1 is thus added again under its raw spelling, at a new id, as transformers does).
    specials = list(dict.fromkeys(t for t in named.values() if t is not None))
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    fresh = [AddedToken(t, special=True) for t in specials if t not in added]
    if fresh:
        tok.add_tokens(fresh)
    if specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])


def _post_processor(
    tok: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """``[bos] $A [eos]`` (and ``[bos] $B:1 [eos]`` after it for a pair), for those not None."""
    head = f"{bos}:0 " if bos is not None else ""
    tail = f" {eos}:0" if eos is not None else ""
    single = f"{head}$A:0{tail}"
    pair = single
    pair += f" {bos}:1" if bos is not None else ""
    pair += " $B:1"
    pair += f" {eos}:1" if eos is not None else ""
    specials = [(t, tok.token_to_id(t)) for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
