"""`carry_optimizer`: two runs that carry AdamW's moments equal one uninterrupted run of both (train/carry.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainlog import LogCollector

from prefloop.config import ConfigError
from prefloop.loop import LoopConfig
from prefloop.train.dpo import run

# Every step sees all 8 pairs (one batch), at a constant rate: steps 3-4 of a 4-step run see exactly what a second
# 2-step run sees, so the only state that can differ between them is the optimizer's.
SAME = dict(lr=1e-2, lr_schedule="constant")


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_carried_runs_equal_one_straight_run_and_fresh_moments_do_not(make_config):
    straight_logs = LogCollector()
    straight = run(make_config("straight", max_steps=4, **SAME), callbacks=[straight_logs])

    first = run(make_config("first", max_steps=2, carry_optimizer=True, **SAME))
    saved = torch.load(first / "adapter" / "optimizer.pt", weights_only=True)
    assert set(saved["state"]) == set(saved["names"]) and all(int(s["step"]) == 2 for s in saved["state"].values())

    carried_logs = LogCollector()
    carried = run(make_config("carried", max_steps=2, adapter=str(first), carry_optimizer=True, **SAME),
                  callbacks=[carried_logs])
    assert [x["loss"] for x in carried_logs.logs] == pytest.approx([x["loss"] for x in straight_logs.logs[2:]],
                                                                   abs=1e-6)
    assert max_difference(weights(carried), weights(straight)) < 1e-6

    # The control: the same continuation with AdamW starting from zero moments lands elsewhere.
    fresh = run(make_config("fresh", max_steps=2, adapter=str(first), **SAME))
    assert max_difference(weights(fresh), weights(straight)) > 1e-3


def test_carrying_what_is_not_there_or_does_not_fit_is_refused(make_config, round1_adapter, tiny_model):
    with pytest.raises(ConfigError, match=r"no optimizer.pt.*Fix: drop carry_optimizer"):
        run(make_config("none", adapter=str(round1_adapter), carry_optimizer=True))  # trained without it

    with pytest.raises(ConfigError, match="carry_optimizer=True needs LoRA. Fix: drop --carry-optimizer"):
        make_config("full", lora=False, carry_optimizer=True)

    # Moments of a rank-4 adapter beside a rank-8 one: same names, other shapes.
    r4 = run(make_config("r4", carry_optimizer=True))
    r8 = run(make_config("r8", carry_optimizer=True, lora_r=8, lora_alpha=16))
    shutil.copy(r4 / "adapter" / "optimizer.pt", r8 / "adapter" / "optimizer.pt")
    with pytest.raises(ConfigError, match=r"has shape .* Fix: carry an optimizer only into the adapter"):
        run(make_config("mismatch", adapter=str(r8), carry_optimizer=True))

    with pytest.raises(ConfigError, match="init: base starts a fresh one"):
        LoopConfig(model=str(tiny_model), prompts="p.jsonl", out="o", init="base", reference="initial",
                   train={"carry_optimizer": True})
