"""Text <-> token ids through the `tokenizers` library (tokenizer.json), and streaming decode.

Contract:
- `Tokenizer(path, eos_token_ids=())`: path is a model folder holding tokenizer.json, or the
  tokenizer.json file itself. `encode` adds the special tokens tokenizer.json's post-processor
  defines (e.g. Llama's BOS), as transformers does by default; `decode` skips special tokens.
  `eos_token_ids` = the ids given (the model config's) + tokenizer_config.json's eos_token.
- `encode_checked(text)` is `encode` that refuses (`UnencodableText`, naming the characters)
  text the vocabulary cannot represent, instead of silently dropping it or mapping it to the
  unknown token. `max_token_chars` bounds the characters one token covers, so a caller can
  refuse text that cannot fit a token budget before paying for tokenizing it.
- `IncrementalDetokenizer(tokenizer, prompt_ids)`: `push(token_id)` returns the text the new
  token adds, `flush()` whatever is still held back. Deltas never end in half a UTF-8 character
  (a byte-level token may carry part of one): while the decoded tail ends with U+FFFD the text is
  held back. The concatenation of all deltas and the flush equals decoding the generated ids in
  context of the prompt (so SentencePiece-style leading spaces survive).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers

REPLACEMENT = "\ufffd"


class UnencodableText(ValueError):
    """Text holds characters the tokenizer's vocabulary cannot represent; ``chars`` lists them."""

    def __init__(self, chars: list[str]):
        shown = ", ".join(repr(c) for c in chars[:8]) + (" ..." if len(chars) > 8 else "")
        super().__init__(f"characters the model's vocabulary cannot represent: {shown}")
        self.chars = chars


class Tokenizer:
    def __init__(self, path: str | Path, eos_token_ids: Sequence[int] = ()):
        path = Path(path)
        folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        self.tok = tokenizers.Tokenizer.from_file(str(file))
        eos = list(eos_token_ids)
        eos_token = _eos_token_from_config(folder / "tokenizer_config.json")
        if eos_token is not None and self.tok.token_to_id(eos_token) is not None:
            eos.append(self.tok.token_to_id(eos_token))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        unk = json.loads(self.tok.to_str()).get("model", {}).get("unk_token")
        self.unk_token: str | None = unk if isinstance(unk, str) else None
        self.unk_id = None if self.unk_token is None else self.tok.token_to_id(self.unk_token)
        # Vocabulary strings are at least as long as the text they cover (byte-level BPE spells
        # each byte as one char); x4 covers normalizers that compose characters (NFC, Hangul).
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.max_token_chars = 4 * max((len(t) for t in vocab), default=1)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_checked(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``encode``, but raise ``UnencodableText`` for characters that would be lost: mapped
        to the unknown token, or covered by no token at all (whitespace aside)."""
        enc = self.tok.encode(text, add_special_tokens=add_special_tokens)
        covered = bytearray(len(text))
        lost: dict[str, None] = {}
        for token_id, (begin, end) in zip(enc.ids, enc.offsets):
            span = text[begin:end]
            covered[begin:end] = b"\x01" * (end - begin)
            if token_id == self.unk_id and span != self.unk_token:
                lost.update(dict.fromkeys(span))
        lost.update(dict.fromkeys(c for c, k in zip(text, covered) if not k and not c.isspace()))
        if lost:
            raise UnencodableText(list(lost))
        return enc.ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def _eos_token_from_config(file: Path) -> str | None:
    if not file.is_file():
        return None
    eos = json.loads(file.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos  # old files use AddedToken dicts


class IncrementalDetokenizer:
    """Streaming decode with a small context window (the vLLM / TGI offsets scheme).

    ids[prefix:read] is text already emitted, decoded again only as context; the delta is what
    decoding ids[prefix:] adds beyond it.
    """

    CONTEXT = 5  # prompt tokens decoded as context for the first delta

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.read = len(self.ids)
        self.prefix = max(self.read - self.CONTEXT, 0)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Everything still held back (an incomplete character decodes as U+FFFD here)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        if len(text) <= len(prefix_text) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text) :]
