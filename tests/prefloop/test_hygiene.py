"""Decontamination: what counts as a match (exact, n-gram overlap, near-duplicate), what does not, and the loop's
guarantee that no training prompt matching an eval prompt is ever drawn."""

from __future__ import annotations

import json

import pytest

from prefloop.config import ConfigError, from_dict
from prefloop.hygiene import Matcher, decontaminate, prompt_text
from prefloop.loop import LoopConfig
from prefloop.pool import decontaminate_pool, draw_prompts

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
        "judge": {"judge": "python", "reward_fn": "prefloop.tasks.addition:reward"},
        "decontaminate": {"benchmarks": [write(tmp_path / "bench.jsonl", bench)]}})
    from prefloop.records import load_prompts

    pool, info = decontaminate_pool(config, load_prompts(config.prompts).records)
    assert info["removed"] == 35 and info["by_reason"] == {"exact": 35} and info["kept"] == 265
    banned = {prompt_text(p) for p in evals + bench}
    for k in range(1, 20):
        assert not banned & {prompt_text(r["prompt"]) for r in draw_prompts(pool, 50, 0, k)}
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(LoopConfig, {"out": "o", "model": "m", "prompts": "p", "decontaminate": {"ngram": 0.5},
                               "judge": {"judge": "python", "reward_fn": "prefloop.tasks.addition:reward"}})


# -- deduplication ------------------------------------------------------------------------------------------------


def jaccard(a: str, b: str) -> float:
    from prefloop.hygiene import shingles

    x, y = shingles(prompt_text(a)), shingles(prompt_text(b))
    return len(x & y) / len(x | y)


def test_near_duplicates_equal_a_brute_force_jaccard_scan():
    """Planted repeats (exact after normalization, and one- or two-word edits of 40-word texts, Jaccard > 0.85) and
    unrelated texts (Jaccard < 0.3): the flagged set and what each points at equal an all-pairs exact-Jaccard scan."""
    import random

    from prefloop.hygiene import near_duplicates

    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(400)]
    originals = [" ".join(rng.choices(vocabulary, k=40)) for _ in range(30)]
    items = list(originals)
    for i in range(0, 30, 3):  # a repeat of every third original: exact (other case/punctuation) or edited
        words = originals[i].split()
        if i % 2:
            items.append(originals[i].upper() + "!")
        else:
            words[20] = "edited"
            items.append(" ".join(words))
    rng.shuffle(items)
    expected = {}
    for i, text in enumerate(items):
        earlier = [j for j in range(i) if j not in expected and jaccard(items[j], text) >= 0.8]
        if earlier:
            expected[i] = earlier[0]
    assert len(expected) == 10  # the planted repeats, each pointing at its original
    assert all(jaccard(items[i], items[j]) < 0.3 or i in expected or j in expected
               for i in range(len(items)) for j in range(i))  # the unrelated texts are far apart
    got = near_duplicates(items, 0.8)
    assert {i: j for i, (j, _) in got.items()} == expected
    assert sorted(reason for _, reason in got.values()) == ["exact"] * 5 + ["near_duplicate"] * 5


def loop_config(tmp_path, prompts, **settings):
    return from_dict(LoopConfig, {
        "out": str(tmp_path / "run"), "model": "m", "prompts": write(tmp_path / "train.jsonl", prompts),
        "judge": {"judge": "python", "reward_fn": "prefloop.tasks.addition:reward"}, **settings})


def test_the_pool_loses_its_repeats_only_when_asked(tmp_path):
    from prefloop.pool import dedup_pool
    from prefloop.records import load_prompts

    base = "Write a short poem about the sea at night, with a title, in four lines that rhyme"
    prompts = [base, base.replace("four", "six"), base + ".", "What is the capital of France?"]
    off = loop_config(tmp_path, prompts)
    pool = load_prompts(off.prompts).records
    assert dedup_pool(off, pool) == (pool, None)  # off by default: "four" vs "six" lines are different tasks
    on = loop_config(tmp_path, prompts, dedup={"near_threshold": 0.6})
    kept, info = dedup_pool(on, pool)
    assert jaccard(prompts[0], prompts[1]) >= 0.6  # so the "six" version goes, by the measure the option names
    assert [r["prompt"] for r in kept] == [prompts[0], prompts[3]]
    assert info["by_reason"] == {"near_duplicate": 1, "exact": 1} and info["kept"] == 2 and info["pool"] == 4
    with pytest.raises(ConfigError, match="near_threshold"):
        loop_config(tmp_path, prompts, dedup={"near_threshold": 1.5})


@pytest.mark.parametrize("fresh", [False, True])
def test_rounds_draw_fresh_prompts_when_asked_and_count_repeats(tmp_path, fresh):
    from prefloop.pool import draw_round
    from prefloop.records import load_prompts
    from prefloop.store import iter_records

    config = loop_config(tmp_path, [f"{a}+{a}=" for a in range(40)], prompts_per_round=16,
                         dedup={"fresh_prompts": fresh})
    pool = load_prompts(config.prompts).records
    drawn: set[str] = set()
    for k in (1, 2, 3):
        d = tmp_path / "run" / f"round_{k:03d}"
        d.mkdir(parents=True)
        path, summary = draw_round(config, pool, k, d)
        ids = [row["id"] for _, row in iter_records(path)]
        assert summary == {"prompts": 16, "repeated_prompts": len(drawn & set(ids))}
        if fresh and k < 3:
            assert not drawn & set(ids)
        drawn |= set(ids)
    assert len(drawn) == 40 or not fresh  # round 3 takes the 8 unused left, then 8 drawn again
