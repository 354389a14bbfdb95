"""Judge ensembles (judge/ensemble.py): combinations equal hand computations, disagreements are dropped by the pairs
stage, a kill mid-member resumes to the uninterrupted output, a tiny reward model serves as a member, bad configs
are one line and exit 2.

The members are python verifiers defined below (user reward functions are a judge kind of their own). This module
is also loaded by the judges in subprocesses (`--reward-fn <this file>:length`), so its top level imports little.
"""

from __future__ import annotations

import json
import os
import signal
from fractions import Fraction
from pathlib import Path

import pytest

from prefloop.cli import main
from prefloop.judge.ensemble import member_view
from prefloop.judge.evaluate import JudgeEvalConfig
from prefloop.judge.evaluate import run as judge_eval
from prefloop.judge.pairs import PairsConfig
from prefloop.judge.pairs import run as pairs
from prefloop.judge.stage import JudgeConfig, run
from prefloop.runstate import read_summary

HERE = Path(__file__).resolve()
CALLS, KILL_AT = "ENSEMBLE_TEST_CALLS", "ENSEMBLE_TEST_KILL_AT"


# --- the members: three tiny verifiers ---------------------------------------------------------------------------

def _called(name: str) -> int:
    """Log a call (when the test asks) and return how many calls of `name` the log holds."""
    if not os.environ.get(CALLS):
        return 0
    with open(os.environ[CALLS], "a") as f:
        f.write(name + "\n")
    return Path(os.environ[CALLS]).read_text().split().count(name)


def correct(prompts, completions, answer=None, **columns):
    """1 when the answer is the reference, else 0; no reference -> no score (a failure)."""
    _called("correct")
    answer = answer or [None] * len(completions)
    return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def length(prompts, completions, **columns):
    """The answer's length; SIGKILLs its own process at the $ENSEMBLE_TEST_KILL_AT-th call (a kill mid-member)."""
    calls = _called("length")
    if os.environ.get(KILL_AT) and calls >= int(os.environ[KILL_AT]):
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(len(c)) for c in completions]


def ones(prompts, completions, **columns):
    """How many digits 1 the answer holds."""
    return [float(c.count("1")) for c in completions]


def member(fn: str) -> dict:
    return {"judge": "python", "reward_fn": f"{HERE}:{fn}"}


# --- candidates and hand computations ----------------------------------------------------------------------------

TEXTS = {"p1": ("1+1=", "2", ["2", "22", "3", "333"]),
         "p2": ("5+6=", "11", ["11", "1", "111", "7"]),
         "p3": ("2+2=", "4", ["4", "44", "5"])}


def write_candidates(path: Path, texts: dict = TEXTS) -> Path:
    rows = [{"id": rid, "prompt": prompt, "columns": {"answer": answer}, "round": 1,
             "completions": [{"text": t, "finish_reason": "stop", "num_tokens": len(t) + 1} for t in answers]}
            for rid, (prompt, answer, answers) in texts.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def ensemble(tmp_path: Path, fns: list[str], **settings) -> Path:
    candidates = write_candidates(tmp_path / "candidates.jsonl")
    return run(JudgeConfig(candidates=str(candidates), out=str(tmp_path / "judgments.jsonl"), judge="ensemble",
                           members=[member(f) for f in fns], **settings))


F = Fraction
# Rank-normalized scores, worked by hand (mid-ranks of ties, lowest 0, highest 1):
#   correct p1 [1,0,0,0] -> [1, 1/3, 1/3, 1/3]     length p1 [1,2,1,3] -> [1/6, 2/3, 1/6, 1]
#   correct p2 [1,0,0,0] -> [1, 1/3, 1/3, 1/3]     length p2 [2,1,3,1] -> [2/3, 1/6, 1, 1/6]
#   correct p3 [1,0,0]   -> [1, 1/4, 1/4]          length p3 [1,2,1]   -> [1/4, 1, 1/4]
MEAN_CORRECT_LENGTH = {"p1": [F(7, 12), F(1, 2), F(1, 4), F(2, 3)],
                       "p2": [F(5, 6), F(1, 4), F(2, 3), F(1, 4)],
                       "p3": [F(5, 8), F(5, 8), F(1, 4)]}


def test_mean_is_the_mean_of_rank_normalized_member_scores(tmp_path):
    out = ensemble(tmp_path, ["correct", "length"])
    got = records(out)
    for rid, expected in MEAN_CORRECT_LENGTH.items():
        assert got[rid]["scores"] == [float(x) for x in expected], rid
        assert got[rid]["statuses"] == ["ok"] * len(expected) and got[rid]["status"] == "ok"
    # best/worst per member and agreement: correct's best is the right answer, length's the longest one
    assert got["p1"]["ensemble"]["best"] == [[0], [3]] and got["p1"]["ensemble"]["worst"] == [[1, 2, 3], [0, 2]]
    assert [got[r]["ensemble"]["agree_best"] for r in TEXTS] == [False, False, False]
    assert [got[r]["ensemble"]["agree_worst"] for r in TEXTS] == [True, True, True]
    assert not any(got[r]["ensemble"]["drop"] for r in TEXTS)  # drop_disagreements is off
    # provenance: each member's scores are its own stage output's, byte for byte
    for i in range(2):
        mine = records(tmp_path / "judgments.members" / f"{i}.jsonl")
        for rid in TEXTS:
            assert got[rid]["ensemble"]["members"][i]["scores"] == mine[rid]["scores"]
            assert got[rid]["ensemble"]["members"][i]["judge"] == mine[rid]["judge"]
    assert got["p1"]["ensemble"]["members"][0]["scores"] == [1.0, 0.0, 0.0, 0.0]
    assert got["p1"]["round"] == 1 and got["p1"]["judge"].startswith("ensemble:mean:python:")
    summary = read_summary(out)
    assert summary["status"] == "done" and summary["completion_statuses"] == {"ok": 11}
    assert [m["completion_statuses"] for m in summary["members"]] == [{"ok": 11}, {"ok": 11}]
    assert summary["agreement"]["prompts"] == 3 and summary["agreement"]["agree_rate"] == 0.0
    assert summary["agreement"]["agree_worst_rate"] == 1.0
    assert summary["agreement"]["pairwise_agree_rate"] == [[1.0, 0.0], [0.0, 1.0]]


def test_vote_is_votes_for_the_best_minus_votes_against_the_worst(tmp_path):
    out = ensemble(tmp_path, ["correct", "length", "ones"], combine="vote")
    got = records(out)
    # p2 ["11","1","111","7"]: best correct {11}, length {111}, ones {111}; worst correct {1,111,7}, length {1,7},
    # ones {7}.  11: +1 -0;  1: +0 -2;  111: +2 -1;  7: +0 -3
    assert got["p2"]["scores"] == [1.0, -2.0, 1.0, -3.0]
    # p1 ["2","22","3","333"]: ones scores all alike (votes for and against each); correct best {2} worst
    # {22,3,333}; length best {333} worst {2,3}.  2: +2 -2;  22: +1 -2;  3: +1 -3;  333: +2 -2
    assert got["p1"]["scores"] == [0.0, -1.0, -2.0, 0.0]
    # p3 ["4","44","5"]: ones alike; correct best {4} worst {44,5}; length best {44} worst {4,5}
    assert got["p3"]["scores"] == [0.0, 0.0, -2.0]
    assert read_summary(out)["agreement"]["pairwise_agree_rate"][0][2] == pytest.approx(2 / 3, abs=1e-4)


def test_drop_disagreements_drops_exactly_the_prompts_members_disagree_on(tmp_path):
    # correct + ones: ones scores p1 and p3 all alike (no opinion: agrees); on p2 correct's best is "11", ones' "111"
    out = ensemble(tmp_path, ["correct", "ones"], drop_disagreements=True)
    got = records(out)
    assert {rid for rid, r in got.items() if r["ensemble"]["drop"]} == {"p2"}
    assert read_summary(out)["agreement"]["marked_to_drop"] == 1
    assert read_summary(out)["agreement"]["disagreements"] == 1
    made = pairs(PairsConfig(judgments=str(out), out=str(tmp_path / "pairs.jsonl")))
    kept = records(made)
    assert set(kept) == {"p1", "p3"}
    assert kept["p1"]["chosen"] == "2" and kept["p3"]["chosen"] == "4"  # the answer both rank best
    assert read_summary(made)["drops"]["judges_disagree"] == 1
    # without the flag the same judgments keep p2's pair
    other = tmp_path / "keep"
    other.mkdir()
    kept_all = records(pairs(PairsConfig(judgments=str(ensemble(other, ["correct", "ones"])),
                                         out=str(other / "pairs.jsonl"))))
    assert set(kept_all) == {"p1", "p2", "p3"}


def test_a_member_failure_is_a_failure_not_a_rank(tmp_path):
    texts = {**TEXTS, "p4": ("3+3=", None, ["6", "66"])}  # no reference: `correct` cannot score p4
    candidates = write_candidates(tmp_path / "c.jsonl", texts)
    out = run(JudgeConfig(candidates=str(candidates), out=str(tmp_path / "j.jsonl"), judge="ensemble",
                          members=[member("correct"), member("length")], max_failed_fraction=0.9))
    got = records(out)
    assert got["p4"]["scores"] == [None, None] and got["p4"]["statuses"] == ["error", "error"]
    assert got["p4"]["errors"][0].startswith("member 0 (python:") and "None" in got["p4"]["errors"][0]
    assert got["p4"]["ensemble"]["agree"] is None  # nothing scored by every member: no agreement to count
    assert got["p1"]["scores"] == [float(x) for x in MEAN_CORRECT_LENGTH["p1"]]  # the others are untouched


def test_pairwise_member_scores_are_bracket_wins():
    record = {"judge": "llm:m:pairwise", "scores": [None] * 5, "statuses": ["ok"] * 5, "errors": [None] * 5,
              "comparisons": [
                  {"round": 1, "a": 0, "b": 1, "status": "ok", "winner": 0, "loser": 1},
                  {"round": 1, "a": 2, "b": 3, "status": "tie", "winner": None, "errors": [None, None]},
                  {"round": 2, "a": 0, "b": 2, "status": "ok", "winner": 0, "loser": 2}]}
    # 0 won twice; 1 and 2 lost a decided match; 3 only tied; 4 repeats 1's text (judged as its first copy)
    scores, statuses, errors = member_view(record, ["a", "b", "c", "d", "b"])
    assert scores == [2.0, 0.0, 0.0, None, 0.0]
    assert statuses == ["ok", "ok", "ok", "tie", "ok"] and errors[3]


def test_resume_after_a_kill_mid_member_equals_the_uninterrupted_run(tmp_path):
    from reliability.killing import Subprocess, log_tail

    candidates = write_candidates(tmp_path / "candidates.jsonl", {f"q{i}": (f"{i}+{i}=", str(2 * i), [
        str(2 * i), str(2 * i + 1) * (i % 3 + 1), "9" * (i + 1)]) for i in range(6)})
    (tmp_path / "members.yaml").write_text(f"- {{judge: python, reward_fn: '{HERE}:correct'}}\n"
                                           f"- {{judge: python, reward_fn: '{HERE}:length'}}\n")

    def args(out: Path) -> list[str]:
        return ["judge", "--candidates", str(candidates), "--out", str(out), "--judge", "ensemble",
                "--members", str(tmp_path / "members.yaml"), "--chunk-size", "1"]

    def start(out: Path, calls: Path, **env: str) -> int:
        return Subprocess(**{CALLS: str(calls), **env}).start(args(out), tmp_path / "log").wait()

    (tmp_path / "straight").mkdir()
    straight = tmp_path / "straight" / "j.jsonl"
    assert start(straight, tmp_path / "straight.calls") == 0, log_tail(tmp_path / "log")

    (tmp_path / "killed").mkdir()
    out, calls = tmp_path / "killed" / "j.jsonl", tmp_path / "killed.calls"
    assert start(out, calls, **{KILL_AT: "3"}) == -signal.SIGKILL  # member 1, its third chunk
    member1 = tmp_path / "killed" / "j.members" / "1.jsonl"
    assert not out.exists() and len(member1.read_bytes().splitlines()) == 2
    before = member1.read_bytes()
    assert calls.read_text().split() == ["correct"] * 6 + ["length"] * 3
    assert start(out, calls) == 0, log_tail(tmp_path / "log")
    # member 0 was not judged again; member 1 resumed at the chunk the kill cut off
    assert calls.read_text().split() == ["correct"] * 6 + ["length"] * 7
    assert member1.read_bytes().startswith(before)
    assert out.read_bytes() == straight.read_bytes()
    for i in range(2):
        name = f"{i}.jsonl"
        assert (out.parent / "j.members" / name).read_bytes() == (straight.parent / "j.members" / name).read_bytes()
    assert read_summary(out)["status"] == "done"

    # killed after the members, before the ensemble's summary: combining again costs no judge call
    out.unlink()
    (out.parent / "j.summary.json").unlink()
    assert start(out, calls) == 0, log_tail(tmp_path / "log")
    assert calls.read_text().split() == ["correct"] * 6 + ["length"] * 7
    assert out.read_bytes() == straight.read_bytes()


def save_classifier(path: Path) -> Path:
    """A random tiny LlamaForSequenceClassification (+ tokenizer), as tests/judge/test_reward_model.py builds it."""
    import torch
    from transformers import LlamaForSequenceClassification

    from prefloop.demo.tiny import TinyConfig, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    config = build_model(tokenizer, TinyConfig(seed=1)).config
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def midranks(values: list[float]) -> list[float]:
    """Rank-normalize by sorting (an independent route to the same definition): ties share their mean position."""
    order = sorted(values)
    positions = {v: [i for i, x in enumerate(order) if x == v] for v in values}
    return [sum(positions[v]) / len(positions[v]) / (len(values) - 1) for v in values]


def test_a_tiny_reward_model_is_a_member(tmp_path):
    import torch

    torch.set_num_threads(1)
    rm = save_classifier(tmp_path / "rm")
    rm_member = {"judge": "reward_model", "reward_model": str(rm), "dtype": "float32"}
    candidates = write_candidates(tmp_path / "candidates.jsonl")
    out = run(JudgeConfig(candidates=str(candidates), out=str(tmp_path / "j.jsonl"), judge="ensemble",
                          members=[member("correct"), rm_member], cache="off"))
    got = records(out)
    alone = records(run(JudgeConfig(candidates=str(candidates), out=str(tmp_path / "rm.jsonl"), cache="off",
                                    **rm_member)))
    for rid, (_, answer, texts) in TEXTS.items():
        rm_scores = alone[rid]["scores"]
        assert got[rid]["ensemble"]["members"][1]["scores"] == rm_scores  # the member is the plain judge
        verifier = midranks([float(t == answer) for t in texts])
        expected = [(a + b) / 2 for a, b in zip(verifier, midranks(rm_scores), strict=True)]
        assert got[rid]["scores"] == pytest.approx(expected, abs=1e-12)
    summary = read_summary(out)
    assert summary["members"][1]["judge"] == alone["p1"]["judge"]
    assert summary["members"][1]["completion_statuses"] == {"ok": 11}


def test_an_ensemble_judges_a_loop_round_on_the_tiny_model(tmp_path):
    """In `prefloop run`, an ensemble is the round's judge (its members under round_001/judgments.members/), the
    pairs come from its scores, and the report carries the members' agreement; held-out answers get one judge."""
    from prefloop.demo.tiny import save_tiny
    from prefloop.loop import LoopConfig
    from prefloop.loop import run as run_loop
    from prefloop.store import dumps
    from prefloop.tasks.addition import make_prompts

    save_tiny(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(8, 0, "train")))
    (tmp_path / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(4, 0, "heldout")))
    verifier = {"judge": "python", "reward_fn": "prefloop.tasks.addition:reward"}
    config = LoopConfig(
        out=str(tmp_path / "run"), model=str(tmp_path / "model"), prompts=str(tmp_path / "prompts.jsonl"),
        eval_prompts=str(tmp_path / "heldout.jsonl"), rounds=1, prompts_per_round=8,
        gen={"n": 4, "max_new_tokens": 4, "dtype": "float32", "temperature": 1.5},
        judge={"judge": "ensemble", "members": [verifier, member("length")]}, eval_judge=verifier,
        pairs={"keep_truncated": True},
        train={"max_steps": 1, "batch_size": 2, "save_steps": 1, "logging_steps": 1,
               "gradient_checkpointing": False, "dtype": "float32"})
    run_loop(config)
    round_dir = tmp_path / "run" / "round_001"
    judged = records(round_dir / "judgments.jsonl")
    assert len(judged) == 8 and all(len(r["ensemble"]["members"]) == 2 for r in judged.values())
    assert read_summary(round_dir / "judgments.members" / "1.jsonl")["status"] == "done"
    for pair in records(round_dir / "pairs.jsonl").values():
        scores = judged[pair["id"]]["scores"]
        assert pair["score_chosen"] == max(s for s in scores if s is not None)
    assert records(round_dir / "eval_judgments.jsonl")  # scored by the verifier alone
    assert "judge ensemble members agree on best and worst in" in (tmp_path / "run" / "report.md").read_text()


def test_judge_eval_scores_each_member_and_the_ensemble(tmp_path):
    out = ensemble(tmp_path, ["correct", "length"])
    report = json.loads(judge_eval(JudgeEvalConfig(judgments=str(out), gold=str(tmp_path / "judgments.members" /
                                                   "0.jsonl"), out=str(tmp_path / "eval.json"), bootstrap=10))
                        .read_text())
    # gold = the verifier: 3 + 3 + 2 labelled comparisons (the right answer beats each wrong one)
    assert report["labelled_comparisons"] == 8
    # ensemble (MEAN_CORRECT_LENGTH): p1 right over 22 and 3, wrong vs 333; p2 right 3/3; p3 tie vs 44, right vs 5
    assert (report["decided"], report["accuracy"]) == (7, round(6 / 7, 4))
    verifier, lengths = report["members"]
    assert (verifier["decided"], verifier["accuracy"]) == (8, 1.0)
    # length: p1 wrong vs 22 and 333, tie vs 3; p2 right vs 1 and 7, wrong vs 111; p3 wrong vs 44, tie vs 5
    assert (lengths["decided"], lengths["accuracy"], lengths["tie_rate"]) == (6, round(2 / 6, 4), 0.25)
    assert report["ensemble_agreement"] == 0.0


BAD = {
    "unknown member kind": ("[{judge: python, reward_fn: 'x.py:f'}, {judge: gpt4}]",
                            "members[1] has judge 'gpt4', which is not a judge kind. Fix: set judge to one of"),
    "empty members": ("[]", "--judge ensemble needs members"),
    "nested ensemble": ("[{judge: ensemble, members: []}, {judge: python, reward_fn: 'x.py:f'}]",
                        "members[0]: an ensemble cannot be a member of an ensemble. Fix:"),
    "one member": ("[{judge: python, reward_fn: 'x.py:f'}]", "an ensemble of one judge is that judge. Fix:"),
    "member without judge": ("[{reward_fn: 'x.py:f'}, {judge: python, reward_fn: 'x.py:f'}]",
                             "members[0] has no `judge` key. Fix:"),
    "not a file": ("members.yaml", "is neither a file nor an inline YAML list. Fix:"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, name):
    members, message = BAD[name]
    candidates = write_candidates(tmp_path / "c.jsonl")
    code = main(["-q", "judge", "--candidates", str(candidates), "--out", str(tmp_path / "j.jsonl"),
                 "--judge", "ensemble", "--members", members])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("prefloop judge: error: ")
    assert message in err
    assert not list(tmp_path.glob("j*"))  # nothing written


def test_a_wrong_reward_fn_in_a_later_member_fails_before_any_member_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(CALLS, str(tmp_path / "calls"))
    candidates = write_candidates(tmp_path / "c.jsonl")
    members = f"[{{judge: python, reward_fn: '{HERE}:correct'}}, {{judge: python, reward_fn: 'nope.py:f'}}]"
    code = main(["-q", "judge", "--candidates", str(candidates), "--out", str(tmp_path / "j.jsonl"),
                 "--judge", "ensemble", "--members", members])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "members[1] (python)" in err and "nope.py" in err and "Fix:" in err
    assert not (tmp_path / "calls").exists() and not list(tmp_path.glob("j*"))


def test_config_yaml_members_drift_and_new_run(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "c.jsonl")
    config = tmp_path / "ensemble.yaml"
    config.write_text(f"candidates: {candidates}\nout: {tmp_path / 'j.jsonl'}\njudge: ensemble\ncombine: vote\n"
                      f"members:\n  - {{judge: python, reward_fn: '{HERE}:correct'}}\n"
                      f"  - {{judge: python, reward_fn: '{HERE}:ones'}}\n")
    assert main(["-q", "judge", "--config", str(config)]) == 0
    # p2 ["11","1","111","7"] by vote: correct best {11} worst {1,111,7}; ones best {111} worst {7}
    assert records(tmp_path / "j.jsonl")["p2"]["scores"] == [1.0, -1.0, 0.0, -2.0]
    # a changed member is drift (its config hash), named; --new-run moves the ensemble and its members aside
    capsys.readouterr()
    changed = ["-q", "judge", "--config", str(config), "--members",
               f"[{{judge: python, reward_fn: '{HERE}:correct'}}, {{judge: python, reward_fn: '{HERE}:length'}}]"]
    assert main(changed) == 2 and "changed: member_hashes" in capsys.readouterr().err
    assert main([*changed, "--new-run"]) == 0
    # now length: best {111} worst {1,7}
    assert records(tmp_path / "j.jsonl")["p2"]["scores"] == [1.0, -2.0, 0.0, -2.0]
    assert len(list(tmp_path.glob("j.members.old-*/0.jsonl"))) == 1 and len(list(tmp_path.glob("j.jsonl.old-*"))) == 1


def test_the_loop_report_shows_the_members_agreement(tmp_path):
    from prefloop.report import write_report

    summary = read_summary(ensemble(tmp_path, ["correct", "ones"], drop_disagreements=True))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"config": {}, "status": "done", "rounds": [
        {"round": 1, "phases": {"judge": {"status": "done", "summary": summary}}}]}))
    text = write_report(tmp_path / "run").read_text()
    assert "judge ensemble members agree on best and worst in 66.7% of 3 prompts (1 marked to drop)" in text


def test_a_bad_combine_is_refused():
    from prefloop.config import ConfigError

    with pytest.raises(ConfigError, match="combine = 'median'. Fix: use one of mean, vote"):
        JudgeConfig(candidates="c", out="o", judge="ensemble", members=[member("correct")] * 2, combine="median")
