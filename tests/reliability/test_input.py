"""Bad input through the CLI: each case stops with one line naming file:line, the field and the fix (and writes
nothing), or becomes a per-row failure status, never a silent wrong label.

Unit-level checks of every malformed prompt row live in tests/prefloop/test_records.py and of the reward-function
checks in tests/judge/test_python_judge.py; these tests drive the same cases end to end through the stages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefloop.cli import main
from prefloop.store import read_records


@pytest.fixture(autouse=True)
def _no_bar(monkeypatch):
    monkeypatch.setenv("PREFLOOP_NO_BAR", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    # One intra-op thread: the tiny model gains nothing from more, and a shared 2-core box stalls with them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def one_error(capsys) -> str:
    """The single `prefloop ...: error:` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("prefloop ")]
    return line


# --- prompts ------------------------------------------------------------------------------------------------------

GOOD = {"id": "a", "prompt": "1+1="}
BAD_ROWS = {
    "unknown-role": ({"id": "b", "prompt": [{"role": "human", "content": "2+2="}]},
                     ["`prompt[0].role` is 'human'", "Fix: rename the role"]),
    "content-not-a-string": ({"id": "b", "prompt": [{"role": "user", "content": ["2+2="]}]},
                             ["`prompt[0].content` must be a string"]),
    "prompt-a-number": ({"id": "b", "prompt": 4}, ["`prompt` must be a string or a non-empty list", "Fix"]),
    "prompt-missing": ({"id": "b", "question": "2+2="}, ["missing field `prompt`", "--prompt-field"]),
    "prompt-empty": ({"id": "b", "prompt": " "}, ["`prompt` is empty", "Fix"]),
    "ends-with-assistant": ({"id": "b", "prompt": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]},
                            ["ends with an assistant message", "Fix"]),
    "id-a-list": ({"id": ["b"], "prompt": "2+2="}, ["`id` must be a string or a number, got list", "Fix"]),
    "id-a-boolean": ({"id": True, "prompt": "2+2="}, ["`id` must be a string or a number, got bool", "Fix"]),
    "same-id-other-prompt": ({"id": "a", "prompt": "2+2="}, ["id 'a' was already used at", ":1 for a different",
                                                            "Fix: give each prompt a unique id"]),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_prompt_row_stops_generate_naming_file_line_field_and_fix(tmp_path, capsys, case):
    """A malformed prompt row exits 2 with one line `FILE:LINE: field ... Fix: ...` before any model loads (the
    model path does not even exist) and leaves nothing in the output folder."""
    row, expected = BAD_ROWS[case]
    prompts = write_lines(tmp_path / "prompts.jsonl", [GOOD, row, {"id": "c", "prompt": "3+3="}])
    out = tmp_path / "out" / "candidates.jsonl"
    code = main(["generate", "--model", str(tmp_path / "no-such-model"), "--prompts", str(prompts),
                 "--out", str(out)])
    line = one_error(capsys)
    assert code == 2 and line.startswith(f"prefloop generate: error: {prompts}:2: ")
    for text in expected:
        assert text in line
    assert not out.parent.exists()


def test_a_prompt_too_long_for_the_context_stops_before_any_generation(tiny_model, tmp_path, capsys):
    """A prompt that cannot fit the context with max_new_tokens, in the last chunk: exit 2 naming its file:line, id,
    length, the limit and the fixes, with nothing generated and no output or config left, so the corrected command
    (here --skip-too-long) starts fresh; that run skips it, counts it, and writes every other prompt once."""
    rows = [{"id": f"q{i}", "prompt": f"{i}+1="} for i in range(8)]
    rows.insert(6, {"id": "long", "prompt": "1+" * 80})  # 160 tokens; the tiny model's context is 128
    rows.append({"id": "q0", "prompt": "0+1="})  # a repeated row: dropped and counted
    prompts = write_lines(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out" / "candidates.jsonl"
    args = ["generate", "--model", tiny_model, "--prompts", str(prompts), "--out", str(out), "--n", "1",
            "--max-new-tokens", "4", "--chunk-size", "3", "--dtype", "float32"]
    assert main(args) == 2
    line = one_error(capsys)
    assert line == (f"prefloop generate: error: {prompts}:7: prompt 'long' is 160 tokens long, but the model's "
                    "context of 128 tokens with max_new_tokens=4 fits prompts of at most 124 tokens. Nothing was "
                    "generated. Fix: shorten or drop it, lower --max-new-tokens, or pass --skip-too-long to skip "
                    "such prompts (counted in the summary as `skipped_too_long`).")
    assert not out.parent.exists()  # nothing made, nothing left: not even the folder it would have made

    assert main([*args, "--skip-too-long"]) == 0
    records = read_records(out)
    assert sorted(r["id"] for r in records) == [f"q{i}" for i in range(8)]
    summary = json.loads((out.parent / "candidates.summary.json").read_text())
    assert summary["status"] == "done" and summary["prompts"] == 9 and summary["written"] == 8
    assert summary["skipped_too_long"] == 1 and summary["duplicates_dropped"] == 1
    before = out.read_bytes()
    assert main([*args, "--skip-too-long"]) == 0  # finished: nothing to do
    assert out.read_bytes() == before
    assert main(args) == 2  # skip_too_long shapes the output: dropping it is config drift
    assert "(changed: skip_too_long)" in one_error(capsys)


def test_a_model_path_that_is_not_a_model_fails_cleanly_and_the_fixed_command_starts_fresh(tiny_model, tmp_path,
                                                                                              capsys):
    """--model pointing at an empty folder: exit 2, one line naming --model and the fix, no output or config left
    behind, so the corrected command runs instead of being refused as config drift (`model` changed)."""
    prompts = write_lines(tmp_path / "prompts.jsonl", [GOOD])
    out = tmp_path / "out" / "candidates.jsonl"
    (tmp_path / "empty").mkdir()
    args = ["generate", "--prompts", str(prompts), "--out", str(out), "--n", "1", "--max-new-tokens", "2",
            "--dtype", "float32"]
    assert main([*args, "--model", str(tmp_path / "empty")]) == 2
    line = one_error(capsys)
    assert line.startswith(f"prefloop generate: error: {tmp_path / 'empty'}: not a model directory (it is empty). "
                           "Fix: ")
    assert not out.parent.exists()  # nothing made, nothing left: not even the folder it would have made
    assert main(["-q", *args, "--model", tiny_model]) == 0
    assert [r["id"] for r in read_records(out)] == ["a"]


# --- reward functions ---------------------------------------------------------------------------------------------

SHAKY = '''
import math

def shaky(prompts, completions, **columns):
    """A verifier with every bug: it raises, and returns NaN, None, a string, infinity and a bool."""
    scores = []
    for c in completions:
        if c == "raise":
            raise RuntimeError("verifier crashed on " + c)
        scores.append({"nan": math.nan, "none": None, "str": "0.9", "inf": math.inf, "bool": True}.get(c, len(c)))
    return scores
'''


def candidates(path: Path, rows: dict[str, list[str]]) -> Path:
    return write_lines(path, [{"id": rid, "prompt": f"{rid}?", "completions": [
        {"text": t, "finish_reason": "stop", "num_tokens": 2} for t in texts]} for rid, texts in rows.items()])


def strict_json(line: str):
    def refuse(name):
        raise AssertionError(f"{name} written to a judgments file")

    return json.loads(line, parse_constant=refuse)


def test_a_reward_function_that_raises_or_returns_non_numbers_fails_only_those_rows(tmp_path, capsys):
    """Raising, NaN, None, a string, inf and a bool each become that completion's `error` with the reason and a
    null score (counted in the summary); the other completions keep their scores, and `pairs` never pairs a
    failure: only prompts with two real scores yield pairs, the failures counted as `judge_failed`."""
    (tmp_path / "shaky.py").write_text(SHAKY)
    cands = candidates(tmp_path / "candidates.jsonl", {
        "p0": ["raise", "ok", "okay"], "p1": ["nan", "none", "str", "inf", "bool", "a"],
        "p2": ["raise", "nan"], "p3": ["good", "bad!!"]})
    judgments = tmp_path / "judgments.jsonl"
    assert main(["-q", "judge", "--candidates", str(cands), "--out", str(judgments), "--judge", "python",
                 "--reward-fn", f"{tmp_path / 'shaky.py'}:shaky", "--max-failed-fraction", "1"]) == 0
    rows = {r["id"]: r for r in map(strict_json, judgments.read_text().splitlines())}
    assert rows["p0"]["scores"] == [None, 2.0, 4.0] and rows["p0"]["statuses"] == ["error", "ok", "ok"]
    assert rows["p0"]["errors"][0] == "reward function raised RuntimeError: verifier crashed on raise"
    assert rows["p0"]["status"] == "error"
    assert rows["p1"]["scores"] == [None] * 5 + [1.0]
    assert rows["p1"]["errors"][:5] == [
        "reward function returned nan", "reward function returned None",
        "reward function returned a non-number (str: '0.9')", "reward function returned inf",
        "reward function returned a non-number (bool: 'True')"]
    assert rows["p2"]["scores"] == [None, None] and rows["p3"]["status"] == "ok"
    summary = json.loads((tmp_path / "judgments.summary.json").read_text())
    assert summary["completion_statuses"] == {"error": 8, "ok": 5}

    pairs = tmp_path / "pairs.jsonl"
    assert main(["-q", "pairs", "--judgments", str(judgments), "--out", str(pairs)]) == 0
    assert [(p["id"], p["chosen"], p["rejected"]) for p in read_records(pairs)] == [
        ("p0", "okay", "ok"), ("p3", "bad!!", "good")]
    drops = json.loads((tmp_path / "pairs.summary.json").read_text())["drops"]
    assert drops == {"judge_failed": 8, "too_few_usable": 2}


# --- judgments into pairs -----------------------------------------------------------------------------------------

JUDGMENT = {"id": "j1", "prompt": "1+1=", "scores": [1.0, 0.0],
            "completions": [{"text": "2", "finish_reason": "stop"}, {"text": "3", "finish_reason": "stop"}]}


@pytest.mark.parametrize("bad,shown", [
    ('NaN', "NaN"), ('Infinity', "Infinity"), ('"0.9"', '"0.9"'), ("true", "true"), ('[1]', "[1]"),
])
def test_pairs_refuses_a_score_that_is_not_a_number(tmp_path, capsys, bad, shown):
    """A judgments file whose score is NaN, infinite, a string, a bool or a list (hand-edited, or from another
    tool) exits 2 naming file:line and `scores[i]` before anything is written; it never becomes a label."""
    second = json.dumps({**JUDGMENT, "id": "j2"}).replace('"scores": [1.0, 0.0]', f'"scores": [1.0, {bad}]')
    judgments = write_lines(tmp_path / "judgments.jsonl", [JUDGMENT, second])
    out = tmp_path / "out" / "pairs.jsonl"
    assert main(["pairs", "--judgments", str(judgments), "--out", str(out)]) == 2
    line = one_error(capsys)
    assert line.startswith(f"prefloop pairs: error: {judgments}:2: `scores[1]` is {shown}, not a finite number")
    assert "Fix: write a failed judgment as null" in line
    assert not out.parent.exists()


def test_pairs_refuses_completions_of_the_wrong_type(tmp_path, capsys):
    """`completions` that is not a list of objects with a text string exits 2 naming file:line and the field."""
    judgments = write_lines(tmp_path / "judgments.jsonl", [{**JUDGMENT, "completions": "2 or 3"}])
    assert main(["pairs", "--judgments", str(judgments), "--out", str(tmp_path / "pairs.jsonl")]) == 2
    assert f"{judgments}:1: `completions` must be a list of objects with a `text` string" in one_error(capsys)


@pytest.mark.parametrize("first_style", ["text", "messages"])
def test_pairs_refuses_judgments_that_mix_text_and_message_prompts(tmp_path, capsys, first_style):
    """TRL trains one prompt style per dataset: a judgments file mixing them exits 2 naming the first line of each
    style and the fix (--chat), with no pairs file and no sidecar written."""
    text = JUDGMENT
    chat = {**JUDGMENT, "prompt": [{"role": "user", "content": "1+1="}]}
    rows = [text, text, chat] if first_style == "text" else [chat, chat, text]
    judgments = write_lines(tmp_path / "judgments.jsonl", [{**r, "id": f"j{i}"} for i, r in enumerate(rows)])
    out = tmp_path / "out" / "pairs.jsonl"
    assert main(["pairs", "--judgments", str(judgments), "--out", str(out)]) == 2
    line = one_error(capsys)
    text_line, chat_line = (1, 3) if first_style == "text" else (3, 1)
    assert f"{judgments}:3: mixes prompt styles: line {text_line} has a text prompt and line {chat_line} a message " \
           "list" in line
    assert "Fix: generate with --chat" in line
    assert not out.parent.exists()

