"""An export's dataset card and its `datasets` copy on disk (`--save-to-disk`) or on the Hugging Face hub
(`--push-to-hub`), for judge/export.py.

The card is YAML front matter (`configs` with data_files, `license`, `task_categories`, `tags`, `size_categories`)
and a body with what prefloop can establish about the data: the policy that wrote the answers and the judge (from
the sidecars each stage writes beside its output, `X.config.yaml` / `X.summary.json`, followed from pairs to
judgments to candidates, and from the pairs' `meta`), the pair strategy, the judge's trust statistics, counts, skip
reasons and answer lengths. A sidecar that is missing or unreadable leaves its line out or says "unknown": a card
says less, it never fails an export.

Failure semantics: the disk copy is written whole (`atomic_dir`), only into a new, empty or earlier saved directory.
The hub push runs last; whatever it raises (no network, no login, no permission) becomes `StageFailed` with one
line, and every local file stays written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from prefloop.config import ConfigError
from prefloop.errors import StageFailed
from prefloop.judge.stats import judge_stats
from prefloop.runstate import sidecar
from prefloop.store import atomic_dir

log = logging.getLogger(__name__)

TAGS = {
    "kto": ["prefloop", "kto", "preference"],
    "sft": ["prefloop", "sft", "best-of-n"],
    "ranked": ["prefloop", "ranking", "reward-modeling"],
    "groups": ["prefloop", "grpo", "reward"],
    "llamafactory": ["prefloop", "dpo", "preference", "llama-factory"],
    "axolotl": ["prefloop", "dpo", "preference", "axolotl"],
}
DESCRIPTION = {
    "kto": "Unpaired preference data in TRL's KTO format (`prompt`, `completion`, `label`).",
    "sft": "Best-of-n answers (each prompt's best-scored answer) for supervised fine-tuning, in TRL's format.",
    "ranked": "Every candidate answer per prompt with its judge score, status and finish reason, best first.",
    "groups": "Every answer per prompt with its score (`completions`, `rewards`, `truncated`), for GRPO's loss.",
    "llamafactory": "Preference pairs in LLaMA-Factory's sharegpt layout (`ranking: true`).",
    "axolotl": "Preference pairs in axolotl's DPO `chat_template.default` layout.",
}
SIZES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)
JUDGE_KEYS = (
    "judge",
    "reward_fn",
    "reward_model",
    "judge_model",
    "judge_adapter",
    "judge_backend",
    "mode",
    "template",
    "constitution",
)
GEN_KEYS = ("model", "adapter", "backend", "n", "temperature", "top_p", "max_new_tokens", "seed")
DISK_FILES, HUB_FILES = "train/data-*.arrow", "data/train-*"  # where save_to_disk and push_to_hub put the rows


def size_category(n: int) -> str:
    return next((label for bound, label in SIZES if n < bound), "1B<n<10B")


def _sidecars(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config and summary a stage wrote beside `path` ({} for each that is missing or unreadable)."""
    found = []
    for name, parse in (("config.yaml", yaml.safe_load), ("summary.json", json.loads)):
        try:
            value = parse(sidecar(path, name).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            value = None
        found.append(value if isinstance(value, dict) else {})
    return found[0], found[1]


def _upstream(name: Any, near: Path) -> Path | None:
    """The input file a stage's config names (as typed when it ran): as given, or beside `near`; found by the file or
    by its own config beside it."""
    if not isinstance(name, str) or not name:
        return None
    places = (Path(name), near.parent / name, near.parent / Path(name).name)
    return next((p for p in places if p.is_file() or sidecar(p, "config.yaml").is_file()), None)


def provenance(path: str | Path, kind: str, source: list[dict[str, Any]]) -> dict[str, Any]:
    """What made the input: the pairs' meta and config, the judge and its statistics, the generation settings."""
    facts: dict[str, Any] = {}
    here: Path | None = Path(path)
    if kind == "pairs":
        config, summary = _sidecars(here)
        metas = [row.get("meta") or {} for row in source]
        facts["pairs"] = {
            k: sorted({str(m[k]) for m in metas if m.get(k) not in (None, "")})
            for k in ("judge", "strategy", "round", "config_hash", "judge_config_hash")
        }
        facts["pairs"]["min_margin"] = config.get("min_margin")
        facts["pairs_drops"] = summary.get("drops")
        here = _upstream(config.get("judgments"), here)
    else:
        facts["judges"] = sorted({str(row["judge"]) for row in source if row.get("judge")})
        facts["stats"] = judge_stats(source)
    if here is not None:
        config, summary = _sidecars(here)
        facts["judge"] = {k: config[k] for k in JUDGE_KEYS if config.get(k) not in (None, "", [], {})}
        facts.setdefault("stats", summary.get("stats"))
        here = _upstream(config.get("candidates"), here)
    if here is not None:
        facts["generation"] = {k: v for k, v in _sidecars(here)[0].items() if k in GEN_KEYS and v is not None}
    return facts


def _pairs(values: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (values or {}).items()) or "none"


def card_text(
    config: Any, kind: str, facts: dict[str, Any], summary: dict[str, Any], data_files: str, load: str
) -> str:
    """The dataset card: YAML front matter, then provenance, trust statistics, counts, lengths and how to load it."""
    data = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
        "license": config.license,
        "task_categories": ["text-generation"],
        "tags": TAGS[config.format],
        "size_categories": [size_category(summary.get("rows_out", 0))],
    }
    try:
        from huggingface_hub import DatasetCardData

        front = DatasetCardData(**data).to_yaml()
    except ImportError:
        front = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    pairs, gen = facts.get("pairs"), facts.get("generation")
    judges = facts.get("judges") or (pairs or {}).get("judge") or []
    lines = [
        f"# {config.name or Path(config.out).stem}",
        "",
        f"{DESCRIPTION[config.format]} Made with prefloop (`prefloop export --format {config.format}`) from "
        f"`{Path(config.input).name}` (a {kind} file).",
        "",
        "## Provenance",
        "",
        "- Policy (wrote the answers): " + (_pairs(gen) if gen else "unknown (no generate config found upstream)"),
        "- Judge: "
        + (", ".join(f"`{j}`" for j in judges) or "unknown")
        + (f" ({_pairs(facts['judge'])})" if facts.get("judge") else ""),
    ]
    if pairs:
        lines += [
            f"- Pair strategy: {', '.join(pairs['strategy']) or 'unknown'}"
            + (f", min_margin {pairs['min_margin']}" if pairs.get("min_margin") is not None else ""),
            f"- Rounds: {', '.join(pairs['round']) or 'unknown'}",
            f"- Config hashes: pairs {', '.join(pairs['config_hash']) or 'unknown'}; judge "
            f"{', '.join(pairs['judge_config_hash']) or 'unknown'}",
        ]
    else:
        lines.append("- Pair strategy: none (exported from judgments: no pairs were selected)")
    stats = {k: v for k, v in (facts.get("stats") or {}).items() if not isinstance(v, dict)}
    lines += ["", "## Judge trust statistics", ""]
    lines += (
        [
            "| statistic | value |",
            "| --- | --- |",
            *(f"| {k} | {'n/a' if v is None else v} |" for k, v in stats.items()),
        ]
        if stats
        else ["Not recorded (no judgments summary found upstream)."]
    )
    lines += [
        "",
        "## Counts",
        "",
        f"- Rows in ({kind}): {summary.get('rows_in')}",
        f"- Rows out: {summary.get('rows_out')}",
        f"- Skipped: {_pairs(summary.get('skipped'))}",
    ]
    if summary.get("answers_dropped"):
        lines.append(f"- Answers that could not be a prompt's best: {_pairs(summary['answers_dropped'])}")
    if summary.get("labels"):
        lines.append(f"- Labels: {_pairs(summary['labels'])}")
    if facts.get("pairs_drops") is not None:
        lines.append(f"- Dropped by the pairs stage: {_pairs(facts['pairs_drops'])}")
    lines += ["", "## Lengths (characters)", "", "| answers | mean | median |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['mean']} | {v['median']} |" for k, v in (summary.get("lengths") or {}).items()]
    lines += ["", "## Load it", "", "```python", "import datasets", "", f"ds = {load}", "```", ""]
    return f"---\n{front.strip()}\n---\n\n" + "\n".join(lines)


def check_disk_dir(path: str | Path) -> None:
    """Refuse a --save-to-disk directory holding anything but an earlier saved dataset: the copy replaces it whole."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir()) and not (path / "dataset_dict.json").is_file()):
        raise ConfigError(
            f"--save-to-disk {path}: exists and is not a saved dataset (no dataset_dict.json), and the "
            "copy replaces its directory whole. Fix: choose a new or empty directory."
        )


def publish(
    config: Any, kind: str, source: list[dict[str, Any]], rows: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    """`--save-to-disk` and `--push-to-hub`: the rows as `DatasetDict({"train": ...})`, each with its card."""
    import datasets

    keys = list(dict.fromkeys(k for r in rows for k in r))  # `from_list` takes its columns from the first row only
    dataset = datasets.DatasetDict({"train": datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])})
    facts = provenance(config.input, kind, source)
    if config.save_to_disk:
        card = card_text(config, kind, facts, summary, DISK_FILES, f"datasets.load_from_disk({config.save_to_disk!r})")
        with atomic_dir(config.save_to_disk) as tmp:
            dataset.save_to_disk(str(tmp))
            (tmp / "README.md").write_text(card, encoding="utf-8")
        log.info("export: saved %d rows and their card to %s", len(rows), config.save_to_disk)
    if config.push_to_hub:
        repo = config.push_to_hub
        card = card_text(config, kind, facts, summary, HUB_FILES, f"datasets.load_dataset({repo!r}, split='train')")
        try:
            from huggingface_hub import DatasetCard

            dataset.push_to_hub(repo, private=config.private)
            DatasetCard(card).push_to_hub(repo, repo_type="dataset")
        except Exception as e:  # no network, no login, no permission, ...: whatever the hub client raises
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            reason = reason if len(reason) <= 160 else reason[:157] + "..."
            raise StageFailed(
                f"could not push to the Hugging Face hub ({reason}). Fix: check the network and "
                "`huggingface-cli login`, or use --save-to-disk DIR and push later."
            ) from e
        log.info("export: pushed %d rows and their card to the hub dataset %s", len(rows), repo)
