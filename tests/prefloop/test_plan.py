"""`prefloop run --dry-run` says what the real run then does: the pool after cleaning, the prompts and completions of
a round, and where a run resumes; it writes nothing and refuses a changed config as the run would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from workdirs import loop_workdir

from prefloop.cli import main
from prefloop.config import from_dict
from prefloop.loop import LoopConfig
from prefloop.loop import run as run_loop
from prefloop.runstate import ConfigDriftError
from prefloop.store import dumps, read_records


def values(d: Path, rounds: int = 1, **changes) -> dict:
    return {
        "out": str(d / "run"), "model": str(d / "model"), "prompts": str(d / "pool.jsonl"),
        "eval_prompts": str(d / "heldout.jsonl"), "rounds": rounds, "prompts_per_round": 20,
        "gen": {"n": 3, "max_new_tokens": 4, "dtype": "float32"},
        "judge": {"judge": "python", "reward_fn": str(d / "reward.py") + ":length"},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 2, "batch_size": 4, "gradient_checkpointing": False, "dtype": "float32"},
        **changes,
    }


def dry(d: Path, **kw) -> str:
    return run_loop(from_dict(LoopConfig, {**values(d, **kw), "dry_run": True}))


def test_dry_run_predicts_the_run_and_where_it_resumes(tmp_path):
    d = loop_workdir(tmp_path)
    # The pool: the 48 training prompts plus two held-out prompts under other ids, which decontamination removes.
    train, heldout = read_records(d / "prompts.jsonl"), read_records(d / "heldout.jsonl")
    (d / "pool.jsonl").write_text("".join(dumps(r) for r in train + [{**h, "id": f"copy{i}"} for i, h in
                                                                       enumerate(heldout[:2])]))
    text = dry(d)
    assert not (d / "run").exists(), "a dry run wrote into the run directory"
    assert "run directory" in text and ": new run" in text

    root = run_loop(from_dict(LoopConfig, values(d)))
    manifest = json.loads((root / "manifest.json").read_text())
    kept = manifest["decontamination"]["kept"]
    drawn = manifest["rounds"][1]["phases"]["prompts"]["summary"]["prompts"]
    completions = sum(len(r["completions"]) for r in read_records(root / "round_001" / "candidates.jsonl"))
    assert kept <= 48 < manifest["decontamination"]["pool"] == 50  # the copies left the pool, at least
    assert f"-> {kept:,}\n" in text
    assert f"{drawn} prompts (drawn from {kept:,}) x n=3 = {completions} completions" in text
    assert "held-out eval  16 prompts" in text

    assert "finished: all 1 rounds are done" in dry(d)
    assert "resumes round 2 at `prompts`" in dry(d, rounds=2)
    # A kill during round 1's train phase leaves it `running` in the manifest: the run would resume there.
    path = root / "manifest.json"
    killed = json.loads(path.read_text())
    killed["rounds"][1]["phases"]["train"] = {"status": "running"}
    path.write_text(json.dumps(killed))
    assert "resumes round 1 at `train`;" in dry(d)
    with pytest.raises(ConfigDriftError, match=r"changed: train"):
        dry(d, train={**values(d)["train"], "lr": 1e-3})


def test_cli_dry_run_prints_the_plan_and_exits_0(tmp_path, capsys):
    d = loop_workdir(tmp_path)
    (d / "pool.jsonl").write_bytes((d / "prompts.jsonl").read_bytes())
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump(values(d)))
    assert main(["run", "--config", str(config), "--dry-run"]) in (0, None)
    out = capsys.readouterr().out
    assert "prefloop run --dry-run: nothing loaded, nothing written." in out and "x n=3 = 60 completions" in out
    assert "pairs: best_worst;" in out
    assert not (d / "run").exists()


def test_dry_run_of_a_kto_labelling_loop_names_labels_not_pairs(tmp_path):
    d = loop_workdir(tmp_path)
    (d / "pool.jsonl").write_bytes((d / "prompts.jsonl").read_bytes())
    text = dry(d, kto_threshold=1.5, train={**values(d)["train"], "method": "kto"})
    assert "labels (no pairs): every answer of the prompts whose answers score both >= and < 1.5" in text
    assert "pairs:" not in text and "train: kto (" in text


def test_dry_run_of_a_grpo_loop_names_answer_groups_and_the_sampling_temperature(tmp_path):
    d = loop_workdir(tmp_path)
    (d / "pool.jsonl").write_bytes((d / "prompts.jsonl").read_bytes())
    text = dry(d, gen={**values(d)["gen"], "temperature": 0.8}, train={**values(d)["train"], "method": "grpo"})
    assert "answer groups (no pairs): every answer of the prompts whose answers score differently" in text
    assert "pairs:" not in text and "train: grpo (TRL's GRPO loss, log-probs at T=0.8)" in text
    text = dry(d, train={**values(d)["train"], "method": "grpo"}, export={"keep_equal_rewards": True})
    assert "answer groups (no pairs): every answer of every prompt, with its score" in text
