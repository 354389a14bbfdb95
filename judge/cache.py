"""The judge cache: answers of model judges on disk, so a re-run, a resumed run or a second pair strategy pays
for no judge call twice.

    ~/.cache/prefloop/judge/<judge hash>.jsonl     # or $PREFLOOP_CACHE_DIR, or $XDG_CACHE_HOME/prefloop/judge

One file per judge configuration (model and its weights' fingerprint, template text, sampling, mode...); each
line maps a key -- sha256 of the exact input (the rendered judge prompt and attempt, or the prompt and response
for a reward model) -- to the answer. Only successful answers are stored; failures are asked again next time.

The cache is best effort by design, never a source of truth: lines are appended whole with one `write()`
(several processes may share a file), a line that does not parse (a crash mid-write) is skipped on load, and
deleting the directory only costs time. `--cache off` disables it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from prefloop.models import cache_root

log = logging.getLogger(__name__)


def default_dir() -> Path:
    """`$PREFLOOP_CACHE_DIR` itself (as before models were cached there too), else `<prefloop cache>/judge`."""
    return cache_root() if os.environ.get("PREFLOOP_CACHE_DIR") else cache_root() / "judge"


def resolve_dir(setting: str | None) -> Path | None:
    """`auto` -> the default directory; `off`/empty -> no cache; anything else is a directory."""
    if setting in (None, "", "off", "none", "false"):
        return None
    return default_dir() if setting == "auto" else Path(setting)


def fingerprint(path_or_id: str | None) -> Any:
    """Identity of a model: for a local directory, its weights' names, sizes and mtimes (retrained at the same
    path = a new judge), those of a `prefloop train` output's adapter/, merged/ and model/ included; for a local
    file (a .gguf), its size and mtime; for a hub id or server model name, the name itself."""
    if not path_or_id:
        return None
    path = Path(path_or_id)
    if path.is_file():
        return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
    if not path.is_dir():
        return path_or_id
    dirs = [path] + [path / d for d in ("adapter", "merged", "model") if (path / d).is_dir()]
    files = sorted(p for d in dirs for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return [str(path.resolve())] + [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                    for p in files]


class JudgeCache:
    """`get(key)` / `put(key, value)`; `flush()` appends the new entries. `hits` and `misses` count lookups."""

    def __init__(self, directory: str | Path, judge_hash: str) -> None:
        self.path = Path(directory) / f"{judge_hash}.jsonl"
        self.entries: dict[str, Any] = {}
        self.pending: list[str] = []
        self.hits = self.misses = 0
        skipped = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        item = json.loads(line)
                        self.entries[item["k"]] = item["v"]
                    except (ValueError, KeyError, TypeError):
                        skipped += 1
        if skipped:
            log.info("judge cache %s: skipped %d unreadable lines", self.path, skipped)

    @staticmethod
    def key(*parts: Any) -> str:
        blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]

    def get(self, key: str) -> Any:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        self.pending.append(json.dumps({"k": key, "v": value}, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                if f.tell() > 0:  # a line torn by a crash must not swallow the next one
                    with open(self.path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            f.write(b"\n")
                f.write("".join(self.pending).encode("utf-8"))
        except OSError as e:  # a full or read-only disk costs the cache, never the run
            log.warning("judge cache %s: not written (%s)", self.path, e)
        self.pending = []


class CachedJudge:
    """A judge that scores each completion on its own (a reward model), behind the cache: only completions not
    in the cache reach it, and its successful scores are stored."""

    def __init__(self, judge, cache: JudgeCache) -> None:
        self.inner, self.cache = judge, cache
        self.name = judge.name
        self.info = getattr(judge, "info", {})

    def judge(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        verdicts, todo = [], []
        for r, row in enumerate(rows):
            keys = [JudgeCache.key(row["prompt"], c["text"]) for c in row["completions"]]
            hits = [self.cache.get(k) for k in keys]
            verdicts.append({"scores": list(hits), "statuses": ["ok" if h is not None else "error" for h in hits],
                             "errors": [None] * len(hits)})
            missing = [i for i, h in enumerate(hits) if h is None]
            if missing:
                todo.append((r, missing, keys, {**row, "completions": [row["completions"][i] for i in missing]}))
        if todo:
            for (r, missing, keys, _), verdict in zip(todo, self.inner.judge([t[3] for t in todo]), strict=True):
                for j, i in enumerate(missing):
                    score, status = verdict["scores"][j], verdict["statuses"][j]
                    verdicts[r]["scores"][i], verdicts[r]["statuses"][i] = score, status
                    verdicts[r]["errors"][i] = verdict["errors"][j]
                    if status == "ok" and score is not None:
                        self.cache.put(keys[i], score)
            self.cache.flush()
        return verdicts

    def close(self) -> None:
        self.inner.close()
