"""Fixtures for the train tests: one tiny local model per session, small pairs files, fast train configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from prefloop.train.dpo import TrainConfig

N_PAIRS = 8


def make_pairs(n: int = N_PAIRS, conversational: bool = False, seed: int = 0) -> list[dict]:
    """Addition pairs in prefloop's pairs schema (TRL preference format plus id, scores and meta)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        prompt, chosen, rejected = f"{a}+{b}=", str(a + b), str(a + b + rng.randint(1, 9))
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        rows.append(
            {
                "id": f"pair-{i}",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": 1.0,
                "score_rejected": 0.0,
                "margin": 1.0,
                "meta": {"judge": "python", "round": 1, "strategy": "best_worst", "config_hash": "0123456789ab"},
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # Matrices this small gain nothing from intra-op threads, and an OpenMP pool that shares its cores with other
    # processes stalls badly (measured: ~80x slower steps on a loaded 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_pairs())


def make_groups(n: int = 4) -> list[dict]:
    """A groups file's rows (`prefloop export --format groups`): 4 answers per prompt, the last cut at the limit."""
    return [{"prompt": f"{i}+1=", "completions": [str(i + 1), str(i + 2), f"{i + 1}0", "x"],
             "rewards": [1.0, 0.0, 0.5, 0.0], "truncated": [False, False, False, True]} for i in range(n)]


@pytest.fixture(scope="session")
def groups_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("groups") / "groups.jsonl", make_groups())


@pytest.fixture(scope="session")
def conv_pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs_conv.jsonl", make_pairs(conversational=True))


def fast_config(model: Path, pairs: Path, out: Path, **overrides) -> TrainConfig:
    """A config that trains the tiny model in about a second: fp32 (exact comparisons), all pairs in one batch."""
    values = dict(
        model=str(model),
        pairs=str(pairs),
        out=str(out),
        dtype="float32",
        loss=["sigmoid"],  # the DPO tests check sigmoid's algebra (the stage's default adds SFT: test_sigmoid_plus_sft)
        batch_size=N_PAIRS,
        max_length=32,
        max_steps=2,
        logging_steps=1,
        save_steps=100,
        gradient_checkpointing=False,
        lora_r=4,
        lora_alpha=8,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture
def make_config(tiny_model, pairs_file, tmp_path):
    def make(out: str = "train", pairs: str | Path = pairs_file, **overrides) -> TrainConfig:
        return fast_config(tiny_model, Path(pairs), tmp_path / out, **overrides)

    return make


@pytest.fixture(scope="session")
def round1_adapter(tiny_model, pairs_file, tmp_path_factory) -> Path:
    """A round-1 adapter trained hard enough (high lr) that its log-probs clearly differ from the base's."""
    from prefloop.train.dpo import run

    out = run(fast_config(tiny_model, pairs_file, tmp_path_factory.mktemp("round1") / "train", lr=2e-2, max_steps=4))
    return out / "adapter"
