"""Judge kinds are a registry: a new kind is one module plus one line in `prefloop.judge.KINDS`.

The test writes a kind the package has never seen (a judge preferring the shortest answer, from the flags the
judge stage already has), registers it, and runs it through the judge stage, the pairs stage and an ensemble.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from prefloop.config import ConfigError
from prefloop.judge import KINDS, JudgeKind, judge_kind, uses_generator
from prefloop.judge.pairs import PairsConfig
from prefloop.judge.pairs import run as select_pairs
from prefloop.judge.stage import JudgeConfig
from prefloop.judge.stage import run as judge
from prefloop.store import iter_records

SHORTEST = '''
from dataclasses import dataclass
from typing import ClassVar

from prefloop.config import ConfigError


class ShortestJudge:
    name = "shortest"

    def judge(self, rows):
        verdicts = []
        for row in rows:
            n = len(row["completions"])
            verdicts.append({"scores": [-float(len(c["text"])) for c in row["completions"]],
                             "statuses": ["ok"] * n, "errors": [None] * n})
        return verdicts

    def close(self):
        pass


@dataclass
class ShortestOptions:
    generator: ClassVar[bool] = False
    cached: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config):
        if config.mode not in (None, "chars"):
            raise ConfigError(f"--judge shortest --mode {config.mode!r}. Fix: use chars.")
        return cls()

    def derived(self):
        return {"mode": "chars"}

    def first_label(self):
        return "A"

    def api_models(self):
        return []

    def pairwise(self):
        return False

    def rewrites(self):
        return False

    def load(self, cache=None):
        return ShortestJudge()
'''

TEXTS = {"a": ["four", "4", "the answer is four"], "b": ["yes, it is", "no", "maybe so"]}


@pytest.fixture
def shortest(tmp_path, monkeypatch):
    """The new kind's module on sys.path, and its one registration."""
    (tmp_path / "shortest_kind.py").write_text(textwrap.dedent(SHORTEST))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(KINDS, "shortest", "shortest_kind:ShortestOptions")
    yield
    sys.modules.pop("shortest_kind", None)


def _candidates(tmp_path):
    path = tmp_path / "candidates.jsonl"
    rows = [{"id": rid, "prompt": f"prompt {rid}", "completions": [{"text": t, "finish_reason": "stop"} for t in texts]}
            for rid, texts in TEXTS.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_registered_kind_has_the_protocol():
    members = [name for name in dir(JudgeKind) if not name.startswith("_")]
    assert set(members) >= {"from_config", "derived", "first_label", "api_models", "pairwise", "rewrites", "load"}
    for name in KINDS:
        cls = judge_kind(name)
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, f"{name}: {missing}"
    assert [n for n in KINDS if uses_generator(n)] == ["llm", "constitutional"]
    assert not uses_generator("ensemble") and not uses_generator(None)


def test_a_new_kind_runs_through_the_stages_with_one_registration(tmp_path, shortest):
    candidates = _candidates(tmp_path)
    config = JudgeConfig(candidates=str(candidates), out=str(tmp_path / "j.jsonl"), judge="shortest")
    assert config.mode == "chars"  # the kind's derived value, recorded on the config (and so in its hash)
    judge(config)
    records = {row["id"]: row for _, row in iter_records(tmp_path / "j.jsonl")}
    for rid, texts in TEXTS.items():
        assert records[rid]["scores"] == [-float(len(t)) for t in texts]
        assert records[rid]["judge"] == "shortest" and records[rid]["status"] == "ok"
    select_pairs(PairsConfig(judgments=str(tmp_path / "j.jsonl"), out=str(tmp_path / "p.jsonl")))
    pairs = {row["id"].split(":")[0]: row for _, row in iter_records(tmp_path / "p.jsonl")}
    for rid, texts in TEXTS.items():  # best_worst by hand: the shortest text is chosen, the longest rejected
        assert (pairs[rid]["chosen"], pairs[rid]["rejected"]) == (min(texts, key=len), max(texts, key=len))


def test_the_new_kinds_checks_and_an_ensemble_member_of_it(tmp_path, shortest):
    candidates = _candidates(tmp_path)
    with pytest.raises(ConfigError, match="--judge shortest --mode 'words'. Fix: use chars"):
        JudgeConfig(candidates=str(candidates), out=str(tmp_path / "j.jsonl"), judge="shortest", mode="words")
    (tmp_path / "short.py").write_text("def short(prompts, completions, **kw):\n"
                                       "    return [1.0 if len(c) < 5 else 0.0 for c in completions]\n")
    config = JudgeConfig(candidates=str(candidates), out=str(tmp_path / "e.jsonl"), judge="ensemble",
                         members=[{"judge": "shortest"}, {"judge": "python", "reward_fn": f"{tmp_path}/short.py:short"}])
    judge(config)
    member = dict(iter_records(tmp_path / "e.members" / "0.jsonl"))
    assert [row["judge"] for row in member.values()] == ["shortest", "shortest"]
    combined = {row["id"]: row["scores"] for _, row in iter_records(tmp_path / "e.jsonl")}
    # Both members rank "4" (a) and "no" (b) best; the short-answer function ties "four" with "4", so only the
    # new kind's vote makes "4" the ensemble's unique best.
    for rid, best in (("a", "4"), ("b", "no")):
        scores = combined[rid]
        assert scores.index(max(scores)) == TEXTS[rid].index(best) and scores.count(max(scores)) == 1
