"""Verifiable instruction following, in the spirit of IFEval: an everyday request plus one or two checkable constraints.

    "Describe how bread is made. Answer in at most 30 words. Do not use any commas (",") in your answer."

Pure functions, no I/O except `write_task`: `make_prompts` yields prompt rows (chat messages, plus a `constraints`
column of JSON specs such as `{"kind": "max_words", "n": 30}` and a `topic` column, both handed to the judge),
`check` verifies a text against specs, and `reward` / `strict` are python judges (TRL reward-function convention):

    python -m prefloop.tasks.instructions data/ --train 4000 --heldout 500 --seed 0   # data/train.jsonl, heldout.jsonl
    prefloop judge --candidates c.jsonl --out j.jsonl --judge python --reward-fn prefloop.tasks.instructions:reward

Scores. `reward` is the fraction of a prompt's constraints the answer meets (IFEval's instruction-level score);
`strict` is 1.0 only when all are met (IFEval's prompt-level strict accuracy). `reward` is the default for
training, because preference pairs need a score gap: with N samples from a small model that meets every
constraint of a prompt only now and then, a 0/1 score ties (and drops) most prompts whose samples all fail, while
the fraction still ranks "one of two constraints met" above "none met". The cost is that partial credit can favour
answers that meet the easy constraint and ignore the hard one; `strict` is the honest headline metric, and binary,
so the loop reports it as held-out accuracy. In the loop:

    judge: {judge: python, reward_fn: prefloop.tasks.instructions:reward}
    eval_judge: {reward_fn: prefloop.tasks.instructions:strict}

Which one trains better is not measured here: both are available. Generate with room for the longest bound (`min_words` 150: about
256 new tokens), or truncated answers (which `prefloop pairs` drops) will crowd out the long ones.

Splits. Train and held-out prompts share no topic and, for every constraint kind with parameters, no parameter
set (held-out uses other word and sentence bounds, bullet counts, paragraph counts, words, phrases and
characters); the parameterless kinds (lowercase, uppercase, quotes, json, postscript) appear in both. The
partition is fixed by the tables below; the seed only picks topics and constraints within a split.

Checking. Every checker sees the answer with surrounding whitespace stripped, and an empty answer meets no
constraint (not even "at most 30 words"): an empty reply must never be rewarded. Definitions used throughout:
a word is a regex `\\b\\w+\\b` token (so "don't" is two words, "don" and "t", and "well-known" is "well" and
"known"); a sentence is a piece between `[.!?]+` runs that contains a word character (so "3.5" splits and
"P.S." counts as two sentences); a paragraph is a block between blank lines.

Constraint pairs never contradict each other: `compatible` encodes the rules (families that exclude each other,
kinds that never mix, and parameter checks such as "no colons" against a start phrase containing one), and the
tests build an answer that meets every compatible pair of each split.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.tasks import task_main, write_splits
from prefloop.tasks.constraints import (  # noqa: F401 - re-exported: the checkers are part of this module's API
    check_bullets,
    check_ends_with,
    check_forbid_words,
    check_include_words,
    check_json,
    check_lowercase,
    check_max_sentences,
    check_max_words,
    check_min_sentences,
    check_min_words,
    check_no_char,
    check_paragraphs,
    check_postscript,
    check_quotes,
    check_starts_with,
    check_uppercase,
    render_bullets,
    render_ends_with,
    render_forbid_words,
    render_include_words,
    render_json,
    render_lowercase,
    render_max_sentences,
    render_max_words,
    render_min_sentences,
    render_min_words,
    render_no_char,
    render_paragraphs,
    render_postscript,
    render_quotes,
    render_starts_with,
    render_uppercase,
    split_paragraphs,
    split_sentences,
    split_words,
)
from prefloop.tasks.topics import TOPICS

SPLITS = ("train", "heldout")
TWO_CONSTRAINTS = 0.5  # probability that a prompt carries two constraints rather than one

# ---------------------------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """A constraint kind: its checker `check(text, **params)`, its instruction `render(**params)`, its parameter
    sets per split, its family (a prompt holds at most one constraint per family), and its sampling weight."""

    name: str
    check: Callable[..., bool]
    render: Callable[..., str]
    params: dict[str, tuple[dict[str, Any], ...]]
    family: str | None = None
    weight: float = 1.0


def _same(*params: dict[str, Any]) -> dict[str, tuple[dict[str, Any], ...]]:
    """The same parameter sets in both splits (only for kinds without parameters)."""
    return {split: tuple(params) for split in SPLITS}


def _values(key: str, **per_split: list[Any]) -> dict[str, tuple[dict[str, Any], ...]]:
    return {split: tuple({key: v} for v in values) for split, values in per_split.items()}


def _word_sets(vocabulary: list[str]) -> tuple[dict[str, Any], ...]:
    """Each word alone, and each pair of neighbours in `vocabulary`."""
    singles = [[w] for w in vocabulary]
    pairs = [[a, b] for a, b in zip(vocabulary, vocabulary[1:], strict=False)]
    return tuple({"words": ws} for ws in singles + pairs)


def _bullet_sets(counts: list[int]) -> tuple[dict[str, Any], ...]:
    return tuple({"n": n, "marker": m} for n in counts for m in ("-", "*"))


# Weights are guesses at what a ~135M instruct model can sometimes satisfy (not measured): formats it rarely gets
# (JSON, exact paragraph counts) and ones it meets by accident (long answers) are drawn less often.
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("lowercase", check_lowercase, render_lowercase, _same({}), family="case"),
    Kind("uppercase", check_uppercase, render_uppercase, _same({}), family="case", weight=0.75),
    Kind("no_char", check_no_char, render_no_char, _values("char", train=[",", "!", ":"], heldout=["'", "-"])),
    Kind("max_words", check_max_words, render_max_words,
         _values("n", train=[15, 30, 50, 80, 120], heldout=[20, 40, 60, 100]), family="length", weight=1.25),
    Kind("min_words", check_min_words, render_min_words, _values("n", train=[60, 100, 150], heldout=[80, 120]),
         family="length", weight=0.75),
    Kind("max_sentences", check_max_sentences, render_max_sentences, _values("n", train=[1, 2, 4], heldout=[3, 5]),
         family="length"),
    Kind("min_sentences", check_min_sentences, render_min_sentences, _values("n", train=[3, 5, 8], heldout=[4, 6]),
         family="length", weight=0.75),
    Kind("include_words", check_include_words, render_include_words, {
        "train": _word_sets(["simple", "example", "people", "careful", "together", "always", "enjoy"]),
        "heldout": _word_sets(["useful", "often", "world", "patience", "quickly", "remember"]),
    }, weight=1.25),
    Kind("forbid_words", check_forbid_words, render_forbid_words, {
        "train": _word_sets(["very", "also", "really", "many", "important"]),
        "heldout": _word_sets(["just", "things", "make", "more", "help"]),
    }),
    Kind("starts_with", check_starts_with, render_starts_with, _values(
        "phrase", train=["In short,", "Here is my answer:", "Great question", "Let me explain", "To put it simply,"],
        heldout=["Well,", "Here is what I think:", "Simply put,", "Good question"]), weight=1.25),
    Kind("ends_with", check_ends_with, render_ends_with, _values(
        "phrase", train=["Hope this helps.", "That is all.", "Thank you for reading.",
                         "Let me know if you have questions."],
        heldout=["Good luck!", "Any other questions?", "I hope that answers your question."]), weight=1.25),
    Kind("bullets", check_bullets, render_bullets, {"train": _bullet_sets([2, 4, 5]), "heldout": _bullet_sets([3, 6])},
         family="format"),
    Kind("quotes", check_quotes, render_quotes, _same({}), family="format", weight=0.75),
    Kind("json", check_json, render_json, _same({}), family="format", weight=0.5),
    Kind("paragraphs", check_paragraphs, render_paragraphs, _values("n", train=[2, 4], heldout=[3]),
         family="format", weight=0.75),
    Kind("postscript", check_postscript, render_postscript, _same({}), weight=0.75),
)}

# Families whose members exclude each other (two case rules, two length bounds or two whole-answer shapes in one
# prompt are either contradictory or redundant), and kind pairs that never mix whatever their parameters.
EXCLUSIVE_FAMILIES = ("case", "length", "format")
NEVER_TOGETHER: frozenset[frozenset[str]] = frozenset(frozenset(p) for p in (
    ("json", "starts_with"), ("json", "ends_with"), ("json", "postscript"),  # the object must be the whole answer
    ("json", "max_sentences"), ("json", "min_sentences"),  # sentences of a JSON object mean nothing
    ("quotes", "starts_with"), ("quotes", "ends_with"),  # the quotes must be the first and last characters
    ("quotes", "postscript"),  # a postscript inside the quotes is odd, one outside breaks them
    ("bullets", "max_sentences"), ("bullets", "min_sentences"),  # bullet fragments vs sentences: ill-defined
    ("paragraphs", "postscript"),  # is the postscript a paragraph? ambiguous
    ("postscript", "max_sentences"),  # "P.S." itself counts as two sentences
))


def spec_params(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec's parameters: every key but `kind`."""
    return {k: v for k, v in spec.items() if k != "kind"}


def kind_of(spec: dict[str, Any]) -> Kind:
    """The `Kind` a spec names; ValueError for an unknown or missing kind."""
    kind = KINDS.get(spec.get("kind")) if isinstance(spec, dict) else None
    if kind is None:
        raise ValueError(f"unknown constraint {spec!r}; kinds: {', '.join(KINDS)}")
    return kind


def render(spec: dict[str, Any]) -> str:
    """The instruction sentence a spec adds to the prompt."""
    return kind_of(spec).render(**spec_params(spec))


def all_specs(split: str) -> list[dict[str, Any]]:
    """Every constraint spec `split` can draw: `{"kind": name, **params}` for each kind and parameter set."""
    _check_split(split)
    return [copy.deepcopy({"kind": k.name, **params}) for k in KINDS.values() for params in k.params[split]]


# ---------------------------------------------------------------------------------------------------- compatibility


def _forced_text(spec: dict[str, Any]) -> str:
    """Text the constraint forces into the answer verbatim (case-sensitive)."""
    kind = spec["kind"]
    if kind in ("starts_with", "ends_with"):
        return spec["phrase"]
    return {"postscript": "P.S.", "json": '{":}', "quotes": '"', "bullets": f"{spec.get('marker')} "}.get(kind, "")


def _forced_words(spec: dict[str, Any]) -> set[str]:
    """Words (lowercased) the constraint forces into the answer."""
    if spec["kind"] == "include_words":
        return {w.lower() for w in spec["words"]}
    return {w.lower() for w in split_words(_forced_text(spec))}


def _allows(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether `a`'s parameters leave room for what `b` forces into the answer."""
    kind, forced = a["kind"], _forced_text(b)
    if kind == "lowercase":
        return not any(c.isupper() for c in forced)
    if kind == "uppercase":
        return not any(c.islower() for c in forced)
    if kind == "no_char":
        return a["char"] not in forced and not any(a["char"] in w for w in _forced_words(b))
    if kind == "forbid_words":
        return not {w.lower() for w in a["words"]} & _forced_words(b)
    if kind == "max_words":  # room for what `b` forces plus a few words of content per bullet / paragraph
        per_unit = {"bullets": 5, "paragraphs": 10}.get(b["kind"], 0)
        return a["n"] >= len(_forced_words(b)) + 5 and a["n"] >= per_unit * b.get("n", 0)
    if kind == "max_sentences":  # an end phrase is a sentence of its own; every paragraph holds one
        if b["kind"] == "ends_with":
            return a["n"] >= len(split_sentences(b["phrase"])) + 1
        if b["kind"] == "paragraphs":
            return a["n"] >= b["n"]
    return True


def compatible(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether one answer can meet both constraints without strain: different kinds, not two of one exclusive
    family, not a pair in `NEVER_TOGETHER`, and parameters that do not clash (e.g. all-lowercase vs a start
    phrase with capitals, "no colons" vs JSON, "no word 'very'" vs "use the word 'very'")."""
    ka, kb = kind_of(a), kind_of(b)
    if ka.name == kb.name or (ka.family is not None and ka.family == kb.family and ka.family in EXCLUSIVE_FAMILIES):
        return False
    if frozenset((ka.name, kb.name)) in NEVER_TOGETHER:
        return False
    return _allows(a, b) and _allows(b, a)


# ---------------------------------------------------------------------------------------------------- prompts


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _weighted_choice(rng: random.Random, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """A kind by weight among those with a spec in `specs`, then one of its specs uniformly."""
    names = sorted({s["kind"] for s in specs}, key=list(KINDS).index)
    name = rng.choices(names, weights=[KINDS[n].weight for n in names])[0]
    return rng.choice([s for s in specs if s["kind"] == name])


def _draw(rng: random.Random, split: str, pool: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    topic = rng.choice(TOPICS[split])
    specs = [_weighted_choice(rng, pool)]
    if rng.random() < TWO_CONSTRAINTS:
        specs.append(_weighted_choice(rng, [s for s in pool if compatible(specs[0], s)]))
    return topic, specs


def prompt_row(topic: str, constraints: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """The prompt row for `topic` under `constraints`: id, one user message, and the `constraints` and `topic`
    columns. The id is `if-<split>-` + a hash of the content, so the same prompt has the same id in any draw."""
    content = " ".join([topic, *(render(c) for c in constraints)])
    canonical = json.dumps([topic, constraints], sort_keys=True, separators=(",", ":"))
    rid = f"if-{split}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"
    return {"id": rid, "prompt": [{"role": "user", "content": content}], "constraints": constraints, "topic": topic}


def make_prompts(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct prompt rows of `split`, drawn by `seed` (same arguments, same rows in the same order).

    Each row: `{"id", "prompt": [{"role": "user", "content": topic + instructions}], "constraints": [spec, ...],
    "topic"}`, with one or two constraints (two with probability `TWO_CONSTRAINTS`, always `compatible`). Topics
    and parameter sets come only from `split`'s tables. Repeated draws are skipped, so rows and ids are unique; as
    the one-constraint prompts of a split are far fewer (topics x specs) than the two-constraint ones, large draws hold
    relatively more two-constraint prompts. Raises ValueError when `n` distinct prompts cannot be drawn.
    """
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng, pool = random.Random(f"prefloop.tasks.instructions:{split}:{seed}"), all_specs(split)
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(50 * n + 100):
        if len(rows) == n:
            break
        row = prompt_row(*_draw(rng, split, pool), split)
        rows.setdefault(row["id"], row)
    if len(rows) < n:
        raise ValueError(f"could not draw {n} distinct prompts from split {split!r} (got {len(rows)})")
    return list(rows.values())


def write_task(directory: str | Path, n_train: int = 4000, n_heldout: int = 500, seed: int = 0) -> tuple[Path, Path]:
    """Write `make_prompts` rows as `directory/train.jsonl` and `directory/heldout.jsonl` (each file replaced
    atomically); return both paths. The held-out rows use `seed` too, so one seed names the whole task."""
    return write_splits(directory, make_prompts, n_train, n_heldout, seed)


# ---------------------------------------------------------------------------------------------------- verifier


def check(text: str, constraints: list[dict[str, Any]]) -> list[bool]:
    """Per constraint, whether `text` meets it. The text is stripped of surrounding whitespace first, and an
    empty text meets none. Unknown kinds raise ValueError (a malformed row is an error, not a zero)."""
    kinds = [kind_of(spec) for spec in constraints]
    text = text.strip()
    return [bool(text) and bool(kind.check(text, **spec_params(spec))) for kind, spec in zip(kinds, constraints,
                                                                                              strict=True)]


def completion_text(completion: Any) -> str | None:
    """The answer in a completion: the string itself, or the content of the last assistant message of a message
    list (TRL's conversational format; text parts of multimodal content joined). None when there is none."""
    if completion is None or isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else completion
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"completion must be a str or a list of messages, got {type(completion).__name__}")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if content is None or isinstance(content, str) else str(content)
    return None


def _results(completions: list[Any], constraints: list[Any] | None) -> list[list[bool] | None]:
    """Per completion, `check` of its text against its row's constraints; None where either is missing."""
    if constraints is None:
        raise ValueError("no `constraints` column: pass the rows `make_prompts` writes (one spec list per row)")
    if len(constraints) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(constraints)} constraint lists")
    results: list[list[bool] | None] = []
    for completion, specs in zip(completions, constraints, strict=True):
        if isinstance(specs, str):  # a csv/parquet round trip may hand the column over as JSON text
            specs = json.loads(specs)
        text = completion_text(completion)
        results.append(None if text is None or not specs else check(text, specs))
    return results


def reward(prompts: list[Any], completions: list[Any], constraints: list[Any] | None = None,
           **columns: Any) -> list[float | None]:
    """The fraction of its row's constraints each completion meets (0.0, 0.5, 1.0 for two); the training default.

    TRL reward-function convention: `constraints` arrives as a keyword list (one spec list per completion), other
    columns are ignored. None (no completion text, or a row without constraints) is a failure to judge, not a 0.
    """
    return [None if met is None else sum(met) / len(met) for met in _results(completions, constraints)]


def strict(prompts: list[Any], completions: list[Any], constraints: list[Any] | None = None,
           **columns: Any) -> list[float | None]:
    """1.0 where a completion meets every constraint of its row, else 0.0 (prompt-level strict accuracy); None as
    in `reward`. Binary, so the loop reports it as held-out accuracy."""
    return [None if met is None else float(all(met)) for met in _results(completions, constraints)]


def main(argv: list[str] | None = None) -> None:
    task_main("instructions", write_task, 4000, 500, argv)


if __name__ == "__main__":
    main()
