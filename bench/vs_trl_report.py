"""Tables and curves of `bench/vs_trl.py` results: held-out accuracy against training seconds.

    python bench/vs_trl_report.py bench/results/vs_trl.json [more.json ...]   # re-render table, target and PNG

With several files (same task and base model, e.g. the main run and a run of loop variants), their runs are drawn
in one table and one PNG beside the first file (`<first>-all.png`); each file keeps its own table otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# A TRL run stops at the first step past the budget and is evaluated there (a step is ~0.1 s on the demo model); a
# checkpoint up to this many seconds past t counts for t. A loop round that ends later than that does not.
SLACK_S = 1.0
STYLES = {"prefloop": ("k", "-"), "offline": ("grey", "--"), "grpo": ("tab:blue", "-"),
          "online-dpo": ("tab:orange", "-"), "online-dpo-ipo": ("tab:red", ":")}
TITLES = {"addition": "2-digit addition (demo model)", "instructions": "SmolLM2-135M-Instruct, instructions"}


def at(curve: list[dict], t: float, start: float) -> float:
    """Accuracy of the newest checkpoint finished by time t (the base model's before the first)."""
    done = [p["accuracy"] for p in curve if p["t"] <= t + SLACK_S]
    return done[-1] if done else start


def summarize(result: dict) -> dict:
    """Fill in the result's grid, each run's accuracy at the budget and the target, from its curves."""
    runs, base, budget = result["runs"], result["base"]["accuracy"], result["budget_s"]
    times = [0] + sorted({round(budget * i / 6) for i in range(1, 7)})
    result["grid"] = {str(t): {r["name"]: at(r["curve"], t, base) for r in runs} for t in times}
    for r in runs:
        r["accuracy_at_budget"] = at(r["curve"], budget, base)
        r["best_accuracy"] = max([base] + [p["accuracy"] for p in r["curve"] if p["t"] <= budget + SLACK_S])
    ours = next((r for r in runs if r["name"] == "prefloop"), None)
    others = [r for r in runs if r.get("side", r["name"]) != "prefloop"]
    result["target_met"] = None
    # Where a run has no checkpoint by the budget (a loop round, or a real model's TRL step, longer than the slack),
    # the budget column says nothing about it: compare at the first time every run has one instead. Runs that
    # stopped at the budget keep their last checkpoint there, which favours the later runs, not them.
    firsts = [r["curve"][0]["t"] for r in runs if r["curve"]]
    late = bool(firsts) and max(firsts) > budget + SLACK_S
    result["compared_at_s"] = max(firsts) if late else budget
    if ours and others:
        t = result["compared_at_s"]
        best = max(others, key=lambda r: at(r["curve"], t, base))
        result["target_met"] = at(ours["curve"], t, base) >= at(best["curve"], t, base)
        result["best_alternative"] = best["name"]
    return result


def table(result: dict) -> str:
    runs, base = result["runs"], result["base"]["accuracy"]
    lines = [f"{result['task']}: base held-out accuracy {base:.1%} ({result['base']['heldout']} prompts); budget "
             f"{result['budget_s']:.0f} s of training per run", "",
             "| training s | " + " | ".join(r["name"] for r in runs) + " |",
             "| --- | " + " | ".join("---" for _ in runs) + " |"]
    for t, row in result["grid"].items():
        lines.append(f"| {t} | " + " | ".join(f"{row[r['name']]:.1%}" for r in runs) + " |")
    lines += ["", "| run | at budget | best by budget | training s (CPU s) | checkpoints |", "| --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['accuracy_at_budget']:.1%} | {r['best_accuracy']:.1%} | "
                     f"{r['train_s']:.0f} ({r['cpu_s']:.0f}) | {len(r['curve'])} |")
    if result["target_met"] is not None:
        ours = next(r for r in runs if r["name"] == "prefloop")
        best = next(r for r in runs if r["name"] == result["best_alternative"])
        t = result.get("compared_at_s", result["budget_s"])
        where = "" if t == result["budget_s"] else f", compared at {t:.0f} s, the first time every run has a checkpoint"
        lines += ["", f"target (prefloop >= the best alternative at equal time{where}): "
                      f"{'met' if result['target_met'] else 'NOT met'} ({at(ours['curve'], t, base):.1%} vs "
                      f"{best['name']} {at(best['curve'], t, base):.1%})"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["base"]["accuracy"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    variant_colors = iter(["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "gold"] * 3)
    shades: dict[str, int] = {}  # a TRL side's runs in one colour family, darker for each further learning rate
    families = {"grpo": "Blues", "online-dpo": "Oranges", "online-dpo-ipo": "Reds"}
    for r in result["runs"]:
        side = r.get("side", r["name"])
        color, line = STYLES.get(side, ("tab:green", "-"))
        if side == "prefloop" and r.get("variant"):
            color, line = next(variant_colors), "-."
        elif side in families:
            shades[side] = shades.get(side, 0) + 1
            color = plt.get_cmap(families[side])(0.35 + 0.2 * shades[side])
        xs = [0.0] + [p["t"] for p in r["curve"]]
        ys = [100 * base] + [100 * p["accuracy"] for p in r["curve"]]
        main = r["name"] == "prefloop"
        # Steps: a run's accuracy at t is its newest checkpoint's, held until the next one (as the tables read it).
        ax.plot(xs, ys, marker="o", ms=3, color=color, linestyle=line, label=r["name"], drawstyle="steps-post",
                linewidth=2.5 if main else 1.3, alpha=1.0 if main else 0.85)
    ax.axvline(result["budget_s"], color="grey", linewidth=0.8, alpha=0.5)
    ax.set_xlabel("training seconds (model builds and evaluations excluded)")
    ax.set_ylabel("held-out accuracy, % (greedy)")
    ax.set_title(f"{TITLES.get(result['task'], result['task'])}: same base, verifier, held-out set", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge(results: list[dict]) -> dict:
    first = results[0]
    for other in results[1:]:
        same = (other["task"], other["base"]["accuracy"], other["budget_s"])
        if same != (first["task"], first["base"]["accuracy"], first["budget_s"]):
            raise SystemExit(f"cannot merge: task/base accuracy/budget {same} differ from the first file's")
    names = [r["name"] for r in first["runs"]]
    extra = [r for res in results[1:] for r in res["runs"] if r["name"] not in names]
    return {**first, "runs": first["runs"] + extra}


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    paths = [Path(p) for p in argv]
    results = [summarize(json.loads(p.read_text())) for p in paths]
    if len(results) == 1:
        paths[0].write_text(json.dumps(results[0], indent=2) + "\n")
        plot(results[0], paths[0].with_suffix(".png"))
        print(table(results[0]))
        return
    merged = summarize(merge(results))
    plot(merged, paths[0].with_name(paths[0].stem + "-all.png"))
    print(table(merged))


if __name__ == "__main__":
    main(sys.argv[1:])
