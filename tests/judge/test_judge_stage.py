"""The judge stage: candidates file in, one judgments record per prompt out; validated, resumable, failures kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefloop.judge.stage import JudgeConfig, load_candidates, run
from prefloop.runstate import read_summary
from prefloop.store import InputError

REWARD = "prefloop.tasks.addition:reward"


def candidate(rid: str, prompt, texts: list[str], answer=None, finish="stop") -> dict:
    """One record in the candidates format `prefloop generate` writes."""
    record = {
        "id": rid,
        "prompt": prompt,
        "completions": [{"text": t, "finish_reason": finish, "num_tokens": len(t) + 1} for t in texts],
        "model": "tiny",
        "round": 0,
        "config_hash": "0123456789ab",
        "columns": {} if answer is None else {"answer": answer},
    }
    return record


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def addition_candidates(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i, 2 * i + 1
        prompt = f"{a}+{b}=" if i % 2 else [{"role": "user", "content": f"{a}+{b}="}]
        rows.append(candidate(f"add-{a}-{b}", prompt, [str(a + b), str(a + b + 1), f" {a + b} "], answer=str(a + b)))
    return rows


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_judges_every_candidate_with_a_verifier(tmp_path):
    """A real run with `prefloop.tasks.addition:reward` writes one judgment per id, scoring each completion, plus a summary."""
    cands = write_jsonl(tmp_path / "candidates.jsonl", addition_candidates(5))
    out = run(JudgeConfig(candidates=str(cands), out=str(tmp_path / "judgments.jsonl"), reward_fn=REWARD))
    records = [json.loads(line) for line in read_lines(out)]
    assert [r["id"] for r in records] == [c["id"] for c in addition_candidates(5)]
    for r in records:
        assert r["scores"] == [1.0, 0.0, 1.0]  # the verifier strips whitespace
        assert r["statuses"] == ["ok"] * 3 and r["status"] == "ok"
        assert r["judge"] == f"python:{REWARD}"
        assert len(r["completions"]) == 3
    assert records[0]["prompt"] == [{"role": "user", "content": "0+1="}]  # the prompt style is carried through
    summary = read_summary(out)
    assert summary["status"] == "done" and summary["prompts"] == 5 and summary["judged"] == 5
    assert summary["completion_statuses"] == {"ok": 15}
    assert (tmp_path / "judgments.config.yaml").exists()


def test_rerun_of_finished_stage_does_nothing(tmp_path):
    """Re-running a finished judge stage with the same config leaves the output byte-identical."""
    cands = write_jsonl(tmp_path / "candidates.jsonl", addition_candidates(3))
    config = JudgeConfig(candidates=str(cands), out=str(tmp_path / "j.jsonl"), reward_fn=REWARD)
    before = run(config).read_bytes()
    assert run(config).read_bytes() == before


@pytest.mark.parametrize("keep", [0, 3, 6])
def test_resume_after_torn_tail_keeps_lines_and_every_id_once(tmp_path, keep):
    """After a crash (N complete lines + a torn half line, no summary), a re-run keeps the N lines byte-for-byte
    and ends with every id exactly once."""
    rows = addition_candidates(8)
    cands = write_jsonl(tmp_path / "candidates.jsonl", rows)
    config = JudgeConfig(candidates=str(cands), out=str(tmp_path / "j.jsonl"), reward_fn=REWARD, chunk_size=2)
    out = run(config)
    lines = read_lines(out)
    assert len(lines) == 8

    # Simulate the crash: the summary is only written at the end, so a killed run has none.
    out.write_bytes(b"".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
    (tmp_path / "j.summary.json").unlink()

    run(config)
    after = read_lines(out)
    assert after[:keep] == lines[:keep]
    ids = [json.loads(line)["id"] for line in after]
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids))
    assert all(line.endswith(b"\n") for line in after)
    assert (tmp_path / "j.jsonl.torn").read_bytes() == lines[keep][: len(lines[keep]) // 2]
    assert read_summary(out)["status"] == "done"


def test_missing_completions_field_is_an_input_error_naming_the_line(tmp_path):
    """A candidates record without `completions` raises InputError naming file:line, before anything is written."""
    rows = addition_candidates(3)
    del rows[1]["completions"]
    cands = write_jsonl(tmp_path / "candidates.jsonl", rows)
    with pytest.raises(InputError, match=r"candidates\.jsonl:2: missing field `completions`"):
        run(JudgeConfig(candidates=str(cands), out=str(tmp_path / "j.jsonl"), reward_fn=REWARD))
    assert not (tmp_path / "j.jsonl").exists()
    assert not (tmp_path / "j.config.yaml").exists()


def test_completion_without_text_is_an_input_error(tmp_path):
    """A completion that is not an object with a `text` string is refused with the file and line."""
    rows = addition_candidates(2)
    rows[1]["completions"] = [{"text": None}]
    cands = write_jsonl(tmp_path / "candidates.jsonl", rows)
    with pytest.raises(InputError, match=r"candidates\.jsonl:2:"):
        load_candidates(cands)


def test_failures_are_recorded_as_failures_never_as_zero(tmp_path):
    """Rows the verifier cannot judge (no reference answer) get status "error", a null score and a reason — not 0."""
    rows = addition_candidates(3)
    rows[1]["columns"] = {}  # no answer: the verifier returns None for it
    cands = write_jsonl(tmp_path / "candidates.jsonl", rows)
    out = run(JudgeConfig(candidates=str(cands), out=str(tmp_path / "j.jsonl"), reward_fn=REWARD))
    text = out.read_text(encoding="utf-8")
    records = {r["id"]: r for r in map(json.loads, text.splitlines())}
    failed = records[rows[1]["id"]]
    assert failed["scores"] == [None, None, None]
    assert failed["statuses"] == ["error"] * 3 and failed["status"] == "error"
    assert all(failed["errors"]) and "None" in failed["errors"][0]
    assert records[rows[0]["id"]]["scores"] == [1.0, 0.0, 1.0]  # the others are still scored
    assert '"scores": [null, null, null]' in text
    assert read_summary(out)["completion_statuses"] == {"ok": 6, "error": 3}


def test_partial_failures_keep_the_scored_completions(tmp_path):
    """A function that fails for one completion of a prompt marks only that one; the record's status says partial."""
    fn = tmp_path / "rewards.py"
    fn.write_text(
        "def score(prompts, completions, **kw):\n"
        "    return [float('nan') if c == 'x' else 1.0 for c in completions]\n"
    )
    cands = write_jsonl(tmp_path / "candidates.jsonl", [candidate("a", "p", ["x", "y"])])
    out = run(JudgeConfig(candidates=str(cands), out=str(tmp_path / "j.jsonl"), reward_fn=f"{fn}:score"))
    (record,) = [json.loads(line) for line in read_lines(out)]
    assert record["scores"] == [None, 1.0]
    assert record["statuses"] == ["error", "ok"]
    assert record["status"] != "ok"


def test_duplicate_candidate_ids_are_an_input_error(tmp_path):
    """Two candidates records with one id are refused up front (file:line), not half-judged and then crashed on."""
    rows = addition_candidates(2)
    rows[1]["id"] = rows[0]["id"]
    cands = write_jsonl(tmp_path / "candidates.jsonl", rows)
    with pytest.raises(InputError, match=r"candidates\.jsonl:2"):
        run(JudgeConfig(candidates=str(cands), out=str(tmp_path / "j.jsonl"), reward_fn=REWARD))
    assert not (tmp_path / "j.jsonl").exists()


def test_bad_reward_fn_fails_before_any_output(tmp_path):
    """A wrong --reward-fn is reported before the stage writes anything, so fixing the typo just works (no drift)."""
    cands = write_jsonl(tmp_path / "candidates.jsonl", addition_candidates(2))
    out = tmp_path / "j.jsonl"
    with pytest.raises((ValueError, AttributeError, ImportError)):
        run(JudgeConfig(candidates=str(cands), out=str(out), reward_fn="prefloop.tasks.addition:rewrd"))
    assert not out.exists()
    assert not (tmp_path / "j.config.yaml").exists()
    run(JudgeConfig(candidates=str(cands), out=str(out), reward_fn=REWARD))  # must not raise ConfigDriftError
    assert len(read_lines(out)) == 2
