"""The `python` judge: TRL reward-function convention, per-row failure isolation, and loading user functions."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from prefloop.judge.python import PythonJudge, PythonOptions, load_function


def _row(rid: str, prompt, texts: list[str], **columns) -> dict:
    completions = [{"text": t, "finish_reason": "stop", "num_tokens": len(t)} for t in texts]
    return {"id": rid, "prompt": prompt, "completions": completions, "columns": columns}


def test_batch_call_follows_trl_convention():
    """The function gets parallel `prompts`/`completions` lists (one entry per completion) and columns as keyword lists."""
    calls = []

    def fn(prompts, completions, **columns):
        calls.append({"prompts": prompts, "completions": completions, **columns})
        return [float(len(c)) for c in completions]

    rows = [_row("a", "1+1=", ["2", "11"], answer="2"), _row("b", "2+3=", ["5"], answer="5", level=3)]
    verdicts = PythonJudge(fn).judge(rows)

    assert len(calls) == 1  # one batch call for all three completions
    (call,) = calls
    assert call["prompts"] == ["1+1=", "1+1=", "2+3="]
    assert call["completions"] == ["2", "11", "5"]
    assert call["answer"] == ["2", "2", "5"]
    assert call["level"] == [None, None, 3]  # a column some rows lack arrives as None for them, still parallel
    assert verdicts[0] == {"scores": [1.0, 2.0], "statuses": ["ok", "ok"], "errors": [None, None]}
    assert verdicts[1] == {"scores": [1.0], "statuses": ["ok"], "errors": [None]}


def test_conversational_prompts_get_message_list_completions():
    """For a message-list prompt, each completion is passed as `[{"role": "assistant", "content": text}]`, as TRL does."""
    seen = {}

    def fn(prompts, completions, **columns):
        seen["prompts"], seen["completions"] = prompts, completions
        return [1.0] * len(completions)

    messages = [{"role": "user", "content": "1+1="}]
    PythonJudge(fn).judge([_row("a", messages, ["2", "3"])])
    assert seen["prompts"] == [messages, messages]
    assert seen["completions"] == [[{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "3"}]]


@pytest.mark.parametrize(
    "bad, reason",
    [(None, "None"), (float("nan"), "nan"), (float("inf"), "inf"), (-math.inf, "inf"), ("1.0", "non-number"),
     (True, "non-number"), (np.float64("nan"), "nan"), ([1.0], "non-number")],
    ids=["none", "nan", "inf", "-inf", "string", "bool", "np-nan", "list"],
)
def test_non_scores_become_failures_not_scores(bad, reason):
    """A returned None / NaN / inf / string / bool is a failure with a reason and a None score; other rows are scored."""

    def fn(prompts, completions, **columns):
        return [bad if c == "bad" else 0.5 for c in completions]

    (verdict,) = PythonJudge(fn).judge([_row("a", "p", ["ok", "bad", "ok2"])])
    assert verdict["scores"] == [0.5, None, 0.5]
    assert verdict["statuses"] == ["ok", "error", "ok"]
    assert verdict["errors"][0] is None and verdict["errors"][2] is None
    assert reason in verdict["errors"][1]


def test_raising_row_is_isolated_by_recalling():
    """When the batch call raises, rows are re-scored one by one: only the failing row errors, with the exception text."""
    calls = []

    def fn(prompts, completions, **columns):
        calls.append(len(completions))
        if "boom" in completions:
            raise ZeroDivisionError("cannot verify 'boom'")
        return [1.0 if c == "right" else 0.0 for c in completions]

    rows = [_row("a", "p", ["right", "boom"]), _row("b", "q", ["wrong"])]
    verdicts = PythonJudge(fn).judge(rows)
    assert verdicts[0]["scores"] == [1.0, None]
    assert verdicts[0]["statuses"] == ["ok", "error"]
    assert "ZeroDivisionError" in verdicts[0]["errors"][1] and "cannot verify 'boom'" in verdicts[0]["errors"][1]
    assert verdicts[1] == {"scores": [0.0], "statuses": ["ok"], "errors": [None]}
    assert calls == [3, 1, 1, 1]  # one batch call, then one call per completion


def test_wrong_length_return_fails_the_whole_batch():
    """A list of the wrong length errors every row of that batch (never guessing alignment) and names the expected length."""

    def fn(prompts, completions, **columns):
        return [1.0] * (len(completions) - 1)

    (verdict,) = PythonJudge(fn).judge([_row("a", "p", ["x", "y", "z"])])
    assert verdict["scores"] == [None, None, None]
    assert verdict["statuses"] == ["error"] * 3
    assert all("3" in e and "got 2" in e for e in verdict["errors"])


def test_wrong_length_only_affects_its_own_batch():
    """With `batch_size`, a wrong-length return for one batch leaves the other batches scored."""

    def fn(prompts, completions, **columns):
        return [] if "drop" in completions else [2.0] * len(completions)

    verdicts = PythonJudge(fn, batch_size=2).judge([_row("a", "p", ["x", "y"]), _row("b", "q", ["drop", "z"])])
    assert verdicts[0]["scores"] == [2.0, 2.0]
    assert verdicts[1]["scores"] == [None, None]
    assert all("2 values" in e for e in verdicts[1]["errors"])


def test_numpy_scalars_are_accepted():
    """numpy scalar scores (float32, int64) are converted to plain floats."""

    def fn(prompts, completions, **columns):
        return [np.float32(0.25), np.int64(3)]

    (verdict,) = PythonJudge(fn).judge([_row("a", "p", ["x", "y"])])
    assert verdict["scores"] == [0.25, 3.0]
    assert all(type(s) is float for s in verdict["scores"])
    assert verdict["statuses"] == ["ok", "ok"]


def test_numpy_bool_is_not_a_score():
    """A numpy bool is rejected like a Python bool: a verifier must say 1.0/0.0, not True/False."""

    def fn(prompts, completions, **columns):
        return [np.bool_(True)]

    (verdict,) = PythonJudge(fn).judge([_row("a", "p", ["x"])])
    assert verdict["scores"] == [None] and verdict["statuses"] == ["error"]


def test_load_function_from_file_and_module(tmp_path):
    """`FILE.py:fn` and `module:fn` both load, and the judge's name records the spec."""
    path = tmp_path / "rewards.py"
    path.write_text(textwrap.dedent("""
        def exact(prompts, completions, answer, **kw):
            return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]
    """))
    fn = load_function(f"{path}:exact")
    assert fn([""], ["4"], answer=["4"]) == [1.0]
    judge = PythonOptions("prefloop.tasks.addition:reward").load()
    assert judge.name == "python:prefloop.tasks.addition:reward"
    (verdict,) = judge.judge([_row("a", "2+2=", ["4", "5"], answer="4")])
    assert verdict["scores"] == [1.0, 0.0]


def test_load_function_missing_file(tmp_path):
    """A missing file raises FileNotFoundError naming the path."""
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_function(f"{tmp_path}/nope.py:fn")


def test_load_function_missing_function(tmp_path):
    """A file or module without the function raises, naming the function."""
    path = tmp_path / "rewards.py"
    path.write_text("def other(prompts, completions, **kw):\n    return []\n")
    with pytest.raises(AttributeError, match="'missing'"):
        load_function(f"{path}:missing")
    with pytest.raises(AttributeError, match="'nope'"):
        load_function("prefloop.tasks.addition:nope")


@pytest.mark.parametrize("spec", ["nocolon", ":fn", "rewards.py:"])
def test_load_function_bad_spec(spec):
    """A spec that is not FILE.py:function or module:function is refused, showing the expected form."""
    with pytest.raises(ValueError, match="FILE.py:function"):
        load_function(spec)


def test_a_reward_function_that_raises_on_every_row_stops_the_stage(tmp_path, capsys):
    """Every completion's judgment failed (116 of 116 in the report that found it): exit 2 with one line giving
    the counts, the first error and the fix; nothing is written, and the fixed function then judges every row."""
    import json

    from prefloop.cli import main
    from prefloop.store import read_records

    rows = [_row(f"p{i}", f"{i}+1=", [str(i + 1), "x", "y", "z"]) for i in range(29)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "fn.py").write_text("def score(prompts, completions, **kw):\n    raise KeyError('answer')\n")
    args = ["judge", "--candidates", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "j.jsonl"),
            "--judge", "python", "--reward-fn", f"{tmp_path / 'fn.py'}:score"]
    assert main(args) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("prefloop judge: error:")]
    assert "116 of 116 completions failed (over the ceiling max_failed_fraction=0.5)" in line
    assert "the first: 'p0': error:" in line and "KeyError" in line and "Fix: " in line
    assert not list(tmp_path.glob("j.*"))
    (tmp_path / "fn.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    assert main(args) == 0
    assert len(read_records(tmp_path / "j.jsonl")) == 29
