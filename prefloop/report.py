"""Per-run report: `report.md` (summary, config, per-round table, real answers) and `report.png` (held-out metric
per round).

    python -m prefloop.report runs/demo        # or: prefloop report runs/demo

The numbers come from `RUN_DIR/manifest.json` alone, so the report works on a finished run, a running one (phases
in flight show their status, e.g. "running") and a crashed one (its last phase shows "failed"). Text sections read
the files of phases the manifest marks done:

- "Held-out answers": the first held-out prompts by id that round 0 and the latest evaluated round both answered
  (`round_<k>/eval_candidates.jsonl`), each answer with its score from `eval_judgments.jsonl` when it has one.
- "Pairs": the first pairs by id of the latest round whose pairs are done (`round_<k>/pairs.jsonl`).
- "Plain questions": `RUN_DIR/plain_questions.json` when a demo wrote it (`prefloop.demo.instructions`).

A section whose files are missing or unreadable is left out; it never fails the report. Answers are shown as text
in code fences longer than any backtick run inside them, so nothing a model writes renders as markdown. Both
files are written atomically: a reader (or a browser refreshing the markdown) sees the previous report or the new
one, never half of one.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from prefloop.report_text import (  # noqa: F401 - code_span, fenced and PLAIN_FILE are this module's API too
    DASH,
    PLAIN_FILE,
    answers_section,
    code_span,
    done_summary,
    fenced,
    pairs_section,
    phase,
    plain_section,
)
from prefloop.store import atomic_write

# The config keys a reader needs to interpret the curve; the full resolved config lives in the run dir.
CONFIG_KEYS = ("model", "rounds", "init", "data", "reference", "gen.n", "train.loss", "train.beta")
TIMED_PHASES = (
    ("generate", "gen s"),
    ("judge", "judge s"),
    ("pairs", "pairs s"),
    ("train", "train s"),
    ("eval", "eval s"),
)
TIMED_PHASES_NAMES = tuple(name for name, _ in TIMED_PHASES)
API_KEYS = ("requests", "prompt_tokens", "completion_tokens", "partial")
ANSWERS = 5  # held-out prompts shown with their round-0 and latest answers
PAIRS = 3  # pairs of the latest round shown


def _rows(summary: dict[str, Any]) -> int | None:
    """A round's training rows: its pairs, or (the loop's `kto_threshold`, grpo) its labelled answers or groups."""
    return summary.get("pairs", summary.get("rows_out"))


def load_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest; a missing or unreadable one raises an error naming the file and the fix."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: no loop has run in {run_dir}. Fix: run `prefloop run` first.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Fix: re-run `prefloop run` to rewrite it.") from e


def _cell(rnd: dict[str, Any], name: str, get: Any) -> str:
    """`get(summary)` for a done phase; the phase's status when it is not done; "–" when it never ran."""
    ph = phase(rnd, name)
    if ph is None:
        return DASH
    if ph.get("status") != "done":
        return str(ph.get("status") or "unknown")
    value = get(ph.get("summary") or {})
    return DASH if value is None else value


def _seconds(rnd: dict[str, Any], name: str) -> str:
    ph = phase(rnd, name)
    if ph is None:
        return DASH
    if ph.get("status") != "done":
        return str(ph.get("status") or "unknown")
    return DASH if ph.get("seconds") is None else f"{ph['seconds']:.1f}"


def _metric(rnd: dict[str, Any], key: str) -> float | None:
    s = done_summary(rnd, "eval")
    return None if s is None or s.get(key) is None else float(s[key])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _drops(summary: dict[str, Any]) -> str | None:
    drops = summary.get("drops", summary.get("skipped"))  # pairs, or labelled answers (export's summary)
    if drops is None:
        return None
    kept = [f"{k} {v}" for k, v in drops.items() if v]  # zero counts are noise in a table cell
    return ", ".join(kept) or "none"


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items())


def _config_lines(config: dict[str, Any]) -> list[str]:
    lines = []
    for key in CONFIG_KEYS:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"- {key}: `{shown}`")
    return lines


def _metric_key(rounds: list[dict[str, Any]]) -> str:
    """The held-out metric to plot and headline: accuracy (a verifier), else mean score, else the win rate
    against round 0 (a pairwise judge)."""
    for key in ("accuracy", "mean_score"):
        if any(_metric(r, key) is not None for r in rounds):
            return key
    return "win_rate_vs_base" if any(_metric(r, "win_rate_vs_base") is not None for r in rounds) else "mean_score"


def _judge_note(name: str, stats: dict[str, Any]) -> str | None:
    """The judge's trust numbers (judge/stats.py) in one line."""
    parts = []
    for key, label in (("agreement_rate", "orders agree"), ("first_position_win_rate", "first-position win rate"),
                       ("tie_rate", "ties"), ("parse_error_rate", "parse errors"), ("refusal_rate", "refusals"),
                       ("error_rate", "errors")):
        if stats.get(key) is not None:
            parts.append(f"{label} {_pct(stats[key])}")
    return f"{name}: " + ", ".join(parts) if parts else None


def _summary_line(rounds: list[dict[str, Any]], key: str) -> str:
    """First → last held-out metric; the headline a reader checks before anything else."""
    evals = [(r.get("round"), _metric(r, key)) for r in rounds]
    evals = [(k, v) for k, v in evals if v is not None]
    if key == "win_rate_vs_base":
        if not evals:
            return "No held-out comparison with round 0 has finished yet."
        k, v = evals[-1]
        return f"Held-out win rate vs round 0: {_pct(v)} at round {k} (ties and failed matches count as not won)."
    name = "accuracy" if key == "accuracy" else "mean score"
    fmt = _pct if key == "accuracy" else (lambda x: f"{x:.3f}")
    if not evals:
        return "No held-out eval has finished yet."
    (k0, v0), (k1, v1) = evals[0], evals[-1]
    if len(evals) == 1:
        return f"Held-out {name} {fmt(v0)} at round {k0}; no later eval has finished yet."
    delta = f"{100 * (v1 - v0):+.1f} points" if key == "accuracy" else f"{v1 - v0:+.3f}"
    n = k1 - k0 if isinstance(k0, int) and isinstance(k1, int) else len(evals) - 1
    return f"Held-out {name} {fmt(v0)} → {fmt(v1)} over {n} rounds ({delta})."


def render_markdown(run_dir: Path, manifest: dict[str, Any], answers: int = ANSWERS, pairs: int = PAIRS) -> str:
    """The report's markdown; `answers` and `pairs` are how many held-out prompts and pairs to show as text."""
    rounds = manifest.get("rounds") or []
    has_acc = any(_metric(r, "accuracy") is not None for r in rounds)
    key = _metric_key(rounds)
    has_wins = any(_metric(r, "win_rate_vs_base") is not None for r in rounds)
    base = next((_metric(r, key) for r in rounds if r.get("round") == 0), None)

    out = [f"# prefloop report: {run_dir.resolve().name}", "", _summary_line(rounds, key)]
    meta = [f"run status: {manifest.get('status', 'unknown')}"]
    meta += [f"{k}: `{manifest[k]}`" for k in ("config_hash", "prefloop_version") if manifest.get(k)]
    out += ["", " · ".join(meta), ""]
    out += [f"API spend: {_api(manifest['api_usage'])}", ""] if manifest.get("api_usage") else []
    out += _pool_lines(manifest.get("decontamination") or {})
    config_lines = _config_lines(manifest.get("config") or {})
    if config_lines:
        out += ["## Config", "", *config_lines, ""]

    header = ["round", "held-out mean score"] + (["held-out accuracy"] if has_acc else [])
    header += ["win rate vs round 0"] if has_wins else []
    header += [f"Δ {'acc (points)' if has_acc else 'score'} vs round 0", "pairs kept", "drops by reason"]
    header += ["mean response length (chars)", "held-out answer length (chars)"]
    header += [label for _, label in TIMED_PHASES] + ["fixed s"]
    out += ["## Rounds", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rounds:
        row = [
            str(r.get("round", "?")),
            _cell(r, "eval", lambda s: None if s.get("mean_score") is None else f"{s['mean_score']:.3f}"),
        ]
        if has_acc:
            row.append(_cell(r, "eval", lambda s: None if s.get("accuracy") is None else _pct(s["accuracy"])))
        if has_wins:
            row.append(_cell(r, "eval", lambda s: None if s.get("win_rate_vs_base") is None
                             else _pct(s["win_rate_vs_base"])))
        value = _metric(r, key) if key != "win_rate_vs_base" else None
        if r.get("round") == 0 and value is not None:
            row.append("baseline")
        elif value is not None and base is not None:
            row.append(f"{100 * (value - base):+.1f}" if has_acc else f"{value - base:+.3f}")
        else:
            row.append(_cell(r, "eval", lambda s: None))  # shows "running"/"failed" while eval is not done
        row.append(_cell(r, "pairs", lambda s: None if _rows(s) is None else str(_rows(s))))
        row.append(_cell(r, "pairs", _drops))
        row.append(_cell(r, "generate", lambda s: None if s.get("mean_length") is None else f"{s['mean_length']:.1f}"))
        row.append(_cell(r, "eval", lambda s: None if s.get("mean_length") is None else f"{s['mean_length']:.1f}"))
        row += [_seconds(r, name) for name, _ in TIMED_PHASES]
        fixed = (r.get("fixed_s") or {}).get("total")  # loads, trainer setup, saves: inside the phases' seconds
        row.append(DASH if fixed is None else f"{fixed:.1f}")
        out.append("| " + " | ".join(row) + " |")
    out += ["", "![held-out metric per round](report.png)", "", "## Judge and data", ""]

    for r in rounds:
        notes = []
        for name in ("judge", "eval"):
            s = done_summary(r, name)
            if s and s.get("completion_statuses"):
                notes.append(f"{name} completion statuses: {_counts(s['completion_statuses'])}")
            if s and s.get("stats") and _judge_note(name, s["stats"]):
                notes.append(_judge_note(name, s["stats"]))
            agreement = (s or {}).get("agreement") or {}  # a judge ensemble (judge/ensemble.py)
            if agreement.get("agree_rate") is not None:
                notes.append(f"{name} ensemble members agree on best and worst in {_pct(agreement['agree_rate'])} "
                             f"of {agreement['prompts']} prompts ({agreement['marked_to_drop']} marked to drop)")
        gold = (done_summary(r, "judge") or {}).get("judge_eval")  # the loop's gold_judge
        if gold:
            ci = gold.get("accuracy_ci95") or ["–", "–"]
            notes.append(f"judge vs gold: {gold['error']}" if gold.get("error") else
                         f"judge vs gold: accuracy {_pct(gold['accuracy']) if gold['accuracy'] is not None else DASH} [{ci[0]}, {ci[1]}] on {gold['decided']} "
                         f"decided of {gold['labelled_comparisons']} labelled comparisons, kappa "
                         f"{gold['cohens_kappa']}, ties {_pct(gold['tie_rate']) if gold['tie_rate'] is not None else DASH}")
        s = done_summary(r, "pairs")
        if s and s.get("mean_chosen_chars") is not None and s.get("mean_rejected_chars") is not None:
            # A chosen side that is systematically longer is the classic length bias of judges.
            notes.append(f"mean chars chosen {s['mean_chosen_chars']:.1f} vs rejected {s['mean_rejected_chars']:.1f}")
        if s and s.get("repeated_chosen"):  # one answer chosen for several prompts: a template, not a preference
            notes.append(f"{s['repeated_chosen']} chosen answers repeat another prompt's")
        s = done_summary(r, "prompts")
        if s and s.get("repeated_prompts"):
            notes.append(f"{s['repeated_prompts']} of {s['prompts']} prompts drawn in an earlier round")
        usages = [u for name in TIMED_PHASES_NAMES if (u := (done_summary(r, name) or {}).get("usage"))]
        if usages:  # API requests of the round's openai-backend stages (prefloop/budget.py)
            notes.append("API " + _api({k: sum(u.get(k) or 0 for u in usages) for k in API_KEYS}
                                       | ({"cost_usd": sum(u["cost_usd"] for u in usages)}
                                          if all("cost_usd" in u for u in usages) else {})))
        for name, ph in (r.get("phases") or {}).items():
            if ph.get("status") not in ("done", "running"):
                notes.append(f"**{name} {ph.get('status')}**" + (f": {ph['error']}" if ph.get("error") else ""))
        out.append(f"- round {r.get('round', '?')}: " + ("; ".join(notes) if notes else DASH))
    out += plain_section(run_dir)
    out += answers_section(run_dir, rounds, answers)
    out += pairs_section(run_dir, rounds, pairs)
    return "\n".join(out) + "\n"


def _api(usage: dict[str, Any]) -> str:
    """Token counts (and cost, and the budget) of API requests, as a summary's or the manifest's `usage` has them."""
    text = f"{usage.get('requests', 0):,} requests, {usage.get('prompt_tokens', 0):,} prompt + " \
           f"{usage.get('completion_tokens', 0):,} completion tokens" + (" (partial: a server omitted usage)"
                                                                         if usage.get("partial") else "")
    if usage.get("cost_usd") is not None:
        text += f", ${usage['cost_usd']:.6g}"
    if usage.get("max_budget_usd") is not None:
        text += f" of max_budget_usd ${usage['max_budget_usd']:g}"
    return text


def _pool_lines(cleaned: dict[str, Any]) -> list[str]:
    """What left the prompt pool before round 1 (prefloop/pool.py): repeats, eval and benchmark matches."""
    if not cleaned.get("pool"):
        return []
    repeated = cleaned.get("dedup") or {}
    parts = [f"prompt pool: {repeated.get('pool', cleaned['pool'])} prompts"]
    if repeated:
        parts.append(f"{repeated['removed']} repeats removed ({_counts(repeated['by_reason']) or 'none'})")
    parts.append(f"{cleaned.get('removed', 0)} matching eval/benchmark prompts removed "
                 f"({_counts(cleaned.get('by_reason') or {}) or 'none'})")
    return ["; ".join(parts) + f"; {cleaned.get('kept')} kept", ""]


def render_png(manifest: dict[str, Any]) -> bytes:
    """Held-out metric per round (line) beside pairs kept per round (bars), as PNG bytes."""
    # Imported here so `import prefloop` stays light. An explicit Agg canvas on a bare Figure (not pyplot with
    # `matplotlib.use("Agg")`) renders without a display and without switching the backend of a user's notebook.
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = manifest.get("rounds") or []
    key = _metric_key(rounds)
    has_acc = key in ("accuracy", "win_rate_vs_base")  # both are fractions
    points = [(r["round"], _metric(r, key)) for r in rounds if "round" in r and _metric(r, key) is not None]
    bars = [(r["round"], _rows(done_summary(r, "pairs") or {})) for r in rounds if "round" in r]
    bars = [(k, v) for k, v in bars if v is not None]

    # Figure() rather than pyplot: no global figure registry, so repeated reports in one process never leak.
    fig = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    # Shared x so a round's held-out metric lines up with the pairs count of the same round.
    ax, ax_pairs = fig.subplots(1, 2, width_ratios=[3, 2], sharex=True) if bars else (fig.subplots(), None)
    label = {"accuracy": "held-out accuracy", "mean_score": "held-out mean score",
             "win_rate_vs_base": "held-out win rate vs round 0"}[key]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", color="tab:blue")
        for x, y in points:
            ax.annotate(
                f"{y:.1%}" if has_acc else f"{y:.2f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    else:
        ax.text(0.5, 0.5, "no held-out eval yet", ha="center", va="center", transform=ax.transAxes)
    if has_acc:
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
    else:
        ax.margins(y=0.15)  # headroom for the value labels above the markers
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    ax.set_title(label.capitalize() + " per round", fontsize=10)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax_pairs is not None:
        ax_pairs.bar([k for k, _ in bars], [v for _, v in bars], color="tab:gray")
        ax_pairs.set_xlabel("round")
        ax_pairs.set_ylabel("pairs kept")
        ax_pairs.set_title("Pairs kept per round", fontsize=10)
        ax_pairs.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md` and `report.png` into `run_dir` from its manifest; return the markdown path."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    # The PNG first: the markdown links to it, so a reader never sees a report whose image is missing.
    atomic_write(run_dir / "report.png", render_png(manifest))
    md_path = run_dir / "report.md"
    atomic_write(md_path, render_markdown(run_dir, manifest))
    return md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefloop.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory holding manifest.json (made by `prefloop run`)")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
