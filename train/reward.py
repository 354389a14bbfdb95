"""Train a Bradley-Terry reward model on a pairs file with TRL's `RewardTrainer`.

    python -m prefloop.train.reward --model BASE --pairs pairs.jsonl --out rm/        # then: --judge reward_model

`model` is any causal-LM or sequence-classification checkpoint; it is loaded as
`AutoModelForSequenceClassification` with one output (a fresh score head) and fully fine-tuned. The pairs are
prefloop's (TRL's) preference format, standard or conversational, as `prefloop pairs` writes them. TRL appends
EOS to standard-format texts, and `RewardModelJudge` scores raw text the same way, so training and judging read
the score at the same token.

The tiny reward model the tests use (no downloads) is built on top of this, in the demo layer:
`prefloop.demo.addition_rm.train_addition_rm`.

Failure semantics: the model is written to a temp dir beside `out` and renamed into place; a killed run leaves
no half model (re-run to train again; RM training here is minutes, so it does not checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from prefloop.config import add_arguments, field, from_args
from prefloop.store import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class RewardTrainConfig:
    model: str = field(help="Backbone: a causal-LM or sequence-classification model directory, hub id, .gguf file "
                       "or `prefloop train` output.")
    pairs: str = field(help="Preference pairs JSONL (TRL format, as `prefloop pairs` writes it).")
    out: str = field(help="Directory for the reward model (+ tokenizer and reward_summary.json).", hash=False)
    lr: float = field(1e-4, help="Peak learning rate.")
    epochs: float = field(1.0, help="Passes over the pairs.")
    batch_size: int = field(32, help="Pairs per step.")
    max_length: int | None = field(None, help="Drop pairs longer than this many tokens.")
    seed: int = field(0, help="Seed for the score head's init and data order.")
    dtype: str = field("float32", help="Training dtype.")
    logging_steps: int = field(20, help="Log the loss every this many steps.", hash=False)


def run(config: RewardTrainConfig) -> Path:
    """Train; save the reward model to `config.out` atomically; return it."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.data_utils import is_conversational

    from prefloop.device import DTYPES
    from prefloop.models import resolve_model

    started = time.time()
    backbone = resolve_model(config.model, dtype=config.dtype)  # a .gguf, a train output's merged/ or model/
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=DTYPES[config.dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = datasets.load_dataset("json", data_files=config.pairs, split="train")
    dataset = dataset.select_columns([c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names])
    out = Path(config.out)
    args = trl.RewardConfig(
        output_dir=str(out.parent / f".{out.name}.trainer"), learning_rate=config.lr,
        num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size, seed=config.seed,
        max_length=config.max_length, logging_steps=config.logging_steps, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), lr_scheduler_type="cosine", warmup_steps=10,
        bf16=config.dtype == "bfloat16", disable_tqdm=True,
    )
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "pairs": len(dataset), "final_loss": losses[-1] if losses else None,
               "mean_loss": result.training_loss, "seconds": round(time.time() - started, 1)}
    if not is_conversational(dataset[0]) and tokenizer.chat_template:
        # Trained on raw text: a chat template left on the tokenizer would make judges (`--rm-template auto`)
        # score a format the model never saw.
        log.info("reward model: trained on text pairs; saving its tokenizer without the chat template")
        tokenizer.chat_template = None
    with atomic_dir(out) as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reward_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("reward model saved to %s (%s)", out, summary)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prefloop.train.reward", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML with the same keys as the flags.")
    add_arguments(parser, RewardTrainConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run(from_args(RewardTrainConfig, parser.parse_args(argv))))


if __name__ == "__main__":
    main()
