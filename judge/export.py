"""The export stage: judgments or pairs in, a dataset for another trainer out (TRL's KTO and SFT, LLaMA-Factory,
axolotl) or a ranked list, optionally saved with a dataset card or pushed to the Hugging Face hub.

    prefloop export --in pairs.jsonl --format kto --out kto.jsonl                  # chosen true, rejected false
    prefloop export --in judgments.jsonl --format kto --threshold 1 --out kto.jsonl
    prefloop export --in judgments.jsonl --format sft --threshold 1 --out sft.jsonl [--sft-style messages]
    prefloop export --in judgments.jsonl --format ranked --out ranked.jsonl
    prefloop export --in judgments.jsonl --format groups --out groups.jsonl         # for train --method grpo
    prefloop export --in pairs.jsonl --format llamafactory --out data/prefs.jsonl   # + data/dataset_info.json
    prefloop export --in pairs.jsonl --format axolotl --out prefs.jsonl             # + prefs.axolotl.yaml
    ... --save-to-disk DIR | --push-to-hub REPO [--private]                         # + a dataset card

The input is a judgments file (`prefloop judge`) or a pairs file (`prefloop pairs`), told apart by its first row's
keys. What each format holds and skips: judge/formats.py; the card, the disk copy and the hub: judge/card.py.

Failure semantics: the input is validated whole before anything is written (`InputError` names file:line), and so
is the combination of input and format. The output is a pure function of the input, written whole and atomically,
then its sidecar (dataset_info.json merged under its lock, never clobbering other entries; the axolotl snippet), then
the summary (rows in, rows out, skipped by reason, answer lengths). Zero rows out is `StageFailed` and writes
nothing. A finished output with another config is refused (`ConfigDriftError`); with the same config nothing is
rewritten, but the disk copy and the push still run. The push runs last: when it fails, every local file stays.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError, field
from prefloop.errors import StageFailed
from prefloop.judge.card import check_disk_dir, publish
from prefloop.judge.formats import (
    axolotl_snippet,
    from_judgments,
    from_pairs,
    length_stats,
    llamafactory_info,
    template_args_not_kept,
)
from prefloop.judge.pairs import load_judgments
from prefloop.lock import exclusive
from prefloop.runstate import StageRun
from prefloop.store import InputError, atomic_write, iter_records

log = logging.getLogger(__name__)

FORMATS = ("kto", "sft", "groups", "ranked", "llamafactory", "axolotl")
SFT_STYLES = ("prompt_completion", "messages")


@dataclass
class ExportConfig:
    input: str = field(help="Judgments JSONL (`prefloop judge`) or pairs JSONL (`prefloop pairs`).", alias="in")
    out: str = field(help="JSONL to write.", hash=False)
    format: str = field(help=f"Output format: {', '.join(FORMATS)}.")
    threshold: float | None = field(
        None,
        help="kto from judgments: score >= T is desirable (label true), lower "
        "undesirable. sft: keep a prompt's best answer only if its score >= T.",
    )
    keep_truncated: bool = field(False, help="Judgments: keep answers that hit max_new_tokens (skipped by default).")
    keep_equal_rewards: bool = field(
        False, help="groups: keep the prompts whose answers all score the same (skipped by default as equal_rewards). "
        "GRPO's advantage is zero on each, but TRL's own GRPO batches hold them, and their tokens count in its "
        "token-normalised losses (dapo, bnpo): kept, a step's update is scaled as in TRL's own loop.")
    both_labels: bool = field(
        False, help="kto from judgments: only the prompts whose answers get both labels (a prompt whose answers all "
        "pass or all fail teaches no preference, as GRPO's advantage is zero on it; skipped as one_label_prompt).")
    sft_style: str = field(
        "prompt_completion",
        help="sft: prompt_completion (TRL's prompt-completion rows) or "
        "messages ({messages: prompt messages + the answer}).",
    )
    name: str | None = field(
        None, help="llamafactory: the dataset's name in dataset_info.json (default: the output's stem).", hash=False
    )
    save_to_disk: str | None = field(
        None,
        help="Also save the rows as a `datasets` DatasetDict ({train}) with a "
        "dataset card (README.md) in this directory.",
        hash=False,
    )
    push_to_hub: str | None = field(
        None,
        help="Also push the DatasetDict and its card to this dataset repo on the "
        "Hugging Face hub (after `huggingface-cli login`).",
        hash=False,
    )
    private: bool = field(False, help="--push-to-hub: create the repo private.", hash=False)
    license: str = field(
        "other", help="The dataset card's license (an SPDX id such as apache-2.0, or other).", hash=False
    )
    new_run: bool = field(False, help="Move an existing output aside and start again.", hash=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is unknown. Fix: use one of {', '.join(FORMATS)}.")
        if self.sft_style not in SFT_STYLES:
            raise ConfigError(f"sft_style {self.sft_style!r} is unknown. Fix: use one of {', '.join(SFT_STYLES)}.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"threshold = {self.threshold}. Fix: give a finite number (scores are compared to it).")
        if self.both_labels and self.format != "kto":
            raise ConfigError(f"--both-labels applies to --format kto, not {self.format}. Fix: drop it.")
        if self.keep_equal_rewards and self.format != "groups":
            raise ConfigError(f"--keep-equal-rewards applies to --format groups, not {self.format}. Fix: drop it.")
        if self.private and not self.push_to_hub:
            raise ConfigError("--private applies to --push-to-hub only. Fix: add --push-to-hub REPO, or drop it.")


def detect(path: str | Path) -> str:
    """Which file `path` is, `judgments` or `pairs`, from its first row's keys; `InputError` (file:line) if neither."""
    for lineno, row in iter_records(path):
        if {"completions", "scores"} <= row.keys():
            return "judgments"
        if {"prompt", "chosen", "rejected"} <= row.keys():
            return "pairs"
        raise InputError(
            f"{path}:{lineno}: neither a judgments row (id, prompt, completions, scores) nor a pairs row (id, prompt, "
            f"chosen, rejected); its keys: {', '.join(sorted(row))[:200]}. Fix: pass a file written by `prefloop "
            "judge` or `prefloop pairs`."
        )
    raise InputError(f"{path}: no rows. Fix: pass a file written by `prefloop judge` or `prefloop pairs`.")


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Read a pairs file; `InputError` names file:line for a row that is not TRL's preference format (standard:
    strings; conversational: messages, `chosen`/`rejected` one assistant message each) or mixes the two styles."""
    rows, styles = [], {}
    for lineno, row in iter_records(path):
        missing = next((k for k in ("id", "prompt", "chosen", "rejected") if k not in row), None)
        if missing:
            raise InputError(f"{path}:{lineno}: missing `{missing}`. Fix: pass a file written by `prefloop pairs`.")
        conversational = isinstance(row["prompt"], list)
        styles.setdefault(conversational, lineno)
        if len(styles) == 2:
            raise InputError(
                f"{path}:{lineno}: mixes prompt styles (line {styles[False]} has a text prompt, line "
                f"{styles[True]} messages). Fix: export each style from its own file."
            )
        answers = (row["chosen"], row["rejected"])
        if conversational:
            ok = _messages(row["prompt"]) and all(
                _messages(a) and len(a) == 1 and a[0]["role"] == "assistant" for a in answers
            )
        else:
            ok = all(isinstance(x, str) for x in (row["prompt"], *answers))
        score = row.get("score_chosen")
        if not ok or score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise InputError(
                f"{path}:{lineno}: not a pair in TRL's format (`prompt`, `chosen`, `rejected` all strings, or messages "
                "with `chosen`/`rejected` one assistant message each; `score_chosen` a number). Fix: pass a file "
                "written by `prefloop pairs`."
            )
        rows.append(row)
    return rows


def _messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


@exclusive
def run(config: ExportConfig) -> Path:
    """Export `config.input` as `config.format` into `config.out`; return its path. See module docstring."""
    out = Path(config.out)
    kind = detect(config.input)
    source = load_judgments(config.input) if kind == "judgments" else load_pairs(config.input)
    skipped: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    if kind == "pairs" and config.both_labels:
        raise ConfigError(f"{config.input}: --both-labels picks prompts from judgments, and this is a pairs file (each "
                          "pair gives both labels already). Fix: drop it, or export the judgments.")
    if kind == "judgments":
        rows = from_judgments(config, source, skipped, dropped)
    else:
        rows = from_pairs(config, source, skipped)
    skips = {k: v for k, v in sorted(skipped.items()) if v}
    if not rows:  # nothing to train on is a failed stage, never an empty success
        reasons = ", ".join(f"{k} {v}" for k, v in (skipped + dropped).most_common()) or "none"
        raise StageFailed(
            f"{config.input}: 0 rows for --format {config.format} from {len(source)} {kind} rows (skipped: {reasons}). "
            "Fix: judge_failed: look at the judgments' errors; below_threshold: lower --threshold; truncated: raise "
            "max_new_tokens or pass --keep-truncated; conflicting_labels: export best_worst pairs or the judgments."
        )
    if config.format == "llamafactory":
        llamafactory_info(config, out, rows, write=False)  # a name clash is refused before anything is written
    if config.save_to_disk:
        check_disk_dir(config.save_to_disk)
    state = StageRun("export", out, config)
    done = state.begin(config.new_run) == "done"
    if not done:
        atomic_write(out, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
    if config.format == "llamafactory":
        llamafactory_info(config, out, rows, write=True)
    elif config.format == "axolotl":
        axolotl_snippet(out)
    summary = state.summary()
    if not done:
        extra: dict[str, Any] = {"answers_dropped": dict(sorted(dropped.items()))} if dropped else {}
        lost, names = template_args_not_kept(config.format, source) if kind == "pairs" else (0, [])
        if lost:
            extra["template_args_not_kept"] = lost
            log.warning(
                "export: %d of %d pairs were generated with chat-template arguments (%s) that %s rows have no field "
                "for; they are written, and a trainer renders their prompts without them unless its own config sets "
                "them. kto and sft rows keep them.", lost, len(source), ", ".join(names), config.format,
            )
        if config.format == "kto":
            extra["labels"] = {
                "desirable": sum(r["label"] for r in rows),
                "undesirable": sum(not r["label"] for r in rows),
            }
            if 0 in extra["labels"].values():
                log.warning(
                    "export: every kto row has the same label (%s); KTO learns from both kinds", extra["labels"]
                )
        summary = state.finish(
            "done",
            input=kind,
            format=config.format,
            rows_in=len(source),
            rows_out=len(rows),
            skipped=skips,
            lengths=length_stats(config.format, rows),
            **extra,
        )
    if config.save_to_disk or config.push_to_hub:
        publish(config, kind, source, rows, summary)
    return out
