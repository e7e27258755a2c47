"""The SmolLM2 adapter recipe's parts that need no model: the questions and their held-out
split, the behaviours' rewrites and checks, the shipped data and tables agreeing with the
report. (The adapters themselves, through a server: tests/test_smollm2_adapters.py.)"""

from __future__ import annotations

import json

import pytest
from loraserve.adapters.smollm2_recipe import (
    ACTIVITIES,
    BEHAVIOURS,
    CONCEPTS,
    RECIPE_DIR,
    TEMPLATES,
    format_table,
    is_answer_json,
    is_bulleted_list,
    is_one_short_sentence,
    make_questions,
    sentences,
    training_records,
)

ROOT = RECIPE_DIR.parents[1]


def topic_of(question: str) -> str:
    for kind, topics in (("concept", CONCEPTS), ("activity", ACTIVITIES)):
        for template in TEMPLATES[kind]:
            head, tail = template.split("{}")
            q = question[0].lower() + question[1:]
            for topic in topics:
                if q == (head[0].lower() + head[1:] + topic + tail) or question == (
                    (head + topic + tail)[0].upper() + (head + topic + tail)[1:]
                ):
                    return topic
    raise AssertionError(f"no template makes {question!r}")


def test_held_out_questions_share_no_topic_with_training():
    questions = make_questions(0)
    assert questions == make_questions(0)  # deterministic
    train = {topic_of(q) for q in questions["train"]}
    held = {topic_of(q) for q in questions["eval"]}
    assert train and held and not train & held
    assert len(questions["eval"]) >= 100
    assert json.loads((RECIPE_DIR / "questions.json").read_text()) == questions  # as shipped


@pytest.mark.parametrize(
    "check, good, bad",
    [
        (
            is_one_short_sentence,
            ["The capital of France is Paris.", "Bees make honey and pollinate flowers!"],
            [
                "Paris.",  # under three words
                "The capital is Paris. It is big.",
                "One two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty twentyone.",
                "No final stop",
                "A line\nbreak here.",
            ],
        ),
        (
            is_answer_json,
            ['{"answer": "Bees make honey."}', ' {"answer":"x"} '],
            ['{"answer": ""}', '{"answer": "x", "more": 1}', '["x"]', '{"answer": 3}', "x"],
        ),
        (
            is_bulleted_list,
            [
                "- Bees make honey.\n- They pollinate flowers.",
                "- one two\n- three four\n- five six",
            ],
            [
                "- Bees make honey.",  # one point is no list
                "Bees:\n- make honey\n- pollinate",
                "- Bees make honey.\n* They pollinate.",
                "1. Bees make honey.\n2. They pollinate.",
                "- Bees\n- make honey",  # a point of one word
            ],
        ),
    ],
)
def test_checks(check, good, bad):
    assert all(check(t) for t in good)
    assert not any(check(t) for t in bad)


def test_rewrites_pass_their_own_checks_and_the_base_answer_does_not():
    answer = (
        "Bees are flying insects closely related to wasps and ants. They are known for their "
        "role in pollination and for producing honey. Some"
    )
    assert sentences(answer) == [
        "Bees are flying insects closely related to wasps and ants.",
        "They are known for their role in pollination and for producing honey.",
    ]
    for behaviour in BEHAVIOURS.values():
        assert behaviour.check(behaviour.rewrite(answer)), behaviour.name
        assert not behaviour.check(answer), behaviour.name
    records = training_records(
        BEHAVIOURS["json"], ["Tell me about bees."], {"Tell me about bees.": answer}, 5
    )
    assert records == [
        {
            "messages": [
                {"role": "user", "content": "Tell me about bees."},
                {
                    "role": "assistant",
                    "content": json.dumps({"answer": sentences(answer)[0]}),
                },
            ]
        }
    ]


def test_the_shipped_data_and_tables_agree_with_the_report():
    report = json.loads((RECIPE_DIR / "report.json").read_text())
    table = format_table(report)
    assert table in (RECIPE_DIR / "README.md").read_text()
    assert table in (ROOT / "README.md").read_text()
    for name, trained in report["trained"].items():
        lines = (RECIPE_DIR / "train" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == trained["records"]
        assert all(BEHAVIOURS[name].check(json.loads(x)["messages"][-1]["content"]) for x in lines)
        assert (RECIPE_DIR / "adapters" / f"{name}.safetensors").stat().st_size == trained["bytes"]
