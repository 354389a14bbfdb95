"""Demo and test tasks shipped with prefloop: prompt generators with verifiers in TRL's reward-function convention.

Each task module is pure Python (no models, no downloads): it makes prompt rows in prefloop's prompt format and
scores answers with a function the `python` judge loads as `--reward-fn prefloop.tasks.<module>:<function>`.

- `instructions`: verifiable instruction following in the spirit of IFEval (a request plus checkable constraints).
- `word_problems`: one-step arithmetic stories with a numeric answer (the third task behind the train defaults).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

MakePrompts = Callable[..., list[dict[str, Any]]]  # make_prompts(n, split=..., seed=...)


def write_splits(directory: str | Path, make_prompts: MakePrompts, n_train: int, n_heldout: int,
                 seed: int) -> tuple[Path, Path]:
    """Write a task's `directory/train.jsonl` and `directory/heldout.jsonl` (each replaced atomically), drawn by
    `make_prompts` with one `seed` for both; return both paths."""
    from prefloop.store import atomic_write, dumps

    paths = []
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        path = Path(directory) / f"{split}.jsonl"
        atomic_write(path, "".join(dumps(row) for row in make_prompts(n, split=split, seed=seed)))
        paths.append(path)
    return paths[0], paths[1]


def task_main(module: str, write_task: Callable[..., tuple[Path, Path]], n_train: int, n_heldout: int,
              argv: list[str] | None = None) -> None:
    """`python -m prefloop.tasks.<module> DIR [--train N] [--heldout N] [--seed S]`: write the task's files."""
    parser = argparse.ArgumentParser(prog=f"python -m prefloop.tasks.{module}",
                                     description=f"Write the {module} task's train and held-out prompts.")
    parser.add_argument("directory")
    parser.add_argument("--train", type=int, default=n_train, help=f"train prompts (default {n_train})")
    parser.add_argument("--heldout", type=int, default=n_heldout, help=f"held-out prompts (default {n_heldout})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_task(args.directory, args.train, args.heldout, args.seed):
        print(path)
