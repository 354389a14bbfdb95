"""Inputs tests share: a tiny random Llama, addition prompts (train and held-out) and a reward that scores
gibberish by its length (distinct scores, so every round makes pairs). Each test module builds its own copy (its
runs write beside it), from this one definition."""

from __future__ import annotations

import json
from pathlib import Path

from prefloop.demo.tiny import save_tiny
from prefloop.store import dumps
from prefloop.tasks.addition import make_prompts

LENGTH_REWARD = "def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"


def write_addition_prompts(path: Path, n: int) -> Path:
    """`n` addition prompts `q00000`... with their answers (so the python verifier can score them), in both prompt
    styles (a string, and a one-message conversation), sums repeating past 97 x 89."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 97, (7 * i) % 89
            prompt = f"{a}+{b}=" if i % 2 else [{"role": "user", "content": f"{a}+{b}="}]
            f.write(json.dumps({"id": f"q{i:05d}", "prompt": prompt, "answer": str(a + b)}) + "\n")
    return path


def loop_workdir(d: Path, train: int = 48, heldout: int = 16) -> Path:
    """`d/model`, `d/prompts.jsonl`, `d/heldout.jsonl`, `d/reward.py` (function `length`)."""
    save_tiny(d / "model")
    (d / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(train, 0, "train")))
    (d / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(heldout, 0, "heldout")))
    (d / "reward.py").write_text(LENGTH_REWARD)
    return d
