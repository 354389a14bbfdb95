"""Record types (docs/architecture.md "Records") and the prompt loader that validates input before any work starts.

A prompt is either a plain string (raw text, completion style) or a list of messages (chat template), as in TRL
and vLLM; the style carries through to the pairs. A message list may be a whole conversation (user, assistant,
user, ...): generation continues it with the next assistant turn. Every other column of a prompt row (e.g.
`answer`) is kept and passed to judges as keyword lists; a `tools` column (TRL's name) also reaches the chat
template, for that row only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from prefloop.store import InputError, iter_records

Messages = list[dict[str, str]]
Prompt = str | Messages
ROLES = ("system", "user", "assistant", "tool")
# Extra columns reach reward functions as keyword arguments next to these, so they cannot share their names.
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids", "trainer_state")
# A pair's per-row chat-template arguments, as TRL's trainers read them (judge/pairs.py writes them, export keeps them).
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")


class Completion(TypedDict):
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_new_tokens)
    num_tokens: int | None  # tokens generated, EOS included; None only when a server does not say
    logprobs: NotRequired[list[float]]  # per generated token, the model's raw log-prob (when asked for)
    token_ids: NotRequired[list[int]]  # the generated token ids, beside (top) log-probs (local backends only)
    tokens: NotRequired[list[str]]  # each generated token's text (with `Sampling.top_logprobs`)
    top_logprobs: NotRequired[list[dict[str, float]]]  # per generated token: {alternative's text: log-prob}


@dataclass
class LoadedPrompts:
    records: list[dict[str, Any]]
    duplicates: int = 0
    locations: dict[str, str] = field(default_factory=dict)  # id -> "file:line" (or "file:item N"), for messages


def prompt_id(prompt: Prompt | dict[str, Any]) -> str:
    """Content id: `sha256(canonical JSON of the prompt)[:16]` (docs/architecture.md "Records"), stable across runs and machines."""
    canonical = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def chat_template_kwargs(record: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The extra chat-template arguments a prompt record is rendered with: `base` (the generate stage's
    `chat_template_kwargs`), its `tools` replaced by the row's own `tools` when the row has the column. Empty tools
    are left out, as TRL does (some templates write tool boilerplate for `tools=[]`)."""
    out = dict(base or {})
    if record.get("tools") is not None:
        out["tools"] = record["tools"]
    if not out.get("tools"):
        out.pop("tools", None)
    return out


def check_tools(tools: Any, where: str) -> list[dict[str, Any]]:
    """`tools` as a list of tool objects (JSON schemas, e.g. {"type": "function", "function": {"name": ...}}), the
    form `apply_chat_template(tools=...)`, vLLM and TRL take; a JSON string holding that list (how csv and TRL
    datasets often store it) is parsed. Raises `InputError` naming `where` otherwise."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            tools = None  # reported below, with the expected shape
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InputError(
            f"{where}: `tools` must be a list of tool objects (JSON schemas such as "
            '{"type": "function", "function": {"name": "...", "parameters": {...}}}), or that list as a JSON string. '
            "Fix: write the row's tools in that form, or drop the column."
        )
    return tools


def _check_prompt(prompt: Any, where: str, field_name: str) -> None:
    if prompt is None:
        raise InputError(f"{where}: missing field `{field_name}`. Fix: add it, or map your column with --prompt-field.")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError(f"{where}: `{field_name}` is empty. Fix: remove the row or give it text.")
        return
    if not isinstance(prompt, list) or not prompt:
        raise InputError(
            f"{where}: `{field_name}` must be a string or a non-empty list of messages, got {type(prompt).__name__}. "
            'Fix: use "text" or [{"role": "user", "content": "text"}].'
        )
    for i, msg in enumerate(prompt):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InputError(f"{where}: `{field_name}[{i}]` must be an object with `role` and `content`.")
        if msg["role"] not in ROLES:
            raise InputError(
                f"{where}: `{field_name}[{i}].role` is {msg['role']!r}; expected one of {', '.join(ROLES)}. "
                "Fix: rename the role (e.g. 'human' -> 'user', 'gpt' -> 'assistant')."
            )
        if not isinstance(msg["content"], str):
            raise InputError(f"{where}: `{field_name}[{i}].content` must be a string.")
    if prompt[-1]["role"] == "assistant":
        raise InputError(
            f"{where}: `{field_name}` ends with an assistant message, so there is nothing to answer. "
            "Fix: end the conversation with a user message."
        )
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        raise InputError(f"{where}: `{field_name}` has no non-empty user message.")


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs from JSONL, a JSON array, parquet/csv, or a local HF dataset directory."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".parquet", ".csv", ".arrow"):
        import datasets

        if path.is_dir() and (path / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            ds = datasets.load_dataset(str(path) if path.is_dir() else suffix.lstrip("."), split="train",
                                       **({} if path.is_dir() else {"data_files": str(path)}))
        return [(f"{path}:row {i + 1}", dict(row)) for i, row in enumerate(ds)]
    if suffix == ".json":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise InputError(
                f"{path}:{line}: not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}). "
                "Fix: re-encode the file as UTF-8."
            ) from None
        if text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
            return [(f"{path}:item {i + 1}", row) for i, row in enumerate(data)]
    return [(f"{path}:{lineno}", row) for lineno, row in iter_records(path)]


def load_prompts(
    path: str | Path,
    prompt_field: str = "prompt",
    id_field: str = "id",
    chat: bool = False,
) -> LoadedPrompts:
    """Load and validate every prompt row; raise `InputError` (file:line, field, fix) on the first bad row.

    Rows without an id get `prompt_id(prompt)`. A row repeating an earlier prompt (same content) is dropped and
    counted; two rows with one id but different prompts are an error, since one of them would silently vanish.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: prompts file not found.")
    out = LoadedPrompts(records=[])
    by_id: dict[str, tuple[str, str]] = {}  # id -> (canonical prompt, location)
    seen_content: set[str] = set()
    for where, row in _rows(path):
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object per row, got {type(row).__name__}.")
        prompt = row.get(prompt_field)
        _check_prompt(prompt, where, prompt_field)
        if chat and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if row.get("tools") is not None:
            row = {**row, "tools": check_tools(row["tools"], where)}
            if row["tools"] and isinstance(prompt, str):
                raise InputError(
                    f"{where}: the row has `tools`, but its `{prompt_field}` is plain text, which no chat template "
                    f"renders. Fix: give `{prompt_field}` as messages, or pass --chat."
                )
        # A prompt's identity: its messages, and its tools when it has any (the same conversation offered other
        # tools is another prompt). Without tools it is the prompt alone, so ids stay what they always were.
        identity = {"prompt": prompt, "tools": row["tools"]} if row.get("tools") else prompt
        canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False)
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"{where}: contains an unpaired surrogate ({e.object[e.start]!r}, a lone \\udXXX escape) that is not "
                "valid Unicode. Fix: remove or repair that escape."
            ) from None
        rid = row.get(id_field)
        if isinstance(rid, (bool, list, dict)):  # str() would make an id of it silently: "True", "['a']"
            raise InputError(
                f"{where}: `{id_field}` must be a string or a number, got {type(rid).__name__} ({json.dumps(rid)[:60]}). "
                f"Fix: give each row a string id, or drop the `{id_field}` column to derive ids from content."
            )
        rid = prompt_id(identity) if rid in (None, "") else str(rid)
        if rid in by_id:
            if by_id[rid][0] != canonical:
                raise InputError(
                    f"{where}: id {rid!r} was already used at {by_id[rid][1]} for a different prompt. "
                    "Fix: give each prompt a unique id, or drop the id column to derive ids from content."
                )
            out.duplicates += 1
            continue
        if canonical in seen_content:
            out.duplicates += 1
            continue
        by_id[rid] = (canonical, where)
        out.locations[rid] = where
        seen_content.add(canonical)
        extras = {k: v for k, v in row.items() if k not in (prompt_field, id_field, "prompt", "id")}
        clash = sorted(set(extras) & set(RESERVED_COLUMNS))
        if clash:
            raise InputError(
                f"{where}: column(s) {', '.join(clash)} clash with the reward-function arguments of the same name. "
                "Fix: rename those columns."
            )
        out.records.append({"id": rid, "prompt": prompt, **extras})
    if not out.records:
        raise InputError(f"{path}: no prompts found. Fix: the file needs at least one row with `{prompt_field}`.")
    return out
