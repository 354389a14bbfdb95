"""Constitutions as data: principles to critique, revise and compare by (Constitutional AI, Bai et al. 2022).

    prompts/constitutions/harmless.yaml         # built-ins, by name: --constitution harmless
    my_constitution.yaml | my_constitution.json # or a file

prefloop's YAML schema:

    name: harmless
    system: optional system message for every turn
    default_compare: the comparison question for principles without their own
    principles:
      - {id: harm-general, critique: "...", revision: "...", compare: "..."}   # compare is optional
    examples:            # optional few-shot conversations (message lists), prepended to every chain
      - [{role: user, content: ...}, {role: assistant, content: ...}, ...]

The JSON layout of the Hugging Face CAI recipe loads unchanged:

    {"constitutions": [{"critic": "...", "revision": "..."}], "system_chat": [[{"role": ..., "content": ...}]]}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefloop.prompts import builtin

DEFAULT_COMPARE = "Which of these assistant responses is better?"


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    compare: str | None = None


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    system: str | None = None
    examples: tuple[tuple[dict[str, str], ...], ...] = field(default_factory=tuple)
    default_compare: str = DEFAULT_COMPARE
    source: str = ""

    @property
    def sha256(self) -> str:
        blob = json.dumps([self.system, self.default_compare, [p.__dict__ for p in self.principles],
                           [list(e) for e in self.examples]], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def compare(self, principle: Principle) -> str:
        return principle.compare or self.default_compare

    def few_shot(self) -> list[dict[str, str]]:
        return [m for example in self.examples for m in example]


def load_constitution(spec: str) -> Constitution:
    """A built-in by name, or a YAML/JSON file (prefloop's schema or the HF CAI recipe's layout)."""
    known = {**builtin("constitutions")}
    path = known.get(spec) or Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"constitution {spec!r} is neither a built-in ({', '.join(known)}) nor a file. "
            "Fix: pass a built-in name or a YAML/JSON file (see prefloop/judge/constitution.py for the schema)."
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level.")
    if "constitutions" in data:
        return _from_hf(data, path)
    return _from_prefloop(data, path)


def _examples(value: Any, path: Path, key: str) -> tuple[tuple[dict[str, str], ...], ...]:
    if value in (None, []):
        return ()
    if not isinstance(value, list) or not all(isinstance(e, list) for e in value):
        raise ValueError(f"{path}: `{key}` must be a list of conversations (lists of messages).")
    out = []
    for i, conversation in enumerate(value):
        for j, m in enumerate(conversation):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{path}: `{key}[{i}][{j}]` must be {{role, content}} strings.")
        out.append(tuple({"role": m["role"], "content": m["content"]} for m in conversation))
    return tuple(out)


def _from_prefloop(data: dict[str, Any], path: Path) -> Constitution:
    principles = data.get("principles")
    if not isinstance(principles, list) or not principles:
        raise ValueError(f"{path}: `principles` must be a non-empty list.")
    out, ids = [], set()
    for i, p in enumerate(principles):
        if not isinstance(p, dict) or not isinstance(p.get("critique"), str) or not isinstance(p.get("revision"), str):
            raise ValueError(f"{path}: principles[{i}] needs `critique` and `revision` strings.")
        pid = str(p.get("id", f"p{i}"))
        if pid in ids:
            raise ValueError(f"{path}: principle id {pid!r} repeats. Fix: give each principle its own id.")
        ids.add(pid)
        out.append(Principle(pid, p["critique"], p["revision"], p.get("compare")))
    return Constitution(name=str(data.get("name", path.stem)), principles=tuple(out), system=data.get("system"),
                        examples=_examples(data.get("examples"), path, "examples"),
                        default_compare=data.get("default_compare") or DEFAULT_COMPARE, source=str(path))


def _from_hf(data: dict[str, Any], path: Path) -> Constitution:
    items = data["constitutions"]
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: `constitutions` must be a non-empty list of {{critic, revision}}.")
    principles = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("critic"), str) or not isinstance(
            item.get("revision"), str
        ):
            raise ValueError(f"{path}: constitutions[{i}] needs `critic` and `revision` strings.")
        principles.append(Principle(f"{path.stem}-{i}", item["critic"], item["revision"]))
    return Constitution(name=path.stem, principles=tuple(principles),
                        examples=_examples(data.get("system_chat"), path, "system_chat"), source=str(path))
