"""Prompt data shipped with prefloop: judge templates (`judges/*.yaml`) and constitutions (`constitutions/`).

Files here are data, not code: a user's own file with the same schema works everywhere a built-in name does.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def builtin(kind: str) -> dict[str, Path]:
    """Built-in data files of one kind (a subfolder), by name: `builtin("judges")["pairwise"]`."""
    return {p.stem: p for p in sorted((ROOT / kind).glob("*.yaml"))}
