"""Inputs the loop tests share: a tiny random Llama, addition prompts (train and held-out) and a reward that scores
gibberish by its length (distinct scores, so every round makes pairs). Each test module builds its own copy (its
runs write beside it), from this one definition."""

from __future__ import annotations

from pathlib import Path

from prefloop.demo.tiny import save_tiny
from prefloop.store import dumps
from prefloop.tasks.addition import make_prompts

LENGTH_REWARD = "def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"


def loop_workdir(d: Path, train: int = 48, heldout: int = 16) -> Path:
    """`d/model`, `d/prompts.jsonl`, `d/heldout.jsonl`, `d/reward.py` (function `length`)."""
    save_tiny(d / "model")
    (d / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(train, 0, "train")))
    (d / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(heldout, 0, "heldout")))
    (d / "reward.py").write_text(LENGTH_REWARD)
    return d
