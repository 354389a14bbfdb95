"""The demo's task (prefloop/tasks/addition.py): fixed train/heldout partition, prompt records, and the reward judge.

PYTHONPATH=. python -m pytest tests/tasks/test_addition.py -q
"""

from __future__ import annotations

import hashlib
import importlib

import pytest

from prefloop.tasks.addition import make_prompts, reward, split_size


def _pairs(records: list[dict]) -> set[tuple[int, int]]:
    return {tuple(int(x) for x in r["prompt"].rstrip("=").split("+")) for r in records}


def test_splits_are_disjoint_and_cover_all_problems():
    """train (9000) and heldout (1000) are disjoint and together are every a+b with a, b in 0..99."""
    train = _pairs(make_prompts(split_size("train"), seed=0, split="train"))
    heldout = _pairs(make_prompts(split_size("heldout"), seed=0, split="heldout"))
    assert (len(train), len(heldout)) == (9000, 1000)
    assert not train & heldout
    assert train | heldout == {(a, b) for a in range(100) for b in range(100)}


def test_partition_does_not_depend_on_seed_and_never_changes():
    """The seed picks problems within a split; the split itself is fixed (pinned, so evals stay comparable)."""
    assert _pairs(make_prompts(1000, seed=1, split="heldout")) == _pairs(make_prompts(1000, seed=2, split="heldout"))
    held = sorted(_pairs(make_prompts(1000, seed=0, split="heldout")))
    digest = hashlib.sha256(",".join(f"{a}-{b}" for a, b in held).encode()).hexdigest()[:16]
    assert digest == "453a125880746c80"


def test_make_prompts_is_deterministic_per_seed():
    """Same (n, seed, split) gives the same records in the same order; another seed gives another sample."""
    assert make_prompts(50, seed=3, split="train") == make_prompts(50, seed=3, split="train")
    assert make_prompts(50, seed=3, split="train") != make_prompts(50, seed=4, split="train")


def test_records_have_stable_ids_prompt_and_answer():
    """Each record is {"id": "add-a-b", "prompt": "a+b=", "answer": str(a+b)}, ids unique (no replacement)."""
    records = make_prompts(500, seed=0, split="train")
    assert len({r["id"] for r in records}) == 500
    for r in records:
        a, b = (int(x) for x in r["prompt"].rstrip("=").split("+"))
        assert r == {"id": f"add-{a}-{b}", "prompt": f"{a}+{b}=", "answer": str(a + b)}


def test_too_many_prompts_raises_naming_the_max():
    """n above the split size raises ValueError naming the maximum instead of sampling with replacement."""
    with pytest.raises(ValueError, match="1000"):
        make_prompts(1001, seed=0, split="heldout")
    with pytest.raises(ValueError, match="split"):
        make_prompts(1, seed=0, split="test")


def test_reward_on_text_completions():
    """1.0 iff the stripped completion equals the answer: surrounding whitespace is fine, a wrong sum is not."""
    prompts = ["12+34="] * 6
    completions = ["46", "46 ", " 46\n", "47", "4 6", ""]
    assert reward(prompts, completions, answer=["46"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_reward_on_conversational_completions():
    """A message-list completion is judged by its last message's content."""
    completions = [
        [{"role": "assistant", "content": "46 "}],
        [{"role": "assistant", "content": "47"}],
        [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "46"}],
    ]
    assert reward([[{"role": "user", "content": "12+34="}]] * 3, completions, answer=["46"] * 3) == [1.0, 0.0, 1.0]


def test_reward_marks_unverifiable_inputs_none_and_rejects_mismatches():
    """No completion or no reference answer gives None (a judging failure, not a 0); list length mismatch raises."""
    assert reward(["1+1="] * 3, [None, "2", "2"], answer=["2", None, 2]) == [None, None, 1.0]
    with pytest.raises(ValueError, match="one answer per completion"):
        reward(["1+1="] * 2, ["2", "2"], answer=["2"])


def test_reward_is_loadable_as_module_function():
    """The judge config `prefloop.tasks.addition:reward` resolves to this function."""
    module, name = "prefloop.tasks.addition:reward".split(":")
    assert getattr(importlib.import_module(module), name) is reward
