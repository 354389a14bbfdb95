"""The report's text sections (prefloop/report.py): held-out answers of round 0 beside the latest round's, the
latest round's pairs, and the plain questions a demo asks before and after training.

A section whose files are missing or unreadable is left out; it never fails the report. Text is shown in code
fences longer than any backtick run inside it, cut at `TEXT_CHARS`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASH = "–"  # en dash: a value that does not exist (round 0 has no training) or is not known yet
TEXT_CHARS = 400  # a longer prompt or answer is cut there, and the label says so
CELL_CHARS = 80  # a plain question's answer in a table cell
PLAIN_FILE = "plain_questions.json"  # {round: {correct, total, answers: [{question, answer, correct}]}}


def phase(rnd: dict[str, Any], name: str) -> dict[str, Any] | None:
    return (rnd.get("phases") or {}).get(name)


def done_summary(rnd: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A phase's summary only once it is done: numbers from a running or failed phase are not results."""
    ph = phase(rnd, name)
    return (ph.get("summary") or {}) if ph and ph.get("status") == "done" else None



def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; lines that do not parse (a tail being written) are skipped; [] when the
    file is missing or unreadable. A report shows what is there and never fails on it."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _content(content: Any) -> str:
    """A message's content as text (the text parts of a multimodal content list joined)."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def as_text(value: Any) -> str:
    """A prompt or answer as text: a string as is; one message as its content; several as `role: content` blocks."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        if len(value) == 1:
            return _content(value[0].get("content"))
        return "\n\n".join(f"{m.get('role', '?')}: {_content(m.get('content'))}" for m in value)
    return json.dumps(value, ensure_ascii=False)


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def fenced(text: str) -> list[str]:
    """`text` as a fenced code block (markdown lines) whose fence is longer than any backtick run in `text`, so
    nothing in it can close the block or render as markdown or HTML."""
    fence = "`" * max(3, _longest_backticks(text) + 1)
    return [fence + "text", *text.splitlines(), fence]


def _escape_pipes(text: str) -> str:
    """`|` escaped, so text stays in its GFM table cell (also inside a code span)."""
    return text.replace("|", "\\|")


def code_span(text: str) -> str:
    """`text` as one inline code span: whitespace collapsed, delimited by more backticks than any run inside it."""
    text = " ".join(text.split())
    ticks = "`" * (_longest_backticks(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _clip(text: str, limit: int) -> tuple[str, str | None]:
    """`text` cut to `limit` characters (ending in "…"), and a note saying so when it was cut."""
    if len(text) <= limit:
        return text, None
    return text[:limit] + "…", f"first {limit} of {len(text)} chars"


def _score(value: Any) -> str:
    """A score note: `score 0.5`; `not scored` for a failed judgment (None)."""
    return f"score {value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not scored"


def _block(label: str, text: str, score_note: str | None = None) -> list[str]:
    """A labelled text block: `label (score 1, first 400 of 950 chars):`, a blank line, the text fenced."""
    shown, cut = _clip(text, TEXT_CHARS)
    notes = [n for n in (score_note, cut, None if text.strip() else "empty") if n]
    return [label + (f" ({', '.join(notes)})" if notes else "") + ":", "", *fenced(shown), ""]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + "s" * (n != 1)


def _round_dir(run_dir: Path, k: int) -> Path:
    return run_dir / f"round_{k:03d}"


def _eval_answers(run_dir: Path, k: int) -> dict[str, dict[str, Any]]:
    """Round k's held-out answers by id: {"prompt", "text", "score"}; `score` is None when the eval judgments do not
    score this answer alone (no file, or a pairwise match against round 0), else the score note."""
    d = _round_dir(run_dir, k)
    scores = {}
    for row in _read_jsonl(d / "eval_judgments.jsonl"):
        if "comparisons" not in row and isinstance(row.get("scores"), list) and row["scores"]:
            scores[row.get("id")] = _score(row["scores"][0])
    answers = {}
    for row in _read_jsonl(d / "eval_candidates.jsonl"):
        completions = row.get("completions")
        if isinstance(row.get("id"), str) and isinstance(completions, list) and completions \
                and isinstance(completions[0], dict):
            answers[row["id"]] = {"prompt": row.get("prompt"), "text": as_text(completions[0].get("text", "")),
                                  "score": scores.get(row["id"])}
    return answers


def _done_rounds(rounds: list[dict[str, Any]], phase: str) -> list[int]:
    """Rounds whose `phase` is done, in order."""
    return sorted(r["round"] for r in rounds if isinstance(r.get("round"), int) and done_summary(r, phase) is not None)


def answers_section(run_dir: Path, rounds: list[dict[str, Any]], limit: int) -> list[str]:
    """Round 0's and the latest evaluated round's answers to the first `limit` held-out prompts both answered."""
    done = _done_rounds(rounds, "eval")
    if 0 not in done or limit < 1:
        return []
    base = _eval_answers(run_dir, 0)
    for k in reversed([k for k in done if k > 0]):
        latest = _eval_answers(run_dir, k)
        ids = sorted(set(base) & set(latest))[:limit]
        if ids:
            break
    else:
        return []
    out = ["", "## Held-out answers, round 0 vs latest", "",
           f"The first {_count(len(ids), 'held-out prompt')} (by id) answered in round 0 and round {k}, with the "
           "eval judge's score.", ""]
    for pid in ids:
        out += [f"### {code_span(pid)}", "", *_block("Prompt", as_text(base[pid]["prompt"]))]
        out += _block("Round 0", base[pid]["text"], base[pid]["score"])
        out += _block(f"Round {k}", latest[pid]["text"], latest[pid]["score"])
    return out[:-1]


def pairs_section(run_dir: Path, rounds: list[dict[str, Any]], limit: int) -> list[str]:
    """The first `limit` pairs (by id) of the latest round whose pairs phase is done and whose file is readable."""
    for k in reversed(_done_rounds(rounds, "pairs")):
        rows = [r for r in _read_jsonl(_round_dir(run_dir, k) / "pairs.jsonl")
                if isinstance(r.get("id"), str) and {"prompt", "chosen", "rejected"} <= set(r)]
        if rows:
            break
    else:
        return []
    shown = sorted(rows, key=lambda r: r["id"])[:limit] if limit > 0 else []
    if not shown:
        return []
    out = ["", f"## Pairs of the latest round (round {k})", "",
           f"The first {len(shown)} of {_count(len(rows), 'pair')} (by id), with the judge's scores.", ""]
    for pair in shown:
        out += [f"### {code_span(pair['id'])}", "", *_block("Prompt", as_text(pair["prompt"]))]
        out += _block("Chosen", as_text(pair["chosen"]), _score(pair.get("score_chosen")))
        out += _block("Rejected", as_text(pair["rejected"]), _score(pair.get("score_rejected")))
    return out[:-1]


def _load_plain(run_dir: Path) -> dict[int, dict[str, Any]]:
    """`plain_questions.json` as {round: result}, rounds in order; {} when missing or not in that shape."""
    try:
        data = json.loads((run_dir / PLAIN_FILE).read_text(encoding="utf-8"))
        results = {int(k): v for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}
    ok = all(isinstance(v, dict) and isinstance(v.get("answers"), list) for v in results.values())
    return dict(sorted(results.items())) if ok else {}


def _plain_cell(answer: dict[str, Any]) -> str:
    text, _ = _clip(" ".join(str(answer.get("answer", "")).split()), CELL_CHARS)
    return ("✓ " if answer.get("correct") else "✗ ") + (_escape_pipes(code_span(text)) if text else "(empty)")


def plain_section(run_dir: Path) -> list[str]:
    """Correct counts and answers per round for the plain questions (a check that training broke nothing)."""
    results = _load_plain(run_dir)
    if not results:
        return []
    out = ["", "## Plain questions (greedy)", "",
           "General questions outside the task, answered greedily; an answer is correct when it contains an accepted "
           "keyword. Fewer correct answers after training means it damaged the model beyond the task.", "",
           "| round | correct | mean answer length (chars) |", "| --- | --- | --- |"]
    for k, result in results.items():
        lengths = [len(str(a.get("answer", ""))) for a in result["answers"] if isinstance(a, dict)]
        mean = f"{sum(lengths) / len(lengths):.1f}" if lengths else DASH
        out.append(f"| {k} | {result.get('correct', DASH)}/{result.get('total', DASH)} | {mean} |")
    by_question: dict[str, dict[int, dict[str, Any]]] = {}
    for k, result in results.items():
        for answer in result["answers"]:
            if isinstance(answer, dict):
                by_question.setdefault(str(answer.get("question", "?")), {})[k] = answer
    out += ["", "| question | " + " | ".join(f"round {k}" for k in results) + " |", "|" + " --- |" * (len(results) + 1)]
    for question, answers in by_question.items():
        cells = [_plain_cell(answers[k]) if k in answers else DASH for k in results]
        out.append(f"| {_escape_pipes(question)} | " + " | ".join(cells) + " |")
    return out
