"""Training methods: which TRL trainer turns a pairs file into a policy, and with which of its settings.

| method  | TRL trainer (1.16)                      | reference          | data it trains on                         |
| ------- | --------------------------------------- | ------------------ | ----------------------------------------- |
| `dpo`   | `trl.DPOTrainer` (`loss`: its loss_type) | yes (`reference`)  | pairs                                     |
| `orpo`  | `trl.experimental.orpo.ORPOTrainer`      | none               | pairs (SFT on chosen + odds-ratio term)   |
| `kto`   | `trl.KTOTrainer`                         | yes (`reference`)  | pairs unpaired (chosen -> desirable, rejected -> undesirable), or a KTO file (`prompt`, `completion`, `label`) |
| `simpo` | `trl.experimental.cpo.CPOTrainer`, loss_type `simpo`, `cpo_alpha` 0 | none | pairs |
| `sft`   | `trl.SFTTrainer`                         | none               | the chosen answers (best-of-n rejection sampling), or a file of `prompt`, `completion` |
| `grpo`  | `trl.GRPOTrainer`, answers served by `rollout_func` (train/grpo.py) | none (beta 0) | a groups file: every scored answer of each prompt (`prefloop export --format groups`) |

`beta` means what each trainer calls beta: DPO's and KTO's KL strength, ORPO's λ (the weight of the odds-ratio
term against the SFT loss, the paper's λ), SimPO's reward scale β (with `simpo_gamma`, the target margin γ). Its
default is TRL's per method (0.1), except SimPO, whose paper and TRL's docs pair β = 2.0 with γ = 0.5 (TRL's own
default β of 0.1 with γ 0.5 asks for a margin the scaled rewards can hardly reach). `sft` has no beta; `grpo` keeps
TRL's default 0 (no KL term), the only value it takes.

Every method is trained with LoRA by default and keeps the train stage's contract (checkpoints, resume, summary,
drift refusal, merge); the losses are TRL's, never rewritten here.

A pairs file's `tools` and `chat_template_kwargs` columns (what generate rendered the prompts with) stay beside the
rows: dpo, kto and sft pass both to the chat template, as TRL's trainers do. orpo and simpo (TRL's experimental
trainers) read `chat_template_kwargs` but not `tools`, so a file with tools is refused for them rather than trained
on prompts rendered without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefloop.config import ConfigError
from prefloop.records import TEMPLATE_COLUMNS
from prefloop.train.grpo import GROUPS, group_shape, step_groups

METHODS = ("dpo", "orpo", "kto", "simpo", "sft", "grpo")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1, "simpo": 2.0, "sft": 0.1, "grpo": 0.0}
PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")  # TRL's unpaired preference format (KTO)
COMPLETIONS = ("prompt", "completion")  # TRL's prompt-completion format (SFT)


@dataclass(frozen=True)
class Method:
    name: str
    uses_reference: bool  # a reference model (the base or the previous round's adapter) enters the loss
    accepts: tuple[tuple[str, ...], ...]  # column sets a training file may have, the first being a pairs file

    def trainer(self) -> tuple[type, type]:
        """(Trainer class, its config class) from the installed TRL."""
        if self.name == "dpo":
            from trl import DPOConfig, DPOTrainer

            return DPOTrainer, DPOConfig
        if self.name == "kto":
            from trl import KTOConfig, KTOTrainer

            return KTOTrainer, KTOConfig
        if self.name == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            return ORPOTrainer, ORPOConfig
        if self.name == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            return CPOTrainer, CPOConfig
        if self.name == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            return GRPOTrainer, GRPOConfig
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer, SFTConfig

    def options(self, config) -> dict[str, Any]:
        """The method's own settings for its TRL config class (the shared ones are set by the stage)."""
        dropout = {"disable_dropout": config.lora_dropout == 0.0}
        if self.name == "dpo":
            return {
                "beta": config.beta,
                "loss_type": list(config.loss),
                "loss_weights": config.loss_weights,
                "ld_alpha": config.ld_alpha,
                **dropout,
            }
        if self.name == "kto":
            return {
                "beta": config.beta,
                "desirable_weight": config.desirable_weight,
                "undesirable_weight": config.undesirable_weight,
                **dropout,
            }
        if self.name == "orpo":
            return {"beta": config.beta, **dropout}
        if self.name == "simpo":
            return {
                "beta": config.beta,
                "loss_type": "simpo",
                "cpo_alpha": 0.0,
                "simpo_gamma": config.simpo_gamma,
                **dropout,
            }
        if self.name == "grpo":
            # TRL's defaults otherwise (loss_type dapo, scale_rewards group, beta 0). The answers are given, so
            # max_length caps only nothing TRL generates; it is the completion cap TRL's config has instead.
            n, groups = group_shape(config.pairs)  # batch_size counts groups (rows), as it counts pairs for dpo
            batch = step_groups(config.batch_size, config.grad_accum, groups)
            return {"num_generations": n, "per_device_train_batch_size": batch * n,
                    "max_completion_length": config.max_length, "temperature": config.temperature, **dropout}
        return {"completion_only_loss": True}  # sft: the loss is on the answer, never the prompt

    def dataset(self, dataset, seed: int = 0):
        """The rows the trainer reads, from a pairs file (or a file already in the method's own format).

        kto: TRL's KTO reads its rows in order (its KL estimate pairs each row with its batch neighbours), and
        unpairing puts every chosen answer before every rejected one, so batches would hold one label only: the rows
        are shuffled here, seeded by `seed`, so each batch mixes desirable and undesirable answers."""
        columns = set(dataset.column_names)
        template = [c for c in TEMPLATE_COLUMNS if c in columns]
        if self.name == "kto":
            if set(PAIRED) <= columns:
                from trl.data_utils import unpair_preference_dataset

                dataset = unpair_preference_dataset(dataset.select_columns([*PAIRED, *template]))
            return dataset.select_columns([*UNPAIRED, *template]).shuffle(seed=seed).flatten_indices()
        if self.name == "sft" and set(PAIRED) <= columns:
            return dataset.select_columns(["prompt", "chosen", *template]).rename_column("chosen", "completion")
        for wanted in self.accepts:
            if set(wanted) <= columns:
                # Extra columns (id, scores, meta) mean nothing to a trainer, and some trainers' collators choke on
                # nested ones; DPO drops them itself.
                if self.name == "grpo":  # TRL passes every column to the reward function, and `completions` is its
                    cut = ["truncated"] if "truncated" in columns else []  # no EOS after these
                    return dataset.select_columns([*wanted, *cut, *template]).rename_column("completions", "answers")
                return dataset.select_columns([*wanted, *template])
        raise AssertionError(f"{self.name}: columns {sorted(columns)} were checked on load")


_METHODS = {
    "dpo": Method("dpo", True, (PAIRED,)),
    "orpo": Method("orpo", False, (PAIRED,)),
    "kto": Method("kto", True, (PAIRED, UNPAIRED)),
    "simpo": Method("simpo", False, (PAIRED,)),
    "sft": Method("sft", False, (PAIRED, COMPLETIONS)),
    "grpo": Method("grpo", False, (GROUPS,)),
}


def method(name: str) -> Method:
    return _METHODS[name]


def check_template_columns(dataset, path: Any, name: str) -> None:
    """Refuse a pairs file whose chat-template columns the trainer would get wrong, before any model loads."""
    if "tools" in dataset.column_names and name in ("orpo", "simpo"):
        raise ConfigError(f"{path}: the pairs carry `tools`, which TRL's {name} trainer does not pass to the chat "
                          "template, so it would train on prompts rendered without them. Fix: train with --method "
                          "dpo, kto or sft.")
    if "chat_template_kwargs" in dataset.column_names and None in dataset["chat_template_kwargs"]:
        row = dataset["chat_template_kwargs"].index(None) + 1
        raise ConfigError(f"{path}: row {row} has no `chat_template_kwargs`, which other rows have (TRL renders "
                          "every row with its own). Fix: train on pairs generated with one chat_template_kwargs "
                          "setting.")


def rows_word(name: str) -> str:
    """What one training row is, for log lines and summaries."""
    return {"kto": "labelled completions", "sft": "completions", "grpo": "answer groups"}.get(name, "pairs")
