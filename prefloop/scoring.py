"""How the loop scores a round: the held-out answers (accuracy or mean score; a pairwise judge's win rate against
round 0's answers), and the round's judge against a judge you trust (`gold_judge`, through `prefloop judge-eval`);
and what a round spends whatever its size (`fixed_costs`). `config` is a `LoopConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefloop.config import from_dict
from prefloop.errors import StageFailed
from prefloop.judge.stage import JudgeConfig
from prefloop.judge.stage import run as judge
from prefloop.store import atomic_write, dumps, iter_records


def mean_length(candidates: Path) -> float:
    lengths = [len(c["text"]) for _, row in iter_records(candidates) for c in row["completions"]]
    return round(sum(lengths) / max(len(lengths), 1), 3)


def eval_summary(judgments: Path) -> dict[str, Any]:
    """Mean held-out score; accuracy too when the judge's scores are binary (a verifier)."""
    scores, lengths, failed = [], [], 0
    for _, row in iter_records(judgments):
        for score, completion in zip(row["scores"], row["completions"], strict=True):
            lengths.append(len(completion["text"]))
            if score is None:
                failed += 1
            else:
                scores.append(score)
    summary: dict[str, Any] = {
        "prompts": len(lengths), "scored": len(scores), "failed": failed,
        "mean_score": round(sum(scores) / max(len(scores), 1), 4),
        "mean_length": round(sum(lengths) / max(len(lengths), 1), 3),
    }
    if scores and set(scores) <= {0.0, 1.0}:
        # Failed judgments count as wrong: accuracy is over every held-out answer, not only the scored ones.
        summary["accuracy"] = round(sum(scores) / len(lengths), 4)
    return summary


def pairwise_eval(config: Any, judge_cfg: Any, k: int, candidates: Path, round_dir: Path):
    """A pairwise judge has no scores: policy k's held-out answer is judged against round 0's, in both orders.

    Round 0 only writes the baseline answers. `win_rate_vs_base` is over every held-out prompt: identical answers
    (`same`), an empty answer on either side (`empty`), ties (the orders disagree) and failed matches count as
    not won, so it is a lower bound; `tie_rate`,
    `same` and `failed` say how much is undecided.
    """
    summary: dict[str, Any] = {"mean_length": mean_length(candidates)}
    if k == 0:
        return candidates, {**summary, "prompts": sum(1 for _ in iter_records(candidates))}
    base = {row["id"]: row for _, row in iter_records(Path(config.out) / "round_000" / "eval_candidates.jsonl")}
    versus = round_dir / "eval_vs_base_candidates.jsonl"
    rows = [{"id": row["id"], "prompt": row["prompt"],
             "completions": [row["completions"][0], base[row["id"]]["completions"][0]]}
            for _, row in iter_records(candidates) if row["id"] in base]
    atomic_write(versus, "".join(dumps(r) for r in rows))
    judge_cfg.candidates, judge_cfg.out = str(versus), str(round_dir / "eval_judgments.jsonl")
    judgments = judge(judge_cfg)
    outcomes = {"won": 0, "lost": 0, "tie": 0, "failed": 0, "same": 0, "empty": 0}
    for _, row in iter_records(judgments):
        texts = [c["text"] for c in row["completions"]]
        if texts[0] == texts[1] or not all(t.strip() for t in texts):  # nothing to compare: not a match
            outcomes["same" if texts[0] == texts[1] else "empty"] += 1
        for c in row["comparisons"]:
            if c["status"] == "tie":
                outcomes["tie"] += 1
            elif c["status"] != "ok":
                outcomes["failed"] += 1
            else:
                outcomes["won" if c["winner"] == 0 else "lost"] += 1
    matches = max(sum(outcomes.values()), 1)
    return judgments, {**summary, "prompts": len(rows), **outcomes,
                       "win_rate_vs_base": round(outcomes["won"] / matches, 4),
                       "tie_rate": round(outcomes["tie"] / matches, 4)}


def judge_vs_gold(config: Any, k: int, judgments: Path) -> dict[str, Any]:
    """The round's judge scored against `gold_judge` on the same candidates (judge/evaluate.py); a gold judge that
    never separates two answers is recorded, not a failed round (the judge's labels are still what trains)."""
    from prefloop.judge.evaluate import JudgeEvalConfig
    from prefloop.judge.evaluate import run as judge_eval

    d = judgments.parent
    gold = judge(from_dict(JudgeConfig, {"candidates": str(d / "candidates.jsonl"), "out": str(d / "gold_judgments.jsonl"),
                                         **config.gold_judge}, f"loop config `gold_judge` (round {k})"))
    try:
        report = json.loads(judge_eval(JudgeEvalConfig(judgments=str(judgments), gold=str(gold),
                                                       out=str(d / "judge_eval.json"))).read_text())
    except StageFailed as e:
        return {"error": str(e)}
    keys = ("labelled_comparisons", "decided", "accuracy", "accuracy_ci95", "cohens_kappa", "tie_rate",
            "no_verdict_rate", "first_position_win_rate", "length_bias")
    return {key: report.get(key) for key in keys}


# A round's fixed costs, from its phases' summaries: what it spends whatever the number of prompts.
FIXED_COSTS = (("generate", "load_s"), ("judge", "load_s"), ("train", "setup_s"), ("train", "save_s"),
               ("eval", "load_s"))


def fixed_costs(rnd: dict[str, Any]) -> dict[str, float]:
    """Seconds per fixed cost of a round (model and engine loads, the trainer's setup and the adapter's save) and
    their `total`; a phase that was resumed as done in an earlier process counts what it recorded then."""
    costs = {}
    for name, key in FIXED_COSTS:
        value = ((rnd.get("phases", {}).get(name) or {}).get("summary") or {}).get(key)
        if value is not None:
            costs[f"{name}.{key}"] = value
    return {**costs, "total": round(sum(costs.values()), 3)}
