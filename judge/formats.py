"""The export formats (judge/export.py): rows in each layout, the files other tools need beside them, answer lengths.

- `kto`: TRL's unpaired format (`prompt`, `completion`, `label`). From pairs: chosen true, rejected false; an answer
  chosen in one pair and rejected in another has no absolute label and is skipped (`conflicting_labels`), a repeat
  is skipped (`duplicate`). From judgments: score >= `threshold` is true; failed, empty, truncated (unless
  `keep_truncated`) and repeated answers are skipped (the reasons of `judge.pairs.usable`); with `both_labels`, so
  are the answers of a prompt whose answers all got one label (`one_label_prompt`).
- `sft`: best-of-n, one row per prompt: its top-scored answer (ties: the lowest index), kept when its score is >=
  `threshold` if one is given. From pairs: the best chosen answer per prompt (`all_above_margin` pairs share one).
  TRL's prompt-completion rows, or `{"messages": [...]}` with `sft_style: messages`.
- `groups` (judgments only): per prompt every answer and its score (`completions`, `rewards`, `truncated`: cut at
  the token limit), GRPO's group, for `prefloop train --method grpo`. A prompt whose answers all score the same is
  skipped (`equal_rewards`: GRPO's advantage is zero on each; `keep_equal_rewards` keeps it, as TRL's GRPO batches
  do), and so is one with an answer that failed judging (`incomplete_group`: the groups would differ in size).
  Repeated, empty and truncated answers stay, as in GRPO.
- `ranked` (judgments only): per prompt every candidate with score, status, error and finish_reason, best first,
  failed judgments last, each with its original `index`.
- `llamafactory` (pairs only): LLaMA-Factory's sharegpt preference rows (`conversations`, `chosen`, `rejected`,
  `system`), and its entry in `dataset_info.json` beside the output.
- `axolotl` (pairs only): axolotl's DPO `chat_template.default` rows (`messages`, `chosen`, `rejected`), and
  `<stem>.axolotl.yaml`, the `datasets:` entry to paste into an axolotl config.
Conversational inputs stay conversational (answers are one assistant message); text prompts stay text, except in the
message layouts (`messages`, llamafactory, axolotl), where a text prompt is one user turn.
Chat-template arguments the prompt was generated with stay with it where the format can hold them: `tools` (a JSON
string) and `chat_template_kwargs` on kto and sft rows, as TRL's trainers read them, and `tools` on llamafactory rows
(its `tools` column); rows that are the same but for them stay apart. What a format cannot hold (axolotl's rows,
llamafactory's other arguments) is counted in the summary (`template_args_not_kept`) and warned about; the rows
are written.

Failure semantics: a combination that cannot work (kto from judgments without a threshold, a pair layout from
judgments, ranked from pairs, a pairwise judgment) raises `ConfigError` or `InputError` before anything is written.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from prefloop.config import ConfigError
from prefloop.judge.pairs import MARGIN_EPS, template_fields, usable
from prefloop.lock import output_lock
from prefloop.records import TEMPLATE_COLUMNS
from prefloop.runstate import sidecar
from prefloop.store import InputError, atomic_write, atomic_write_json, iter_records

SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}


def _answer(prompt: Any, text: str) -> Any:
    """An answer in the prompt's style: a string for a text prompt, one assistant message for messages."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _text(answer: Any) -> str:
    return answer if isinstance(answer, str) else answer[-1]["content"]


def _sft(config: Any, prompt: Any, text: str, fields: dict[str, Any]) -> dict[str, Any]:
    if config.sft_style == "messages":
        return {"messages": [*_as_messages(prompt), {"role": "assistant", "content": text}], **fields}
    return {"prompt": prompt, "completion": _answer(prompt, text), **fields}


def _fields(pair: dict[str, Any]) -> dict[str, Any]:
    """A pair's chat-template arguments (judge/pairs.py writes them as TRL reads them)."""
    return {k: pair[k] for k in TEMPLATE_COLUMNS if pair.get(k)}


def _key(prompt: Any, fields: dict[str, Any]) -> str:
    """One prompt as rendered: the same messages with other tools or template arguments are another prompt."""
    return json.dumps([prompt, fields], sort_keys=True)


def from_judgments(
    config: Any, judgments: list[dict[str, Any]], skipped: Counter, dropped: Counter
) -> list[dict[str, Any]]:
    """Rows of `config.format` from scored judgments; `skipped` counts output rows not made, `dropped` (sft) the
    answers that could not be a prompt's best."""
    fmt = config.format
    if fmt in ("llamafactory", "axolotl"):
        raise ConfigError(
            f"--format {fmt} holds chosen/rejected pairs. Fix: run `prefloop pairs` first (its "
            "strategies and margins pick the pairs) and export the pairs file."
        )
    pairwise = next((i for i, j in enumerate(judgments) if j.get("comparisons") is not None), None)
    if pairwise is not None:
        raise InputError(
            f"{config.input}:{_line(config.input, pairwise)}: a pairwise judgment (matches, no scores) "
            f"cannot be exported as {fmt}. Fix: run `prefloop pairs` first and export the pairs file."
        )
    if fmt == "groups":
        if config.threshold is not None:
            raise ConfigError("--threshold does not apply to --format groups (every answer keeps its score). Fix: "
                              "drop --threshold.")
        return [row for j in judgments if (row := _group(j, skipped, config.keep_equal_rewards)) is not None]
    if fmt == "kto" and config.threshold is None:
        raise ConfigError(
            "--format kto from judgments needs --threshold T (score >= T is labelled desirable, lower "
            "undesirable). Fix: pass --threshold, or export a pairs file (chosen true, rejected false)."
        )
    rows = []
    for j in judgments:
        if fmt == "ranked":
            rows.append(_ranked(j))
            continue
        items = usable(j, config.keep_truncated, skipped if fmt == "kto" else dropped)
        fields = template_fields(j.get("chat_template_kwargs"))
        if fmt == "kto":
            labelled = [
                {
                    "prompt": j["prompt"],
                    "completion": _answer(j["prompt"], it[2]),
                    "label": it[1] >= config.threshold - MARGIN_EPS,
                    **fields,
                }
                for it in items  # (index, score, text, ...)
            ]
            if config.both_labels and len({r["label"] for r in labelled}) < 2:
                skipped["one_label_prompt"] += len(labelled)
            else:
                rows += labelled
        elif not items:
            skipped["no_usable_answer"] += 1
        else:
            _, score, text, *_ = max(items, key=lambda it: (it[1], -it[0]))  # the top score; ties: the lowest index
            if config.threshold is not None and score < config.threshold - MARGIN_EPS:
                skipped["below_threshold"] += 1
            else:
                rows.append(_sft(config, j["prompt"], text, fields))
    return rows


def _group(j: dict[str, Any], skipped: Counter, keep_equal: bool = False) -> dict[str, Any] | None:
    """One prompt's GRPO group: every answer with its score, or None (counted in `skipped`)."""
    statuses = j.get("statuses") or ["ok"] * len(j["completions"])
    if any(score is None or status != "ok" for score, status in zip(j["scores"], statuses, strict=True)):
        skipped["incomplete_group"] += 1
        return None
    if len(j["completions"]) < 2 or (len({float(x) for x in j["scores"]}) < 2 and not keep_equal):
        skipped["equal_rewards"] += 1
        return None
    return {"prompt": j["prompt"], "completions": [c["text"] for c in j["completions"]],
            "rewards": [float(x) for x in j["scores"]],
            "truncated": [c.get("finish_reason") == "length" for c in j["completions"]],
            **template_fields(j.get("chat_template_kwargs"))}


def _ranked(j: dict[str, Any]) -> dict[str, Any]:
    n = len(j["completions"])
    statuses, errors = j.get("statuses") or ["ok"] * n, j.get("errors") or [None] * n
    candidates = [
        {
            "index": i,
            "text": c["text"],
            "score": score,
            "status": status,
            "error": error,
            "finish_reason": c.get("finish_reason"),
        }
        for i, (c, score, status, error) in enumerate(
            zip(j["completions"], j["scores"], statuses, errors, strict=True)
        )
    ]
    # Best first; a failed judgment (null score or a non-ok status) after every scored answer; ties keep index order.
    failed = lambda c: c["score"] is None or c["status"] != "ok"  # noqa: E731
    candidates.sort(key=lambda c: (failed(c), 0.0 if failed(c) else -c["score"], c["index"]))
    return {"id": j["id"], "prompt": j["prompt"], "judge": j.get("judge", ""), "candidates": candidates}


def from_pairs(config: Any, pairs: list[dict[str, Any]], skipped: Counter) -> list[dict[str, Any]]:
    """Rows of `config.format` from TRL preference pairs; `skipped` counts the rows not made, by reason."""
    fmt = config.format
    if fmt in ("ranked", "groups"):
        raise ConfigError(
            f"--format {fmt} lists every candidate with its score, and pairs keep two. Fix: export the "
            "judgments file the pairs came from."
        )
    if config.threshold is not None and fmt != "sft":
        raise ConfigError(
            f"--threshold does not apply to --format {fmt} from pairs (the pairs already say which answer "
            "is better). Fix: drop --threshold, or export the judgments file."
        )
    if fmt == "kto":
        groups: dict[tuple[str, str], tuple[dict[str, Any], list[bool]]] = {}
        for p in pairs:
            for answer, label in ((p["chosen"], True), (p["rejected"], False)):
                key = (_key(p["prompt"], _fields(p)), _text(answer))
                groups.setdefault(key, (p, []))[1].append(label)
        rows = []
        for (_, text), (p, labels) in groups.items():
            if len(set(labels)) > 1:  # better than one answer and worse than another: no absolute label
                skipped["conflicting_labels"] += len(labels)
                continue
            skipped["duplicate"] += len(labels) - 1
            rows.append({"prompt": p["prompt"], "completion": _answer(p["prompt"], text), "label": labels[0],
                         **_fields(p)})
        return rows
    if fmt == "sft":
        if config.threshold is not None and any(p.get("score_chosen") is None for p in pairs):
            raise ConfigError(
                "--threshold needs `score_chosen` on every pair, and this file lacks it. Fix: drop "
                "--threshold, or export the judgments file."
            )
        best: dict[str, dict[str, Any]] = {}

        def rank(p: dict[str, Any]) -> tuple[float, int]:  # the best chosen answer; ties: the lowest index
            score = p.get("score_chosen")
            return float("-inf") if score is None else score, -(p.get("meta") or {}).get("chosen_index", 0)

        for p in pairs:
            key = _key(p["prompt"], _fields(p))
            if key in best:
                skipped["same_prompt"] += 1
            if key not in best or rank(p) > rank(best[key]):
                best[key] = p
        rows = []
        for p in best.values():
            if config.threshold is not None and p["score_chosen"] < config.threshold - MARGIN_EPS:
                skipped["below_threshold"] += 1
            else:
                rows.append(_sft(config, p["prompt"], _text(p["chosen"]), _fields(p)))
        return rows
    if fmt == "axolotl":
        return [_axolotl(p) for p in pairs]
    rows = []
    for p in pairs:
        row = _llamafactory(p)
        if isinstance(row, str):
            skipped[row] += 1
        else:
            rows.append(row)
    return rows


def template_args_not_kept(fmt: str, pairs: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """How many pairs carry chat-template arguments that `fmt`'s rows have no field for, and which arguments."""
    if fmt in ("kto", "sft"):
        return 0, []
    count, names = 0, set()
    for p in pairs:
        fields = _fields(p)
        lost = ({"tools"} if "tools" in fields and fmt != "llamafactory" else set()) | set(
            fields.get("chat_template_kwargs") or {})
        count += bool(lost)
        names |= lost
    return count, sorted(names)


def _axolotl(p: dict[str, Any]) -> dict[str, Any]:
    """axolotl's DPO `chat_template.default` row: the prompt messages, then one assistant message each."""
    return {
        "messages": _as_messages(p["prompt"]),
        "chosen": {"role": "assistant", "content": _text(p["chosen"])},
        "rejected": {"role": "assistant", "content": _text(p["rejected"])},
    }


def _llamafactory(p: dict[str, Any]) -> dict[str, Any] | str:
    """LLaMA-Factory's sharegpt preference row, or the reason it cannot be one: its converter wants human and gpt
    turns alternating from a human one to a human one, and a system prompt only first (it goes in `system`)."""
    messages, system = _as_messages(p["prompt"]), None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    conversations = []
    for i, m in enumerate(messages):
        role = SHAREGPT_ROLES.get(m["role"])
        if role is None:
            return "system_not_first" if m["role"] == "system" else "unsupported_role"
        if role != ("human" if i % 2 == 0 else "gpt"):
            return "turns_not_alternating"
        conversations.append({"from": role, "value": m["content"]})
    if len(conversations) % 2 == 0:
        return "turns_not_alternating"  # empty, or ending on an assistant turn: nothing for chosen/rejected to answer
    row = {
        "conversations": conversations,
        "chosen": {"from": "gpt", "value": _text(p["chosen"])},
        "rejected": {"from": "gpt", "value": _text(p["rejected"])},
    }
    if p.get("tools"):
        row["tools"] = p["tools"]  # a JSON string, as LLaMA-Factory's `tools` column holds them
    return {**row, "system": system} if system is not None else row


def _line(path: str | Path, index: int) -> int:
    """The line number of the `index`-th record of `path` (blank lines are not records)."""
    return next(lineno for i, (lineno, _) in enumerate(iter_records(path)) if i == index)


def _content(answer: Any) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list):
        return answer[-1]["content"]
    return answer.get("content", answer.get("value", ""))


def length_stats(fmt: str, rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and median characters of the exported answers, per role (chosen/rejected, desirable/undesirable, ...)."""
    chars: dict[str, list[int]] = {}
    for r in rows:
        if fmt == "kto":
            found = [("desirable" if r["label"] else "undesirable", r["completion"])]
        elif fmt == "sft":
            found = [("completion", r["messages"][-1] if "messages" in r else r["completion"])]
        elif fmt == "ranked":
            found = [("candidate", c["text"]) for c in r["candidates"]]
        elif fmt == "groups":
            found = [("completion", text) for text in r["completions"]]
        else:
            found = [("chosen", r["chosen"]), ("rejected", r["rejected"])]
        for role, answer in found:
            chars.setdefault(role, []).append(len(_content(answer)))
    return {k: {"mean": round(statistics.fmean(v), 2), "median": statistics.median(v)} for k, v in chars.items()}


def llamafactory_info(config: Any, out: Path, rows: list[dict[str, Any]], write: bool) -> None:
    """Check (and with `write`, merge in) this export's entry in the dataset_info.json beside `out`, under that file's
    lock: other entries are kept, and an entry of the same name for another file is refused, never replaced."""
    path, name = out.parent / "dataset_info.json", config.name or out.stem
    with output_lock(path):
        try:
            info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e}). Fix: repair it, or export into another folder.") from None
        if not isinstance(info, dict):
            raise InputError(f"{path}: not a JSON object of datasets. Fix: repair it, or export into another folder.")
        other = info[name].get("file_name") if isinstance(info.get(name), dict) else info.get(name)
        if other not in (None, out.name):
            raise ConfigError(f"{path} already has a dataset {name!r} ({other}). Fix: pass --name with another name.")
        columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
        for column in ("system", "tools"):  # LLaMA-Factory reads a mapped column from every row: map it if it exists
            if any(column in r for r in rows):
                columns[column] = column
        info[name] = {"file_name": out.name, "formatting": "sharegpt", "ranking": True, "columns": columns}
        if write:
            atomic_write_json(path, info)


def axolotl_snippet(out: Path) -> None:
    """`<stem>.axolotl.yaml` beside `out`: the lines to paste into an axolotl config to train DPO on it."""
    entry = {
        "path": str(out.resolve()),
        "split": "train",
        "type": "chat_template.default",
        "field_messages": "messages",
        "field_chosen": "chosen",
        "field_rejected": "rejected",
        "message_property_mappings": {"role": "role", "content": "content"},
    }
    body = yaml.safe_dump({"rl": "dpo", "datasets": [entry]}, sort_keys=False, allow_unicode=True)
    atomic_write(sidecar(out, "axolotl.yaml"), f"# prefloop export: paste into your axolotl config\n{body}")
