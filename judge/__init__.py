"""Judges: score candidates, then select chosen/rejected pairs.

A backend is any object with the `Judge` protocol. A failure is recorded as a failure (a status and a reason per
completion), never coerced into a score or a label: pair selection only ever sees scores a judge really produced.

Judges: `python` (a user's reward function), `reward_model` (a sequence-classification model), `llm` (a language
model through any generator backend, pointwise or pairwise in both orders), `constitutional` (critique -> revise
pairs, or CAI feedback soft labels from log-probs).
"""

from __future__ import annotations

from typing import Any, NotRequired, Protocol, TypedDict


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


BACKENDS = ("python", "reward_model", "llm", "constitutional")


def load_judge(kind: str, **options: Any) -> Judge:
    """Construct the named judge; `options` as `JudgeConfig.judge_options()` gives them."""
    if kind == "python":
        from prefloop.judge.python import PythonJudge

        return PythonJudge(options["reward_fn"], batch_size=options.get("batch_size", 256))
    if kind == "reward_model":
        from prefloop.judge.cache import CachedJudge
        from prefloop.judge.reward_model import RewardModelJudge

        cache = options.pop("cache", None)
        judge = RewardModelJudge(**options)
        return CachedJudge(judge, cache) if cache is not None else judge
    if kind == "llm":
        from prefloop.gen import load_generator
        from prefloop.judge.llm import LLMJudge

        generator = load_generator(options.pop("backend"), options.pop("model"), adapter=options.pop("adapter"),
                                   **options.pop("backend_options"))
        return LLMJudge(generator, **options)
    if kind == "constitutional":
        from prefloop.gen import load_generator
        from prefloop.judge.constitutional import ConstitutionalJudge

        generator = load_generator(options.pop("backend"), options.pop("model"), adapter=options.pop("adapter"),
                                   **options.pop("backend_options"))
        verifier = options.pop("verifier", None)
        try:
            verifier = load_judge(verifier.pop("judge"), **verifier) if verifier else None
        except BaseException:
            generator.close()
            raise
        return ConstitutionalJudge(generator, verifier=verifier, **options)
    raise ValueError(f"unknown judge {kind!r}; choose one of: {', '.join(BACKENDS)}")
