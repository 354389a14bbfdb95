"""One-step arithmetic word problems with a checkable answer: a task for a real chat model that prefloop never
trained for it (the third task behind the train defaults, beside the addition demo and `instructions`).

    python -m prefloop.tasks.word_problems DIR [--train N] [--heldout N] [--seed S]   # DIR/train.jsonl, heldout.jsonl
    prefloop judge ... --judge python --reward-fn prefloop.tasks.word_problems:reward

A prompt is one short story ("Mia has 14 stickers and gets 9 more. How many stickers does Mia have now?") from a
template (add, subtract, multiply, share) with a name, an object and two numbers; its row carries the `answer`.
Train and held-out prompts use different names and objects, so a held-out prompt never repeats a training
story. The verifier reads the answer's last number (digits, with an optional sign or thousands commas, or a number
word up to twenty): 1.0 when it equals the row's answer, else 0.0.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any

from prefloop.tasks import task_main, write_splits
from prefloop.tasks.instructions import completion_text

# (template, operation): {name} {obj} {a} {b}; the operation gives the answer from a and b.
TEMPLATES = (
    ("{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?", "add"),
    ("{name} had {a} {obj} and gave away {b}. How many {obj} does {name} have left?", "sub"),
    ("{name} buys {a} boxes with {b} {obj} in each box. How many {obj} does {name} have in all?", "mul"),
    ("{name} shares {a} {obj} equally among {b} friends. How many {obj} does each friend get?", "div"),
    ("There are {a} {obj} on a table and {name} puts {b} more there. How many {obj} are on the table?", "add"),
    ("{name} needs {a} {obj} and already has {b}. How many more {obj} does {name} need?", "sub"),
)
NAMES = {
    "train": ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Ines", "Kai", "Lena", "Ravi", "Sara", "Tom"),
    "heldout": ("Nina", "Paul", "Yuki", "Hugo", "Ella", "Sam"),
}
OBJECTS = {
    "train": ("apples", "stickers", "marbles", "pencils", "cookies", "books", "coins", "shells"),
    "heldout": ("cards", "stamps", "buttons", "candles", "plums"),
}
SPLITS = tuple(NAMES)
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty").split()
NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?![\d])|(?<![\w.])-?\d+(?:\.\d+)?|\b(?:" + "|".join(WORDS) + r")\b",
                    re.IGNORECASE)


def _numbers(op: str, rng: random.Random) -> tuple[int, int, int]:
    """(a, b, answer) for `op`, kept small enough for a small model to have a chance."""
    if op == "add":
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        return a, b, a + b
    if op == "sub":
        a = rng.randint(5, 60)
        b = rng.randint(1, a - 1)
        return a, b, a - b
    if op == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return a, b, a * b
    b, answer = rng.randint(2, 6), rng.randint(2, 9)
    return answer * b, b, answer


def make_prompts(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct rows of `split` drawn by `seed`: `{"id", "prompt": [user message], "answer"}`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"prefloop.tasks.word_problems:{split}:{seed}")
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(50 * n + 100):
        if len(rows) == n:
            break
        template, op = rng.choice(TEMPLATES)
        a, b, answer = _numbers(op, rng)
        text = template.format(name=rng.choice(NAMES[split]), obj=rng.choice(OBJECTS[split]), a=a, b=b)
        rid = f"wp-{split}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        rows.setdefault(rid, {"id": rid, "prompt": [{"role": "user", "content": text}], "answer": answer})
    if len(rows) < n:
        raise ValueError(f"could not draw {n} distinct prompts from split {split!r} (got {len(rows)})")
    return list(rows.values())


def write_task(directory: str | Path, n_train: int = 2000, n_heldout: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write `directory/train.jsonl` and `directory/heldout.jsonl` atomically; return both paths."""
    return write_splits(directory, make_prompts, n_train, n_heldout, seed)


def last_number(text: str) -> float | None:
    """The last number written in `text` (digits or a number word up to twenty), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    token = found[-1].lower().replace(",", "")
    return float(WORDS.index(token)) if token in WORDS else float(token)


def reward(prompts: list[Any], completions: list[Any], answer: list[Any] | None = None,
           **columns: Any) -> list[float | None]:
    """1.0 where the completion's last number equals its row's `answer`, else 0.0 (TRL reward-function convention:
    `answer` arrives as a keyword list). None (no completion text) is a failure to judge, not a 0."""
    if answer is None:
        raise ValueError("no `answer` column: pass the rows `make_prompts` writes")
    out: list[float | None] = []
    for completion, want in zip(completions, answer, strict=True):
        text = completion_text(completion)
        if text is None:
            out.append(None)
            continue
        got = last_number(text)
        out.append(float(got is not None and abs(got - float(want)) < 1e-9))
    return out


def main(argv: list[str] | None = None) -> None:
    task_main("word_problems", write_task, 2000, 200, argv)


if __name__ == "__main__":
    main()

