"""Per-stage run state: the resolved config beside every output, drift refusal, and "finished means finished".

For an output `candidates.jsonl` the stage writes `candidates.config.yaml` (the resolved config, reusable with
`--config`, its hash in the header) when it starts and `candidates.summary.json` (counts, timings, status) when it
ends. For a directory output (a trained model) the same files live inside it as `config.yaml` / `summary.json`.

- Re-running a stage whose summary says `done` with the same config hash does nothing.
- Resuming with a changed config is refused, naming the changed keys: records on disk were made with the old
  config, and mixing the two silently is how datasets rot. `--new-run` moves the old output aside (never deletes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefloop.config import changed_keys, config_hash, dump_yaml, hashed_dict, to_dict
from prefloop.errors import PrefloopError
from prefloop.store import atomic_write, atomic_write_json, remove_stale_temps

log = logging.getLogger(__name__)


class ConfigDriftError(PrefloopError, RuntimeError):
    """An unfinished (or finished) output exists that was made with a different config."""


def read_summary(out: str | Path, directory: bool = False) -> dict[str, Any]:
    """The summary a stage wrote beside `out` (empty if it has not finished)."""
    path = sidecar(out, "summary.json", directory)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def sidecar(out: str | Path, name: str, directory: bool = False) -> Path:
    """`<stem>.<name>` beside a file output, or `<dir>/<name>` inside a directory output."""
    out = Path(out)
    if directory:
        return out / name
    return out.with_name(f"{out.stem}.{name}")


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@dataclass
class StageRun:
    """The bookkeeping of one stage writing `out` with `config` (a stage dataclass)."""

    stage: str
    out: Path
    config: Any
    directory: bool = False  # the output is a directory (a model, a run) rather than a file

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.hash = config_hash(hashed_dict(self.config))
        self.config_path = sidecar(self.out, "config.yaml", self.directory)
        self.summary_path = sidecar(self.out, "summary.json", self.directory)
        self.started = time.time()
        self.began: str | None = None

    def begin(self, new_run: bool = False) -> str:
        """Check the output against the config; return "done" (nothing to do), "resume" or "fresh".

        Raises `ConfigDriftError` naming the changed keys when the output was made with another config.
        """
        self.began = self._begin(new_run)
        return self.began

    def check(self) -> str:
        """What `begin()` would return ("done", "resume", "fresh"), raising as it would, touching nothing."""
        return self._begin(new_run=False, write=False)

    def _begin(self, new_run: bool, write: bool = True) -> str:
        if write:
            for path in (self.config_path, self.summary_path):  # a kill mid-write leaves a temp: not output
                remove_stale_temps(path)
        if new_run:
            self._move_aside()
        if self.config_path.exists():
            old = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
            new = hashed_dict(self.config)
            # A key the old config lacks is a setting added by a newer prefloop: it ran with that setting's default.
            defaults = _defaults(type(self.config))
            old_hashed = {k: old[k] if k in old else defaults.get(k) for k in new}
            keys = changed_keys(old_hashed, new)  # by value: 0 and 0.0 are the same temperature
            if keys:
                raise ConfigDriftError(
                    f"{self.out} was started with a different {self.stage} config (changed: {', '.join(keys)}). "
                    f"Fix: restore those values to resume, or pass --new-run to move the old output aside and start "
                    f"again, or choose another --out."
                )
            summary = self.summary()
            if summary.get("status") == "done" and self._output_exists():
                if summary.get("output_bytes") in (None, self._output_bytes()):
                    return "done"
                log.warning("%s changed size since it was finished; checking it by resuming", self.out)
            return "resume"
        if self._output_exists():
            raise ConfigDriftError(
                f"{self.out} exists but has no {self.config_path.name}, so prefloop cannot tell how it was made. "
                "Fix: pass --new-run to move it aside, or choose another --out."
            )
        if write:
            atomic_write(
                self.config_path,
                dump_yaml(to_dict(self.config), header=f"# prefloop {self.stage} — config_hash: {self.hash}"),
            )
        return "fresh"

    def forget_if_empty(self) -> bool:
        """After a failure: if this run started the output (`begin` said "fresh") and wrote no record, remove what it
        did write (config, summary, an empty output), so the corrected command starts fresh instead of being refused
        as config drift. Return whether it did."""
        if self.began != "fresh" or self._output_exists():
            return False
        for path in (self.config_path, self.summary_path, *(() if self.directory else (self.out,))):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        return True

    def summary(self) -> dict[str, Any]:
        if self.summary_path.exists():
            return json.loads(self.summary_path.read_text(encoding="utf-8"))
        return {}

    def finish(self, status: str = "done", **counts: Any) -> dict[str, Any]:
        summary = {
            "stage": self.stage,
            "status": status,
            "config_hash": self.hash,
            "seconds": round(time.time() - self.started, 3),
            **counts,
        }
        if not self.directory and self.out.is_file():
            summary["output_bytes"] = self._output_bytes()
        atomic_write_json(self.summary_path, summary)
        return summary

    def _output_bytes(self) -> int | None:
        return self.out.stat().st_size if self.out.is_file() else None

    def _output_exists(self) -> bool:
        if self.directory:
            return self.out.is_dir() and any(p.name not in ("config.yaml", "summary.json") for p in self.out.iterdir())
        return self.out.exists() and self.out.stat().st_size > 0

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in (self.out, self.config_path, self.summary_path):
            if path.exists() and not (self.directory and path.parent == self.out):
                aside, i = path.with_name(f"{path.name}.old-{stamp}"), 0
                while aside.exists():  # two --new-run in one second must not overwrite the first set-aside
                    i += 1
                    aside = path.with_name(f"{path.name}.old-{stamp}-{i}")
                os.replace(path, aside)
                log.warning("--new-run: moved %s to %s", path, aside)
