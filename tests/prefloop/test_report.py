"""Tests for prefloop.report: the markdown table carries the manifest's numbers, the PNG is real, errors name the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from prefloop.report import main, write_report


def _round(
    k: int, acc: float | None, score: float, pairs: int, drops: dict[str, int], eval_status: str = "done"
) -> dict:
    ev: dict[str, Any] = {"status": eval_status}
    if eval_status == "done":
        summary: dict[str, Any] = {"prompts": 500, "mean_score": score, "mean_length": 2.0}
        if acc is not None:
            summary["accuracy"] = acc
        ev.update(seconds=3.0 + k, summary=summary)
    return {
        "round": k,
        "policy": {"model": "runs/demo/base", "adapter": f"round_{k - 1:03d}/model"},
        "phases": {
            "prompts": {"status": "done", "seconds": 0.1, "summary": {"prompts": 2048}},
            "generate": {"status": "done", "seconds": 8.1, "summary": {"written": 2048, "mean_length": 2.25 + k}},
            "judge": {"status": "done", "seconds": 0.5, "summary": {"completion_statuses": {"ok": 16000, "error": 4}}},
            "pairs": {
                "status": "done",
                "seconds": 0.3,
                "summary": {"pairs": pairs, "drops": drops, "mean_chosen_chars": 2.0, "mean_rejected_chars": 2.4},
            },
            "train": {"status": "done", "seconds": 6.0, "summary": {"steps": 24, "final_loss": 0.41}},
            "eval": ev,
        },
    }


MANIFEST: dict[str, Any] = {
    "prefloop_version": "0.1.0",
    "config_hash": "ab12cd34ef56",
    "config": {
        "model": "runs/demo/base",
        "rounds": 3,
        "init": "previous",
        "data": "fresh",
        "reference": "initial",
        "gen": {"n": 8, "temperature": 1.0},
        "train": {"loss": ["sigmoid", "sft"], "beta": 0.1},
    },
    "status": "running",
    "rounds": [
        {
            "round": 0,
            "policy": {"model": "runs/demo/base", "adapter": None},
            "phases": {
                "eval": {
                    "status": "done",
                    "seconds": 3.2,
                    "summary": {"prompts": 500, "mean_score": 0.246, "accuracy": 0.246},
                }
            },
        },
        _round(1, 0.40, 0.40, 1500, {"tie": 500, "truncated": 3}),
        _round(2, 0.582, 0.582, 1234, {"tie": 812, "truncated": 3, "identical": 0}),
        _round(3, None, 0.0, 1100, {"tie": 900}, eval_status="running"),
    ],
}


def _write(tmp_path: Path, manifest: dict) -> Path:
    run = tmp_path / "demo_run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return run


def _table(md: str) -> dict[str, dict[str, str]]:
    """The per-round table as {round: {column: cell}}."""
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]]
    return {row["round"]: row for row in rows}


def test_table_has_one_row_per_round_with_manifest_numbers(tmp_path: Path) -> None:
    """Each round is one table row; accuracy, Δ vs round 0, pairs and drop reasons match the manifest."""
    md_path = write_report(_write(tmp_path, MANIFEST))
    md = md_path.read_text(encoding="utf-8")
    assert md_path == tmp_path / "demo_run" / "report.md"
    assert md.startswith("# prefloop report: demo_run")
    rows = _table(md)
    assert list(rows) == ["0", "1", "2", "3"]
    r2 = rows["2"]
    assert r2["held-out accuracy"] == "58.2%"
    assert r2["held-out mean score"] == "0.582"
    assert r2["Δ acc (points) vs round 0"] == "+33.6"
    assert r2["pairs kept"] == "1234"
    assert r2["drops by reason"] == "tie 812, truncated 3"  # zero counts left out
    assert r2["mean response length (chars)"] == "4.2"
    assert r2["gen s"] == "8.1" and r2["eval s"] == "5.0"
    assert rows["0"]["Δ acc (points) vs round 0"] == "baseline"


def test_missing_phases_dash_and_running_status_shown(tmp_path: Path) -> None:
    """Phases that never ran render "–"; a phase in flight renders its status instead of numbers."""
    rows = _table(write_report(_write(tmp_path, MANIFEST)).read_text(encoding="utf-8"))
    r0, r3 = rows["0"], rows["3"]
    for col in ("pairs kept", "drops by reason", "mean response length (chars)", "gen s", "judge s", "train s"):
        assert r0[col] == "–", col
    for col in ("held-out mean score", "held-out accuracy", "Δ acc (points) vs round 0", "eval s"):
        assert r3[col] == "running", col
    assert r3["pairs kept"] == "1100"


def test_summary_config_and_judge_sections(tmp_path: Path) -> None:
    """The headline spans first→last finished eval; config subset, image link and judge statuses are present."""
    md = write_report(_write(tmp_path, MANIFEST)).read_text(encoding="utf-8")
    assert "Held-out accuracy 24.6% → 58.2% over 2 rounds (+33.6 points)." in md
    assert "- train.loss: `sigmoid, sft`" in md and "- gen.n: `8`" in md and "- train.beta: `0.1`" in md
    assert "temperature" not in md  # only the key subset, not the whole config
    assert "![held-out metric per round](report.png)" in md
    assert "- round 1: judge completion statuses: ok 16000, error 4" in md
    assert "run status: running" in md


def test_failed_phase_is_reported(tmp_path: Path) -> None:
    """A failed phase shows "failed" in its table cell and its error in the judge-and-data section."""
    manifest = copy.deepcopy(MANIFEST)
    manifest["rounds"][2]["phases"]["train"] = {"status": "failed", "error": "CUDA out of memory"}
    md = write_report(_write(tmp_path, manifest)).read_text(encoding="utf-8")
    assert _table(md)["2"]["train s"] == "failed"
    assert "**train failed**: CUDA out of memory" in md


def test_png_is_valid_and_nontrivial(tmp_path: Path) -> None:
    """report.png is a real PNG of more than a few KB, written beside report.md with no temp files left."""
    run = _write(tmp_path, MANIFEST)
    write_report(run)
    png = (run / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5_000
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "report.md", "report.png"]


def test_without_accuracy_mean_score_is_shown_and_plotted(tmp_path: Path) -> None:
    """With a non-verifier judge (no accuracy) the table, headline and plot use mean score."""
    manifest = copy.deepcopy(MANIFEST)
    for r in manifest["rounds"]:
        (r["phases"]["eval"].get("summary") or {}).pop("accuracy", None)
    run = _write(tmp_path, manifest)
    md = write_report(run).read_text(encoding="utf-8")
    rows = _table(md)
    assert "held-out accuracy" not in rows["2"]
    assert rows["2"]["Δ score vs round 0"] == "+0.336"
    assert "Held-out mean score 0.246 → 0.582 over 2 rounds (+0.336)." in md
    assert (run / "report.png").read_bytes().startswith(b"\x89PNG")


def test_missing_manifest_names_path_and_fix(tmp_path: Path) -> None:
    """No manifest.json → FileNotFoundError naming the path and telling the user to run `prefloop run`."""
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*run `prefloop run` first"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_main_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m prefloop.report RUN_DIR` writes the report and prints its path."""
    run = _write(tmp_path, MANIFEST)
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")
