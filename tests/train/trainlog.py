"""Trainer callbacks and a hand log-prob computation the train tests share."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class LogCollector(TrainerCallback):
    """Keeps every training log dict (logging_steps=1 gives one per step)."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append({**logs, "step": state.global_step})


class Snapshot(TrainerCallback):
    """Copies the model's parameters when training begins and ends."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


class SimulatedCrash(Exception):
    pass


class CrashAfterSave(TrainerCallback):
    """Dies right after checkpoint `step` is complete, like a killed job."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedCrash


def hand_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the completions (chosen, rejected) and the chosen tokens' log-probs, via plain logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    chosen, rejected = (token_logps * mask).sum(1).chunk(2)
    chosen_tokens = token_logps.chunk(2)[0][mask.chunk(2)[0]]
    return chosen, rejected, chosen_tokens
