"""A loop round's training rows (the loop's pairs phase): the round's chosen/rejected pairs (`prefloop pairs`); with
`kto_threshold`, every usable answer labelled by its score (`prefloop export --format kto`), for KTO; with
`train.method: grpo`, every answer of each prompt with its score (`prefloop export --format groups`), for GRPO.

With `data: accumulate` the rows of every round so far are concatenated into `train_pairs.jsonl`, which training
reads instead. No rows is a failed phase (StageFailed), with the judge's position bias named when it explains it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefloop.errors import StageFailed
from prefloop.judge.pairs import run as select_pairs
from prefloop.runstate import read_summary
from prefloop.store import atomic_write, iter_records


def pairs_phase(config: Any, k: int, d: Path) -> tuple[Path, dict[str, Any]]:
    """Round k's training rows from `d/judgments.jsonl`, for a LoopConfig `config`: (their file, its summary)."""
    try:
        if rows_file(config) != "pairs.jsonl":
            from prefloop.judge.export import run as export

            out = export(export_config(config, d))
        else:
            out = select_pairs(config.stage_config("pairs", k, {}))
    except StageFailed as e:
        stats = read_summary(d / "judgments.jsonl").get("stats") or {}
        hint = ""
        if stats.get("first_position_win_rate") is not None:
            hint = (f" The judge picked the first slot {stats['first_position_win_rate']:.0%} of the time and its "
                    f"two orders agreed {stats.get('agreement_rate') or 0:.0%} of the time: a judge with a strong "
                    "position bias or failing parses labels nothing.")
        what = {"pairs.jsonl": "pairs", "labels.jsonl": "labelled answers"}.get(rows_file(config), "answer groups")
        raise StageFailed(f"round {k}: no {what} to train on: {e}{hint} See {d / 'judgments.summary.json'} and "
                          "the report.") from None
    summary = read_summary(out)
    if config.data == "accumulate":
        parts = [Path(config.out) / f"round_{j:03d}" / rows_file(config) for j in range(1, k + 1)]
        atomic_write(d / "train_pairs.jsonl", b"".join(p.read_bytes() for p in parts))
        summary["train_pairs"] = sum(1 for p in parts for _ in iter_records(p))
    return out, summary


def rows_file(config: Any) -> str:
    """A round's training rows: its pairs, its labelled answers (`kto_threshold`) or its answer groups (grpo)."""
    if config.kto_threshold is not None:
        return "labels.jsonl"
    return "groups.jsonl" if config.train.get("method") == "grpo" else "pairs.jsonl"


def export_config(config: Any, d: Path) -> Any:
    """The export that labels round directory `d`'s answers (`kto_threshold`) or groups them (grpo); LoopConfig builds
    it up front too, so a bad threshold fails before any round samples."""
    from prefloop.config import ConfigError, from_dict
    from prefloop.judge.export import ExportConfig

    if rows_file(config) == "pairs.jsonl":
        raise ConfigError("export: settings of the export that builds GRPO's groups or KTO's labels; this loop trains "
                          "on pairs. Fix: drop `export`, or set train.method: grpo or kto_threshold.")
    owned = sorted(set(config.export) & {"in", "input", "out", "format", "threshold", "both_labels"})
    if owned:
        raise ConfigError(f"export: {', '.join(owned)} are the loop's to set (each round's files, the method's "
                          "format). Fix: drop them from `export`.")
    paths = {"input": str(d / "judgments.jsonl"), "out": str(d / rows_file(config))}
    if config.kto_threshold is None:
        return from_dict(ExportConfig, {**config.export, **paths, "format": "groups"}, "loop config `export`")
    return from_dict(ExportConfig, {"keep_truncated": bool(config.pairs.get("keep_truncated")), **config.export,
                                    **paths, "format": "kto", "threshold": config.kto_threshold, "both_labels": True},
                     "loop config `export`")
