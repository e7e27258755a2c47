"""Structured output: a JSON schema, any JSON object, a regular expression or a list of
choices constrains a request's tokens, through a per-row token mask applied at sampling time.

The grammar engine is llguidance (PyPI ``llguidance``), chosen by measurement on this project's
CPU at SmolLM2's 49,152-token vocabulary and batch 32 (``bench/grammar.py``, README): it
compiles a schema in about 1 ms (xgrammar 10-20 ms, outlines-core 0.2-19 s), fills 32 rows'
masks of mixed constraints in 1.2-1.4 ms (xgrammar 2.2-2.5, outlines-core 1.6-1.9), has no
dependencies, reads tokenizer.json itself, keeps special tokens out of constrained text, and
refuses schema keywords it does not implement instead of ignoring them.

Contract:

- ``Constraint(kind, value)``: ``json_schema`` (the schema's JSON text), ``json_object`` (any
  JSON object; no value), ``regex`` (the whole output matches it), ``choice`` (the output is
  one of ``value``, a tuple of strings). Sizes are capped before any work.
- ``Grammars(tokenizer_path, vocab_size, eos_token_ids)``: one per model. ``compile`` turns a
  constraint into a matcher template, cached (LRU, ``MAX_CACHED``) by its text, raising
  ``InvalidRequest`` naming the problem for a schema, pattern or list it cannot use; call it
  off the engine thread (the frontends do, before they submit). ``matcher`` gives a request its
  own copy (microseconds). ``fill`` writes the allowed tokens of many matchers as an int32
  bitmask ``[n, ceil(V / 32)]`` (bit ``t % 32`` of word ``t // 32``), releasing the GIL, so the
  engine runs it on a helper thread while the forward runs; ``apply`` adds 0 / -inf to those
  rows' logits.
- Cost bounds: llguidance's parser limits (lexer states, grammar size, per-step "fuel") bound
  what a hostile schema or pattern can cost at compile time and at every step; a pattern over
  them fails its request alone (``InvalidRequest`` at compile, an error finish mid-generation).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from loraserve.server.errors import InvalidRequest
from torch import Tensor

KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_SCHEMA_CHARS = 64 * 1024
MAX_REGEX_CHARS = 4 * 1024
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
MAX_CACHED = 512  # compiled templates kept (a template is a few KB)
# JSON may be pretty-printed, but each gap holds at most 20 whitespace characters: unbounded
# whitespace lets a sampled row spend its whole budget on it
JSON_OPTIONS = {"whitespace_pattern": r"[ \t\n\r]{0,20}"}


@dataclass(frozen=True)
class Constraint:
    kind: str
    value: str | tuple[str, ...] = ""

    @property
    def field(self) -> str:
        """The request field that carries it, for error messages."""
        return f"params.constraint.{'choices' if self.kind == 'choice' else self.kind}"


class Grammars:
    """Compiles constraints for one model's vocabulary, and fills and applies token masks."""

    def __init__(self, tokenizer_path: str | Path, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._path = Path(tokenizer_path)
        self._eos = list(eos_token_ids)
        self._tokenizer = None  # built on first use: ~0.5 s, and only servers that constrain
        self._executor = None
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # cache misses, for tests and metrics

    # ---------------------------------------------------------------- compiling

    def compile(self, constraint: Constraint):
        """The matcher template for ``constraint`` (cached); raises ``InvalidRequest``."""
        check(constraint)
        with self._lock:
            template = self._cache.get(constraint)
            if template is not None:
                self._cache.move_to_end(constraint)
                return template
        llg = _llguidance()
        grammar = _grammar(llg, constraint)
        template = llg.LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=_limits(llg))
        if template.is_error():
            raise InvalidRequest(constraint.field, _error_text(template.get_error()))
        with self._lock:
            self.compiled += 1
            self._cache[constraint] = template
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return template

    def matcher(self, constraint: Constraint):
        """A fresh matcher of ``constraint`` for one request."""
        return self.compile(constraint).deep_copy()

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                eos = self._eos or None
                try:  # llguidance reads byte-level BPE and SentencePiece tokenizer.json itself
                    self._tokenizer = llg.LLTokenizer(
                        str(self._path), n_vocab=self.vocab_size, eos_token=eos
                    )
                except ValueError:  # others (the demo's character vocabulary): token by token
                    vocabulary = llg.TokenizerWrapper(_Vocabulary(self._path, self._eos))
                    self._tokenizer = llg.LLTokenizer(
                        vocabulary, n_vocab=self.vocab_size, eos_token=eos
                    )
                self._executor = llg.LLExecutor(num_threads=1)
            return self._tokenizer

    # ---------------------------------------------------------------- masks

    def fill(self, matchers: Sequence) -> Tensor:
        """The allowed tokens of each matcher: int32 ``[len(matchers), words]``."""
        mask = torch.zeros(len(matchers), self.words, dtype=torch.int32)
        self._llg_tokenizer()
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], mask.data_ptr(), self.words * 4, len(matchers)
        )
        return mask

    def apply(self, logits: Tensor, rows: Sequence[int], mask: Tensor) -> None:
        """``logits[rows[i]] += 0 where mask[i] allows a token, else -inf``, in place."""
        index = torch.tensor(rows, device=logits.device)
        bias = allowed_bias(mask.to(logits.device), logits.shape[1]).to(logits.dtype)
        logits.index_add_(0, index, bias)


class _Vocabulary:
    """A tokenizer.json llguidance cannot read, as the token list its ``TokenizerWrapper``
    takes: each token's bytes (its text alone), the special tokens, and an encoder."""

    def __init__(self, path: Path, eos: Sequence[int]):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(path))
        n = self._tok.get_vocab_size(with_added_tokens=True)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self.tokens, self.special_token_ids = [], []
        for i in range(n):
            piece = self._tok.id_to_token(i) or ""
            if piece in special:
                self.special_token_ids.append(i)
                self.tokens.append(piece.encode())
            else:
                self.tokens.append(self._tok.decode([i], skip_special_tokens=False).encode())
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = None

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False).ids


_BYTE_BIAS: dict[torch.device, Tensor] = {}


def allowed_bias(mask: Tensor, vocab: int) -> Tensor:
    """``[n, words]`` int32 bitmask -> ``[n, vocab]`` float32, 0 where allowed, -inf elsewhere:
    one table lookup per mask byte (a bool unpack and ``masked_fill`` costs 2.5x on CPU)."""
    table = _BYTE_BIAS.get(mask.device)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [256, 8], bit k of byte
        table = torch.where(bits.bool(), 0.0, float("-inf")).to(mask.device)
        _BYTE_BIAS[mask.device] = table
    n = mask.shape[0]
    as_bytes = mask.contiguous().view(torch.uint8).long()  # little-endian: tokens 8k..8k+7
    return torch.nn.functional.embedding(as_bytes, table).reshape(n, -1)[:, :vocab]


# -------------------------------------------------------------------- constraints


def check(constraint: Constraint) -> None:
    """Refuse, before any work, a constraint too large or of the wrong shape."""
    kind, value, field = constraint.kind, constraint.value, constraint.field
    if kind not in KINDS:
        raise InvalidRequest("params.constraint", f"unknown kind {kind!r}; one of {KINDS}")
    if kind == "json_schema":
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(field, "is empty")
        if len(value) > MAX_SCHEMA_CHARS:
            raise InvalidRequest(field, f"{len(value)} characters; at most {MAX_SCHEMA_CHARS}")
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise InvalidRequest(field, "is empty")
        if len(value) > MAX_REGEX_CHARS:
            raise InvalidRequest(field, f"{len(value)} characters; at most {MAX_REGEX_CHARS}")
    elif kind == "choice":
        if not isinstance(value, tuple) or not value:
            raise InvalidRequest(field, "needs at least one choice")
        if len(value) > MAX_CHOICES:
            raise InvalidRequest(field, f"{len(value)} choices; at most {MAX_CHOICES}")
        for i, choice in enumerate(value):
            if not isinstance(choice, str) or not choice or len(choice) > MAX_CHOICE_CHARS:
                raise InvalidRequest(
                    f"{field}[{i}]", f"must be a non-empty string of at most {MAX_CHOICE_CHARS}"
                )


def _grammar(llg, constraint: Constraint) -> str:
    kind, value = constraint.kind, constraint.value
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except ValueError as err:
            raise InvalidRequest(constraint.field, f"is not valid JSON ({err})") from None
        if not isinstance(schema, dict):
            raise InvalidRequest(constraint.field, "must be a JSON object (a JSON schema)")
        try:
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as err:
            raise InvalidRequest(constraint.field, str(err)) from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    lark = "start: " + " | ".join(json.dumps(choice) for choice in value)
    return llg.LLMatcher.grammar_from_lark(lark)


def _limits(llg):
    """What one grammar may cost (llguidance's speeds: lexer fuel ~14-50k/ms, Earley items
    ~20k/ms): building its lexer at most ~20 ms of fuel and 50k states (~100 MB), each mask
    at most ~14 ms of lexer fuel and 50k items; short error messages (no parser dumps)."""
    return llg.LLParserLimits(
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_lexer_states=50_000,
        max_grammar_size=500_000,
        verbose_errors=False,
    )


def _error_text(error: str) -> str:
    """llguidance's message, on one line and bounded."""
    return " ".join(error.split())[:500]


def _llguidance():
    import llguidance

    return llguidance
