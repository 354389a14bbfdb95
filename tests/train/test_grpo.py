"""`method: grpo`: TRL's GRPOTrainer on the answers of a groups file, served through its `rollout_func`.

The first logged loss is checked against GRPO's loss computed here from the stored rewards and the answers' token
counts, and a short run is checked to move probability toward the better-rewarded answers, measured by the model's
own forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_groups, write_jsonl
from peft import PeftModel
from trainlog import LogCollector
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefloop.config import ConfigError
from prefloop.store import InputError
from prefloop.train.dpo import build_trainer, run, training_args


def first_loss(rows: list[dict], tokenizer) -> float:
    """GRPO's step-1 loss (`dapo`, beta 0, ratio 1) on `rows` in one batch, by hand: -sum_i A_i |o_i| / sum_i |o_i|,
    A_i the group-normalised reward, (r_i - mean) / (std + 1e-4) with Bessel's std, |o_i| the answer's tokens plus
    EOS unless it was cut."""
    num = den = 0.0
    for row in rows:
        r = torch.tensor(row["rewards"])
        advantages = (r - r.mean()) / (r.std() + 1e-4)
        for text, cut, a in zip(row["completions"], row["truncated"], advantages.tolist(), strict=True):
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + (0 if cut else 1)
            num, den = num + a * tokens, den + tokens
    return -num / den


def test_first_loss_is_minus_the_token_weighted_mean_advantage(make_config, groups_file, tiny_model):
    """At step 1 the policy ratio is 1 and beta 0, so TRL's loss is `first_loss`'s: a wrong answer served, a lost or
    extra EOS, or a reward given to another answer changes it."""
    config = make_config(method="grpo", pairs=groups_file, batch_size=4, max_steps=1)
    logs = LogCollector()
    build_trainer(config, callbacks=[logs]).train()
    assert logs.logs[0]["loss"] == pytest.approx(first_loss(make_groups(), AutoTokenizer.from_pretrained(tiny_model)),
                                                 abs=1e-4)
    assert logs.logs[0]["reward"] == pytest.approx(0.375)


def test_fewer_groups_than_a_batch_train_in_one_smaller_step(make_config, tmp_path, tiny_model):
    """TRL's GRPO sampler deals whole batches only: 3 groups at --batch-size 4 would train nothing, so they train as
    one step of 3 (its loss is the hand-computed one over those 3). 6 groups at batch 4 train one step and report the
    2 the sampler leaves out; with gradient accumulation a short file is refused, naming the fix."""
    rows = make_groups(3)
    rows[1] = {**rows[1], "rewards": [0.5, 0.5, 0.5, 0.5]}  # a tied group (export --keep-equal-rewards): advantage 0
    small = write_jsonl(tmp_path / "small.jsonl", rows)
    logs = LogCollector()
    out = run(make_config("small", method="grpo", pairs=small, batch_size=4, max_steps=-1, epochs=1),
              callbacks=[logs])
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["steps"], summary["pairs"], summary["groups_unused_per_epoch"]) == (1, 3, 0)
    assert logs.logs[0]["loss"] == pytest.approx(first_loss(rows, AutoTokenizer.from_pretrained(tiny_model)), abs=1e-4)
    six = write_jsonl(tmp_path / "six.jsonl", make_groups(6))
    out = run(make_config("six", method="grpo", pairs=six, batch_size=4, max_steps=-1, epochs=1))
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["steps"], summary["pairs"], summary["groups_unused_per_epoch"]) == (1, 6, 2)
    with pytest.raises(ConfigError, match=r"3 answer groups, fewer than one step's 8 .*Fix: lower --batch-size"):
        training_args(make_config("accum", method="grpo", pairs=small, batch_size=4, grad_accum=2))


def answer_logps(model, tokenizer, prompt: str, answers: list[str]) -> list[float]:
    """Summed log-prob of each answer (and its EOS) after `prompt`, from a plain forward pass."""
    out = []
    for answer in answers:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        out.append(sum(logps[len(p) - 1 + t, tok].item() for t, tok in enumerate(a)))
    return out


def test_training_moves_probability_to_the_better_rewarded_answers(make_config, groups_file, tiny_model):
    """After a few steps, every prompt's reward-1 answer gained log-prob against its reward-0 (terminated) answer,
    relative to the base model."""
    out = run(make_config("grpo-learns", method="grpo", pairs=groups_file, batch_size=4, max_steps=6, lr=2e-2))
    summary = json.loads((out / "train_summary.json").read_text())
    assert (summary["method"], summary["pairs"], summary["rows"], summary["steps"]) == ("grpo", 4, "answer groups", 6)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                        out / "adapter")
    for row in make_groups():
        good, bad = row["completions"][0], row["completions"][1]
        before = answer_logps(base, tokenizer, row["prompt"], [good, bad])
        after = answer_logps(trained, tokenizer, row["prompt"], [good, bad])
        assert after[0] - after[1] > before[0] - before[1] + 1.0, row["prompt"]


def test_bad_groups_files_and_a_beta_are_refused_naming_the_fix(make_config, tmp_path):
    rows = make_groups(3)
    rows[2] = {**rows[2], "completions": rows[2]["completions"][:3], "rewards": [1.0, 0.0, 0.5]}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(InputError, match=r"mixed.jsonl:3: 3 answers, while earlier rows have 4"):
        run(make_config("mixed", method="grpo", pairs=mixed))
    twice = write_jsonl(tmp_path / "twice.jsonl", [*make_groups(2), make_groups(1)[0]])
    with pytest.raises(InputError, match=r"twice.jsonl:3: the same prompt as line 1"):
        run(make_config("twice", method="grpo", pairs=twice))
    with pytest.raises(ConfigError, match=r"missing.jsonl: groups file not found"):
        run(make_config("missing", method="grpo", pairs=tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="grpo trains with TRL's default beta 0"):
        make_config(method="grpo", beta=0.1)
    with pytest.raises(ConfigError, match="temperature = 0.0: grpo's log-probs need a temperature > 0"):
        make_config(method="grpo", temperature=0.0)
