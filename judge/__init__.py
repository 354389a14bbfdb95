"""Judges: score candidates, then select chosen/rejected pairs.

A backend is any object with the `Judge` protocol. A failure is recorded as a failure (a status and a reason per
completion), never coerced into a score or a label: pair selection only ever sees scores a judge really produced.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict


class Verdict(TypedDict):
    """A judge's answer for one candidates record: one score (or None) and one status per completion."""

    scores: list[float | None]
    statuses: list[str]  # "ok" | "error" | "parse_error" | "refusal"
    errors: list[str | None]


class Judge(Protocol):
    name: str

    def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        """One verdict per candidates record (`{"id", "prompt", "completions", "columns"}`), in order."""
        ...

    def close(self) -> None: ...


BACKENDS = ("python",)


def load_judge(kind: str, **options: Any) -> Judge:
    if kind == "python":
        from prefloop.judge.python import PythonJudge

        return PythonJudge(options["reward_fn"], batch_size=options.get("batch_size", 256))
    raise ValueError(f"unknown judge {kind!r}; choose one of: {', '.join(BACKENDS)}")
