"""`method: grpo`: TRL's GRPO loss on answers already sampled and scored, the loop's round as GRPO's rollouts.

TRL's `GRPOTrainer` samples its own answers with the policy being trained, a few prompts at a time. Here the answers
come from a groups file (`prefloop export --format groups`: per prompt, every answer generate sampled and the score
judge gave it), served to the trainer through its `rollout_func`: the trainer asks for a batch of prompts' answers
and gets the stored ones, tokenized as its own generation would have left them (the prompt through the chat template
with the generation prompt, the answer's tokens, then EOS unless the answer was cut at the token limit). Their
stored scores are the reward (`stored_reward`), so TRL computes its group-normalised advantages and its loss
(`loss_type`, `scale_rewards`: TRL's defaults) exactly as on its own samples. Nothing of GRPO's loss is rewritten.

What changes against TRL's own loop: sampling is the generate stage's (vLLM's batched engine, any backend) and the
judge stage's, and happens once per round, so an answer may be trained on a few optimizer steps after the policy
that sampled it moved (as in GRPO with `steps_per_generation` > 1). `beta` is TRL's default 0 (no KL term, no
reference model), and log-probabilities are taken at the answers' sampling temperature (`temperature`; the loop
sets it from gen.temperature).

A step takes `batch_size` groups. TRL's sampler deals whole steps only: the groups past the last whole one sit out
the epoch (the summary's `groups_unused_per_epoch`), and a file with fewer groups than one batch trains them all in
one smaller step rather than none (`step_groups`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError
from prefloop.store import InputError, iter_records

log = logging.getLogger(__name__)
GROUPS = ("prompt", "completions", "rewards")  # a groups file's columns (plus `truncated` and template columns)


def group_shape(path: str | Path) -> tuple[int, int]:
    """(answers per prompt, groups) of groups file `path`: every row must have the same number of answers (GRPO's
    num_generations)."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: groups file not found. Fix: run `prefloop export --format groups` first or check "
                          "--pairs.")
    sizes: Counter[int] = Counter()
    first: dict[str, int] = {}
    for lineno, row in iter_records(path):
        if not set(GROUPS) <= row.keys():
            raise InputError(f"{path}:{lineno}: not a groups row (prompt, completions, rewards). Fix: train grpo on "
                             "`prefloop export --format groups` output.")
        n = len(row["completions"])
        if n != len(row["rewards"]) or n < 2:
            raise InputError(f"{path}:{lineno}: {n} completions and {len(row['rewards'])} rewards. Fix: a group needs "
                             "one reward per completion and at least 2 of each.")
        if sizes and n not in sizes:
            raise InputError(f"{path}:{lineno}: {n} answers, while earlier rows have {next(iter(sizes))}; GRPO "
                             "normalises rewards in groups of one size. Fix: sample the same n for every prompt.")
        sizes[n] += 1
        key = _key(row["prompt"])
        if key in first:  # TRL's rollout hook is given the prompt alone, so it must name one group
            raise InputError(f"{path}:{lineno}: the same prompt as line {first[key]}. Fix: merge the two groups' "
                             "answers into one row, or keep one of them.")
        first[key] = lineno
    if not sizes:
        raise ConfigError(f"{path}: no groups to train on. Fix: check the export's skipped counts.")
    return next(iter(sizes)), sizes.total()


def step_groups(batch_size: int, grad_accum: int, groups: int) -> int:
    """The groups per device per step: `batch_size`, or every group when the file holds fewer than one step's.

    TRL's GRPO sampler deals whole steps only (batch_size x grad_accum x processes groups) and drops the rest, so a
    round with fewer groups than a batch (a small round, or one where most prompts' answers tied) would train
    nothing; in one process without accumulation it trains them all in one smaller step instead."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if groups >= batch_size * grad_accum * world:
        return batch_size
    if grad_accum * world > 1:
        raise ConfigError(f"{groups} answer groups, fewer than one step's {batch_size * grad_accum * world} (batch_size "
                          "x grad_accum x processes): nothing would train. Fix: lower --batch-size or --grad-accum, "
                          "or sample more prompts.")
    log.warning("train: %d answer groups, fewer than --batch-size %d: one step of %d", groups, batch_size, groups)
    return groups


def unused_groups(args: Any, groups: int) -> int:
    """Groups TRL's sampler leaves out of each epoch: those past the last whole step (`args`: the GRPOConfig)."""
    per_step = args.generation_batch_size // args.num_generations
    return groups % per_step


def _key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def stored_reward(prompts: list, completions: list, stored_reward: list[float], **kwargs) -> list[float]:
    """The reward function TRL calls: the judge stage's score of each answer, carried by the rollout."""
    return [float(r) for r in stored_reward]


def rollout(dataset, tokenizer, group: int):
    """TRL's `rollout_func` serving `dataset`'s stored answers (a groups file's rows, `completions` named `answers`).

    TRL passes the batch's prompts, each repeated once per answer it wants (its sampler repeats a prompt
    `num_generations` times); the k-th occurrence of a prompt in a call gets the prompt's k-th stored answer."""
    groups = {_key(row["prompt"]): row for row in dataset}
    eos = tokenizer.eos_token_id

    def prompt_ids(row: dict[str, Any]) -> list[int]:
        if isinstance(row["prompt"], str):
            return tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        kwargs = dict(row.get("chat_template_kwargs") or {})
        if row.get("tools"):
            kwargs["tools"] = json.loads(row["tools"])
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, **kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def answer_ids(row: dict[str, Any], k: int) -> list[int]:
        ids = tokenizer(row["answers"][k], add_special_tokens=False)["input_ids"]
        cut = bool((row.get("truncated") or [False] * group)[k])
        return ids if cut else [*ids, eos]

    def serve(prompts: list, trainer: Any = None) -> dict[str, list]:
        seen: Counter[str] = Counter()
        rendered: dict[str, list[int]] = {}  # each prompt through the chat template once per call, not per answer
        out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "stored_reward": []}
        for prompt in prompts:
            key = _key(prompt)
            row = groups.get(key)
            if row is None:
                raise KeyError(f"rollout: a prompt not in the groups file: {key[:120]}")
            k = seen[key] % group
            seen[key] += 1
            if key not in rendered:
                rendered[key] = prompt_ids(row)
            out["prompt_ids"].append(rendered[key])
            out["completion_ids"].append(answer_ids(row, k))
            out["stored_reward"].append(row["rewards"][k])
        if any(n % group for n in seen.values()):  # TRL's sampler always asks for whole groups
            raise RuntimeError(f"rollout: TRL asked for {sorted(set(seen.values()))} answers of a prompt, not whole "
                               f"groups of {group}; TRL's rollout_func contract changed?")
        return out

    return serve
