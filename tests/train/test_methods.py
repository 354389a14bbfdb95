"""ORPO, KTO, SimPO and SFT through TRL's trainers on the pairs file `prefloop pairs` writes.

Each method's first logged loss is checked against the same loss computed here from the model's own log-probs
(plain logits, the batch TRL built), so a method wired to the wrong trainer, option or data would fail; and each
resumes from a checkpoint to exactly the losses and adapter of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from trainlog import CrashAfterSave, LogCollector, SimulatedCrash
from transformers import AutoModelForCausalLM

from prefloop.config import ConfigError
from prefloop.train.dpo import TrainConfig, build_trainer, last_complete_checkpoint, run


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def base(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def label_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (sum, mean) of the log-probs of the tokens whose label is not -100."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    targets = labels[:, 1:]
    mask = targets != -100
    token = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    return token.sum(1), token.sum(1) / mask.sum(1)


def paired_batch_logps(model, batch) -> dict[str, torch.Tensor]:
    out = {}
    for side in ("chosen", "rejected"):
        out[side], out[f"{side}_mean"] = label_logps(
            model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"]
        )
    return out


def first_loss(config: TrainConfig, expected) -> tuple[float, float]:
    """(logged step-1 loss, `expected(trainer, batch)`) for the batch step 1 trains on (one batch = every row)."""
    logs = LogCollector()
    trainer = build_trainer(config, callbacks=[logs])
    batch = next(iter(trainer.get_train_dataloader()))
    want = expected(trainer, batch)
    trainer.train()
    return logs.logs[0]["loss"], want


def test_orpo_loss_is_sft_nll_minus_lambda_log_sigmoid_log_odds(make_config, tiny_model):
    """ORPO (Hong et al. 2024, eq. 6-7): NLL of the chosen sequence - λ mean log σ(log odds(chosen) - log odds(rejected)),
    odds from the mean token log-prob; no reference model."""
    config = make_config(method="orpo", beta=0.25, max_steps=1)

    def expected(trainer, batch):
        lp = paired_batch_logps(base(tiny_model), batch)
        c, r = lp["chosen_mean"], lp["rejected_mean"]
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        # TRL's ORPO takes the NLL over the whole chosen sequence, prompt included (as the paper's code does).
        ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
        whole, _ = label_logps(base(tiny_model), ids, mask, torch.where(mask == 1, ids, -100))
        nll = -(whole.sum() / (mask[:, 1:] == 1).sum())
        return (nll - 0.25 * F.logsigmoid(log_odds).mean()).item()

    logged, want = first_loss(config, expected)
    assert logged == pytest.approx(want, abs=1e-4)


def test_simpo_loss_is_length_normalized_margin_minus_gamma(make_config, tiny_model):
    """SimPO (Meng et al. 2024, eq. 6): -log σ(β (mean log p(chosen) - mean log p(rejected)) - γ); TRL's CPO trainer
    with loss_type simpo and no NLL term (cpo_alpha 0); β defaults to 2.0 for simpo."""
    config = make_config(method="simpo", simpo_gamma=0.7, max_steps=1)
    assert config.beta == 2.0

    def expected(trainer, batch):
        lp = paired_batch_logps(base(tiny_model), batch)
        return (-F.logsigmoid(2.0 * (lp["chosen_mean"] - lp["rejected_mean"]) - 0.7)).mean().item()

    logged, want = first_loss(config, expected)
    assert logged == pytest.approx(want, abs=1e-5)


def test_kto_loss_against_the_initial_model_with_its_kl_estimate(make_config, tiny_model, round1_adapter):
    """KTO (Ethayarajh et al. 2024, eq. 7) on the pairs unpaired (chosen desirable, rejected undesirable): the
    policy is the round-1 adapter, the reference the base, and z0 the batch's mismatched-completion KL (>= 0)."""
    config = make_config(
        method="kto",
        adapter=str(round1_adapter),
        reference="initial",
        desirable_weight=2.0,
        undesirable_weight=0.5,
        max_steps=1,
    )

    def expected(trainer, batch):
        policy = PeftModel.from_pretrained(base(tiny_model), str(round1_adapter))
        reference = base(tiny_model)
        pc, pr, _ = logps_by_label(policy, batch)
        rc, rr, _ = logps_by_label(reference, batch)
        kl = (kl_logps(policy, batch) - kl_logps(reference, batch)).mean().clamp(min=0)
        label = batch["label"].bool()
        ratio = pc - rc
        losses = torch.where(
            label, 2.0 * (1 - torch.sigmoid(0.1 * (ratio - kl))), 0.5 * (1 - torch.sigmoid(0.1 * (kl - ratio)))
        )
        assert label.any() and (~label).any()
        assert (ratio.abs() > 1e-2).any(), "round-1 adapter too close to the base for this test to mean much"
        return losses.mean().item()

    logged, want = first_loss(config, expected)
    assert logged == pytest.approx(want, abs=1e-5)


def logps_by_label(model, batch):
    """Sequence log-probs of the batch's completions (KTO's rows: input_ids with a completion_mask)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    seq = (token * batch["completion_mask"][:, 1:]).sum(1)
    return seq, None, None


def kl_logps(model, batch):
    kl = {k.removeprefix("KL_"): v for k, v in batch.items() if k.startswith("KL_")}
    return logps_by_label(model, kl)[0]


def test_sft_trains_on_the_chosen_answers_only(make_config, tiny_model):
    """Best-of-n SFT: the loss is the mean NLL of the chosen answers' tokens (prompt tokens masked), nothing of the
    rejected ones."""
    config = make_config(method="sft", max_steps=1)

    def expected(trainer, batch):
        pairs = [json.loads(line) for line in open(config.pairs)]
        decoded = sorted(trainer.processing_class.decode(ids) for ids in trainer.train_dataset["input_ids"])
        assert decoded == sorted(f"{p['prompt']}{p['chosen']}</s>" for p in pairs)
        total, _ = label_logps(base(tiny_model), batch["input_ids"], batch["attention_mask"], batch["labels"])
        return -(total.sum() / (batch["labels"][:, 1:] != -100).sum()).item()

    logged, want = first_loss(config, expected)
    assert logged == pytest.approx(want, abs=1e-4)


def test_kto_and_sft_read_their_own_formats(make_config, tmp_path):
    """A KTO file (prompt, completion, label) and an SFT file (prompt, completion) train as they are."""
    kto = write_jsonl(
        tmp_path / "kto.jsonl",
        [{"prompt": f"{i}+1=", "completion": str(i + 1 + (i % 2)), "label": i % 2 == 0} for i in range(8)],
    )
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(8)])
    for name, path in (("kto", kto), ("sft", sft)):
        out = run(make_config(f"own-{name}", pairs=str(path), method=name, max_steps=1))
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["method"] == name and summary["pairs"] == 8 and math.isfinite(summary["final_loss"])
    with pytest.raises(ConfigError, match="orpo trains on rows with prompt, chosen, rejected"):
        run(make_config("wrong", pairs=str(sft), method="orpo", max_steps=1))


@pytest.mark.parametrize("name", ["orpo", "kto", "simpo", "sft", "grpo"])
def test_each_method_resumes_to_the_uninterrupted_run(make_config, groups_file, name):
    """Killed after checkpoint 2 of 4, the re-run resumes there and ends with the straight run's losses and adapter;
    the summary names the method."""
    settings = dict(method=name, max_steps=-1, epochs=1, batch_size=2 if name != "kto" else 4, save_steps=2, lr=1e-2)
    if name == "grpo":  # 4 groups of 4 answers: one group a step
        settings.update(pairs=groups_file, batch_size=1)
    straight_logs = LogCollector()
    straight = run(make_config(f"{name}-straight", **settings), callbacks=[straight_logs])
    config = make_config(f"{name}-resumed", **settings)
    with pytest.raises(SimulatedCrash):
        run(config, callbacks=[CrashAfterSave(2)])
    assert last_complete_checkpoint(Path(config.out) / "checkpoints").name == "checkpoint-2"
    resumed_logs = LogCollector()
    resumed = run(config, callbacks=[resumed_logs])
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["method"] == name and summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    assert [x["loss"] for x in resumed_logs.logs] == pytest.approx(
        [x["loss"] for x in straight_logs.logs[2:]], abs=1e-6
    )
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    shutil.rmtree(straight)


def test_reference_free_methods_continue_an_adapter_without_a_reference_copy(make_config, round1_adapter):
    """orpo with a previous round's adapter trains that adapter, and TRL keeps no frozen 'ref' copy of it."""
    trainer = build_trainer(make_config(method="orpo", adapter=str(round1_adapter), reference="previous"))
    assert list(trainer.model.peft_config) == ["default"]
    assert json.loads((Path(round1_adapter) / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(("overrides", "fix"), [({"method": "ppo"}, "one of dpo, orpo, kto, simpo, sft")])
def test_bad_method_names_the_fix(overrides, fix):
    with pytest.raises(ConfigError, match=fix):
        TrainConfig(model="m", pairs="p.jsonl", out="o", **overrides)


def test_length_controls_reach_trl(make_config):
    """--ld-alpha is TRL's LD-DPO ld_alpha; unset, TRL's own default (no length desensitization) stands."""
    from prefloop.train.dpo import training_args

    assert training_args(make_config(ld_alpha=0.3)).ld_alpha == 0.3
    assert training_args(make_config()).ld_alpha is None


def test_lr_schedule_constant_keeps_the_rate_and_linear_decays_it(make_config):
    """The learning rate Trainer logs at each of 3 steps: lr each time with `constant`, falling with `linear`."""
    rates = {}
    for schedule in ("constant", "linear"):
        logs = LogCollector()
        run(make_config(f"lr-{schedule}", lr_schedule=schedule, max_steps=3, lr=1e-3), callbacks=[logs])
        rates[schedule] = [x["learning_rate"] for x in logs.logs if "learning_rate" in x]
    assert rates["constant"] == pytest.approx([1e-3] * 3)
    assert rates["linear"][0] == pytest.approx(1e-3) and rates["linear"][0] > rates["linear"][1] > rates["linear"][2]
    with pytest.raises(ConfigError, match="lr_schedule = 'cosine'. Fix: use linear or constant"):
        make_config(lr_schedule="cosine")
