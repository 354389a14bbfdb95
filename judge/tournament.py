"""The knockout tournament that pairwise judges share: N answers, N-1 matches, one batch per bracket round.

A seeded bracket over a prompt's distinct non-empty answers (identical or empty answers cannot make a pair).
Each bracket round, the matches of every prompt in the chunk go to `play` together (one batch for the judge
model); a decided match advances its winner, a tie or failed match advances a seeded coin's pick and gives no
label, and an odd answer out has a bye. Every match is recorded as a comparison:

    {"round", "a", "b", "status": "ok"|"tie"|<failure>, "winner", "loser", "p_chosen", "verdicts", ...}
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

Match = tuple[int, int, int]  # (row, a, b): completion indices a and b of row
Play = Callable[[list[Match], int], list[dict[str, Any]]]


def entrants(completions: list[dict[str, Any]]) -> list[int]:
    """Indices of the distinct, non-empty answers, in order."""
    out, seen = [], set()
    for i, c in enumerate(completions):
        if c["text"].strip() and c["text"] not in seen:
            seen.add(c["text"])
            out.append(i)
    return out


def knockout(rows: list[dict[str, Any]], seed: int, play: Play) -> list[list[dict[str, Any]]]:
    """Every row's comparisons. `play(matches, bracket_round)` judges a batch of matches, one comparison each."""
    rngs = [random.Random(f"{seed}:{row['id']}") for row in rows]
    alive = []
    for row, rng in zip(rows, rngs, strict=True):
        players = entrants(row["completions"])
        rng.shuffle(players)
        alive.append(players)
    comparisons: list[list[dict[str, Any]]] = [[] for _ in rows]
    bracket_round = 0
    while any(len(a) > 1 for a in alive):
        bracket_round += 1
        matches = [(r, a[k], a[k + 1]) for r, a in enumerate(alive) for k in range(0, len(a) - 1, 2)]
        results = play(matches, bracket_round)
        winners: dict[int, list[int]] = {r: [] for r in range(len(rows))}
        for (r, a, b), comparison in zip(matches, results, strict=True):
            comparison.setdefault("round", bracket_round)
            comparisons[r].append(comparison)
            winner = comparison.get("winner")
            winners[r].append(winner if winner is not None else rngs[r].choice((a, b)))
        for r, a in enumerate(alive):
            if len(a) > 1:
                alive[r] = winners[r] + ([a[-1]] if len(a) % 2 else [])
    return comparisons
