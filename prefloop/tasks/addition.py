"""The demo's verifiable task: 2-digit addition as raw-text prompts ("12+34=" -> "46", then EOS).

Pure functions, no I/O: `make_prompts` yields prompt records, `reward` is the python judge (TRL reward-function
convention), loadable as `prefloop.tasks.addition:reward` or `prefloop/tasks/addition.py:reward`.

    python -c "from prefloop.tasks.addition import make_prompts; print(make_prompts(3, seed=0, split='heldout'))"
"""

from __future__ import annotations

import hashlib
import random
from functools import cache
from typing import Any

SPLITS = ("train", "heldout")
HELDOUT_SIZE = 1000  # of the 10,000 problems a+b with a, b in 0..99


def problem_id(a: int, b: int) -> str:
    """The stable id of the problem `a+b`."""
    return f"add-{a}-{b}"


@cache
def _split(split: str) -> tuple[tuple[int, int], ...]:
    # The partition must not depend on `seed`, the Python version or the process (`hash()` is salted per process),
    # so problems are ordered by a sha256 of their id and the last HELDOUT_SIZE are held out, forever.
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems = sorted(
        ((a, b) for a in range(100) for b in range(100)),
        key=lambda ab: hashlib.sha256(problem_id(*ab).encode()).hexdigest(),
    )
    cut = len(problems) - HELDOUT_SIZE
    return tuple(problems[:cut] if split == "train" else problems[cut:])


def split_size(split: str) -> int:
    """How many distinct problems `split` holds (9000 train, 1000 heldout)."""
    return len(_split(split))


def make_prompts(n: int, seed: int, split: str) -> list[dict[str, str]]:
    """`n` distinct problems of `split`, chosen by `seed`: `[{"id": "add-12-34", "prompt": "12+34=", "answer": "46"}]`.

    The train/heldout partition is fixed (independent of `seed`); `seed` only picks which problems of the split,
    in which order. Sampling is without replacement, so `n` larger than the split raises.
    """
    problems = _split(split)
    if not 0 <= n <= len(problems):
        raise ValueError(
            f"n={n} is out of range for split {split!r}: it holds {len(problems)} distinct problems (max n)."
        )
    chosen = random.Random(seed).sample(problems, n)
    return [{"id": problem_id(a, b), "prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in chosen]


def _completion_text(completion: Any) -> str | None:
    # TRL hands conversational completions as a message list; the model's answer is the last message.
    if completion is None or isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        content = completion[-1].get("content") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, list):  # multimodal-style content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if content is None or isinstance(content, str) else str(content)
    raise TypeError(f"completion must be a str or a list of messages, got {type(completion).__name__}")


def reward(
    prompts: list[Any], completions: list[Any], answer: list[Any] | str | int, **kwargs: Any
) -> list[float | None]:
    """1.0 where `completion.strip() == answer`, else 0.0; None where there is nothing to verify.

    TRL reward-function convention: lists in (the dataset's `answer` column arrives as a keyword), one value per
    completion out. None (no completion text, or no reference answer) is a failure to judge, not a wrong answer:
    the judge records it as such instead of coercing it into a score.
    """
    if isinstance(answer, (str, int)):  # a single reference for every completion
        answer = [answer] * len(completions)
    if len(answer) != len(completions):
        raise ValueError(
            f"got {len(completions)} completions but {len(answer)} answers; pass one answer per completion"
        )
    scores: list[float | None] = []
    for completion, ref in zip(completions, answer, strict=True):
        text = _completion_text(completion)
        if text is None or ref is None:
            scores.append(None)
        else:
            scores.append(1.0 if text.strip() == str(ref).strip() else 0.0)
    return scores
