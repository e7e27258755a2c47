"""Chat templates: transformers parity, finding a template, and hostile templates failing fast.

- ``render`` equals transformers' ``apply_chat_template(tokenize=False)`` for SmolLM2's ChatML
  template, Llama-3-Instruct's and Qwen2.5-Instruct's (its tools branch and ``tojson``
  included), over several conversations with and without the generation prompt, and for a
  template using the rest of transformers' environment (``tojson`` options, ``namespace``,
  ``{% generation %}``, loop controls).
- ``from_folder`` reads what transformers reads, and what ``save_pretrained`` writes:
  ``chat_template.jinja`` first, else ``tokenizer_config.json`` (a string, or named templates),
  bos/eos as strings or AddedToken dicts, else from ``special_tokens_map.json``; a symlink that
  leaves the folder is refused; broken files are refused naming the file.
- ``raise_exception`` gives ``ChatTemplateError`` whose text is the template's own message.
- Every hostile template fails with ``ChatTemplateError`` in well under 2 s, and fails alone.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jinja2
import pytest
import tokenizers
from loraserve.adapters.chat_template import (
    MAX_TEMPLATE_CHARS,
    ChatTemplate,
    ChatTemplateError,
    NoChatTemplate,
)
from tokenizers import models
from transformers import PreTrainedTokenizerFast

# HuggingFaceTB/SmolLM2-135M-Instruct
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Qwen/Qwen2.5-7B-Instruct
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (the template as published)
# The rest of transformers' environment: tojson's options, namespace, dict, loop controls,
# {% generation %}, whitespace control, undefined variables, None-valued keys dropped.
EXTRAS = (
    "{%- set ns = namespace(n=0, seen=dict(a=1)) %}"
    "{%- for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{%- set ns.n = ns.n + 1 %}\n  [{{ loop.index }}/{{ loop.length }}] {{ m.role|upper }}: "
    "{% generation %}{{ m.content|tojson }}{% endgeneration %}"
    "{{ ' name=' ~ m.name if m.name is defined else '' }}"
    "{% if ns.n > 3 %}{% break %}{% endif %}\n{% endfor %}"
    "{{ ns.n }} {{ ns.seen|tojson(indent=2, sort_keys=True) }} {{ tools|tojson }} "
    "{{ documents is none }} {{ missing is defined }} {{ '%s-%03d'|format('x', 7) }} "
    "{{ messages[-1].content|tojson(ensure_ascii=True, separators=(',', ':')) }} "
    "{{ range(3)|list|join(',') }} {{ messages|map(attribute='role')|unique|list|length }}"
    "{% set a, b = 'p', ('q', 1) %}{{ a ~ b }}"
    "{% for k, v in {'x': [1, (2, 3)], 'w': {}}|dictsort %}{{ k }}={{ v }};{% endfor %}"
    "{{ '{}|{:>4}'.format(a, 7) }}{{ ('ab' * 3)[1:4] }}"
    "{{ bos_token }}{{ eos_token }}{% if add_generation_prompt %}>>{% endif %}"
)
TEMPLATES = {"smollm2": SMOLLM2, "llama3": LLAMA3, "qwen25": QWEN25, "extras": EXTRAS}
TOKENS = {  # (bos, eos) as each model's tokenizer has them
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen25": (None, "<|im_end|>"),
    "extras": ("<s>", "</s>"),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "  The quick brown fox?\n"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "café naïve 🙂 東京"},
        {"role": "assistant", "content": 'Bonjour ! "quoted" <tags> & \\ backslash'},
        {"role": "user", "content": "And again?", "name": None},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "name": "calc"},
    ],
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville — 天気",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"wind": "föhn"}'},
    {"role": "user", "content": "Thanks"},
]


def backend() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def hf_tokenizer(template: str, bos: str | None, eos: str | None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=backend(), bos_token=bos, eos_token=eos)
    tok.chat_template = template
    return tok


def assert_parity(hf: PreTrainedTokenizerFast, ours: ChatTemplate, conversations, **extra):
    for messages in conversations:
        for g in (True, False):
            want = hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=g, **extra
            )
            assert ours.render(messages, add_generation_prompt=g, **extra) == want, (messages, g)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", TEMPLATES)
def test_render_matches_transformers(name):
    bos, eos = TOKENS[name]
    hf = hf_tokenizer(TEMPLATES[name], bos, eos)
    ours = ChatTemplate(TEMPLATES[name], bos_token=bos, eos_token=eos)
    assert_parity(hf, ours, CONVERSATIONS)
    text = ours.render(CONVERSATIONS[0])
    # the test means something only if the template's own features show in the output
    marker = {"smollm2": "named SmolLM", "llama3": bos, "qwen25": "You are Qwen", "extras": ">>"}
    assert marker[name] in text


def test_qwen_tools_branch_matches_transformers():
    hf = hf_tokenizer(QWEN25, None, "<|im_end|>")
    ours = ChatTemplate(QWEN25, eos_token="<|im_end|>")
    assert_parity(hf, ours, [TOOL_CONVERSATION, CONVERSATIONS[1]], tools=[WEATHER_TOOL])
    text = ours.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert '"description": "Météo actuelle d\'une ville — 天気"' in text  # tojson, not ASCII
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in text


def test_long_conversation_stays_within_budget_and_matches():
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20}
        for i in range(2000)
    ]
    for template, eos in ((QWEN25, "<|im_end|>"), (LLAMA3, "<|eot_id|>")):
        hf = hf_tokenizer(template, "<|begin_of_text|>", eos)
        ours = ChatTemplate(template, "<|begin_of_text|>", eos)
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages, max_chars=len(want)) == want  # ~3x that is built in all
        with pytest.raises(ChatTemplateError, match="output exceeds"):
            ours.render(messages, max_chars=len(want) - 1)


def test_strftime_now_and_extra_variables():
    template = ChatTemplate("{{ strftime_now('%Y') }}|{{ date_string }}|{{ bos_token }}")
    text = template.render([], date_string="26 Jul 2024")
    assert text == f"{time.strftime('%Y')}|26 Jul 2024|"


# ------------------------------------------------------------------------------ finding a template


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def hf_from_folder(folder: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def test_from_folder_reads_what_transformers_saves(tmp_path):
    hf = hf_tokenizer(LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "chat_template.jinja").is_file()
    ours = ChatTemplate.from_folder(tmp_path)
    assert ours == ChatTemplate(LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
    assert_parity(hf_from_folder(tmp_path), ours, CONVERSATIONS)


def test_from_folder_tokenizer_config_string_and_added_token_dict(tmp_path):
    backend().save(str(tmp_path / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True}
    config = {"chat_template": LLAMA3, "bos_token": bos, "eos_token": "<|eot_id|>"}
    write_json(tmp_path / "tokenizer_config.json", config)
    ours = ChatTemplate.from_folder(tmp_path)
    assert ours == ChatTemplate(LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
    assert_parity(hf_from_folder(tmp_path), ours, CONVERSATIONS)


def test_from_folder_named_templates_use_default(tmp_path):
    backend().save(str(tmp_path / "tokenizer.json"))
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": SMOLLM2}]
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": named, "eos_token": "E"})
    ours = ChatTemplate.from_folder(tmp_path)
    assert ours == ChatTemplate(SMOLLM2, None, "E")
    assert_parity(hf_from_folder(tmp_path), ours, CONVERSATIONS)


def test_from_folder_jinja_file_wins_and_tokens_fall_back(tmp_path):
    backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(SMOLLM2, encoding="utf-8")
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": "CONFIG", "eos_token": None})
    tokens = {"bos_token": {"content": "<B>"}, "eos_token": "<E>"}
    write_json(tmp_path / "special_tokens_map.json", tokens)
    ours = ChatTemplate.from_folder(tmp_path)
    assert ours == ChatTemplate(SMOLLM2, "<B>", "<E>")
    assert_parity(hf_from_folder(tmp_path), ours, CONVERSATIONS)


def test_from_folder_without_template_is_none(tmp_path):
    assert ChatTemplate.from_folder(tmp_path) is None
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "</s>", "chat_template": None})
    assert ChatTemplate.from_folder(tmp_path) is None
    err = NoChatTemplate.for_folder(tmp_path)
    assert isinstance(err, LookupError) and "chat_template.jinja" in str(err)
    assert "tokenizer_config.json" in str(err)


def test_from_folder_refuses_a_symlink_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside.jinja"
    outside.write_text(SMOLLM2)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "chat_template.jinja").symlink_to(outside)
    with pytest.raises(ChatTemplateError, match="outside"):
        ChatTemplate.from_folder(folder)
    # the same for tokenizer_config.json, and a link that stays inside is followed
    (folder / "chat_template.jinja").unlink()
    write_json(tmp_path / "config.json", {"chat_template": SMOLLM2})
    (folder / "tokenizer_config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(ChatTemplateError, match="outside"):
        ChatTemplate.from_folder(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "templates").mkdir()
    (folder / "templates" / "chat.jinja").write_text(LLAMA3)
    (folder / "chat_template.jinja").symlink_to(folder / "templates" / "chat.jinja")
    assert ChatTemplate.from_folder(folder).source == LLAMA3


@pytest.mark.parametrize(
    "config, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"chat_template": 42}), "string or a list"),
        (json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}), "default"),
        (json.dumps({"chat_template": [{"name": "default"}]}), "entry"),
        (json.dumps({"chat_template": "ok", "eos_token": 7}), "eos_token"),
        (json.dumps({"chat_template": "{% for %}"}), "does not compile"),
    ],
)
def test_from_folder_refuses_broken_files_naming_them(tmp_path, config, match):
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ChatTemplateError, match=match) as err:
        ChatTemplate.from_folder(tmp_path)
    if "compile" not in match:
        assert "tokenizer_config.json" in str(err.value)


def test_from_folder_refuses_an_oversized_or_binary_template_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ChatTemplateError, match="UTF-8"):
        ChatTemplate.from_folder(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("x" * (MAX_TEMPLATE_CHARS + 1))
    with pytest.raises(ChatTemplateError, match="limit"):
        ChatTemplate.from_folder(tmp_path)


def test_from_metadata():
    assert ChatTemplate.from_metadata({"format": "pt"}) is None
    metadata = {"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>", "eos_token": "<E>"}
    ours = ChatTemplate.from_metadata(metadata)
    assert ours == ChatTemplate(LLAMA3, "<|begin_of_text|>", "<E>")
    hf = hf_tokenizer(LLAMA3, "<|begin_of_text|>", "<E>")
    assert_parity(hf, ours, CONVERSATIONS)
    assert ChatTemplate.from_metadata({"chat_template": SMOLLM2}) == ChatTemplate(SMOLLM2)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate.from_metadata({"chat_template": "{{ unclosed"})
    with pytest.raises(ChatTemplateError, match="bos_token"):
        ChatTemplate.from_metadata({"chat_template": SMOLLM2, "bos_token": 1})


# ------------------------------------------------------------------------------ refusals

ROLE_CHECK = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)


def test_raise_exception_carries_the_template_message():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError) as ours:
        ChatTemplate(ROLE_CHECK).render(messages)
    with pytest.raises(jinja2.TemplateError) as theirs:
        hf_tokenizer(ROLE_CHECK, None, None).apply_chat_template(messages, tokenize=False)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value) == "Conversation roles must alternate user/assistant/user/assistant/..."
    assert ChatTemplate(ROLE_CHECK).render(messages[:1]) == "a"


def test_inputs_of_the_wrong_type_are_the_callers_error():
    with pytest.raises(TypeError, match="dict"):
        ChatTemplate(SMOLLM2).render(["hello"])
    with pytest.raises(TypeError, match="JSON-like"):
        ChatTemplate(SMOLLM2).render([{"role": "user", "content": object()}])


BIG = "x" * 60_000
SHARED = (  # 64 references to one long string: little memory, a lot of text
    "{% set a = ['x' * 1000000] %}{% set b = [a, a, a, a, a, a, a, a] %}"
    "{% set c = [b, b, b, b, b, b, b, b] %}"
)
HOSTILE = {
    "nested loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "loop iterations",
    ),
    "nested loops over a list": (
        "{% set l = ('x' * 50000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
        "loop iterations",
    ),
    "huge range": ("{% for i in range(10**9) %}{% endfor %}", "range"),
    "string multiplication": ("{{ 'x' * 10**10 }}", "builds a value"),
    "list multiplication": ("{{ ([0] * 10**9)|length }}", "builds a value"),
    "power": ("{{ 10 ** (10 ** 10) }}", "bits"),
    "power of a literal": ("{{ 2 ** 100000000 }}", "bits"),
    "integer product": ("{% set n = 10 ** 1000 %}{{ n * n * n * n * n }}", "bits"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed"),
    "macro fan-out": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}",
        "loop iterations|longer than",  # a call costs ~15 us: the deadline may come first
    ),
    "recursive loop": (
        "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
        "recursed",
    ),
    "output flood": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output"),
    "doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "builds a value",
    ),
    "doubling with +": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}"
        "{% endfor %}",
        "builds a value",
    ),
    "one string many times, as text": (SHARED + "{{ c }}", "into text"),
    "one string many times, joined": (SHARED + "{{ c|join }}", "into text"),
    "one string many times, str.join": (
        "{% set s = 'x' * 1000000 %}{{ ''.join([s, s, s, s, s, s, s, s]) }}",
        "a value",
    ),
    "namespace holding itself": (
        "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}",
        "into text",
    ),
    "macro buffer": (
        "{% macro m() %}{% for i in range(50000) %}" + BIG + "{% endfor %}{% endmacro %}{{ m() }}",
        "builds a value",
    ),
    "set block buffer": (
        "{% set s %}{% for i in range(50000) %}" + BIG + "{% endfor %}{% endset %}",
        "builds a value",
    ),
    "total work": (
        "{% for i in range(100000) %}{% set s = 'x' * 1000000 %}{% endfor %}",
        "in all",
    ),
    "ljust": ("{{ 'x'.ljust(10**9) }}", "limit"),
    "replace": ("{{ ('x' * 1000000).replace('', 'yy') }}", "builds a value"),
    "replace filter": ("{{ ('x' * 1000000)|replace('', 'yy') }}", "builds a value"),
    "percent width": ("{{ '%999999999d' % 1 }}", "builds a value"),
    "percent repeated key": (
        "{{ ('%(a)s' * 100000) % {'a': 'x' * 100000} }}",
        "builds a value",
    ),
    "format width": ("{{ '{:999999999}'.format(1) }}", "builds a value"),
    "format filter": ("{{ '%999999999s'|format('x') }}", "builds a value"),
    "indent": ("{{ ('a\n' * 500000)|indent(1000) }}", "builds a value"),
    "center": ("{{ 'x'|center(10**9) }}", "limit"),
    "tojson indent": (
        "{% set ns = namespace(v=1) %}{% for i in range(900) %}{% set ns.v = [ns.v] %}{% endfor %}"
        "{{ ns.v|tojson(indent=100000) }}",
        "into text",
    ),
    "dunder class": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "dunder on messages": ("{{ messages.__class__ }}", "unsafe"),
    "format through attr": ("{{ ('{:999999999}'|attr('format'))(1) }}", "a value"),
    "format reaching in": ("{{ ('{0.__class__}'|attr('format'))(1) }}", "unsafe"),
    "function globals": ("{{ raise_exception.__globals__ }}", "unsafe"),
    "mutating a list": ("{{ messages.append(1) }}", "unsafe"),
    "namespace underscore": ("{% set ns = namespace() %}{% set ns._x = 1 %}", "namespace"),
    "include": ("{% include 'x.jinja' %}", "failed"),
    "removed filter": ("{{ 'x'|striptags }}", "No filter named"),
    "syntax error": ("{% for x in %}", "does not compile"),
    "source too large": ("{#" + "x" * MAX_TEMPLATE_CHARS + "#}", "limit"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_fail_fast(name):
    source, match = HOSTILE[name]
    messages = [{"role": "user", "content": "hi"}]
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate(source).render(messages)
    assert time.monotonic() - start < 2.0
    # and fails alone: the next render is unaffected
    assert ChatTemplate(SMOLLM2).render(messages).endswith("<|im_start|>assistant\n")


def test_slow_template_stops_at_the_deadline():
    slow = "{% for i in range(99999) %}{% set s = messages|tojson %}{% endfor %}"
    messages = [{"role": "user", "content": "word " * 200}] * 20
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="longer than 0.2 s"):
        ChatTemplate(slow).render(messages, timeout_s=0.2, max_chars=100_000_000)
    assert time.monotonic() - start < 1.0


def test_budgets_are_per_render_across_threads():
    errors, texts = [], []

    def hostile():
        try:
            ChatTemplate(HOSTILE["nested loops"][0]).render([])
        except ChatTemplateError as err:
            errors.append(err)

    def honest():
        for _ in range(50):
            texts.append(ChatTemplate(QWEN25).render(CONVERSATIONS[2]))

    threads = [threading.Thread(target=f) for f in (hostile, honest, hostile, honest)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 2
    assert len(texts) == 100 and len(set(texts)) == 1
