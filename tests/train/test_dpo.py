"""The train stage on a tiny local Llama with real TRL: what trains, against which reference, and how it resumes.

pytest tests/train -q            # add -m slow for the slow ones
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
from trainlog import CrashAfterSave, LogCollector, SimulatedCrash, Snapshot, hand_logps
from transformers import AutoModelForCausalLM

from prefloop.config import ConfigError
from prefloop.runstate import ConfigDriftError
from prefloop.train.dpo import TrainConfig, build_trainer, last_complete_checkpoint, load_pairs, run

LN2 = math.log(2)


def load_base(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


def test_lora_training_changes_adapter_not_base(make_config, tiny_model):
    """LoRA DPO updates every adapter matrix, leaves base weights untouched, saves that adapter, and merges it."""
    snap = Snapshot()
    out = run(make_config(max_steps=3, lr=1e-2, merge=True), callbacks=[snap])
    lora = [n for n in snap.before if "lora_" in n]
    base = [n for n in snap.before if "lora_" not in n]
    assert lora and base
    assert all(not torch.equal(snap.before[n], snap.after[n]) for n in lora), "some LoRA matrix did not move"
    assert all(torch.equal(snap.before[n], snap.after[n]) for n in base), "a base weight changed"

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    trained_b = {n: t for n, t in snap.after.items() if "lora_B" in n}
    assert len(saved) == len(lora) and all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    assert sorted(t.abs().sum().item() for t in trained_b.values()) == pytest.approx(
        sorted(t.abs().sum().item() for k, t in saved.items() if "lora_B" in k)
    )

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and 0 < summary["trainable_params"] < summary["total_params"]
    ids = torch.tensor([[5, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_base(tiny_model), str(out / "adapter"))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["new-adapter", "previous-adapter-as-reference"])
def test_first_step_loss_is_ln2(make_config, round1_adapter, case):
    """At step 0 the policy equals the reference, so the sigmoid DPO loss is ln 2 (dtype auto: bf16 here if native)."""
    logs = LogCollector()
    extra = {"adapter": str(round1_adapter), "reference": "previous"} if case != "new-adapter" else {}
    run(make_config(max_steps=1, dtype="auto", **extra), callbacks=[logs])
    first = logs.logs[0]
    assert abs(first["loss"] - LN2) < 1e-3
    assert abs(first["rewards/margins"]) < 1e-3


@pytest.mark.parametrize("reference", ["previous", "initial"])
def test_reference_is_previous_policy_or_base(make_config, tiny_model, round1_adapter, reference):
    """reference=previous scores with the round-1 adapter, reference=initial with the base: checked against
    log-probs computed by hand, both through TRL's reference pass and through the first logged loss."""
    config = make_config(adapter=str(round1_adapter), reference=reference, max_steps=1)
    logs = LogCollector()
    trainer = build_trainer(config, callbacks=[logs])
    batch = next(iter(trainer.get_train_dataloader()))  # batch_size = all pairs, so step 1 sees exactly these
    trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    base_c, base_r, _ = hand_logps(load_base(tiny_model), batch)
    prev_c, prev_r, _ = hand_logps(PeftModel.from_pretrained(load_base(tiny_model), str(round1_adapter)), batch)
    assert (prev_c - base_c).abs().max() > 1e-2, "round-1 adapter too close to the base for this test to mean much"
    want_c, want_r = (prev_c, prev_r) if reference == "previous" else (base_c, base_r)
    torch.testing.assert_close(trl_chosen, want_c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(trl_rejected, want_r, atol=1e-4, rtol=1e-5)

    # The training step uses the same reference: the policy starts as the round-1 adapter in both cases (eq. 7 of
    # the DPO paper: loss = -log sigmoid(beta * (policy log-ratio - reference log-ratio))).
    trainer.train()
    beta = config.beta
    expected = -F.logsigmoid(beta * ((prev_c - want_c) - (prev_r - want_r))).mean().item()
    assert logs.logs[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert logs.logs[0]["rewards/chosen"] == pytest.approx(beta * (prev_c - want_c).mean().item(), abs=1e-5)
    if reference == "initial":
        assert abs(expected - LN2) > 1e-3  # otherwise the two cases would be indistinguishable


@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_pairs_file_trains_without_conversion(make_config, pairs_file, conv_pairs_file, style):
    """A pairs JSONL with id/score/meta columns, in either TRL format, goes from load_dataset('json') to training."""
    path = pairs_file if style == "standard" else conv_pairs_file
    dataset = load_pairs(path)
    assert {"id", "score_chosen", "score_rejected", "margin", "meta"} <= set(dataset.column_names)
    logs = LogCollector()
    trainer = build_trainer(make_config(pairs=str(path)), callbacks=[logs])
    prompt = trainer.processing_class.decode(trainer.train_dataset[0]["prompt_ids"])
    if style == "standard":
        assert prompt == dataset[0]["prompt"]
    else:  # the chat template was applied, with the generation prompt
        assert prompt == f"user: {dataset[0]['prompt'][0]['content']}\nassistant: "
    trainer.train()
    assert len(logs.logs) == 2 and all(math.isfinite(x["loss"]) for x in logs.logs)


def test_sigmoid_plus_sft_loss(make_config, tiny_model):
    """loss 'sigmoid,sft' with weights 1,0.5 gives ln 2 + 0.5 * chosen-token NLL at step 0 (RPO)."""
    config = make_config(loss="sigmoid,sft", loss_weights="1.0,0.5", max_steps=1)
    assert config.loss == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.5]
    logs = LogCollector()
    trainer = build_trainer(config, callbacks=[logs])
    batch = next(iter(trainer.get_train_dataloader()))
    _, _, chosen_tokens = hand_logps(load_base(tiny_model), batch)
    trainer.train()
    assert logs.logs[0]["loss"] == pytest.approx(LN2 - 0.5 * chosen_tokens.mean().item(), abs=1e-4)


@pytest.mark.parametrize(
    "reference", [None, "previous", "initial"], ids=["new-adapter", "adapter-previous", "adapter-initial"]
)
def test_resume_matches_straight_run(make_config, round1_adapter, reference):
    """Killed after checkpoint 2 and re-run, training resumes from the last complete checkpoint (a torn one is
    skipped) and ends with the same adapter and losses as an uninterrupted run; a finished run is not redone."""
    extra = {"adapter": str(round1_adapter), "reference": reference} if reference else {}
    settings = dict(max_steps=-1, epochs=1, batch_size=2, save_steps=2, lr=1e-2, **extra)  # 8 pairs: 4 steps
    straight_logs = LogCollector()
    straight = run(make_config("straight", **settings), callbacks=[straight_logs])

    config = make_config("resumed", **settings)
    with pytest.raises(SimulatedCrash):
        run(config, callbacks=[CrashAfterSave(2)])
    ckpts = Path(config.out) / "checkpoints"
    torn = Path(shutil.copytree(ckpts / "checkpoint-2", ckpts / "checkpoint-4"))  # killed while saving step 4
    (torn / "trainer_state.json").unlink()
    assert last_complete_checkpoint(ckpts).name == "checkpoint-2"

    resumed_logs = LogCollector()
    resumed = run(config, callbacks=[resumed_logs])
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    assert [x["step"] for x in resumed_logs.logs] == [3, 4]
    assert [x["loss"] for x in resumed_logs.logs] == pytest.approx(
        [x["loss"] for x in straight_logs.logs[2:]], abs=1e-6
    )
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and not any(".ref." in k for k in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)

    again = Snapshot()
    run(config, callbacks=[again])  # finished: returns at once
    assert not hasattr(again, "before")
    assert json.loads((resumed / "train_summary.json").read_text()) == summary


def test_full_finetune_trains_every_weight_against_a_frozen_copy(make_config):
    """lora=False trains all weights, with TRL's frozen copy of `model` as reference (ln 2 at step 0), to out/model."""
    snap, logs = Snapshot(), LogCollector()
    out = run(make_config(lora=False, lr=1e-3), callbacks=[snap, logs])
    assert abs(logs.logs[0]["loss"] - LN2) < 1e-3
    assert all(not torch.equal(snap.before[n], snap.after[n]) for n in snap.before)
    saved = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    trained = {n.removeprefix("module."): p for n, p in snap.after.items()}
    for name, param in saved.named_parameters():
        torch.testing.assert_close(param, trained[name])


def test_changed_config_is_refused(make_config):
    """Re-running an output dir with a different training config names the changed keys instead of mixing runs."""
    config = make_config(max_steps=1)
    run(config)
    with pytest.raises(ConfigDriftError, match="beta"):
        run(make_config(max_steps=1, beta=0.5))


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        ({"reference": "base"}, "initial"),
        ({"lora": False, "adapter": "x"}, "drop --adapter"),
        ({"loss": "sigmoid,dpo"}, "choose from"),
        ({"loss": "sigmoid,sft", "loss_weights": "1.0"}, "one weight per loss"),
        ({"lora": False, "merge": True}, "drop --merge"),
        ({"lora_target_modules": "q_proj,lm_head"}, "remove lm_head"),
        ({"dtype": "fp8"}, "one of"),
    ],
)
def test_bad_config_names_the_fix(overrides, fix):
    """Invalid train configs fail at construction with a message that says how to fix them."""
    with pytest.raises(ConfigError, match=fix):
        TrainConfig(model="m", pairs="p.jsonl", out="o", **overrides)
