"""Judges: score candidates, then select chosen/rejected pairs.

A backend is any object with the `Judge` protocol. A failure is recorded as a failure (a status and a reason per
completion), never coerced into a score or a label: pair selection only ever sees scores a judge really produced.

Judges: `python` (a user's reward function), `reward_model` (a sequence-classification model), `llm` (a language
model through any generator backend, pointwise or pairwise in both orders), `constitutional` (critique -> revise
pairs, or CAI feedback soft labels from log-probs).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, NotRequired, Protocol, TypedDict

if TYPE_CHECKING:
    from prefloop.judge.cache import JudgeCache


class Verdict(TypedDict):
    """A judge's answer for one candidates record: one score (or None) and one status per completion."""

    scores: list[float | None]
    statuses: list[str]  # "ok" | "error" | "parse_error" | "refusal"
    errors: list[str | None]
    raw: NotRequired[list[Any]]  # llm: per completion, every answer the judge gave (kept for failures too)
    details: NotRequired[list[Any]]  # llm pointwise: per completion, the text score and verdict probabilities
    comparisons: NotRequired[list[dict[str, Any]]]  # llm pairwise: every match, both orders (see judge/llm.py)
    completions: NotRequired[list[dict[str, Any]]]  # constitutional revise: the row's completions + the revision
    revision: NotRequired[dict[str, Any]]  # constitutional revise: the critique -> revision chain


class Judge(Protocol):
    name: str

    def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        """One verdict per candidates record (`{"id", "prompt", "completions", "columns"}`), in order."""
        ...

    def close(self) -> None: ...


class JudgeKind(Protocol):
    """A judge kind: the small dataclass of the options its judge takes, read from the judge stage's flags.

    One module defines it beside its judge; one line in `KINDS` registers it. The stage, the ensemble and the loop
    find kinds only through `KINDS`, so adding a judge touches nothing else (docs/architecture.md "Adding a judge").
    """

    generator: ClassVar[bool]  # it runs on a generation backend (--judge-backend): API budgets, vLLM engines
    cached: ClassVar[bool]  # its answers are worth caching (model judges): the stage opens a `JudgeCache` for it

    @classmethod
    def from_config(cls, config: Any) -> JudgeKind:
        """This kind's options from a `JudgeConfig`, checked without loading anything: a `ConfigError` names the
        flag and the fix."""
        ...

    def derived(self) -> dict[str, Any]:
        """Values the stage config records for its drift check (a default mode, a template's hash)."""
        ...

    def first_label(self) -> str:
        """The label a pairwise verdict gives the first position (judge stats' position bias)."""
        ...

    def api_models(self) -> list[str]:
        """The models this judge sends API requests to: what a budget needs prices for."""
        ...

    def pairwise(self) -> bool:
        """Whether its verdicts compare candidates instead of scoring each: the loop then scores held-out answers
        as a win rate against round 0's."""
        ...

    def rewrites(self) -> bool:
        """Whether it adds a completion of its own (a revision): it cannot score held-out answers or sit in an
        ensemble."""
        ...

    def load(self, cache: JudgeCache | None) -> Judge: ...


class ScoringKind:
    """The answers of a kind that scores each completion and calls no API (`python`, `reward_model`)."""

    def derived(self) -> dict[str, Any]:
        return {}

    def first_label(self) -> str:
        return "A"

    def api_models(self) -> list[str]:
        return []

    def pairwise(self) -> bool:
        return False

    def rewrites(self) -> bool:
        return False


# The judge kinds, by name: "module:Class" of each kind's options (imported when used).
KINDS = {
    "python": "prefloop.judge.python:PythonOptions",
    "reward_model": "prefloop.judge.reward_model:RewardModelOptions",
    "llm": "prefloop.judge.llm:LLMOptions",
    "constitutional": "prefloop.judge.constitutional:ConstitutionalOptions",
}


def judge_kind(name: str) -> type[JudgeKind]:
    """The options class registered as `name` (a ValueError lists the kinds)."""
    if name not in KINDS:
        raise ValueError(f"unknown judge {name!r}; choose one of: {', '.join(KINDS)}")
    module, _, attr = KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def uses_generator(name: Any) -> bool:
    """Whether judge settings naming `name` run on a generation backend (False for ensembles and non-kinds)."""
    return name in KINDS and judge_kind(name).generator
