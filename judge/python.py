"""The `python` judge: a user's reward function (a verifier for math, code, format...) scores each completion.

    prefloop judge --candidates c.jsonl --out j.jsonl --judge python --reward-fn my_rewards.py:correct

The function follows TRL's reward-function convention, so one written for `GRPOTrainer` works unchanged:

    def correct(prompts, completions, **columns) -> list[float | None]

`prompts` and `completions` are parallel lists (one entry per completion; message lists for conversational
prompts, as TRL passes them), and every extra prompt column (e.g. `answer`) arrives as a keyword list. Returning
None, NaN, a non-number, or raising for a row records that row as failed, with the reason; it never becomes a score.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from prefloop.config import ConfigError
from prefloop.judge import ScoringKind, Verdict

RewardFn = Callable[..., list]


def load_function(spec: str) -> RewardFn:
    """Load `path/to/file.py:fn` or `package.module:fn`, with errors that say which part is wrong."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"--reward-fn {spec!r}: expected FILE.py:function or module:function")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.exists():
            raise FileNotFoundError(f"--reward-fn {spec!r}: file {path} not found")
        module_name = f"prefloop_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # lets the user's module use dataclasses/pickling normally
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"--reward-fn {spec!r}: {target} has no function {name!r}")
    return fn


def _as_completion(prompt: Any, text: str) -> Any:
    # TRL passes conversational completions as a message list; plain-text prompts get plain-text completions.
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _check(value: Any) -> tuple[float | None, str | None]:
    """A score, or None with the reason it is not one (None, NaN, inf, a string, a bool...)."""
    if value is None:
        return None, "reward function returned None"
    original = value
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"reward function returned a non-number ({type(original).__name__}: {str(original)[:50]!r})"
    value = float(value)
    if not math.isfinite(value):
        return None, f"reward function returned {value}"
    return value, None


class PythonJudge:
    """Scores completions with a Python function, in batches; isolates failing rows by re-calling one by one."""

    def __init__(self, reward_fn: str | RewardFn, batch_size: int = 256):
        self.fn = load_function(reward_fn) if isinstance(reward_fn, str) else reward_fn
        self.name = f"python:{reward_fn if isinstance(reward_fn, str) else getattr(reward_fn, '__name__', 'fn')}"
        self.batch_size = batch_size

    def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        flat = [(r, i, c) for r, row in enumerate(rows) for i, c in enumerate(row["completions"])]
        verdicts: list[Verdict] = [
            {"scores": [None] * len(row["completions"]), "statuses": ["error"] * len(row["completions"]),
             "errors": [None] * len(row["completions"])}
            for row in rows
        ]
        for start in range(0, len(flat), self.batch_size):
            batch = flat[start : start + self.batch_size]
            for (r, i, _), (score, error) in zip(batch, self._score(rows, batch), strict=True):
                verdicts[r]["scores"][i] = score
                verdicts[r]["statuses"][i] = "ok" if error is None else "error"
                verdicts[r]["errors"][i] = error
        return verdicts

    def _score(self, rows: list[dict], batch: list[tuple]) -> list[tuple[float | None, str | None]]:
        try:
            values = self._call(rows, batch)
        except Exception as e:  # noqa: BLE001 - a user's function may raise anything; isolate the bad rows
            if len(batch) == 1:
                return [(None, f"reward function raised {type(e).__name__}: {e}")]
            return [result for item in batch for result in self._score(rows, [item])]
        if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy array / torch tensor
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(batch):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            error = f"reward function must return a list of {len(batch)} values, got {got}"
            return [(None, error)] * len(batch)
        return [_check(v) for v in values]

    def _call(self, rows: list[dict], batch: list[tuple]) -> list:
        prompts = [rows[r]["prompt"] for r, _, _ in batch]
        completions = [_as_completion(rows[r]["prompt"], c["text"]) for r, _, c in batch]
        keys = sorted({k for r, _, _ in batch for k in rows[r].get("columns", {})})
        columns = {k: [rows[r].get("columns", {}).get(k) for r, _, _ in batch] for k in keys}
        return self.fn(prompts=prompts, completions=completions, **columns)

    def close(self) -> None:
        pass


@dataclass
class PythonOptions(ScoringKind):
    """The `python` judge kind (registered in `prefloop.judge.KINDS`): --reward-fn and --batch-size."""

    reward_fn: str
    batch_size: int = 256

    generator: ClassVar[bool] = False
    cached: ClassVar[bool] = False  # a function is cheap to re-run, and its file may change under the same name

    @classmethod
    def from_config(cls, config: Any) -> PythonOptions:
        if not config.reward_fn:
            raise ConfigError("--judge python needs --reward-fn FILE.py:function (or module:function).")
        return cls(config.reward_fn, config.batch_size)

    def load(self, cache: Any = None) -> PythonJudge:
        return PythonJudge(self.reward_fn, batch_size=self.batch_size)
