"""bench/vs_trl_report.py: what "accuracy at equal time" means, checked against hand-read curves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from vs_trl_report import at, summarize, table  # noqa: E402


def run(name: str, points: list[tuple[float, float]], side: str | None = None) -> dict:
    return {"name": name, "side": side or name.split(" ")[0], "train_s": points[-1][0] if points else 0.0,
            "cpu_s": 0.0, "curve": [{"t": t, "accuracy": a} for t, a in points]}


def test_at_is_the_newest_checkpoint_finished_by_t_with_one_second_of_slack():
    curve = [{"t": 30.4, "accuracy": 0.5}, {"t": 61.5, "accuracy": 0.7}, {"t": 180.6, "accuracy": 0.9}]
    assert at(curve, 0, 0.2) == 0.2  # nothing finished yet: the base model
    assert at(curve, 30, 0.2) == 0.5  # 30.4 is within the slack of 30
    assert at(curve, 60, 0.2) == 0.5  # 61.5 is not
    assert at(curve, 180, 0.2) == 0.9  # a TRL run's evaluation just past the budget counts for the budget
    assert at(curve, 179, 0.2) == 0.7


def test_summary_compares_prefloop_with_the_best_alternative_at_the_budget():
    # The offline run is better at the budget; grpo peaked earlier but is worse at the budget: the target compares
    # the budget column, and the best alternative is the offline run.
    result = {"task": "addition", "budget_s": 180.0, "base": {"accuracy": 0.3, "heldout": 500}, "runs": [
        run("prefloop", [(30, 0.6), (170, 0.8), (195, 0.95)]),
        run("offline", [(100, 0.85)]),
        run("grpo lr=1e-3", [(30, 0.9), (180.4, 0.1)]),
    ]}
    summarize(result)
    assert result["target_met"] is False and result["best_alternative"] == "offline"
    by_name = {r["name"]: r for r in result["runs"]}
    assert by_name["prefloop"]["accuracy_at_budget"] == 0.8  # the round that ended at 195 s is past the budget
    assert by_name["prefloop"]["best_accuracy"] == 0.8
    assert by_name["grpo lr=1e-3"]["best_accuracy"] == 0.9
    assert result["grid"]["0"] == {"prefloop": 0.3, "offline": 0.3, "grpo lr=1e-3": 0.3}
    assert result["grid"]["90"] == {"prefloop": 0.6, "offline": 0.3, "grpo lr=1e-3": 0.9}
    assert "NOT met (80.0% vs offline 85.0%)" in table(result)


def test_a_variant_of_the_loop_is_not_an_alternative():
    result = {"task": "addition", "budget_s": 60.0, "base": {"accuracy": 0.3, "heldout": 10}, "runs": [
        run("prefloop", [(50, 0.6)]), run("prefloop train.epochs=2", [(50, 0.9)], side="prefloop"),
        run("online-dpo lr=1e-4", [(60, 0.5)])]}
    summarize(result)
    assert result["target_met"] is True and result["best_alternative"] == "online-dpo lr=1e-4"


def test_merging_refuses_results_from_another_base_model(tmp_path):
    make = lambda base, runs: {"task": "addition", "budget_s": 60.0,  # noqa: E731
                               "base": {"accuracy": base, "heldout": 10}, "runs": runs}
    (tmp_path / "a.json").write_text(json.dumps(make(0.3, [run("prefloop", [(50, 0.6)])])))
    (tmp_path / "b.json").write_text(json.dumps(make(0.3, [run("offline", [(40, 0.7)])])))
    (tmp_path / "c.json").write_text(json.dumps(make(0.4, [run("offline", [(40, 0.7)])])))
    script = str(BENCH / "vs_trl_report.py")
    ok = subprocess.run([sys.executable, script, str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "NOT met (60.0% vs offline 70.0%)" in ok.stdout and (tmp_path / "a-all.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, script, str(tmp_path / "a.json"), str(tmp_path / "c.json")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "cannot merge" in bad.stderr


def test_when_a_run_has_no_checkpoint_by_the_budget_the_target_is_read_where_every_run_has_one():
    """SmolLM2 on a 2-core CPU: the loop's first round ends at 701 s and a GRPO step takes ~110 s, so nothing is
    evaluated by a 480 s budget; the budget column would call every run the base model's and the target met."""
    result = {"task": "instructions", "budget_s": 480.0, "base": {"accuracy": 0.21, "heldout": 100}, "runs": [
        run("prefloop", [(701.3, 0.26)]), run("grpo lr=5e-4", [(572.0, 0.34)]),
        run("online-dpo lr=5e-4", [(516.0, 0.21)])]}
    summarize(result)
    assert result["compared_at_s"] == 701.3
    assert result["target_met"] is False and result["best_alternative"] == "grpo lr=5e-4"
    assert "compared at 701 s" in table(result) and "NOT met (26.0% vs grpo lr=5e-4 34.0%)" in table(result)
