"""LLM judges inside the loop and on real local models: self-rewarding wiring, the report's judge numbers, and
what a biased judge does to a run (it stops, saying why, instead of training on nothing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fake_server import FakeServer, chat_answer

from prefloop.demo.tiny import TinyConfig, save_tiny
from prefloop.errors import StageFailed
from prefloop.judge.stage import JudgeConfig, run
from prefloop.loop import LoopConfig, Policy, _judge_settings
from prefloop.loop import run as run_loop
from prefloop.runstate import read_summary
from prefloop.store import dumps, read_records
from prefloop.tasks.addition import make_prompts


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("judge-loop")
    # A context long enough for the judge templates (the tiny tokenizer is one token per character).
    save_tiny(d / "model", TinyConfig(max_position_embeddings=2048))
    (d / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(12, 0, "train")))
    (d / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(6, 0, "heldout")))
    return d


def loop_config(workdir: Path, out: str, judge: dict, rounds: int = 1, **kw) -> LoopConfig:
    return LoopConfig(**kw,
        out=str(workdir / out), model=str(workdir / "model"), prompts=str(workdir / "prompts.jsonl"),
        eval_prompts=str(workdir / "heldout.jsonl"), rounds=rounds, prompts_per_round=8,
        gen={"n": 3, "max_new_tokens": 4, "dtype": "float32"}, judge=judge, pairs={"keep_truncated": True},
        train={"max_steps": 2, "batch_size": 4, "save_steps": 2, "logging_steps": 1,
               "gradient_checkpointing": False, "dtype": "float32"},
    )


def scripted_judge(server: FakeServer, url_judge: dict) -> dict:
    return {"judge": "llm", "judge_model": "m", "judge_backend": "openai", "base_url": server.url, "cache": "off",
            "judge_engine": {"ready_timeout": 10}, **url_judge}


def test_a_first_slot_judge_stops_the_loop_and_the_report_says_why(workdir):
    with FakeServer() as server:
        server.script = lambda req: chat_answer("Verdict: [[A]]")
        config = loop_config(workdir, "first-slot", scripted_judge(server, {}))
        with pytest.raises(StageFailed, match=r"round 1: no pairs to train on.*tie 16.*first slot 100%"):
            run_loop(config)
    root = Path(config.out)
    manifest = json.loads((root / "manifest.json").read_text())
    phases = manifest["rounds"][1]["phases"]
    assert phases["judge"]["status"] == "done" and phases["pairs"]["status"] == "failed"
    assert phases["judge"]["summary"]["stats"]["first_position_win_rate"] == 1.0
    report = (root / "report.md").read_text()
    assert "first-position win rate 100.0%" in report and "orders agree 0.0%" in report
    assert "**pairs failed**" in report


def test_pairwise_judge_loop_reports_win_rate_against_round_0(workdir):
    def longer_wins(req):  # a consistent judge, whatever the slot: the longer response wins (ties: the first)
        text = next(m["content"] for m in req.body["messages"] if m["role"] == "user")
        a, b = (re.search(rf"<response_{x}>\n(.*?)\n</response_{x}>", text, re.S).group(1) for x in "ab")
        return chat_answer(f"Verdict: [[{'A' if len(a) >= len(b) else 'B'}]]")

    with FakeServer() as server:
        server.script = longer_wins
        config = loop_config(workdir, "pairwise", scripted_judge(server, {}))
        root = run_loop(config)
    manifest = json.loads((root / "manifest.json").read_text())
    judge_stats = manifest["rounds"][1]["phases"]["judge"]["summary"]["stats"]
    assert judge_stats["comparisons"] > 0 and judge_stats["mode"] == "pairwise"
    assert manifest["rounds"][1]["phases"]["pairs"]["summary"]["pairs"] > 0
    pairs = read_records(root / "round_001" / "pairs.jsonl")
    assert all(len(p["chosen"]) >= len(p["rejected"]) and p["meta"]["p_chosen"] == 1.0 for p in pairs)
    evaluation = manifest["rounds"][1]["phases"]["eval"]["summary"]
    assert sum(evaluation[k] for k in ("won", "lost", "tie", "failed", "same", "empty")) == 6
    assert "win_rate_vs_base" in evaluation
    assert "win rate vs round 0" in (root / "report.md").read_text()


def test_self_rewarding_judge_is_the_current_policy(workdir):
    config = loop_config(workdir, "unused", {"judge": "llm", "judge_model": "policy", "mode": "pointwise"})
    policy = Policy("base", "round_001/train/adapter")
    assert _judge_settings(config, policy, {}) == {"judge_model": "base", "judge_adapter": "round_001/train/adapter"}
    python = loop_config(workdir, "unused", {"judge": "python", "reward_fn": "prefloop.tasks.addition:reward"})
    assert _judge_settings(python, policy, {}) == {}


def candidates(path: Path, rows: dict) -> Path:
    path.write_text("".join(json.dumps({"id": k, "prompt": p, "completions": [
        {"text": t, "finish_reason": "stop", "num_tokens": 2} for t in texts]}) + "\n" for k, (p, texts) in rows.items()))
    return path


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_a_real_local_judge_model_keeps_every_failure_raw(workdir, tmp_path, mode):
    # The tiny model writes gibberish: every answer is a parse failure, kept with its text, and none is a label.
    rows = {"a": ("1+1=", ["2", "3"]), "b": ([{"role": "user", "content": "2+2="}], ["4", "5", "6"])}
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl", rows)), out=str(tmp_path / "j.jsonl"),
                         judge="llm", judge_model=str(workdir / "model"), judge_backend="hf", mode=mode,
                         judge_max_new_tokens=8, parse_retries=1, dtype="float32", cache="off",
                         max_failed_fraction=1)  # keep the failures on record instead of stopping at the ceiling
    out = run(config)
    records = read_records(out)
    if mode == "pointwise":
        for row in records:
            assert set(row["statuses"]) <= {"parse_error", "refusal"} and set(row["scores"]) == {None}
            assert all(len(raw) == 2 and all(isinstance(t, str) for t in raw) for raw in row["raw"])
    else:
        assert [len(r["comparisons"]) for r in records] == [1, 2]  # a knockout: N - 1 matches
        for row in records:
            assert all(c["winner"] is None and c["status"] in ("parse_error", "refusal") for c in row["comparisons"])
    assert read_summary(out)["judge_calls"] > 0


def test_a_judge_prompt_too_long_for_the_model_fails_alone(tmp_path):
    save_tiny(tmp_path / "short")  # a 128-token context: no judge template fits
    config = JudgeConfig(candidates=str(candidates(tmp_path / "c.jsonl", {"a": ("q", ["x"])})),
                         out=str(tmp_path / "j.jsonl"), judge="llm", judge_model=str(tmp_path / "short"),
                         mode="pointwise", dtype="float32", cache="off")
    with pytest.raises(StageFailed, match=r"1 of 1 completions failed .*judge prompt has \d+ tokens.*context of 128"):
        run(config)  # every row failed: the stage stops, and its one line names the real cause
    config.max_failed_fraction = 1
    (row,) = read_records(run(config))
    assert row["statuses"] == ["error"] and "context of 128" in row["errors"][0]


def test_constitutional_revisions_drive_a_loop_round(workdir):
    """`prefloop run` with the constitutional reviser as its judge (the policy critiques and revises its own
    answers) and a verifier function as the held-out judge: revision ≻ original pairs train the round."""
    config = loop_config(workdir, "cai", {"judge": "constitutional", "constitution": "helpful_honest",
                                          "judge_model": "policy", "judge_max_new_tokens": 8,
                                          "judge_temperature": 1.0, "dtype": "float32"},
                         eval_judge={"judge": "python", "reward_fn": "prefloop.tasks.addition:reward"})
    root = run_loop(config)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    pairs = read_records(root / "round_001" / "pairs.jsonl")
    judgments = {j["id"]: j for j in read_records(root / "round_001" / "judgments.jsonl")}
    assert pairs
    for pair in pairs:
        chain = judgments[pair["id"]]["revision"]
        assert pair["chosen"] == chain["passes"][-1]["revision_response"]
        assert pair["rejected"] == chain["init_response"]
    assert "accuracy" in manifest["rounds"][1]["phases"]["eval"]["summary"]


def test_a_constitutional_reviser_cannot_score_held_out_answers(workdir):
    from prefloop.config import ConfigError

    with pytest.raises(ConfigError, match="eval_judge"):
        loop_config(workdir, "cai-bad", {"judge": "constitutional", "constitution": "harmless",
                                         "judge_model": "policy"})
