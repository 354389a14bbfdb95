"""`prefloop run --dry-run`: what a loop config will do, checked and counted, before anything loads or is written.

    prefloop run --config examples/loop.yaml --dry-run

It validates every stage's settings (as the loop does before round 1), reads the prompt files whole (a bad line is
the same one-line error as a real run), cleans the pool as the run will (repeats, eval/benchmark matches), and says
whether the run directory is new, resumes (round and phase, from `manifest.json`), is finished, or was started with
another config (the same refusal as the real run, with the changed keys). No model loads, no lock is taken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefloop.pool import decontaminate_pool, dedup_pool
from prefloop.records import load_prompts
from prefloop.runstate import StageRun

PHASES = ("prompts", "generate", "judge", "pairs", "train", "eval")


def plan(config: Any) -> str:
    """The dry-run text for `config` (a `LoopConfig`); raises what the real run would raise first."""
    state = StageRun("loop", Path(config.out), config, directory=True).check()
    raw = load_prompts(config.prompts).records
    pool, repeated = dedup_pool(config, raw)
    pool, cleaned = decontaminate_pool(config, pool)
    held_out = len(load_prompts(config.eval_prompts).records) if config.eval_prompts else 0

    gen = config.stage_config("generate", 1, config.gen)
    judge = config.stage_config("judge", 1, {})
    pairs = config.stage_config("pairs", 1, {})
    train = config.stage_config("train", 1, {})
    per_round = len(pool) if config.prompts_per_round is None else min(config.prompts_per_round, len(pool))
    samples = per_round * gen.n
    removed = ", ".join(f"{k} {v}" for k, v in cleaned["by_reason"].items() if v) or "none"
    lines = [
        "prefloop run --dry-run: nothing loaded, nothing written.",
        f"run directory  {config.out}: {_progress(config, state)}",
        f"prompt pool    {len(raw):,} prompts ({config.prompts})"
        + (f"; {repeated['removed']:,} repeats removed" if repeated else "")
        + f"; {cleaned['removed']:,} match eval/benchmark prompts and leave it ({removed}) -> {len(pool):,}",
        f"held-out eval  {held_out:,} prompts ({config.eval_prompts}), scored before round 1 and after every round"
        if held_out else "held-out eval  none (no eval_prompts: the report has no accuracy per round)",
        f"each round     {per_round:,} prompts"
        + (" (the whole pool)" if per_round == len(pool) else f" (drawn from {len(pool):,})")
        + f" x n={gen.n} = {samples:,} completions of <= {gen.max_new_tokens} new tokens"
        f" (<= {samples * gen.max_new_tokens:,} tokens); backend {gen.backend}, temperature {gen.temperature}",
        f"               judge: {_judge(judge)}; {_rows(config, pairs)}; train: {_train(config, train)}",
        f"rounds         {config.rounds} (round k samples from policy k-1): <= {samples * config.rounds:,} "
        "completions in all",
    ]
    return "\n".join(lines)


def _progress(config: Any, state: str) -> str:
    manifest_path = Path(config.out) / "manifest.json"
    if state == "fresh" or not manifest_path.exists():
        return "new run"
    rounds = json.loads(manifest_path.read_text(encoding="utf-8")).get("rounds", [])
    for k in range(config.rounds + 1):
        phases = rounds[k]["phases"] if k < len(rounds) else {}
        wanted = ("eval",) if k == 0 else PHASES
        wanted = tuple(p for p in wanted if p != "eval" or config.eval_prompts)
        pending = [p for p in wanted if phases.get(p, {}).get("status") != "done"]
        if pending:
            status = phases.get(pending[0], {}).get("status")
            where = f" (it was {status})" if status and status != "running" else ""
            return f"resumes round {k} at `{pending[0]}`{where}; the phases before it are done and kept"
    return f"finished: all {config.rounds} rounds are done (raise `rounds` to extend it)"


def _judge(judge: Any) -> str:
    by = judge.reward_fn or judge.reward_model or judge.judge_model
    return judge.judge + (f" {by}" if by else "")


def _rows(config: Any, pairs: Any) -> str:
    """What the train phase reads: pairs, (kto_threshold) every answer labelled by its score, or (grpo) groups."""
    if config.kto_threshold is None and config.train.get("method") == "grpo":
        which = ("every prompt" if config.export.get("keep_equal_rewards")
                 else "the prompts whose answers score differently")
        return f"answer groups (no pairs): every answer of {which}, with its score"
    if config.kto_threshold is None:
        return f"pairs: {pairs.strategy}"
    return (f"labels (no pairs): every answer of the prompts whose answers score both >= and < "
            f"{config.kto_threshold:g}, desirable at >= {config.kto_threshold:g}")


def _train(config: Any, train: Any) -> str:
    loss = "+".join(train.loss) if isinstance(train.loss, list) else str(train.loss)
    if train.method == "grpo":
        loss = f"TRL's GRPO loss, log-probs at T={train.temperature:g}"
    weights = f"LoRA r={train.lora_r}" if train.lora else "full fine-tuning"
    start = "the previous round's policy" if config.init == "previous" else "the base"
    length = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs:g} epoch(s)"
    return (f"{train.method} ({loss}), lr {train.lr:g}, {length} at batch {train.batch_size}, {weights}, from {start}, "
            f"reference: {config.reference}")
