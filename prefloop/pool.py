"""The loop's prompt pool: loaded once, cleaned of repeats and of eval/benchmark prompts, then drawn from per round.

    pool = load_prompts(config.prompts).records
    pool, repeated = dedup_pool(config, pool)          # dedup.near_threshold (off by default)
    pool, cleaned = decontaminate_pool(config, pool)   # always: the eval prompts, and decontaminate.benchmarks
    draw_round(config, pool, k, round_dir)             # round k's prompts.jsonl, seeded by round

Kept apart from prefloop/loop.py so the loop reads as its rounds; `config` is a `LoopConfig`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError
from prefloop.records import load_prompts
from prefloop.store import atomic_write, dumps, iter_records

log = logging.getLogger("prefloop.loop")


def draw_prompts(pool: list[dict[str, Any]], count: int | None, seed: int, k: int) -> list[dict[str, Any]]:
    if count is None or count >= len(pool):
        return pool
    return random.Random(f"{seed}:round:{k}").sample(pool, count)


def dedup_pool(config: Any, pool: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The pool without prompts that repeat an earlier one (`dedup.near_threshold`; off: the pool as is)."""
    if config.dedup.get("near_threshold") is None:
        return pool, None
    from prefloop.hygiene import dedup

    kept, info = dedup(pool, "prompt", config.dedup["near_threshold"])
    if info["removed"]:
        log.warning("loop: removed %d of %d pool prompts that repeat an earlier one (%s), e.g. %s", info["removed"],
                    len(pool), ", ".join(f"{k} {v}" for k, v in info["by_reason"].items()),
                    "; ".join(f"{a} repeats {b}" for a, b in info["examples"][:3]))
    return kept, {**info, "pool": len(pool), "kept": len(kept)}


def decontaminate_pool(config: Any, pool: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The pool without prompts that match an eval (or named benchmark) prompt, and what was removed, by reason."""
    from prefloop.hygiene import decontaminate

    thresholds = {k: v for k, v in config.decontaminate.items() if k != "benchmarks"}  # else hygiene's defaults
    files = ([config.eval_prompts] if config.eval_prompts else []) + list(config.decontaminate.get("benchmarks", []))
    reference = [row["prompt"] for f in files for row in load_prompts(f).records]  # each validated whole
    kept, info = decontaminate(pool, reference, **thresholds)
    if not kept:
        raise ConfigError(f"{config.prompts}: every training prompt matches an eval or benchmark prompt "
                          f"({info['by_reason']}). Fix: train on other prompts, or raise decontaminate thresholds.")
    if info["removed"]:
        log.warning("loop: removed %d of %d training prompts that match eval/benchmark prompts (%s), e.g. %s",
                    info["removed"], len(pool), ", ".join(f"{k} {v}" for k, v in info["by_reason"].items()),
                    ", ".join(map(str, info["example_ids"][:3])))
    return kept, {**info, "pool": len(pool), "kept": len(kept), "reference_prompts": len(reference)}


def draw_round(config: Any, pool: list[dict[str, Any]], k: int, d: Path):
    drawn = {row["id"] for j in range(1, k) for _, row in iter_records(Path(config.out) / f"round_{j:03d}" /
                                                                        "prompts.jsonl")}
    unused = [p for p in pool if p["id"] not in drawn]
    fresh = config.dedup.get("fresh_prompts") and config.prompts_per_round is not None
    if fresh and len(unused) >= config.prompts_per_round:
        chosen = draw_prompts(unused, config.prompts_per_round, config.seed, k)
    elif fresh:  # the pool runs out: every unused prompt, then a draw from the used ones for the rest
        log.warning("loop: round %d: only %d prompts no earlier round drew, %d wanted; the rest are drawn again "
                    "(dedup.fresh_prompts)", k, len(unused), config.prompts_per_round)
        used = [p for p in pool if p["id"] in drawn]
        chosen = unused + draw_prompts(used, config.prompts_per_round - len(unused), config.seed, k)
    else:
        chosen = draw_prompts(pool, config.prompts_per_round, config.seed, k)
    atomic_write(d / "prompts.jsonl", "".join(dumps(p) for p in chosen))
    return d / "prompts.jsonl", {"prompts": len(chosen), "repeated_prompts": sum(p["id"] in drawn for p in chosen)}
