"""Judge statistics: how far a run's labels can be trusted, computed from a judgments file.

Pairwise (per comparison, each asked in both orders):
- `agreement_rate`: of the comparisons where both orders gave a verdict, the share where they agree (a label).
- `first_position_win_rate`: of all single-order verdicts, the share that picked the first slot. An unbiased
  judge sits near 50%; a judge that always picks the first slot reads 100% (and agrees 0% of the time).
- `tie_rate`: share of comparisons whose orders disagree.
- `parse_error_rate`, `refusal_rate`, `error_rate`: share of comparisons lost to each failure.
Scores (pointwise, reward model, python): the same failure rates per completion, and `tie_rate` = share of prompts
whose scored completions all got the same score (nothing to learn from them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

FAILURES = ("parse_error", "refusal", "error")


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def judge_stats(judgments: Iterable[dict[str, Any]], first_label: str = "A") -> dict[str, Any]:
    comparisons: Counter[str] = Counter()
    verdicts = first = 0
    p_sources: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    prompts = spread_less = 0
    pairwise = False
    for row in judgments:
        if row.get("comparisons") is not None:
            pairwise = True
            for c in row["comparisons"]:
                comparisons[c["status"]] += 1
                for v in c.get("verdicts") or []:
                    if v is not None:
                        verdicts += 1
                        # Order 1 shows a first, order 2 shows b first: a verdict for slot 1 is a first-slot win.
                        first += v == first_label
                if c.get("p_source"):
                    p_sources[c["p_source"]] += 1
            continue
        statuses.update(row.get("statuses") or [])
        scored = [s for s, st in zip(row["scores"], row.get("statuses") or [], strict=False)
                  if s is not None and st == "ok"]
        if len(scored) >= 2:
            prompts += 1
            spread_less += len(set(scored)) == 1
    if pairwise:
        total = sum(comparisons.values())
        both = comparisons["ok"] + comparisons["tie"]
        return {
            "mode": "pairwise", "comparisons": total, "labels": comparisons["ok"], "ties": comparisons["tie"],
            "agreement_rate": _rate(comparisons["ok"], both),
            "first_position_win_rate": _rate(first, verdicts),
            "tie_rate": _rate(comparisons["tie"], total),
            **{f"{f}_rate": _rate(comparisons[f], total) for f in FAILURES},
            "p_source": dict(p_sources),
            "comparison_statuses": dict(comparisons),  # incl. low_confidence, verifier_rejected (constitutional)
        }
    total = sum(statuses.values())
    return {
        "mode": "scores", "completions": total, "scored": statuses["ok"],
        "tie_rate": _rate(spread_less, prompts),
        **{f"{f}_rate": _rate(statuses[f], total) for f in FAILURES},
    }
