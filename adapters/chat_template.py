"""Chat messages -> prompt text through a Hugging Face chat template, safely.

Contract:

- ``ChatTemplate(source, bos_token, eos_token).render(messages, add_generation_prompt=...)``
  returns what transformers' ``tokenizer.apply_chat_template(messages, tokenize=False, ...)``
  returns for the same template and tokens: the same jinja2 sandbox
  (``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``), the
  same ``tojson`` filter, ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``
  globals, the same variables (``messages`` with their None-valued keys dropped,
  ``add_generation_prompt``, ``bos_token`` / ``eos_token`` when set, ``tools`` and
  ``documents`` defaulting to None, then the caller's ``**extra``, which wins).
- ``ChatTemplate.from_folder(folder)`` finds a model's template where transformers does
  (``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``), and
  ``from_metadata`` reads a single-file adapter's safetensors metadata. Both return None when
  there is no template and check the one they find (``check``) before returning it.
- Templates come from untrusted adapter files, so everything a template does is bounded and a
  hostile one fails alone, fast, with ``ChatTemplateError`` (its ``str`` is the template's own
  message for ``raise_exception``). Inputs of the wrong type (a message that is not a dict, a
  value that is not JSON-like) are the caller's bug: ``TypeError``.

The bounds, per ``render`` (cheap checks first, and before anything is allocated):

- source: at most ``MAX_TEMPLATE_CHARS`` characters; compiled once per distinct source.
- time: ``timeout_s`` of wall clock, checked at every output chunk, loop iteration, call and
  filter. No single operation can run long, because of the bounds below.
- steps: ``MAX_STEPS`` loop iterations (``range`` elements included) and calls in all, so
  nested loops fail after that many, not after their product.
- size: the output, and any string a template builds, is at most ``max_chars`` characters, and
  any list, tuple or dict ``max_chars / 16`` elements; every ``*``, ``**``, ``+``, ``%``,
  ``~``, slice, call, filter, literal and macro checks what it is about to build *before*
  building it where that can be known (``"x" * 10**10`` and ``10 ** (10**10)`` are refused
  unevaluated), and everything built is charged to a work budget of
  ``WORK_PER_OUTPUT_CHAR * max_chars`` (about bytes), which caps memory as well as time.
  Turning a container into text is measured first (a list may hold one long string many
  times).
- reach: attributes as the immutable sandbox allows; touching an unsafe one (``__class__``) raises
  at once instead of yielding an undefined value; no ``include`` / ``import`` (no loader);
  ``RecursionError`` from recursive macros becomes ``ChatTemplateError``.

Deviations from transformers, all on paths that real chat templates do not take: the filters
``pprint``, ``striptags``, ``urlize`` and ``wordwrap`` and the global ``lipsum`` are absent (their
cost cannot be bounded cheaply; a template using one is refused when checked); unsafe attribute
access raises instead of rendering as empty; ``*`` widths in %-formatting, fields nested in a
``str.format`` spec and ``|sum`` with a non-numeric start are refused; ``{% generation %}``
renders its body without tracking assistant masks; of the special tokens only ``bos_token`` and
``eos_token`` are passed (others can go in ``**extra``).
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from collections.abc import Iterable, Iterator, Mapping, MappingView, Sequence, Sized
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_TEMPLATE_CHARS = 64 * 1024  # the largest template source accepted
MAX_STEPS = 100_000  # loop iterations and calls, together, in one render
WORK_PER_OUTPUT_CHAR = 32  # what a render may build in all (about bytes), per char of max_chars

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
MAX_JSON_BYTES = 16 << 20  # tokenizer_config.json can list thousands of added tokens

_REMOVED_FILTERS = ("pprint", "striptags", "urlize", "wordwrap")
# Filters that never turn their input into text; the others are checked like ``str(value)``.
_STRUCTURAL_FILTERS = frozenset(
    {
        *("abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float"),
        *("groupby", "int", "items", "last", "length", "list", "map", "max", "min", "random"),
        *("reject", "rejectattr", "reverse", "round", "select", "selectattr", "slice", "sort"),
        *("sum", "unique"),
    }
)
# Filters whose int arguments are widths or counts: one past max_value can only mean to build
# something too large.
_WIDTH_FILTERS = frozenset({"batch", "center", "indent", "round", "slice", "truncate"})
_LOOP_FILTER = "loop-budget"  # wraps every {% for %} iterable; a name no template can spell


class NoChatTemplate(LookupError):
    """The model (or adapter) has no chat template, so chat messages cannot become a prompt."""

    @classmethod
    def for_folder(cls, folder: Path) -> NoChatTemplate:
        """The error for a folder, naming the files looked at."""
        return cls(
            f"no chat template in {folder}: looked at {TEMPLATE_FILE} and the chat_template "
            f"key of {CONFIG_FILE}"
        )


class ChatTemplateError(ValueError):
    """The template failed to compile or render: a syntax error, its own ``raise_exception``
    (then ``str(e)`` is the template's message), an unsafe access, or a budget exceeded."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """The template of a model or PEFT folder, or None when it has none.

        ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template`` (a
        string, or a list of ``{"name", "template"}`` whose "default" is used), as in
        transformers. ``bos_token`` / ``eos_token`` come from ``tokenizer_config.json`` (a string
        or an AddedToken-like ``{"content": ...}``), else from ``special_tokens_map.json``.
        A file that is a symlink resolving outside ``folder`` is refused, not skipped: skipping
        it would silently render with a different template than the folder names.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        root = folder.resolve()
        source = _read_text(root, folder / TEMPLATE_FILE, 4 * MAX_TEMPLATE_CHARS)
        config_file = folder / CONFIG_FILE
        config = _read_json(root, config_file)
        if source is None:
            source = _template_from_config(config, config_file)
        if source is None:
            return None
        bos = _token(config, "bos_token", config_file)
        eos = _token(config, "eos_token", config_file)
        if bos is None or eos is None:
            tokens_file = folder / SPECIAL_TOKENS_FILE
            tokens = _read_json(root, tokens_file)
            bos = bos if bos is not None else _token(tokens, "bos_token", tokens_file)
            eos = eos if eos is not None else _token(tokens, "eos_token", tokens_file)
        return cls(source, bos, eos).check()

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ChatTemplate | None:
        """From a single-file adapter's safetensors ``__metadata__``: ``chat_template`` and the
        optional ``bos_token`` / ``eos_token``. None when there is no ``chat_template``."""
        if metadata.get("chat_template") is None:
            return None
        fields = {key: metadata.get(key) for key in ("chat_template", "bos_token", "eos_token")}
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise ChatTemplateError(f"metadata {key} must be a string, not {type(value)}")
        return cls(fields["chat_template"], fields["bos_token"], fields["eos_token"]).check()

    def check(self) -> ChatTemplate:
        """Compile the template now (cached); raise ``ChatTemplateError`` if it cannot be used.
        Returns self, so a loader can write ``ChatTemplate(...).check()``."""
        if not isinstance(self.source, str):
            raise ChatTemplateError(f"chat template must be a string, not {type(self.source)}")
        if len(self.source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"chat template is {len(self.source)} chars; the limit is {MAX_TEMPLATE_CHARS}"
            )
        for name in ("bos_token", "eos_token"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ChatTemplateError(f"{name} must be a string, not {type(value).__name__}")
        _compile(self.source)
        return self

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        max_chars: int = 1 << 20,
        timeout_s: float = 1.0,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``).

        ``extra`` reaches the template as variables (``tools=[...]``, ``documents=[...]``, ...),
        as ``apply_chat_template``'s ``**kwargs`` do. ``max_chars`` bounds the output and every
        value built on the way; ``timeout_s`` the wall clock. Raises ``ChatTemplateError``.
        """
        if max_chars < 1 or not timeout_s > 0:
            raise ValueError(f"max_chars ({max_chars}) and timeout_s ({timeout_s}) must be > 0")
        self.check()
        template = _compile(self.source)
        variables = {
            key: value
            for key, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
            if value is not None
        }
        variables.update(tools=None, documents=None)
        variables.update(_plain(extra))
        variables["messages"] = [_message(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        budget = _Budget(max_chars, timeout_s)
        active = _ACTIVE.set(budget)
        try:
            return _generate(template, variables, budget)
        except ChatTemplateError:
            raise
        except SecurityError as err:
            raise ChatTemplateError(f"chat template did something unsafe: {err}") from err
        except RecursionError as err:
            raise ChatTemplateError("chat template recursed too deeply") from err
        except Exception as err:  # anything an untrusted template triggers fails it alone
            raise ChatTemplateError(f"chat template failed: {_summary(err)}") from err
        finally:
            _ACTIVE.reset(active)


def _generate(template: jinja2.Template, variables: dict, budget: _Budget) -> str:
    parts: list[str] = []
    total = 0
    chunks = template.generate(variables)
    try:
        for chunk in chunks:
            if not chunk:
                continue
            total += len(chunk)
            if total > budget.max_value:
                raise ChatTemplateError(f"chat template output exceeds {budget.max_value} chars")
            budget.check_deadline()
            parts.append(chunk)
    finally:
        chunks.close()
    return "".join(parts)


def _summary(err: Exception) -> str:
    message = str(err)
    if len(message) > 500:
        message = message[:500] + "..."
    return f"{type(err).__name__}: {message}"


# ------------------------------------------------------------------------------ reading files


def _read_text(root: Path, path: Path, max_bytes: int) -> str | None:
    """``path``'s UTF-8 text, or None when there is no such file. It must resolve inside
    ``root`` and hold at most ``max_bytes``."""
    if not path.exists() and not path.is_symlink():
        return None
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ChatTemplateError(f"{path} resolves to {resolved}, outside {root}; refused")
    if not resolved.is_file():
        raise ChatTemplateError(f"{path} is not a regular file")
    if resolved.stat().st_size > max_bytes:
        raise ChatTemplateError(f"{path} is over {max_bytes} bytes")
    with open(resolved, "rb") as f:
        data = f.read(max_bytes + 1)  # the file may have grown since stat
    if len(data) > max_bytes:
        raise ChatTemplateError(f"{path} is over {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChatTemplateError(f"{path} is not UTF-8 text: {err}") from None


def _read_json(root: Path, path: Path) -> dict:
    """``path``'s JSON object; {} when there is no such file."""
    text = _read_text(root, path, MAX_JSON_BYTES)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ChatTemplateError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _template_from_config(config: dict, file: Path) -> str | None:
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ChatTemplateError(
            f"{file}: chat_template must be a string or a list of named templates, "
            f"not {type(value).__name__}"
        )
    named = {}
    for entry in value:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)
        ):
            raise ChatTemplateError(
                f'{file}: each chat_template entry must be {{"name": str, "template": str}}'
            )
        named[entry["name"]] = entry["template"]
    if "default" not in named:
        raise ChatTemplateError(f"{file}: chat_template names {sorted(named)}, none 'default'")
    return named["default"]


def _token(config: dict, key: str, file: Path) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # the AddedToken form older files use
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ChatTemplateError(f'{file}: {key} must be a string or {{"content": str}}')
    return value


# ------------------------------------------------------------------------------ inputs


def _message(message: Any) -> dict:
    """A plain copy of one message without its None-valued keys, as transformers passes it (many
    templates test for a key's presence, and would render a literal "None")."""
    if not isinstance(message, Mapping):
        raise TypeError(f"a chat message must be a dict, not {type(message).__name__}")
    return _plain({key: value for key, value in message.items() if value is not None})


def _plain(value: Any) -> Any:
    """A copy made of JSON types only: the template sees no object whose methods the sandbox
    does not know (a str subclass may carry any)."""
    try:
        return _plain_copy(value)
    except RecursionError:
        raise TypeError("chat template inputs are nested too deeply") from None


def _plain_copy(value: Any) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_copy(k): _plain_copy(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain_copy(v) for v in value)
    if isinstance(value, list):
        return [_plain_copy(v) for v in value]
    raise TypeError(
        f"chat template inputs must be JSON-like (str, numbers, lists, dicts), "
        f"not {type(value).__name__}"
    )


# ------------------------------------------------------------------------------ the budget


class _Budget:
    """What one render may still spend. ``max_value`` bounds any single string or sequence (and
    the output), in characters or elements; ``work_left`` what all the values built may cost
    together, in units of about a byte (see ``_cost``), which bounds memory as well as time;
    ``steps_left`` loop iterations and calls; ``deadline`` the wall clock (``time.monotonic``)."""

    def __init__(self, max_chars: int, timeout_s: float):
        self.max_value = max_chars
        self.work_total = WORK_PER_OUTPUT_CHAR * max_chars
        self.work_left = self.work_total
        self.steps_left = MAX_STEPS
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template took longer than {self.timeout_s:g} s")

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise ChatTemplateError(f"chat template ran over {MAX_STEPS} loop iterations/calls")
        self.check_deadline()

    def check_size(self, size: int) -> None:
        """Refuse to build a value of ``size`` (``_size``): called before building anything
        whose size can be known first."""
        if size > self.max_value:
            raise ChatTemplateError(
                f"chat template builds a value of size {size} or more (limit {self.max_value}; "
                f"a character counts 1, an element {_ITEM})"
            )
        if size > self.work_left:
            raise self._over_budget()

    def spend(self, cost: int) -> None:
        self.work_left -= cost
        if self.work_left < 0:
            raise self._over_budget()
        self.check_deadline()

    def _over_budget(self) -> ChatTemplateError:
        return ChatTemplateError(
            f"chat template builds more than {self.work_total} (about bytes) in all"
        )

    def charge(self, value: Any) -> Any:
        """Account for ``value``, just built; returns it."""
        size, cost = _cost(value)
        self.check_size(size)
        self.spend(cost)
        return value

    def text(self, value: Any) -> int:
        """About ``len(str(value))``, refused past ``max_value``. Only containers cost a walk
        (spent: turning one into text builds about that much)."""
        if isinstance(value, (str, bytes)):
            return len(value)
        size = _text_size(value, self.max_value)
        self.spend(size)
        return size


_ACTIVE: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _ACTIVE.get()
    if budget is None:
        raise RuntimeError("compiled chat templates run only inside ChatTemplate.render")
    return budget


def _text_size(value: Any, limit: int, *, indent: int = 0, separator: int = 2) -> int:
    """An estimate of the length of ``str(value)`` (or of its JSON with ``indent`` per level and
    ``separator`` per item) found without building it, to within the escaping of characters.
    Raises ``ChatTemplateError`` as soon as it passes ``limit``, so it costs O(limit) at most:
    a list may hold the same long string many times over."""
    total = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        total += depth * indent
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, bytes):
            total += 4 * len(item) + 3
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, Namespace):
            total += 12
            stack.append((item._Namespace__attrs, depth))
        elif isinstance(item, (Mapping, list, tuple, set, frozenset, MappingView)):
            pairs = isinstance(item, Mapping)
            total += 2 + (2 if pairs else 1) * len(item) * separator  # before pushing them
            if total > limit:
                break
            children = (x for pair in item.items() for x in pair) if pairs else item
            stack.extend((child, depth + 1) for child in children)
        else:  # numbers, None, undefined, loop objects: short reprs
            total += 24
        if total > limit:
            break
    if total > limit:
        raise ChatTemplateError(f"chat template turns a value of over {limit} chars into text")
    return total


_ITEM = 16  # size and cost of an element of a list, tuple or set (a pointer and its share of an
# object); of a dict entry, two. So no container holds over max_value / _ITEM elements, and one
# operation on a container (a sort, a groupby) stays short.
_OBJECT = 4 * _ITEM  # an empty list or dict
_SCALARS = frozenset({int, float, bool, type(None)})


def _size(seq: Any, length: int) -> int:
    """The size ``max_value`` bounds of ``seq`` made ``length`` characters or elements long."""
    return length if isinstance(seq, (str, bytes)) else _ITEM * length


def _cost(value: Any) -> tuple[int, int]:
    """(size, cost) of a value just built: its size as ``max_value`` counts it (``_size``), and
    its cost in work units, about bytes: the size, plus the strings and containers it holds at
    its first level, counted as new too (a ``split`` builds them)."""
    if isinstance(value, (str, bytes)):
        return len(value), len(value)
    if isinstance(value, int):
        return 0, value.bit_length() // 8
    if isinstance(value, Namespace):
        value = value._Namespace__attrs
    if isinstance(value, dict):
        items: Sequence | set | frozenset = (*value.keys(), *value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        return 0, 0  # lazy iterators, floats, objects: small, or built as they are used
    size = _ITEM * len(items)
    cost = _OBJECT + size
    kinds = set(map(type, items))  # C loops first: the common cases need no Python loop
    if kinds <= _SCALARS:
        return size, cost
    if kinds == {str}:
        return size, cost + sum(map(len, items))
    for item in items:
        if isinstance(item, (str, bytes)):
            cost += len(item)
        elif isinstance(item, (dict, list, tuple, set, frozenset)):
            cost += _OBJECT + _ITEM * len(item)
    return size, cost


# ------------------------------------------------------------------------------ size estimates

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _percent_size(budget: _Budget, fmt: str | bytes, values: Any) -> int:
    """The most ``fmt % values`` can build: each conversion is as wide as its width and
    precision plus the widest value (a mapping key may be used any number of times)."""
    if isinstance(values, Mapping):
        values = list(values.values())
    elif not isinstance(values, tuple):
        values = [values]
    widest = max((budget.text(v) for v in values), default=0)
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    total = len(text)
    for width, precision in _PERCENT_SPEC.findall(text):
        if "*" in (width, precision):
            raise ChatTemplateError("chat template uses a '*' width in %-formatting")
        total += int(width or 0) + int(precision or 0) + widest
    return total


def _format_size(budget: _Budget, fmt: str, values: Iterable) -> int:
    """The most ``fmt.format(...)`` can build, as ``_percent_size``."""
    widest = max((budget.text(v) for v in values), default=0)
    total = len(fmt)
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        if spec and "{" in spec:
            raise ChatTemplateError("chat template nests fields in a str.format spec")
        total += widest + sum(int(n) for n in re.findall(r"\d+", spec or ""))
    return total


def _replace_size(budget: _Budget, s: Any, old: Any, new: Any, count: Any = None) -> int:
    size = budget.text(s)
    hits = s.count(old) if isinstance(s, str) and isinstance(old, str) and old else size + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return size + hits * budget.text(new)


def _indent_size(
    budget: _Budget, s: Any, width: Any = 4, first: Any = False, blank: Any = False
) -> int:
    pad = len(width) if isinstance(width, str) else max(int(width), 0)
    lines = s.count("\n") + 1 if isinstance(s, str) else budget.text(s) + 1
    return budget.text(s) + lines * pad


def _center_size(budget: _Budget, value: Any, width: Any = 80) -> int:
    return max(budget.text(value), width if isinstance(width, int) else 0)


def _join_size(budget: _Budget, value: Any, d: Any = "", attribute: Any = None) -> int:
    return budget.text(value) + budget.text(d) * len(value)


def _format_filter_size(budget: _Budget, value: Any, *args: Any, **kwargs: Any) -> int:
    return _percent_size(budget, str(value), kwargs or args)


def _tojson_size(
    budget: _Budget,
    x: Any,
    ensure_ascii: Any = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: Any = False,
) -> int:
    width = len(indent) if isinstance(indent, str) else int(indent or 0)
    separator = max((len(s) for s in separators or () if isinstance(s, str)), default=2)
    newline = 1 if indent is not None else 0
    return _text_size(x, budget.max_value, indent=max(width, 0), separator=separator + newline)


def _sum_size(budget: _Budget, iterable: Any, attribute: Any = None, start: Any = 0) -> int:
    if not isinstance(start, (int, float)):  # summing sequences copies them over and over
        raise ChatTemplateError("chat template sums with a non-numeric start")
    return 0


_FILTER_SIZES = {
    "center": _center_size,
    "format": _format_filter_size,
    "indent": _indent_size,
    "join": _join_size,
    "replace": _replace_size,
    "sum": _sum_size,
    "tojson": _tojson_size,
}


def _check_text_method(budget: _Budget, text: str | bytes, name: str, args: tuple) -> tuple:
    """Refuse a str/bytes method call that would build too much; return the arguments to call
    it with (``join``'s iterable, consumed here to be measured, as a list)."""
    _refuse_huge_ints(budget, args)  # ljust, center, zfill... to a width past max_value
    if name in ("format", "format_map"):  # the sandbox hands out only its wrapped version
        raise SecurityError(f"chat template reached str.{name} around the sandbox")
    if name == "join" and args:
        items = list(args[0])
        budget.check_size(sum(budget.text(i) for i in items) + len(text) * len(items))
        return (items, *args[1:])
    if name == "replace" and len(args) >= 2:
        budget.check_size(_replace_size(budget, text, *args[:3]))
    elif name == "expandtabs":
        tabsize = args[0] if args and isinstance(args[0], int) else 8
        budget.check_size(len(text) * max(tabsize, 1))
    elif name == "translate" and args:
        table = args[0]
        values = table.values() if isinstance(table, Mapping) else table
        if isinstance(values, Iterable) and not isinstance(values, (str, bytes)):
            widest = max((len(v) for v in values if isinstance(v, (str, bytes))), default=1)
            budget.check_size(len(text) * widest)
    return args


def _refuse_huge_ints(budget: _Budget, args: Iterable) -> None:
    """A width or count past ``max_value`` (``str.ljust``, ``|center``, ``|batch``...)."""
    for arg in args:
        if type(arg) is int and arg > budget.max_value:
            raise ChatTemplateError(f"chat template passes {arg} (limit {budget.max_value})")


# ------------------------------------------------------------------------------ the sandbox

_MAX_INT_BITS = 4096  # `*` and `**` on integers: past this, nothing a prompt needs


def _power_check(base: Any, exponent: Any) -> None:
    ints = type(base) is int and type(exponent) is int
    if ints and abs(base) > 1 and base.bit_length() * exponent > _MAX_INT_BITS:
        raise ChatTemplateError(f"chat template computes an integer over {_MAX_INT_BITS} bits")


def _product_size(left: Any, right: Any) -> int:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise ChatTemplateError(f"chat template computes an integer over {_MAX_INT_BITS} bits")
        return 0
    for seq, n in ((left, right), (right, left)):
        if isinstance(n, int) and isinstance(seq, (str, bytes, list, tuple)):
            return _size(seq, len(seq) * max(n, 0))
    return 0


def _sum_of_sizes(left: Any, right: Any) -> int:
    kinds = (str, bytes, list, tuple)
    if isinstance(left, kinds) and isinstance(right, kinds):
        return _size(left, len(left) + len(right))
    return 0


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, but ``a ~ b`` goes through ``environment.bounded_join``, which
    measures its parts before joining them, and list, dict and tuple literals through
    ``environment.built``, which charges them."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.bounded_join(context.eval_ctx.autoescape, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _built(self, visit, node: nodes.Node, frame) -> None:
        self.write("environment.built(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame) -> None:
        self._built(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame) -> None:
        self._built(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame) -> None:
        if node.ctx != "load":  # an assignment target: {% for a, b in ... %}
            super().visit_Tuple(node, frame)
        else:
            self._built(super().visit_Tuple, node, frame)

    def visit_Const(self, node: nodes.Const, frame) -> None:
        if isinstance(node.value, (list, dict, tuple)):  # a literal folded at compile time
            self._built(super().visit_Const, node, frame)
        else:
            super().visit_Const(node, frame)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers'
    training masks; a prompt needs only its body (scoped the same way, as a call block)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template environment, with every way to spend time or memory metered
    against the active ``_Budget``."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationTag],
            finalize=_finalize_output,
        )
        filters = {**self.filters, "tojson": _tojson}
        for name in _REMOVED_FILTERS:
            del filters[name]
        self.filters = {name: _bounded_filter(name, f) for name, f in filters.items()}
        self.filters[_LOOP_FILTER] = _count_iterations
        del self.globals["lipsum"]
        self.globals.update(
            range=_budgeted_range,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
        )

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "**":
            _power_check(left, right)
        elif operator == "*":
            budget.check_size(_product_size(left, right))
        elif operator == "+":
            budget.check_size(_sum_of_sizes(left, right))
        elif operator == "%" and isinstance(left, (str, bytes)):
            budget.check_size(_percent_size(budget, left, right))
        return budget.charge(self.binop_table[operator](left, right))

    def call(self, context, obj, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = _check_text_method(budget, owner, obj.__name__, args)
        return budget.charge(super().call(context, obj, *args, **kwargs))

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        budget = _ACTIVE.get()  # None while constant-folding at compile time
        if isinstance(argument, slice) and budget is not None:
            budget.charge(value)  # a slice is a copy
        return value

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Refuse at once: a template reaching for ``__class__`` has no honest use for it."""
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            mapping = args[0] if is_map and args and isinstance(args[0], Mapping) else kwargs
            budget.check_size(_format_size(budget, fmt, (*args, *mapping.values())))
            return wrapped(*args, **kwargs)  # charged by ``call``

        return bounded

    def concat(self, parts: Iterable[str]) -> str:
        """Join a frame's buffer: what a macro, ``{% set %}`` block or ``{% filter %}`` block
        wrote (output inside them does not reach ``render``'s own count)."""
        parts = list(parts)
        budget = _budget()
        budget.check_size(sum(map(len, parts)))
        return budget.charge("".join(parts))

    def bounded_join(self, autoescape: bool, parts: tuple) -> str:
        budget = _budget()
        budget.check_size(sum(budget.text(p) for p in parts))
        return budget.charge((markup_join if autoescape else str_join)(parts))

    def built(self, value: Any) -> Any:
        """A list, dict or tuple literal just evaluated: in a loop, even a constant one is a new
        object each time, and can be kept (``{% set ns.kept = ns.kept + [[1, 2, 3]] %}``)."""
        return _budget().charge(value)


def _finalize_output(value: Any) -> Any:
    """Every ``{{ value }}``: a container is measured before it is turned into text."""
    budget = _ACTIVE.get()  # None while constant-folding at compile time
    if budget is not None and not isinstance(value, str):
        budget.text(value)
    return value


_PASS_ARG = {
    "context": lambda context: context,
    "eval_context": lambda context: context.eval_ctx,
    "environment": lambda context: context.environment,
}


def _bounded_filter(name: str, func):
    """``func`` metered: huge widths refused, inputs measured if the filter makes text of them,
    the result's size estimated first where it can outgrow its inputs, then charged.
    ``pass_context`` also keeps jinja from running it at compile time (constant folding),
    outside any budget."""
    pass_arg = _PASS_ARG.get(getattr(getattr(func, "jinja_pass_arg", None), "name", None))
    size = _FILTER_SIZES.get(name)
    makes_text = name not in _STRUCTURAL_FILTERS

    @jinja2.pass_context
    def bounded(context, value, *args, **kwargs):
        budget = _budget()
        budget.check_deadline()
        if name in _WIDTH_FILTERS:
            _refuse_huge_ints(budget, (*args, *kwargs.values()))
        if name == "join" and not isinstance(value, Sized):
            value = list(value)  # measured, then joined
        if makes_text:
            for item in (value, *args, *kwargs.values()):
                budget.text(item)
        if size is not None:
            budget.check_size(size(budget, value, *args, **kwargs))
        first = () if pass_arg is None else (pass_arg(context),)
        return budget.charge(func(*first, value, *args, **kwargs))

    return bounded


@jinja2.pass_context
def _count_iterations(context, iterable: Any) -> Iterable:
    """Every ``{% for %}`` iterates through this: one step per item."""
    if isinstance(iterable, _BudgetedRange):
        return iterable  # counts its own items
    return _counted(_budget(), iterable)


def _counted(budget: _Budget, iterable: Iterable) -> Iterator:
    for item in iterable:
        budget.step()
        yield item


class _BudgetedRange(Sequence):
    """``range`` whose iteration spends the render's steps; ``len`` and ``in`` stay O(1)."""

    def __init__(self, numbers: range):
        self._numbers = numbers

    def __len__(self) -> int:
        return len(self._numbers)

    def __getitem__(self, index):
        item = self._numbers[index]
        return _BudgetedRange(item) if isinstance(index, slice) else item

    def __iter__(self) -> Iterator[int]:
        return _counted(_budget(), self._numbers)

    def __reversed__(self) -> Iterator[int]:
        return _counted(_budget(), reversed(self._numbers))

    def __contains__(self, item: object) -> bool:
        return item in self._numbers

    def __repr__(self) -> str:
        return repr(self._numbers)


def _budgeted_range(*args: int) -> _BudgetedRange:
    numbers = range(*args)
    if len(numbers) > MAX_STEPS:
        raise ChatTemplateError(f"chat template asks for range() of {len(numbers)} numbers")
    return _BudgetedRange(numbers)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: jinja's own escapes HTML characters and takes fewer options
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: Any) -> None:
    budget = _ACTIVE.get()
    if budget is not None:
        budget.text(message)
    raise ChatTemplateError(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates: construct and ``fromkeys``, and nothing that reaches the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """``namespace`` that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args, **kwargs):  # jinja's signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)  # not self._check_name: Namespace hides attributes
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat template sets {name!r} on a namespace")


@functools.cache
def _environment() -> _BoundedEnvironment:
    version = tuple(int(n) for n in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):  # older sandboxes have known escapes (CVE-2024-56326, -2025-27516)
        raise ImportError(f"chat templates need jinja2>=3.1.6, not {jinja2.__version__}")
    return _BoundedEnvironment()


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    """``source`` (already checked: a string within ``MAX_TEMPLATE_CHARS``) compiled, with every
    ``{% for %}`` iterable wrapped in the step-counting filter."""
    env = _environment()
    try:
        tree = env.parse(source)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None)
            loop.iter.set_lineno(loop.lineno)
        tree.set_environment(env)
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"chat template does not compile: {err.message} (line {err.lineno})"
        ) from None
    except Exception as err:  # RecursionError, MemoryError... from a hostile source
        raise ChatTemplateError(f"chat template does not compile: {_summary(err)}") from None
