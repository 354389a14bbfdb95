"""Decontamination: what counts as a match (exact, n-gram overlap, near-duplicate), what does not, and the loop's
guarantee that no training prompt matching an eval prompt is ever drawn."""

from __future__ import annotations

import json

import pytest

from prefloop.config import ConfigError, from_dict
from prefloop.hygiene import Matcher, decontaminate, prompt_text
from prefloop.loop import LoopConfig, _decontaminate, _draw_prompts

HELDOUT = [
    "Explain how a rainbow forms after a summer storm, in words a child can follow, and keep it under five sentences.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the tallest mountain in Africa?"}],
    "12+34=",
]


def test_prompt_text_normalizes_case_punctuation_and_messages():
    assert prompt_text("  Hello,  WORLD!! ") == "hello world"
    assert prompt_text(HELDOUT[1]) == "be brief what is the tallest mountain in africa"


@pytest.mark.parametrize(("prompt", "reason"), [
    ("explain how a RAINBOW forms after a summer storm in words a child can follow and keep it under five sentences",
     "exact"),
    ([{"role": "user", "content": "be brief. What is the tallest mountain in Africa?"}], "exact"),
    # the reference's words with a new opening: most of its 13-grams are still there
    ("Please: explain how a rainbow forms after a summer storm, in words a child can follow, and keep it short.",
     "ngram13"),
    # one word changed two thirds in: a third of its 13-grams survive, over half of its 8-grams
    ("Explain how a rainbow forms after a summer storm, in words a child can follow, then keep it under five sentences.",
     "ngram8"),
    # one word changed in the middle: under half of either survives, and its 3-gram Jaccard is 0.73 < 0.8
    ("Explain how a rainbow forms after a winter storm, in words a child can follow, and keep it under five sentences.",
     None),
    ("12+35=", None),
    ("Describe how a volcano erupts, for a teenager, in three short paragraphs with a title.", None),
])
def test_what_matches_and_why(prompt, reason):
    assert Matcher().fit(HELDOUT).match(prompt) == reason


def test_near_duplicates_are_caught_by_minhash():
    """A long prompt with scattered one-word edits shares few 8-grams but most word 3-grams."""
    base = ("the committee reviewed the annual budget proposal for the city library and asked the director to "
            "explain why spending on new books had fallen while spending on computers and staff training had risen "
            "over the last three years")
    words = base.split()
    edited = " ".join("reviews" if w == "reviewed" else "town" if w == "city" else w for w in words)
    matcher = Matcher(ngram_threshold=0.9, near_threshold=0.6).fit([base])
    assert matcher.match(edited) == "near_duplicate"
    assert Matcher(ngram_threshold=0.9, near_threshold=0.6).fit(["an unrelated sentence about cats and the moon "
                                                                  "and nothing else at all here"]).match(edited) is None


def test_decontaminate_counts_and_keeps_order():
    pool = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(["12+34=", "40+2=", "12+35=", HELDOUT[0]])]
    kept, info = decontaminate(pool, HELDOUT)
    assert [r["id"] for r in kept] == ["p1", "p2"]
    assert info == {"removed": 2, "by_reason": {"exact": 2}, "example_ids": ["p0", "p3"]}


def write(path, prompts):
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return str(path)


def test_the_loop_never_draws_an_eval_or_benchmark_prompt(tmp_path):
    """A pool that contains every eval prompt and a benchmark's prompts: after decontamination no draw of any
    round holds one of them, and the counts are what was planted."""
    train = [f"{a}+{b}=" for a in range(30) for b in range(10)]
    evals, bench = train[:25], train[100:110]
    config = from_dict(LoopConfig, {
        "out": str(tmp_path / "run"), "model": "m", "prompts": write(tmp_path / "train.jsonl", train),
        "eval_prompts": write(tmp_path / "eval.jsonl", evals),
        "judge": {"judge": "python", "reward_fn": "prefloop.addition:reward"},
        "decontaminate": {"benchmarks": [write(tmp_path / "bench.jsonl", bench)]}})
    from prefloop.records import load_prompts

    pool, info = _decontaminate(config, load_prompts(config.prompts).records)
    assert info["removed"] == 35 and info["by_reason"] == {"exact": 35} and info["kept"] == 265
    banned = {prompt_text(p) for p in evals + bench}
    for k in range(1, 20):
        assert not banned & {prompt_text(r["prompt"]) for r in _draw_prompts(pool, 50, 0, k)}
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(LoopConfig, {"out": "o", "model": "m", "prompts": "p", "decontaminate": {"ngram": 0.5},
                               "judge": {"judge": "python", "reward_fn": "prefloop.addition:reward"}})
