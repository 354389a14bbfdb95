"""The word-problems task: answers computed right, splits that share no story, and a verifier that reads the last
number however it is written."""

from __future__ import annotations

import re

import pytest

from prefloop.tasks.word_problems import NAMES, OBJECTS, last_number, make_prompts, reward


def test_every_answer_is_the_story_arithmetic():
    for row in make_prompts(300, "train", seed=3):
        text = row["prompt"][0]["content"]
        a, b = map(int, re.findall(r"\d+", text)[:2])
        if "more" in text and "need" not in text or "puts" in text:
            want = a + b
        elif "gave away" in text or "already has" in text:
            want = a - b
        elif "boxes" in text:
            want = a * b
        else:
            want = a / b
        assert row["answer"] == want, text
        assert row["answer"] > 0 and row["answer"] == int(row["answer"])


def test_splits_share_no_name_or_object_and_draws_are_seeded():
    train, heldout = make_prompts(200, "train"), make_prompts(100, "heldout")
    for row in heldout:
        text = row["prompt"][0]["content"]
        assert not any(re.search(rf"\b{w}\b", text) for w in NAMES["train"] + OBJECTS["train"]), text
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert make_prompts(50, "train", seed=1) == make_prompts(50, "train", seed=1) != make_prompts(50, "train", seed=2)


@pytest.mark.parametrize(("text", "value"), [
    ("Mia has 23 apples now.", 23), ("14 + 9 = 23", 23), ("The answer is twelve.", 12), ("1,204 coins", 1204),
    ("It is 7.5", 7.5), ("No number here", None), ("Each gets 4 plums, so 4.", 4), ("-3", -3),
])
def test_last_number(text, value):
    assert last_number(text) == value


def test_reward_convention_and_failures():
    got = reward(None, ["So Sam has 20.", [{"role": "assistant", "content": "20 in all"}], "21", None],
                 answer=[20, 20, 20, 20])
    assert got == [1.0, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="answer"):
        reward(None, ["1"])
