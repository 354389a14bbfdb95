"""What the train stage does differently when it is one of N ranks started by `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 -m prefloop.cli train --config train.yaml   # 2 CPU ranks, gloo

TRL's `DPOTrainer` (through transformers' Trainer and accelerate) already shards batches, all-reduces gradients,
averages the logged loss over ranks and writes checkpoints from the main rank only. What is left for prefloop is
its own side effects, which must happen once, on the main rank:

- the run-state decision (`config.yaml` written or checked for drift, "already done", which checkpoint to resume
  from) is made on the main rank and broadcast, so every rank resumes from the same checkpoint, and a refusal
  (changed config) is raised on every rank with the same message instead of leaving the others at a barrier;
- the final adapter/model dir, the merged model and `train_summary.json` are written by the main rank, after the
  weights are gathered on every rank (FSDP / ZeRO-3 shard them); the others wait at a barrier until they exist;
- prefloop's log lines and progress bars come from the main rank only.

With a single process every helper here degrades to "this is the main rank" and no collective is called.
Multi-node runs need `out` on a file system every node sees (as Trainer's own checkpoint resume does).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def is_replica() -> bool:
    """True in a non-main rank of a distributed run: it must not print results or write outputs.

    Reads accelerate's process state only if something already set it up (the train stage does, through
    `TrainingArguments`), so callers such as the CLI pay no import for it."""
    state = sys.modules.get("accelerate.state")
    if state is None or not state.PartialState._shared_state:
        return False
    return not state.PartialState().is_main_process


def quiet_replicas(ranks) -> None:
    """On non-main ranks, keep prefloop's INFO lines and the datasets/transformers progress bars quiet: N copies of
    every line say nothing more than one. Warnings and errors still show (a rank that fails must say why)."""
    if ranks.is_main_process:
        return
    import datasets
    import transformers

    logging.getLogger("prefloop").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def decide_on_main(ranks, decide: Callable[[], T]) -> T:
    """Run `decide()` on the main rank only and give its result to every rank.

    An exception raised there (a config drift refusal, a disk error) is re-raised on every rank, so no rank is left
    waiting at a collective for one that gave up."""
    if ranks.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if ranks.is_main_process:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # re-raised below, on this rank too
            box[0] = ("error", e)
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def gathered_state_dict(trainer) -> dict | None:
    """The full weights for saving, or None when the unwrapped model already holds them (one process, DDP).

    Under FSDP and DeepSpeed ZeRO-3 each rank holds a shard; `accelerator.get_state_dict` gathers them (a
    collective: every rank must call it) and returns the whole dict on the main rank. ZeRO-3 needs
    `zero3_save_16bit_model: true` in the accelerate config for this (see examples/accelerate/README.md)."""
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def world(ranks, config) -> dict[str, Any]:
    """How the run was spread, for the summary: processes, their type, and the global batch they made."""
    return {
        "processes": ranks.num_processes,
        "distributed_type": str(ranks.distributed_type).rsplit(".", 1)[-1],
        "global_batch": config.batch_size * config.grad_accum * ranks.num_processes,
    }
