"""`prefloop judge-eval`: how far a judge agrees with labels you trust, on the same answers.

    prefloop judge-eval --judgments llm.jsonl --gold verifier.jsonl --out llm-vs-verifier.json
    prefloop judge-eval --judgments rm.jsonl --gold human_pairs.jsonl --out rm-vs-human.json

`--judgments` is any judge's output (`prefloop judge`: scores, or pairwise comparisons). `--gold` is either
- another judgments file on the same candidates (a verifier, a stronger judge, human scores): every two answers of
  a prompt whose gold scores differ are one labelled comparison; or
- a pairs file (`prompt`, `chosen`, `rejected`, by prompt id or by text): each row is one labelled comparison of two
  answers the judged file also holds.

For each labelled comparison the judge either prefers an answer (from its scores, or from its decided match between
the two), ties (equal scores, or orders that disagree), or has no verdict (a failed judgment, or no match between
those two in its bracket). Reported, with 95% intervals (Wilson for rates, a seeded bootstrap over prompts for κ):
- `accuracy`: of the comparisons the judge decided, the share where it prefers the gold winner;
- `cohens_kappa`: agreement beyond chance between the judge's and gold's label (orientation: the lower index);
- `tie_rate`, `no_verdict_rate`: shares of all labelled comparisons;
- `first_position_win_rate` (pairwise judges): how often a single order picked the slot shown first;
- `length_bias`: of decided comparisons whose answers differ in length, how often the judge picks the longer one,
  next to how often gold does (a judge that favours length sits above gold).

An ensemble's judgments (`--judge ensemble`) carry each member's scores: the report adds `members`, the same
numbers for each member on the same labelled comparisons, and `ensemble_agreement`, the share of prompts on which
the members share a best and a worst answer.

Failure semantics: both files are validated whole (`InputError` naming file:line); nothing to compare (no prompt in
common, or gold never separates two answers) is `StageFailed`; the report is written atomically.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from prefloop.config import field
from prefloop.errors import StageFailed
from prefloop.judge.pairs import load_judgments
from prefloop.judge.stats import judge_stats
from prefloop.store import InputError, atomic_write_json, iter_records

Z95 = 1.959964


@dataclass
class JudgeEvalConfig:
    judgments: str = field(help="The judge's judgments JSONL (`prefloop judge`).")
    gold: str = field(help="Trusted labels: a judgments JSONL on the same candidates, or a pairs JSONL.")
    out: str = field(help="Report JSON to write.", hash=False)
    seed: int = field(0, help="Seed of the bootstrap.")
    bootstrap: int = field(1000, help="Bootstrap resamples for the interval of Cohen's kappa.")


def wilson(k: int, n: int) -> list[float] | None:
    """95% Wilson score interval of k successes in n trials."""
    if n == 0:
        return None
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return [round(max(centre - half, 0.0), 4), round(min(centre + half, 1.0), 4)]


def kappa(pairs: list[tuple[int, int]]) -> float | None:
    """Cohen's kappa of two binary raters; `pairs` holds (judge label, gold label) per decided comparison."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    p_judge, p_gold = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    expected = p_judge * p_gold + (1 - p_judge) * (1 - p_gold)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def gold_comparisons(path: Path, judged: dict[str, dict]) -> list[tuple[str, int, int]]:
    """(prompt id, winner index, loser index) per labelled comparison, indices into the judged row's completions."""
    out = []
    for lineno, row in iter_records(path):
        if "scores" in row and "completions" in row:
            mine = judged.get(row["id"])
            if mine is None:
                continue
            texts = [c["text"] for c in mine["completions"]]
            if [c["text"] for c in row["completions"]] != texts[:len(row["completions"])]:
                raise InputError(f"{path}:{lineno}: prompt {row['id']!r} has other answers than the judged file. Fix: "
                                 "judge the same candidates file with both judges.")
            s = row["scores"]
            for a, b in combinations(range(len(s)), 2):
                if s[a] is not None and s[b] is not None and s[a] != s[b]:
                    out.append((row["id"], a, b) if s[a] > s[b] else (row["id"], b, a))
        elif {"prompt", "chosen", "rejected"} <= set(row):
            mine = judged.get(row.get("id", "").split(":")[0]) or _by_prompt(judged, row["prompt"])
            if mine is None:
                continue
            texts = [c["text"] for c in mine["completions"]]
            chosen, rejected = _text(row["chosen"]), _text(row["rejected"])
            if chosen in texts and rejected in texts:
                out.append((mine["id"], texts.index(chosen), texts.index(rejected)))
        else:
            raise InputError(f"{path}:{lineno}: neither a judgment (id, completions, scores) nor a pair (prompt, chosen, "
                             "rejected). Fix: pass a file written by `prefloop judge` or `prefloop pairs`.")
    return out


def _text(answer: Any) -> str:
    return answer if isinstance(answer, str) else answer[-1]["content"]


def _by_prompt(judged: dict[str, dict], prompt: Any) -> dict | None:
    key = json.dumps(prompt, sort_keys=True)
    return next((r for r in judged.values() if json.dumps(r["prompt"], sort_keys=True) == key), None)


def verdict(row: dict, a: int, b: int) -> str:
    """The judge's view of answers a and b of `row`: "a", "b", "tie" or "none"."""
    if row.get("comparisons") is not None:
        for c in row["comparisons"]:
            if {c.get("a"), c.get("b")} == {a, b}:
                if c["status"] == "ok":
                    return "a" if c["winner"] == a else "b"
                return "tie" if c["status"] in ("tie", "low_confidence") else "none"
        return "none"
    sa, sb = row["scores"][a], row["scores"][b]
    if sa is None or sb is None:
        return "none"
    return "tie" if sa == sb else "a" if sa > sb else "b"


def evaluate(judged: list[dict], comparisons: list[tuple[str, int, int]], seed: int = 0, bootstrap: int = 1000):
    rows = {r["id"]: r for r in judged}
    decided, per_prompt, ties, none, longer_judge, longer_gold, differ = [], {}, 0, 0, 0, 0, 0
    for rid, win, lose in comparisons:
        v = verdict(rows[rid], win, lose)
        if v in ("tie", "none"):
            ties += v == "tie"
            none += v == "none"
            continue
        picked, other = (win, lose) if v == "a" else (lose, win)
        # Orientation for kappa: label 1 when the lower index is preferred.
        low = min(win, lose)
        decided.append((int(picked == low), int(win == low)))
        per_prompt.setdefault(rid, []).append(decided[-1])
        texts = [c["text"] for c in rows[rid]["completions"]]
        if len(texts[win]) != len(texts[lose]):
            differ += 1
            longer_judge += len(texts[picked]) > len(texts[other])
            longer_gold += len(texts[win]) > len(texts[lose])
    n, right = len(decided), sum(a == b for a, b in decided)
    boot = []
    rng, prompts = random.Random(seed), list(per_prompt)
    for _ in range(bootstrap if prompts else 0):
        sample = [p for _ in prompts for p in per_prompt[rng.choice(prompts)]]
        k = kappa(sample)
        if k is not None:
            boot.append(k)
    boot.sort()
    total = len(comparisons)
    stats = judge_stats(judged)
    return {
        "labelled_comparisons": total, "decided": n, "accuracy": round(right / n, 4) if n else None,
        "accuracy_ci95": wilson(right, n), "cohens_kappa": None if n == 0 else round(kappa(decided), 4),
        "cohens_kappa_ci95": [round(boot[int(0.025 * len(boot))], 4), round(boot[int(0.975 * len(boot)) - 1], 4)]
        if boot else None,
        "tie_rate": round(ties / total, 4) if total else None, "tie_rate_ci95": wilson(ties, total),
        "no_verdict_rate": round(none / total, 4) if total else None,
        "first_position_win_rate": stats.get("first_position_win_rate"),
        "length_bias": {"decided_with_length_difference": differ,
                        "judge_picks_longer": round(longer_judge / differ, 4) if differ else None,
                        "judge_picks_longer_ci95": wilson(longer_judge, differ),
                        "gold_picks_longer": round(longer_gold / differ, 4) if differ else None},
    }


def ensemble_report(judged: list[dict], comparisons: list[tuple[str, int, int]], seed: int, bootstrap: int) -> dict:
    """Each ensemble member scored like the ensemble, from the member scores its records keep (judge/ensemble.py)."""
    members = []
    for m, first in enumerate(judged[0]["ensemble"]["members"]):
        rows = [{"id": r["id"], "completions": r["completions"],
                 **{k: v for k, v in r["ensemble"]["members"][m].items() if k != "judge"}} for r in judged]
        members.append({"judge": first["judge"], **evaluate(rows, comparisons, seed, bootstrap)})
    decided = [r["ensemble"]["agree"] for r in judged if r["ensemble"].get("agree") is not None]
    return {"members": members, "ensemble_agreement": round(sum(decided) / len(decided), 4) if decided else None}


def run(config: JudgeEvalConfig) -> Path:
    judged = load_judgments(config.judgments)
    comparisons = gold_comparisons(Path(config.gold), {r["id"]: r for r in judged})
    if not comparisons:
        raise StageFailed(f"{config.gold}: no labelled comparison on the answers of {config.judgments} (no prompt in "
                          "common, or gold never prefers one answer to another). Fix: judge the same candidates file "
                          "with the gold judge, or pass gold pairs whose answers the judged file holds.")
    report = {"judgments": config.judgments, "gold": config.gold,
              **evaluate(judged, comparisons, config.seed, config.bootstrap)}
    if judged and all("ensemble" in r for r in judged):
        report.update(ensemble_report(judged, comparisons, config.seed, config.bootstrap))
    atomic_write_json(Path(config.out), report)
    ci = report["accuracy_ci95"] or ["–", "–"]
    print(f"judge-eval: {report['decided']} of {report['labelled_comparisons']} comparisons decided; accuracy "
          f"{report['accuracy']} [{ci[0]}, {ci[1]}], kappa {report['cohens_kappa']}, ties {report['tie_rate']}, "
          f"no verdict {report['no_verdict_rate']} -> {config.out}")
    for i, m in enumerate(report.get("members", [])):
        print(f"  member {i} ({m['judge']}): {m['decided']} decided; accuracy {m['accuracy']}, kappa {m['cohens_kappa']}")
    return Path(config.out)
