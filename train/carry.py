"""One optimizer across rounds (`--carry-optimizer`): AdamW's moments travel with the adapter they belong to.

A round of the loop is a fresh `prefloop train`, so its AdamW starts from zero moments. Adam's first step then moves
every weight by about the learning rate whatever the gradient's size (m / sqrt(v) = g / |g|), and with a few steps a
round that happens over and over; one long TRL run keeps its moments instead. With `carry_optimizer`:

- the run writes its optimizer state as `adapter/optimizer.pt`: the moments and step count of each trainable
  parameter, keyed by the parameter's name;
- a run that continues an adapter (`--adapter`) starts its AdamW from that file, so round k+1 goes on where round k
  stopped. The learning rate and its schedule are this run's own: only the moments and step counts are loaded.

A resumed run (a checkpoint of its own) loads that checkpoint's optimizer instead, as without this option. The names
must match one for one (the same adapter continued, the same modules); a mismatch fails before the first step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError

log = logging.getLogger(__name__)

FILE = "optimizer.pt"


def trainable(trainer) -> list[tuple[str, Any]]:
    """(name, parameter) of each parameter the optimizer holds, in its state-dict order (param groups, then params)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for group in trainer.optimizer.param_groups for p in group["params"]]


def save(trainer, adapter_dir: Path) -> None:
    """Write the optimizer's per-parameter state into `adapter_dir` (a directory being written atomically)."""
    import torch

    state = trainer.optimizer.state_dict()["state"]
    names = [name for name, _ in trainable(trainer)]
    torch.save({"names": names, "state": {names[i]: s for i, s in state.items()}}, Path(adapter_dir) / FILE)


def saved_state(adapter_dir: str | Path, adapter: str) -> Path:
    """The optimizer file beside a continued adapter; a clear refusal when that adapter was trained without one."""
    path = Path(adapter_dir) / FILE
    if not path.is_file():
        raise ConfigError(f"{adapter}: no {FILE}, so there is no optimizer state to carry (that adapter was trained "
                          "without carry_optimizer). Fix: drop carry_optimizer for this run, or retrain that one "
                          "with it.")
    return path


def start_from(trainer, path: Path) -> None:
    """Create `trainer`'s optimizer now (Trainer keeps one that exists) and start it from the moments at `path`."""
    import torch

    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ConfigError("carry_optimizer with DeepSpeed or FSDP: their optimizers are sharded and built by them. "
                          "Fix: drop carry_optimizer, or train in one process or with DDP.")
    trainer.create_optimizer()
    saved: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    params = trainable(trainer)
    names = [name for name, _ in params]
    if sorted(names) != sorted(saved["names"]):
        differ = sorted(set(names) ^ set(saved["names"]))[:3]
        raise ConfigError(f"{path}: its parameters differ from this run's trainable ones (e.g. {differ}). "
                          "Fix: carry an optimizer only into the adapter it was saved with.")
    shapes = {name: tuple(p.shape) for name, p in params}
    for name, state in saved["state"].items():
        if "exp_avg" in state and tuple(state["exp_avg"].shape) != shapes[name]:
            raise ConfigError(f"{path}: {name} has shape {tuple(state['exp_avg'].shape)} there and {shapes[name]} "
                              "here. Fix: carry an optimizer only into the adapter it was saved with.")
    current = trainer.optimizer.state_dict()  # this run's param groups (lr, weight decay) and no state yet
    current["state"] = {i: saved["state"][name] for i, name in enumerate(names) if name in saved["state"]}
    trainer.optimizer.load_state_dict(current)
    steps = sorted({int(s["step"]) for s in current["state"].values() if "step" in s})
    log.info("train: optimizer state carried from %s (%d parameters, at step %s)", path, len(current["state"]),
             ",".join(map(str, steps)) or "-")
