"""Training data: JSONL records -> tokenized examples -> padded micro-batches.

- JSON Lines, one record per line (blank lines skipped, other keys ignored), either
  ``{"prompt": str, "completion": str}``, ``{"text": str}``, or a conversation
  ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant message; the first bad
  line raises ``TrainError`` naming ``FILE:LINE``.
- A conversation is rendered with the base's chat template (``chat_records``): the prompt is
  everything before the last assistant message with the template's cue for the assistant's
  turn, the completion is that message (the loss is on it and the EOS that ends the turn;
  earlier assistant turns are context), and the prompt is tokenized without special tokens,
  as transformers' ``apply_chat_template`` does (the template writes them).
- Tokens are ``encode(prompt) + encode(completion, add_special_tokens=False) + [eos]``; the loss
  is on the completion tokens and that EOS only (a text record: every token). A record longer
  than ``max_len`` is cut at the end with a warning (``on_long="truncate"``, the default) or
  refused (``on_long="error"``).
- ``batches`` yields micro-batches forever, each epoch a permutation drawn from ``seed`` alone,
  and can skip ahead to where a resumed run stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from loraserve.adapters.tokenizer import Tokenizer
from torch import Tensor

from .config import TrainConfig, TrainError
from .report import _warn

IGNORE = -100  # target id that the loss skips (prompt tokens, padding)


@dataclass(frozen=True)
class Record:
    """One JSONL line. A text record has ``prompt=None`` and its text in ``completion``."""

    where: str  # "FILE:LINE", for messages
    completion: str
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None  # a conversation, until ``chat_records`` renders it
    templated: bool = False  # the prompt is a rendered chat template: no special tokens added
    # a rendered conversation's earlier turns, before ``prompt``: (the template's text, then an
    # assistant answer the loss is also on), in order
    earlier: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Example:
    """A tokenized record: ``ids[start:]`` are the tokens the loss is on."""

    ids: tuple[int, ...]  # prompt + completion + eos, cut to max_len
    start: int  # first target token (0 for a text record)
    record: Record
    completion_tokens: int  # completion + eos before any cut: the greedy budget in evaluation
    earlier: tuple[tuple[int, int], ...] = ()  # [begin, end) of earlier answers' target tokens

    @property
    def n_targets(self) -> int:
        earlier = sum(min(e, self.start) - b for b, e in self.earlier)
        return len(self.ids) - max(self.start, 1) + earlier  # token 0 is never predicted


def load_records(path: Path) -> list[Record]:
    """Parse a JSONL data file; ``TrainError`` names the line of the first bad record."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise TrainError(f"{path}: no such data file") from None
    except OSError as e:
        raise TrainError(f"{path}: cannot read the data file ({e.strerror})") from None
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            raise TrainError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise TrainError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        records.append(_parse_record(obj, where))
    if not records:
        raise TrainError(f"{path}: no records (the data set is empty)")
    return records


def _parse_record(obj, where: str) -> Record:
    forms = '{"prompt": ..., "completion": ...}, {"text": ...} or {"messages": [...]}'
    if not isinstance(obj, dict):
        raise TrainError(f"{where}: expected a JSON object {forms}, got {type(obj).__name__}")
    if "messages" in obj:
        return _parse_conversation(obj["messages"], where)
    has_pair = "prompt" in obj or "completion" in obj
    if "text" in obj and has_pair:
        raise TrainError(f'{where}: has both "text" and "prompt"/"completion"; use one form')
    if "text" in obj:
        return Record(where, _string_field(obj, "text", where))
    if not has_pair:
        keys = ", ".join(sorted(obj)) or "none"
        raise TrainError(f"{where}: expected {forms}; the record's keys are: {keys}")
    prompt = _string_field(obj, "prompt", where)
    return Record(where, _string_field(obj, "completion", where), prompt)


def _parse_conversation(messages, where: str) -> Record:
    if not isinstance(messages, list) or not messages:
        raise TrainError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TrainError(f'{where}: messages[{i}] needs a "role" string')
        if not isinstance(m.get("content"), str):
            raise TrainError(f'{where}: messages[{i}] needs a "content" string')
    if messages[-1]["role"] != "assistant":
        raise TrainError(f"{where}: the last message must be the assistant's (what to learn)")
    clean = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return Record(where, clean[-1]["content"], messages=clean)


def chat_records(records: Sequence[Record], template, eos_text: str | None = None) -> list[Record]:
    """Conversations rendered with ``template`` (a ``ChatTemplate``; None: the base has none)
    into prompt/completion records, the loss on every assistant answer; other records
    unchanged. ``eos_text``: the EOS token's text, which ends an answer."""
    from loraserve.adapters.chat_template import ChatTemplateError

    out, last_only = [], []
    for r in records:
        if r.messages is None:
            out.append(r)
            continue
        if template is None:
            raise TrainError(
                f"{r.where}: a conversation, but the base has no chat template "
                "(chat_template.jinja or tokenizer_config.json's chat_template)"
            )
        try:
            earlier, prompt = _render_turns(r, template, eos_text)
        except ChatTemplateError as e:
            raise TrainError(f"{r.where}: the base's chat template refused it: {e}") from None
        if earlier is None:
            last_only.append(r.where)
        out.append(Record(r.where, r.completion, prompt, templated=True, earlier=earlier or ()))
    if last_only:
        _warn(
            f"{len(last_only)} conversation(s) with earlier answers (first: {last_only[0]}): the "
            "base's chat template does not render them turn by turn (a turn's prompt is not a "
            "prefix of the whole), so the loss is on their last answer only"
        )
    return out


def _render_turns(r: Record, template, eos_text: str | None):
    """(earlier turns, the last answer's prompt) of a conversation, as ``Record.earlier`` and
    ``Record.prompt``. Each assistant answer is found in the whole rendering where the
    template's generation prompt for it ends, as TRL and axolotl mask turns; the end-of-turn
    token after an answer is the EOS the example appends, so its text is not repeated.
    Earlier turns are None when the template does not render the conversation turn by turn
    (one that drops or rewrites earlier turns): then only the last answer is learnt."""
    messages = list(r.messages)
    answers = [i for i, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
    last = template.render(messages[:-1], add_generation_prompt=True)
    if not answers:
        return (), last
    full = template.render(messages, add_generation_prompt=False)
    earlier, pos = [], 0
    for i in [*answers, len(messages) - 1]:
        head = (
            last
            if i == len(messages) - 1
            else template.render(messages[:i], add_generation_prompt=True)
        )
        content = messages[i]["content"]
        if not (full.startswith(head) and full.startswith(content, len(head))):
            return None, last  # not rendered turn by turn: the last answer only
        if i == len(messages) - 1:
            return tuple(earlier), full[pos : len(head)]
        earlier.append((full[pos : len(head)], content))
        pos = len(head) + len(content)
        if eos_text and full.startswith(eos_text, pos):
            pos += len(eos_text)
    raise AssertionError("unreachable: the last message is the assistant's")


def _string_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise TrainError(f'{where}: field "{key}" is missing')
    if not isinstance(obj[key], str):
        raise TrainError(f'{where}: field "{key}" must be a string, got {type(obj[key]).__name__}')
    return obj[key]


def load_data(config: TrainConfig) -> tuple[list[Record], list[Record]]:
    """(train records, eval records) from --data and --eval-file / --eval-split."""
    records = load_records(config.data)
    if config.eval_file is not None:
        return records, load_records(config.eval_file)
    if config.eval_split > 0:
        return split_eval(records, config.eval_split, config.seed)
    return records, []


def split_eval(records: list[Record], fraction: float, seed: int):
    """Hold out ``ceil(fraction * n)`` records chosen by ``seed``: (train, eval), file order."""
    n_eval = math.ceil(fraction * len(records))
    if n_eval >= len(records):
        raise TrainError(
            f"--eval-split {fraction} of {len(records)} records leaves none to train on"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    max_len: int,
    on_long: str = "truncate",
    what: str = "data",
) -> list[Example]:
    """Records -> examples; a record longer than ``max_len`` is cut at the end or refused."""
    eos = tokenizer.eos_token_ids[0]
    examples, cut, dropped = [], [], []
    for record in records:
        spans, prompt = [], []
        for context, answer in record.earlier:  # templated: no special tokens added
            prompt += tokenizer.encode(context, add_special_tokens=False)
            begin = len(prompt)
            prompt += [*tokenizer.encode(answer, add_special_tokens=False), eos]
            spans.append((begin, len(prompt)))
        if record.prompt is None:
            completion = tokenizer.encode(record.completion)
        else:
            prompt += tokenizer.encode(record.prompt, add_special_tokens=not record.templated)
            completion = tokenizer.encode(record.completion, add_special_tokens=False)
        ids = [*prompt, *completion, eos]
        if len(ids) > max_len:
            if on_long == "error":
                raise TrainError(
                    f"{record.where}: {len(ids)} tokens, longer than --max-len={max_len} "
                    "(raise --max-len, or use --on-long=truncate to cut such records)"
                )
            cut.append(record.where)
        spans = tuple((b, min(e, max_len)) for b, e in spans if b < max_len)
        example = Example(tuple(ids[:max_len]), len(prompt), record, len(completion) + 1, spans)
        if example.n_targets > 0:
            examples.append(example)
        else:
            dropped.append(record.where)
    if cut:
        _warn(
            f"{what}: {len(cut)} record(s) longer than --max-len={max_len} were cut to fit "
            f"(first: {cut[0]}); --on-long=error refuses them instead"
        )
    if dropped:
        _warn(f"{what}: {len(dropped)} record(s) left no completion token (first: {dropped[0]})")
    if not examples:
        raise TrainError(f"{what}: no record has a token to train on (the data set is empty)")
    return examples


@dataclass(frozen=True)
class Batch:
    inputs: Tensor  # [B, S] token ids, right-padded
    targets: Tensor  # [B, S] the next token, or IGNORE (prompt, padding)
    n_targets: int
    n_tokens: int  # real (non-pad) input tokens

    def to(self, device) -> Batch:
        return Batch(
            self.inputs.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.n_targets,
            self.n_tokens,
        )


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad; ``targets[b, t] = ids[t + 1]`` where ``t + 1 >= start``, else IGNORE.

    Right padding is safe with causal attention: a real token never sees a later pad.
    """
    S = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), S), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), S), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        n = len(e.ids) - 1
        inputs[b, :n] = ids[:-1]
        targets[b, :n] = ids[1:]
        targets[b, : max(e.start - 1, 0)] = IGNORE  # predictions of prompt tokens
        for begin, end in e.earlier:  # but earlier answers of a conversation are learnt too
            targets[b, begin - 1 : end - 1] = ids[begin:end]
    n_targets = sum(e.n_targets for e in examples)
    return Batch(inputs, targets, n_targets, sum(len(e.ids) - 1 for e in examples))


def batches(
    examples: Sequence[Example], batch_size: int, seed: int, pad_id: int, start: int = 0
) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, each epoch a new permutation drawn from
    ``seed``; the first ``start`` micro-batches are skipped (resume). The last batch of an epoch
    may be smaller."""
    generator = torch.Generator().manual_seed(seed)
    index = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            if index >= start:
                yield collate([examples[j] for j in order[i : i + batch_size]], pad_id)
            index += 1


def total_steps(config: TrainConfig, n_examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = math.ceil(n_examples / config.batch_size)
    return math.ceil(config.epochs * per_epoch / config.grad_accum)
