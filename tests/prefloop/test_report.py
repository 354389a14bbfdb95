"""Tests for prefloop.report: the markdown table carries the manifest's numbers, the text sections show the run's
real answers and pairs safely fenced, the PNG is real, errors name the fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from prefloop.report import PLAIN_FILE, code_span, fenced, main, render_markdown, write_report


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
        "fixed_s": {"generate.load_s": 0.25 * k, "train.setup_s": 1.5, "total": 1.5 + 0.25 * k},
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
    section = md.split("## Rounds", 1)[1].split("\n\n")[1]  # the table is the section's first paragraph
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
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
    assert r2["fixed s"] == "2.0" and rows["0"]["fixed s"] == "–"  # the loads and setup inside those seconds
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


# ------------------------------------------------------------------------------------------------ text sections

BACKTICKS = "Use ```` ``` ```` to open a block:\n```python\nprint(1)\n```"  # a run of 4 backticks: fence needs 5
LONG = "word " * 100  # 500 chars: cut at 400


def _jsonl(path: Path, rows: list[Any], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn, encoding="utf-8")


def _candidate(pid: str, prompt: Any, text: str) -> dict:
    return {"id": pid, "prompt": prompt, "completions": [{"text": text, "finish_reason": "stop", "num_tokens": 3}]}


def _judgment(pid: str, score: float | None) -> dict:
    return {"id": pid, "prompt": "p", "completions": [{"text": "t"}], "scores": [score]}


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _text_run(tmp_path: Path) -> Path:
    """MANIFEST's run with its files: round 0 and 2 evals (3 is still running, its file half written), pairs."""
    run = _write(tmp_path, MANIFEST)
    _jsonl(run / "round_000" / "eval_candidates.jsonl", [
        _candidate("h-b", _chat("Say hi in lowercase."), "Hi!"),
        _candidate("h-a", _chat("Explain fences."), "I don't know."),
        _candidate("h-z", _chat("Only in round 0."), "x"),
    ])
    _jsonl(run / "round_000" / "eval_judgments.jsonl", [_judgment("h-a", 0.0), _judgment("h-b", None)])
    _jsonl(run / "round_002" / "eval_candidates.jsonl", [
        _candidate("h-a", _chat("Explain fences."), BACKTICKS),
        _candidate("h-b", _chat("Say hi in lowercase."), LONG),
        _candidate("h-y", _chat("Only in round 2."), "y"),
    ], torn='{"id": "h-c", "prom')
    _jsonl(run / "round_002" / "eval_judgments.jsonl", [_judgment("h-a", 1.0), _judgment("h-b", 0.5)])
    _jsonl(run / "round_003" / "eval_candidates.jsonl", [_candidate("h-a", _chat("Explain fences."), "running")])
    pairs = [{"id": f"p-{i}", "prompt": _chat(f"Question {i}?"),
              "chosen": [{"role": "assistant", "content": f"good {i}"}],
              "rejected": [{"role": "assistant", "content": ""}], "score_chosen": 1.0, "score_rejected": 0.0,
              "margin": 1.0, "meta": {"round": 3}} for i in (4, 2, 1, 3)]
    _jsonl(run / "round_003" / "pairs.jsonl", pairs)
    return run


def _section(md: str, title: str) -> str | None:
    """The markdown of the `## title...` section (up to the next `## ` heading), or None when there is none."""
    parts = md.split("\n## ")
    found = [p for p in parts if p.startswith(title)]
    return "## " + found[0].rstrip("\n") if found else None


def test_heldout_answers_round_0_vs_latest(tmp_path: Path) -> None:
    """The first held-out ids both rounds answered, from round 0 and the latest done eval (round 2, not the running
    round 3), with scores; a backtick run gets a longer fence, a long answer is cut, a torn line is skipped."""
    md = write_report(_text_run(tmp_path)).read_text(encoding="utf-8")
    assert _section(md, "Held-out answers") == EXPECTED_ANSWERS


EXPECTED_ANSWERS = f"""## Held-out answers, round 0 vs latest

The first 2 held-out prompts (by id) answered in round 0 and round 2, with the eval judge's score.

### `h-a`

Prompt:

```text
Explain fences.
```

Round 0 (score 0):

```text
I don't know.
```

Round 2 (score 1):

`````text
Use ```` ``` ```` to open a block:
```python
print(1)
```
`````

### `h-b`

Prompt:

```text
Say hi in lowercase.
```

Round 0 (not scored):

```text
Hi!
```

Round 2 (score 0.5, first 400 of 500 chars):

```text
{LONG[:400]}…
```"""


def test_pairs_of_latest_round(tmp_path: Path) -> None:
    """The first pairs by id of the latest round with pairs done; conversational messages shown as their text."""
    md = write_report(_text_run(tmp_path)).read_text(encoding="utf-8")
    assert _section(md, "Pairs") == EXPECTED_PAIRS


EXPECTED_PAIRS = "\n".join(["## Pairs of the latest round (round 3)", "",
                            "The first 3 of 4 pairs (by id), with the judge's scores.", ""] + [
    line for i in (1, 2, 3) for line in [
        f"### `p-{i}`", "", "Prompt:", "", "```text", f"Question {i}?", "```", "",
        "Chosen (score 1):", "", "```text", f"good {i}", "```", "",
        "Rejected (score 0, empty):", "", "```text", "```", ""]][:-1])


def test_plain_text_pairs_and_fallback_to_an_earlier_round(tmp_path: Path) -> None:
    """Standard (string) pairs render as they are; when the latest round's pairs file is missing, the newest round
    that has one is shown; a multi-message prompt shows each message's role."""
    run = _write(tmp_path, MANIFEST)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
    _jsonl(run / "round_002" / "pairs.jsonl", [
        {"id": "a", "prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "score_chosen": 1, "score_rejected": 0}])
    _jsonl(run / "round_001" / "pairs.jsonl", [
        {"id": "b", "prompt": "1+1=", "chosen": "2", "rejected": "3", "score_chosen": 0.75, "score_rejected": 0.125}])
    md = render_markdown(run, MANIFEST, pairs=1)
    assert _section(md, "Pairs") == "\n".join([
        "## Pairs of the latest round (round 2)", "", "The first 1 of 1 pair (by id), with the judge's scores.", "",
        "### `a`", "", "Prompt:", "", "```text", "system: Be brief.", "", "user: 2+2=", "```", "",
        "Chosen (score 1):", "", "```text", "4", "```", "", "Rejected (score 0):", "", "```text", "5", "```"])
    (run / "round_002" / "pairs.jsonl").unlink()
    md = render_markdown(run, MANIFEST, pairs=1)
    assert _section(md, "Pairs").splitlines()[0] == "## Pairs of the latest round (round 1)"
    assert "Chosen (score 0.75):\n\n```text\n2\n```\n\nRejected (score 0.125):\n\n```text\n3\n```" in md


def test_missing_files_leave_sections_out(tmp_path: Path) -> None:
    """No eval files, no pairs files (a run without eval prompts, a failed round): the sections are left out and
    the report is still written; a round-0 eval without any later one shows no comparison either."""
    run = _write(tmp_path, MANIFEST)
    md = write_report(run).read_text(encoding="utf-8")
    assert "## Held-out answers" not in md and "## Pairs" not in md and "## Plain questions" not in md
    _jsonl(run / "round_000" / "eval_candidates.jsonl", [_candidate("h-a", "1+1=", "2")])
    (run / "round_001").mkdir()
    (run / "round_001" / "eval_candidates.jsonl").write_text("not json\n", encoding="utf-8")
    (run / PLAIN_FILE).write_text("{not json", encoding="utf-8")
    md = write_report(run).read_text(encoding="utf-8")
    assert "## Held-out answers" not in md and "## Plain questions" not in md
    assert md.startswith("# prefloop report: demo_run")


def test_falls_back_to_the_newest_round_with_answers(tmp_path: Path) -> None:
    """A done eval whose answers file is gone (or holds no shared id) is passed over for the next newest."""
    run = _text_run(tmp_path)
    (run / "round_002" / "eval_candidates.jsonl").unlink()
    _jsonl(run / "round_001" / "eval_candidates.jsonl", [_candidate("h-b", "plain text prompt", "hi")])
    md = render_markdown(run, MANIFEST)
    section = _section(md, "Held-out answers")
    assert "answered in round 0 and round 1" in section
    assert "### `h-b`\n\nPrompt:\n\n```text\nSay hi in lowercase.\n```\n\nRound 0 (not scored)" in section
    assert "Round 1:\n\n```text\nhi\n```" in section  # round 1 has no judgments file: no score note


def test_plain_questions_table(tmp_path: Path) -> None:
    """plain_questions.json gives a count table (correct, mean answer length) and one row per question, answers
    in escaped code spans."""
    run = _write(tmp_path, MANIFEST)
    answers = {
        "0": {"correct": 1, "total": 2, "answers": [
            {"question": "Capital of France?", "answer": "Paris.", "correct": True},
            {"question": "Legs of a spider?", "answer": "a | b `c`", "correct": False}]},
        "3": {"correct": 2, "total": 2, "answers": [
            {"question": "Capital of France?", "answer": "It is\nParis.", "correct": True},
            {"question": "Legs of a spider?", "answer": "", "correct": True}]},
    }
    (run / PLAIN_FILE).write_text(json.dumps(answers), encoding="utf-8")
    md = write_report(run).read_text(encoding="utf-8")
    assert _section(md, "Plain questions") == "\n".join([
        "## Plain questions (greedy)", "",
        "General questions outside the task, answered greedily; an answer is correct when it contains an accepted "
        "keyword. Fewer correct answers after training means it damaged the model beyond the task.", "",
        "| round | correct | mean answer length (chars) |", "| --- | --- | --- |",
        "| 0 | 1/2 | 7.5 |", "| 3 | 2/2 | 6.0 |", "",
        "| question | round 0 | round 3 |", "| --- | --- | --- |",
        "| Capital of France? | ✓ `Paris.` | ✓ `It is Paris.` |",
        "| Legs of a spider? | ✗ `` a \\| b `c` `` | ✓ (empty) |"])
    assert list(_table(md)) == ["0", "1", "2", "3"]  # the rounds table is still parsed on its own


def test_fence_is_longer_than_any_backtick_run() -> None:
    """Whatever an answer holds, its fence outlasts it: no line inside can close the block."""
    for text in ("", "plain", "``", "```", "a ```` b", "`" * 9):
        lines = fenced(text)
        fence = lines[-1]
        assert lines[0] == fence + "text" and len(fence) >= 3
        assert all(len(run) < len(fence) for line in lines[1:-1] for run in line.split() if set(run) == {"`"})
    assert code_span("`x`") == "`` `x` ``" and code_span("a\n b") == "`a b`"
