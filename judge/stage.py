"""The judge stage: candidates in, one judgments record per prompt out.

    prefloop judge --candidates candidates.jsonl --out judgments.jsonl --judge python --reward-fn rewards.py:fn

Failure semantics: the candidates file is validated whole before the judge loads. Rows are judged in chunks and
each chunk is fsynced before the next; a re-run resumes by id and keeps existing records byte-for-byte. Per
completion, a failed judgment is stored with its status and reason and a null score.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError, field
from prefloop.judge import load_judge
from prefloop.progress import Progress
from prefloop.runstate import StageRun
from prefloop.store import InputError, JsonlStore, iter_records

log = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    candidates: str = field(help="Candidates JSONL written by `prefloop generate`.")
    out: str = field(help="Judgments JSONL to write (appended to on resume).", hash=False)
    judge: str = field("python", help="Judge: python.")
    reward_fn: str | None = field(None, help="For --judge python: FILE.py:function or module:function.")
    batch_size: int = field(256, help="Completions per judge call.", hash=False)
    chunk_size: int = field(256, help="Prompts per persisted chunk.", hash=False)
    new_run: bool = field(False, help="Move an existing output aside and start again.", hash=False)

    def __post_init__(self) -> None:
        if self.judge == "python" and not self.reward_fn:
            raise ConfigError("--judge python needs --reward-fn FILE.py:function (or module:function).")

    def judge_options(self) -> dict[str, Any]:
        return {"reward_fn": self.reward_fn, "batch_size": self.batch_size}


def load_candidates(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a candidates file; `InputError` names file:line and the missing field."""
    rows, lines = [], {}
    for lineno, row in iter_records(path):
        for key in ("id", "prompt", "completions"):
            if key not in row:
                raise InputError(
                    f"{path}:{lineno}: missing field `{key}`. Fix: pass a file written by `prefloop generate`."
                )
        if not isinstance(row["completions"], list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) for c in row["completions"]
        ):
            raise InputError(f"{path}:{lineno}: `completions` must be a list of objects with a `text` string.")
        if row["id"] in lines:
            raise InputError(
                f"{path}:{lineno}: id {row['id']!r} repeats line {lines[row['id']]}. "
                "Fix: `prefloop merge` the file (it unions by id) or drop the duplicate row."
            )
        lines[row["id"]] = lineno
        rows.append(row)
    return rows


def run(config: JudgeConfig) -> Path:
    """Judge every candidates record into `config.out`; return its path. See module docstring."""
    out = Path(config.out)
    rows = load_candidates(config.candidates)
    # Load the judge before anything is written: a wrong --reward-fn must fail without leaving an output behind.
    try:
        judge_ = load_judge(config.judge, **config.judge_options())
    except (ValueError, AttributeError, ImportError, FileNotFoundError) as e:
        raise ConfigError(f"--judge {config.judge}: {e}") from None
    state = StageRun("judge", out, config)
    if state.begin(config.new_run) == "done":
        log.info("%s is complete (config %s); nothing to do", out, state.hash)
        judge_.close()
        return out

    statuses: Counter[str] = Counter()
    with JsonlStore(out) as store:
        todo = [r for r in rows if r["id"] not in store.done]
        progress = Progress(len(rows), "judge", initial=len(rows) - len(todo))
        judge = judge_ if todo else None
        try:
            for start in range(0, len(todo), config.chunk_size):
                chunk = todo[start : start + config.chunk_size]
                verdicts = judge.judge(chunk)
                failed = 0
                for row, verdict in zip(chunk, verdicts, strict=True):
                    statuses.update(verdict["statuses"])
                    failed += any(s != "ok" for s in verdict["statuses"])
                    store.append(_judgment(row, verdict, judge.name, state.hash))
                store.commit()
                progress.update(done=len(chunk) - failed, failed=failed)
        finally:
            progress.close()
            if judge is not None:
                judge.close()

    state.finish("done", prompts=len(rows), judged=len(todo), completion_statuses=dict(statuses))
    if statuses and statuses.get("ok", 0) != sum(statuses.values()):
        log.warning("judge: completion statuses %s (failures are kept as failures, never scores)", dict(statuses))
    return out


def _judgment(row: dict[str, Any], verdict: dict[str, Any], judge_name: str, chash: str) -> dict[str, Any]:
    bad = [s for s in verdict["statuses"] if s != "ok"]
    return {
        "id": row["id"],
        "prompt": row["prompt"],
        "completions": row["completions"],
        "judge": judge_name,
        "scores": verdict["scores"],
        "statuses": verdict["statuses"],
        "errors": verdict["errors"],
        # Row status per DESIGN.md: "ok" when every completion was judged, else the first failure's status
        # (per-completion detail is in `statuses` and `errors`).
        "status": bad[0] if bad else "ok",
        "round": row.get("round", 0),
        "config_hash": chash,
    }
