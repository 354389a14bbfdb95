"""The layers of docs/architecture.md ("Layers and imports"), checked on the source: no module imports from a layer
above its own, `gen` and `train` import no other stage, and no module imports another module's private names.

The import graph is read with `ast` (nothing is imported), top-level and function-level imports alike. The breaks
the architecture page lists under "Known debts" are listed here too, exactly: a new break fails, and so does a debt
paid without its line being removed here and on the page.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"prefloop": "prefloop", "gen": "prefloop.gen", "judge": "prefloop.judge", "train": "prefloop.train",
            "prompts": "prefloop.prompts"}

FOUNDATION = {"prefloop", "prefloop.errors", "prefloop.engine", "prefloop.config", "prefloop.store", "prefloop.runstate",
              "prefloop.records", "prefloop.device", "prefloop.progress", "prefloop.lock", "prefloop.models",
              "prefloop.budget", "prefloop.hygiene", "prefloop.pool", "prefloop.prompts", "prefloop.attention"}
ENGINES_LOOP = {"prefloop.ray_engine", "prefloop.ray_llm", "prefloop.loop", "prefloop.report",
                "prefloop.report_text", "prefloop.scoring", "prefloop.plan", "prefloop.rows"}
DEMO = {"prefloop.demo", "prefloop.tasks"}  # and every module in them: the demos, the tasks, the model builders
LAYERS = ["foundation", "stages", "engines and loop", "demo and tasks", "cli"]

# docs/architecture.md, "Known debts": none today. A break that cannot be avoided is listed here and there.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    if module in FOUNDATION or module.startswith("prefloop.prompts."):
        return 0
    if module.split(".")[:2] in (["prefloop", "gen"], ["prefloop", "judge"], ["prefloop", "train"]):
        return 1
    if module in ENGINES_LOOP:
        return 2
    if module in DEMO or module.startswith(("prefloop.demo.", "prefloop.tasks.")):
        return 3
    if module == "prefloop.cli":
        return 4
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py and docs/architecture.md")


def imports(known: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(importer, imported module, name) for every `from prefloop... import name` in the source."""
    edges = []
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges += [(module, a.name, "") for a in node.names if a.name.startswith("prefloop")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("prefloop"):
                for alias in node.names:  # `from prefloop.gen import stage` imports the submodule
                    sub = f"{node.module}.{alias.name}"
                    edges.append((module, sub, "") if sub in known else (module, node.module, alias.name))
    return edges


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("gen", "judge", "train") else None


def test_every_module_is_in_a_layer():
    for module in modules():
        layer(module)


def test_no_module_imports_from_a_layer_above_its_own():
    known = modules()
    upward = {(a, b) for a, b, _ in imports(known) if b in known and layer(b) > layer(a)}
    assert upward == KNOWN_UPWARD, (
        f"new upward imports: {sorted(upward - KNOWN_UPWARD)}; debts paid (remove them here and from "
        f"docs/architecture.md): {sorted(KNOWN_UPWARD - upward)}")


def test_gen_and_train_import_no_other_stage_and_judge_only_gen():
    crossing = set()
    for a, b, _ in imports(modules()):
        sa, sb = stage(a), stage(b)
        if sa and sb and sa != sb and not (sa == "judge" and sb == "gen"):
            crossing.add((a, b))
    assert crossing == set()


def test_no_module_imports_another_modules_private_names():
    private = {(a, b, name) for a, b, name in imports(modules())
               if name.startswith("_") and not name.endswith("__") and a != b}
    assert private == KNOWN_PRIVATE, (
        f"new private imports: {sorted(private - KNOWN_PRIVATE)}; debts paid (remove them here and from "
        f"docs/architecture.md): {sorted(KNOWN_PRIVATE - private)}")
