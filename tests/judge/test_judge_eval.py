"""`prefloop judge-eval`: a judge's agreement with trusted labels, checked against counts worked out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from prefloop.judge.evaluate import JudgeEvalConfig, kappa, run, wilson


def judgment(rid, texts, scores, comparisons=None):
    row = {"id": rid, "prompt": f"q{rid}", "completions": [{"text": t, "finish_reason": "stop"} for t in texts],
           "scores": scores, "statuses": ["ok" if s is not None else "error" for s in scores]}
    if comparisons is not None:
        row["comparisons"] = comparisons
    return row


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# Gold: p1 orders c > b > a (3 comparisons), p2 has b > a and a tie a = c, b > c (2 labelled comparisons).
GOLD = [judgment("p1", ["a", "bb", "ccc"], [0.0, 0.5, 1.0]), judgment("p2", ["a", "bbbb", "c"], [0.0, 1.0, 0.0])]


def test_pointwise_judge_against_gold_by_hand(tmp_path):
    """Judge p1: c > a = b (gets c>b, c>a right, ties b vs a); p2: a fails (no verdict on b>a), b > c right.
    Decided 3, all right; 1 tie, 1 no verdict of 5; every decided pick is the longer answer, as is gold's."""
    judge = [judgment("p1", ["a", "bb", "ccc"], [1.0, 1.0, 2.0]), judgment("p2", ["a", "bbbb", "c"], [None, 3.0, 1.0])]
    out = run(JudgeEvalConfig(judgments=write(tmp_path / "j.jsonl", judge), gold=write(tmp_path / "g.jsonl", GOLD),
                              out=str(tmp_path / "r.json")))
    r = json.loads(out.read_text())
    assert (r["labelled_comparisons"], r["decided"], r["accuracy"]) == (5, 3, 1.0)
    assert (r["tie_rate"], r["no_verdict_rate"]) == (0.2, 0.2)
    assert r["accuracy_ci95"] == wilson(3, 3) and r["accuracy_ci95"][1] == 1.0
    assert r["length_bias"] == {"decided_with_length_difference": 3, "judge_picks_longer": 1.0,
                                "judge_picks_longer_ci95": wilson(3, 3), "gold_picks_longer": 1.0}


def test_pairwise_judge_and_gold_pairs(tmp_path):
    """A pairwise judge's decided matches against gold pairs given by text; a tie and a missing match count apart."""
    comparisons = [{"a": 0, "b": 1, "status": "ok", "winner": 1, "loser": 0, "verdicts": ["B", "A"]},
                   {"a": 1, "b": 2, "status": "ok", "winner": 1, "loser": 2, "verdicts": ["A", "B"]},
                   {"a": 0, "b": 2, "status": "tie", "winner": None, "verdicts": ["A", "A"]}]
    judge = [judgment("p1", ["a", "bb", "ccc"], [None] * 3, comparisons)]
    gold = [{"prompt": "qp1", "chosen": "bb", "rejected": "a"}, {"prompt": "qp1", "chosen": "ccc", "rejected": "bb"},
            {"prompt": "qp1", "chosen": "ccc", "rejected": "a"}, {"prompt": "qzz", "chosen": "x", "rejected": "y"}]
    r = json.loads(run(JudgeEvalConfig(judgments=write(tmp_path / "j.jsonl", judge), gold=write(tmp_path / "g.jsonl",
                       gold), out=str(tmp_path / "r.json"))).read_text())
    assert (r["labelled_comparisons"], r["decided"], r["accuracy"], r["tie_rate"]) == (3, 2, 0.5, round(1 / 3, 4))
    assert r["first_position_win_rate"] == round(4 / 6, 4)  # single-order verdicts B,A / A,B / A,A: 4 of 6 say "A"


def test_kappa_and_wilson_by_hand():
    # 10 decisions: judge and gold agree on 8; judge says 1 six times, gold five times.
    pairs = [(1, 1)] * 4 + [(0, 0)] * 4 + [(1, 0)] * 2
    # observed 0.8; p_judge 0.6, p_gold 0.4; expected 0.6*0.4 + 0.4*0.6 = 0.48; kappa = 0.32 / 0.52
    assert kappa(pairs) == pytest.approx(0.32 / 0.52)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert math.isclose(kappa([(1, 1), (0, 0)]), 1.0)


def test_nothing_in_common_exits_2_with_one_line(tmp_path):
    judge = write(tmp_path / "j.jsonl", [judgment("other", ["a", "b"], [1.0, 0.0])])
    done = subprocess.run([sys.executable, "-m", "prefloop.cli", "judge-eval", "--judgments", judge, "--gold",
                           write(tmp_path / "g.jsonl", GOLD), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("prefloop judge-eval: error: ")
    assert "no labelled comparison" in done.stderr and not (tmp_path / "r.json").exists()
