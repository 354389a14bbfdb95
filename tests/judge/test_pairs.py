"""Pair selection: strategies, every drop reason counted, seeded tie-breaking, and real TRL compatibility."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from prefloop.config import ConfigError
from prefloop.judge.pairs import PairsConfig, run, select_pairs, to_trl
from prefloop.runstate import read_summary


def judgment(
    scores: list, texts: list[str] | None = None, prompt="2+2=", rid: str = "p", finish: list[str] | None = None
) -> dict:
    """One judgments record (as `prefloop judge` writes it); a None score is a failed judgment."""
    texts = texts if texts is not None else [f"answer {i}" for i in range(len(scores))]
    finish = finish or ["stop"] * len(scores)
    return {
        "id": rid,
        "prompt": prompt,
        "completions": [
            {"text": t, "finish_reason": f, "num_tokens": len(t)} for t, f in zip(texts, finish, strict=True)
        ],
        "judge": "python:rewards.py:fn",
        "scores": scores,
        "statuses": ["ok" if s is not None else "error" for s in scores],
        "errors": [None if s is not None else "reward function returned None" for s in scores],
        "status": "ok",
        "round": 0,
        "config_hash": "0123456789ab",
    }


def pick(j: dict, strategy: str = "best_worst", min_margin: float = 0.0, seed: int | str = 0, **kw):
    drops: Counter = Counter()
    pairs = select_pairs(j, strategy, min_margin, random.Random(seed), drops, **kw)
    return [(c[0], r[0]) for c, r in pairs], drops


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_best_worst_picks_max_vs_min():
    """best_worst pairs the highest-scored completion (chosen) with the lowest (rejected)."""
    pairs, drops = pick(judgment([0.5, 2.0, -1.0, 1.0]))
    assert pairs == [(1, 2)]
    assert not drops


def test_ties_are_dropped_and_counted():
    """A prompt whose usable scores are all equal yields no pair and counts one "tie"."""
    pairs, drops = pick(judgment([1.0, 1.0, 1.0]))
    assert pairs == [] and drops == Counter(tie=1)


def test_identical_texts_are_counted():
    """A repeated completion text is dropped as "identical" and never paired with itself."""
    pairs, drops = pick(judgment([1.0, 0.0, 0.0], texts=["4", "5", "4"]))
    assert pairs == [(0, 1)]
    assert drops == Counter(identical=1)
    pairs, drops = pick(judgment([1.0, 0.0], texts=["4", "4"]))
    assert pairs == [] and drops["identical"] == 1 and drops["too_few_usable"] == 1


def test_empty_and_truncated_are_dropped_and_counted():
    """Empty (or whitespace) and truncated (finish_reason "length") completions are dropped and counted."""
    j = judgment([5.0, 4.0, 1.0, 0.0], texts=["  ", "long", "good", "bad"], finish=["stop", "length", "stop", "stop"])
    pairs, drops = pick(j)
    assert pairs == [(2, 3)]
    assert drops == Counter(empty=1, truncated=1)
    pairs, _ = pick(j, keep_truncated=True)
    assert pairs == [(1, 3)]


def test_truncated_answers_may_be_rejected_but_never_chosen():
    """truncated_rejected: a cut-off answer is the rejected one when it scores lower (or even higher) than a finished
    answer, never the chosen one; a prompt whose only better answers are cut off gives no pair."""
    j = judgment(
        [3.0, 2.0, 0.0, 1.0],
        texts=["cut best", "good", "cut worst", "ok"],
        finish=["length", "stop", "length", "stop"],
    )
    pairs, drops = pick(j, keep_truncated="rejected")
    assert pairs == [(1, 2)] and not drops  # chosen: the best finished answer; rejected: the worst, cut off
    pairs, _ = pick(j, strategy="all_above_margin", keep_truncated="rejected")
    assert sorted(pairs) == [(1, 2), (1, 3), (3, 2)]
    only_cut_better = judgment([2.0, 1.0], texts=["cut", "done"], finish=["length", "stop"])
    assert pick(only_cut_better, keep_truncated="rejected")[0] == []
    all_cut = judgment([2.0, 1.0], texts=["a", "b"], finish=["length", "length"])
    assert pick(all_cut, keep_truncated="rejected") == ([], Counter(only_truncated=1))
    with pytest.raises(ConfigError, match="choose one"):
        PairsConfig(judgments="j.jsonl", out="p.jsonl", keep_truncated=True, truncated_rejected=True)


def test_shortest_within_prefers_the_shorter_of_near_best_answers():
    """Meta-Rewarding's length control: among answers within `shortest_within` of the best score, the shortest is
    chosen; the rejected answer is still the worst."""
    j = judgment([1.0, 0.9, 0.2, 0.95], texts=["a long long answer", "short", "bad", "medium one"])
    assert pick(j)[0] == [(0, 2)]
    assert pick(j, shortest_within=0.1)[0] == [(1, 2)]
    assert pick(j, shortest_within=0.06)[0] == [(3, 2)]  # 0.9 is out of reach
    assert pick(j, shortest_within=0.0)[0] == [(0, 2)]


def test_max_length_ratio_drops_pairs_and_the_summary_measures_length_bias(tmp_path, caplog):
    rows = [judgment([1.0, 0.0], texts=["x" * (10 + i), "y" * 5], rid=f"p{i}") for i in range(25)]
    rows.append(judgment([1.0, 0.0], texts=["ok", "a much longer wrong answer"], rid="short"))
    path = write_jsonl(tmp_path / "j.jsonl", rows)
    run(PairsConfig(judgments=str(path), out=str(tmp_path / "p.jsonl")))
    summary = read_summary(tmp_path / "p.jsonl")
    assert summary["chosen_longer_share"] == round(25 / 26, 4)
    assert "chosen answer is the longer one in 25 of 26 pairs" in caplog.text
    run(PairsConfig(judgments=str(path), out=str(tmp_path / "q.jsonl"), max_length_ratio=3.0))
    summary = read_summary(tmp_path / "q.jsonl")
    assert summary["pairs"] == 1 + 6 and summary["drops"] == {"length_ratio": 19}  # 10..14 chars vs 5 are <= 3x


def test_min_chosen_score_keeps_only_pairs_whose_chosen_answer_passes(tmp_path):
    """Partial credit (the fraction of constraints met): with min_chosen_score 1.0 only a prompt whose best answer
    meets every constraint gives a pair; all_above_margin keeps every pair whose chosen answer passes; pairwise
    judgments (no scores) are refused before anything is written."""
    rows = [judgment([0.5, 0.0, 0.5], rid="half"), judgment([1.0, 0.5, 0.0], rid="full"),
            judgment([0.7 + 0.2 + 0.1, 0.0], rid="float")]  # 0.999...: 1.0 up to float rounding
    path = write_jsonl(tmp_path / "j.jsonl", rows)
    out = run(PairsConfig(judgments=str(path), out=str(tmp_path / "p.jsonl"), min_chosen_score=1.0))
    assert [r["id"] for r in map(json.loads, out.read_text().splitlines())] == ["full", "float"]
    assert read_summary(out)["drops"] == {"chosen_below_min_score": 1}
    out = run(PairsConfig(judgments=str(path), out=str(tmp_path / "a.jsonl"), min_chosen_score=1.0,
                          strategy="all_above_margin"))
    assert [(r["score_chosen"], r["score_rejected"]) for r in map(json.loads, out.read_text().splitlines())] == [
        (1.0, 0.5), (1.0, 0.0), (pytest.approx(1.0), 0.0)]
    assert read_summary(out)["drops"] == {"chosen_below_min_score": 3}  # half's two 0.5 > 0.0, full's 0.5 > 0.0
    pairwise = dict(judgment([None, None], rid="m"), comparisons=[])
    with pytest.raises(ConfigError, match="min_chosen_score needs scored judgments"):
        run(PairsConfig(judgments=str(write_jsonl(tmp_path / "m.jsonl", [pairwise])), out=str(tmp_path / "m.out"),
                        min_chosen_score=1.0))
    assert not (tmp_path / "m.out").exists()
    with pytest.raises(ConfigError, match="min_chosen_score = nan"):
        PairsConfig(judgments="j", out="o", min_chosen_score=float("nan"))


def test_judge_failures_never_enter_a_pair():
    """A completion with a None score (or a non-ok status) is never chosen or rejected; it is counted."""
    pairs, drops = pick(judgment([None, 1.0, None, 0.0]))
    assert pairs == [(1, 3)] and drops["judge_failed"] == 2
    j = judgment([9.0, 1.0, 0.0])
    j["statuses"][0] = "parse_error"  # a score with a failed status is still a failure
    pairs, drops = pick(j)
    assert pairs == [(1, 2)] and drops["judge_failed"] == 1
    pairs, drops = pick(judgment([None, None, 1.0]))
    assert pairs == [] and drops == Counter(judge_failed=2, too_few_usable=1)


def test_min_margin_drops_close_pairs():
    """A pair whose score gap is below min_margin is dropped and counted; at or above it is kept."""
    pairs, drops = pick(judgment([1.0, 0.6]), min_margin=0.5)
    assert pairs == [] and drops == Counter(below_margin=1)
    pairs, _ = pick(judgment([1.0, 0.5]), min_margin=0.5)
    assert pairs == [(0, 1)]


def test_min_margin_is_inclusive_despite_float_rounding():
    """A gap equal to min_margin in decimal (0.3 - 0.1 vs 0.2) is kept: "below" must not hinge on float rounding."""
    pairs, drops = pick(judgment([0.3, 0.1]), min_margin=0.2)
    assert pairs == [(0, 1)], drops


def test_best_random_only_rejects_lower_scores():
    """best_random takes a best completion and a random rejected with a strictly lower score, over many seeds."""
    j = judgment([3.0, 3.0, 1.0, 2.0, 0.0])
    rejected_seen = set()
    for seed in range(60):
        pairs, _ = pick(j, strategy="best_random", seed=seed)
        ((chosen, rejected),) = pairs
        assert j["scores"][chosen] == 3.0
        assert j["scores"][rejected] < 3.0
        rejected_seen.add(rejected)
    assert rejected_seen == {2, 3, 4}  # random, not always the worst


def test_all_above_margin_pairs_and_ids(tmp_path):
    """all_above_margin on scores [3, 2, 1] with min_margin 1 gives all 3 ordered pairs, each with a distinct id."""
    pairs, _ = pick(judgment([3.0, 2.0, 1.0]), strategy="all_above_margin", min_margin=1.0)
    assert sorted(pairs) == [(0, 1), (0, 2), (1, 2)]
    pairs, _ = pick(judgment([3.0, 2.0, 1.0]), strategy="all_above_margin", min_margin=1.5)
    assert pairs == [(0, 2)]

    src = write_jsonl(tmp_path / "j.jsonl", [judgment([3.0, 2.0, 1.0], rid="q")])
    out = run(
        PairsConfig(judgments=str(src), out=str(tmp_path / "pairs.jsonl"), strategy="all_above_margin", min_margin=1.0)
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    assert len({r["id"] for r in records}) == 3
    assert all(r["margin"] >= 1.0 and r["score_chosen"] > r["score_rejected"] for r in records)


def test_seeded_tie_breaking_is_deterministic_and_not_positional():
    """Ties among the best are broken by a seeded draw: the same seed gives the same pick, and picks vary by prompt."""
    chosen = []
    for k in range(40):
        j = judgment([1.0, 1.0, 1.0, 0.0], texts=["a", "b", "c", "d"], rid=f"prompt-{k}")
        first, _ = pick(j, seed=f"0:{j['id']}")  # how `run` seeds: config seed + prompt id
        again, _ = pick(j, seed=f"0:{j['id']}")
        assert first == again
        chosen.append(first[0][0])
    assert set(chosen) == {0, 1, 2}


def test_stage_tie_breaking_varies_across_prompts_and_repeats_exactly(tmp_path):
    """Through `run`, ties break per prompt id with the config seed: identical on re-run, not always position 0."""
    rows = [judgment([1.0, 1.0, 1.0, 0.0], texts=["a", "b", "c", "d"], rid=f"id-{k}") for k in range(30)]
    src = write_jsonl(tmp_path / "j.jsonl", rows)
    out1 = run(PairsConfig(judgments=str(src), out=str(tmp_path / "a" / "pairs.jsonl"), seed=7))
    out2 = run(PairsConfig(judgments=str(src), out=str(tmp_path / "b" / "pairs.jsonl"), seed=7))
    first = [json.loads(line) for line in out1.read_text().splitlines()]
    second = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["meta"]["chosen_index"] for r in first] == [r["meta"]["chosen_index"] for r in second]
    assert len({r["meta"]["chosen_index"] for r in first}) > 1


def test_standard_output_shape_matches_trl():
    """Text prompts give TRL's standard preference format: prompt, chosen and rejected are plain strings."""
    j = judgment([1.0, 0.0], texts=["4", "5"])
    (pair,) = select_pairs(j, "best_worst", 0.0, random.Random(0), Counter())
    record = to_trl(j, *pair, pair_id="p", meta={"judge": "x"})
    assert record == {
        "id": "p",
        "prompt": "2+2=",
        "chosen": "4",
        "rejected": "5",
        "score_chosen": 1.0,
        "score_rejected": 0.0,
        "margin": 1.0,
        "meta": {"judge": "x"},
    }


def test_conversational_output_shape_matches_trl():
    """Message prompts give TRL's conversational format: prompt messages, chosen/rejected one assistant message each."""
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+2="}]
    j = judgment([0.0, 1.0], texts=["5", "4"], prompt=messages)
    (pair,) = select_pairs(j, "best_worst", 0.0, random.Random(0), Counter())
    record = to_trl(j, *pair, pair_id="p", meta={})
    assert record["prompt"] == messages
    assert record["chosen"] == [{"role": "assistant", "content": "4"}]
    assert record["rejected"] == [{"role": "assistant", "content": "5"}]


def test_run_writes_pairs_and_summary_with_drop_counts(tmp_path):
    """`run` writes one pair per usable prompt, its resolved config, and a summary counting every drop reason."""
    rows = [
        judgment([1.0, 0.0], rid="good"),
        judgment([1.0, 1.0], rid="tie"),
        judgment([None, 1.0], rid="failed"),
        judgment([1.0, 0.0], texts=["", "x"], rid="empty"),
        judgment([1.0, 0.0], finish=["length", "stop"], rid="trunc"),
    ]
    src = write_jsonl(tmp_path / "j.jsonl", rows)
    out = run(PairsConfig(judgments=str(src), out=str(tmp_path / "pairs.jsonl"), round=2))
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["id"] == "good"
    assert record["meta"]["round"] == 2 and record["meta"]["strategy"] == "best_worst"
    assert record["meta"]["judge"] == "python:rewards.py:fn"
    assert len(record["meta"]["config_hash"]) == 12
    summary = read_summary(out)
    assert summary["status"] == "done" and summary["prompts"] == 5 and summary["pairs"] == 1
    assert summary["drops"] == {"empty": 1, "judge_failed": 1, "tie": 1, "too_few_usable": 3, "truncated": 1}
    assert (tmp_path / "pairs.config.yaml").exists()


def test_config_validation_names_the_fix():
    """An unknown strategy or negative margin is refused with a ConfigError."""
    with pytest.raises(ConfigError, match="best_worst"):
        PairsConfig(judgments="j", out="o", strategy="best_of_n")
    with pytest.raises(ConfigError, match="min_margin"):
        PairsConfig(judgments="j", out="o", min_margin=-1)


# --- TRL compatibility: the written file goes straight into datasets + DPOTrainer, no conversion -------------------


def _addition_judgments(conversational: bool) -> list[dict]:
    rows = []
    for i in range(4):
        prompt = f"{i}+{i}="
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
        rows.append(judgment([1.0, 0.0, 0.0], texts=[str(2 * i), str(2 * i + 1), "x"], prompt=prompt, rid=f"r{i}"))
    return rows


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_pairs_train_with_trl_dpo_trainer(tmp_path, tiny_model, conversational):
    """Pairs written by `run` load with `load_dataset("json")` and train one real DPOTrainer step (LoRA) unconverted."""
    import datasets
    import peft
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.data_utils import is_conversational

    src = write_jsonl(tmp_path / "judgments.jsonl", _addition_judgments(conversational))
    out = run(PairsConfig(judgments=str(src), out=str(tmp_path / "pairs.jsonl")))
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.num_rows == 4
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert is_conversational(ds[0]) is conversational

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices gain nothing from threads; a shared 2-core box stalls with them
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        args = trl.DPOConfig(
            output_dir=str(tmp_path / "dpo"),
            max_steps=1,
            per_device_train_batch_size=2,
            use_cpu=True,
            report_to="none",
            max_length=64,
            learning_rate=1e-2,
            save_strategy="no",
            logging_steps=1,
        )
        trainer = trl.DPOTrainer(
            model=model,
            args=args,
            train_dataset=ds,
            processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=4, target_modules="all-linear"),
        )
        lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b.values())
        result = trainer.train()
    finally:
        torch.set_num_threads(threads)

    assert result.global_step == 1
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n].detach(), before) for n, before in lora_b.items())  # the step really trained


def test_a_chosen_answer_repeated_across_prompts_is_counted_and_dropped_when_asked(tmp_path):
    """Prompt b's best answer is prompt a's, up to case and punctuation; prompt c's is a one-word edit of a's
    (word 3-gram Jaccard 13/17 = 0.76: the edit touches 2 of the 15 shingles); d's is its own. all_above_margin gives a's one chosen
    answer twice within its own prompt, which is no repeat."""
    template = "I am sorry but I cannot help with that request because it is against my rules today"
    rows = [judgment([2.0, 1.0, 0.0], [template, "meh", "no"], rid="a"),
            judgment([1.0, 0.0], [template.upper() + "!", "x"], rid="b"),
            judgment([1.0, 0.0], [template.replace("rules", "guidelines"), "y"], rid="c"),
            judgment([1.0, 0.0], ["Four.", "Five."], rid="d")]
    path = write_jsonl(tmp_path / "j.jsonl", rows)

    def pairs_of(name, **settings):
        out = run(PairsConfig(judgments=str(path), out=str(tmp_path / f"{name}.jsonl"), **settings))
        return [json.loads(line)["id"].split(":")[0] for line in out.read_text().splitlines()], read_summary(out)

    ids, summary = pairs_of("off", strategy="all_above_margin")
    assert ids == ["a", "a", "a", "b", "c", "d"] and summary["repeated_chosen"] == 1  # b's, exactly
    ids, summary = pairs_of("exact", strategy="all_above_margin", dedup_chosen=0.9)
    assert ids == ["a", "a", "a", "c", "d"] and summary["drops"]["repeated_chosen"] == 1
    ids, summary = pairs_of("near", strategy="all_above_margin", dedup_chosen=0.7)
    assert ids == ["a", "a", "a", "d"] and summary["drops"]["repeated_chosen"] == 2
