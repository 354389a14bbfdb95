"""API cost and budget through the judge stage: an llm judge on the openai backend, against the scripted loopback
server (tests/fake_server.py). Its answers "Score: N" carry `usage.completion_tokens` = 9 (8 characters + EOS), so
with prompt tokens priced at 0 every cost below is computed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fake_server import FakeServer, Request, chat_answer

from prefloop.budget import usd
from prefloop.cli import main
from prefloop.gen import openai as oa
from prefloop.runstate import read_summary
from prefloop.store import read_records

KEY_ENV = "PREFLOOP_TEST_BUDGET_KEY"
OUT = 1000.0  # USD per million completion tokens: $0.001 a token; prompt tokens cost nothing here
ROWS = {f"q{i}": (f"{i}+{i}=", [f"{2 * i}", f"{2 * i} or so"]) for i in range(6)}  # 2 completions a row


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(oa, "BACKOFF_BASE", 0.01)
    monkeypatch.delenv(KEY_ENV, raising=False)


def score(req: Request, pad: str = "") -> object:
    """A deterministic pointwise judge: the score is the response's length, capped at 5."""
    text = next(m["content"] for m in req.body["messages"] if m["role"] == "user")
    response = text.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
    return chat_answer(f"{pad}Score: {min(len(response), 5)}")


def candidates(tmp_path: Path, rows: dict = ROWS) -> Path:
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps({"id": rid, "prompt": prompt, "completions": [
        {"text": t, "finish_reason": "stop", "num_tokens": len(t) + 1} for t in texts]}) + "\n"
        for rid, (prompt, texts) in rows.items()))
    return path


def flags(tmp_path: Path, url: str, out: str = "j.jsonl", **kw) -> list[str]:
    options = {"candidates": candidates(tmp_path), "out": tmp_path / out, "judge": "llm", "judge-model": "m",
               "judge-backend": "openai", "base-url": url, "api-key-env": KEY_ENV, "mode": "pointwise",
               "cache": "off", "chunk-size": 2, "judge-max-new-tokens": 16,
               "judge-engine": '{concurrency: 1, ready_timeout: 5, timeout: 5}',
               "prices": f"{{m: {{input_per_mtok: 0, output_per_mtok: {OUT}}}}}", **kw}
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefloop ")]


def sent(server: FakeServer) -> tuple[int, int, int]:
    replies = [r.reply.json["usage"] for r in server.generation_requests() if r.reply is not None]
    return sum(u["prompt_tokens"] for u in replies), sum(u["completion_tokens"] for u in replies), len(replies)


def straight(tmp_path: Path) -> bytes:
    """The output of an uninterrupted run without a budget."""
    with FakeServer() as clean:
        clean.script = score
        assert main(["judge", *flags(tmp_path, clean.url, out="straight.jsonl")]) == 0
    return (tmp_path / "straight.jsonl").read_bytes()


def test_a_judge_budget_stop_at_the_predicted_chunk_then_resume(tmp_path, capsys):
    """A chunk is 2 rows = 4 requests: worst case 4 x 16 tokens = $0.064, billed 4 x 9 = $0.036. With $0.11,
    chunk 1 ($0 + 0.064) and chunk 2 ($0.036 + 0.064 = $0.1) go; chunk 3 ($0.072 + 0.064 > $0.11) stops: 4 rows
    judged, exit 2. The summary counts what the server billed; a higher budget resumes to the straight output."""
    with FakeServer() as server:
        server.script = score
        assert main(["judge", *flags(tmp_path, server.url, **{"max-budget-usd": 0.11})]) == 2
        [err] = error_lines(capsys)
        assert err == (f"prefloop judge: error: judge: budget reached: $0.072 spent of max_budget_usd $0.11; the next "
                       f"chunk (2 rows) may cost up to $0.064. Everything finished is kept in {tmp_path / 'j.jsonl'}. "
                       "Fix: raise --max-budget-usd (or max_budget_usd in a config) and re-run the same command: it "
                       "resumes; a lower --chunk-size stops in finer steps.")
        assert [r["id"] for r in read_records(tmp_path / "j.jsonl")] == ["q0", "q1", "q2", "q3"]
        summary = read_summary(tmp_path / "j.jsonl")
        prompt_tokens, completion_tokens, replies = sent(server)
        assert summary["status"] == "budget_exceeded" and replies == 8 and completion_tokens == 8 * 9
        usage = summary["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["requests"]) == (prompt_tokens, 72, 8)
        assert usage["cost_usd"] == pytest.approx(72 * OUT / 1e6)

        assert main(["judge", *flags(tmp_path, server.url, **{"max-budget-usd": 1})]) == 0
        summary = read_summary(tmp_path / "j.jsonl")
        prompt_tokens, completion_tokens, replies = sent(server)
        assert summary["status"] == "done" and replies == 12
        assert (summary["usage"]["prompt_tokens"], summary["usage"]["completion_tokens"]) == (prompt_tokens,
                                                                                            completion_tokens)
    assert (tmp_path / "j.jsonl").read_bytes() == straight(tmp_path)


def test_a_judge_stopped_mid_chunk_keeps_the_answers_it_paid_for_in_its_cache(tmp_path, capsys):
    """Answers padded past judge_max_new_tokens (32 tokens billed, 16 estimated): one chunk of 12 requests passes
    the pre-check ($0.192 <= $0.2) but after 7 answers ($0.224) the 8th is not sent. The chunk is not written (a
    row is judged whole), but the 7 answers are in the judge cache: the resume sends only the other 5."""
    pad = "x" * 22 + "\n"  # "x..x\nScore: N": 31 characters, 32 tokens with EOS
    cache = tmp_path / "cache"
    with FakeServer() as server:
        server.script = lambda req: score(req, pad)
        args = flags(tmp_path, server.url, **{"chunk-size": 6, "cache": cache})
        assert main(["judge", *args, "--max-budget-usd", "0.2"]) == 2
        [err] = error_lines(capsys)
        assert "budget reached: $0.224 spent of max_budget_usd $0.2." in err
        assert len(server.generation_requests()) == 7 and read_records(tmp_path / "j.jsonl") == []
        assert read_summary(tmp_path / "j.jsonl")["usage"]["completion_tokens"] == 7 * 32
        assert main(["judge", *args, "--max-budget-usd", "1"]) == 0
        assert len(server.generation_requests()) == 12
    rows = read_records(tmp_path / "j.jsonl")
    assert [r["scores"] for r in rows] == [[float(min(len(t), 5)) for t in texts] for _, texts in ROWS.values()]


def test_judge_dry_run_prints_the_hand_computed_estimate(tmp_path, capsys):
    """Templates small enough to count by hand, chars/4 rounded up per request; nothing sent or written.

    Pointwise "{prompt}>{response}": row a ("p", ["xy", "xyz", "xyzw"]) asks "p>xy" (1 token), "p>xyz" (2) and
    "p>xyzw" (2).
    Pairwise "{prompt}|{response_a}|{response_b}" over ["xy", "xyz", "xyzw"]: 2 matches, each order bounded by
    the two longest answers, "p|xyzw|xyz" (10 characters, 3 tokens): 4 requests, 12 tokens."""
    pointwise, pairwise = tmp_path / "point.yaml", tmp_path / "pair.yaml"
    pointwise.write_text('mode: pointwise\ntemplate: "{prompt}>{response}"\n')
    pairwise.write_text('mode: pairwise\ntemplate: "{prompt}|{response_a}|{response_b}"\n')
    rows = tmp_path / "c.jsonl"
    rows.write_text(json.dumps({"id": "a", "prompt": "p", "completions": [
        {"text": t, "finish_reason": "stop", "num_tokens": 1} for t in ("xy", "xyz", "xyzw")]}) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    common = ["judge", "--candidates", str(rows), "--out", str(tmp_path / "j" / "j.jsonl"), "--judge", "llm",
              "--judge-model", "m", "--judge-backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
              "--judge-max-new-tokens", "10", "--parse-retries", "1", "--prices",
              "{m: {input_per_mtok: 3, output_per_mtok: 5}}", "--dry-run"]
    assert main([*common, "--mode", "pointwise", "--template", str(pointwise)]) == 0
    printed = capsys.readouterr().out
    tokens = sum(math.ceil(len(f"p>{t}") / 4) for t in ("xy", "xyz", "xyzw"))  # 1 + 2 + 2
    assert "3 requests (first attempts; up to 6 with 1 parse retries each)" in printed
    assert f"prompt tokens: {tokens} for the first attempts (chars/4" in printed
    assert "completion tokens: at most 30 (judge_max_new_tokens 10 x 3 requests), 60 with every parse retry" in printed
    assert f"cost: {usd(tokens * 3 / 1e6)} to {usd((2 * tokens * 3 + 60 * 5) / 1e6)}" in printed

    assert main([*common, "--mode", "pairwise", "--template", str(pairwise)]) == 0
    printed = capsys.readouterr().out
    assert "4 requests" in printed and "prompt tokens: 12 for the first attempts" in printed
    assert f"cost: {usd(12 * 3 / 1e6)} to {usd((24 * 3 + 80 * 5) / 1e6)}" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_constitutional_ai_on_the_openai_backend_is_counted_and_stopped_by_the_budget(tmp_path, capsys):
    """A constitutional reviser (critique, then revision: 2 requests a row) is metered like any openai judge: its
    summary has the server's usage; with a budget it stops once the spend passes it (per request: its chain
    depends on its answers, so it has no pre-chunk estimate), and a higher budget resumes to the straight output."""
    def cai(url: str, out: str, *extra: str) -> list[str]:
        args = flags(tmp_path, url, out=out, judge="constitutional", constitution="harmless", mode="revise")
        return ["judge", *args, *extra]

    with FakeServer() as server:
        assert main(cai(server.url, "straight.jsonl")) == 0
        prompt_tokens, completion_tokens, replies = sent(server)
        usage = read_summary(tmp_path / "straight.jsonl")["usage"]
        assert replies == 12 and (usage["prompt_tokens"], usage["completion_tokens"], usage["requests"]) == (
            prompt_tokens, completion_tokens, 12)
        assert usage["cost_usd"] == pytest.approx(completion_tokens * OUT / 1e6)
    with FakeServer() as server:
        assert main(cai(server.url, "j.jsonl", "--max-budget-usd", "0.03")) == 2
        [err] = error_lines(capsys)
        assert "judge: budget reached:" in err and "of max_budget_usd $0.03." in err
        assert 0 < len(server.generation_requests()) < 12
        assert read_summary(tmp_path / "j.jsonl")["status"] == "budget_exceeded"
        assert main(cai(server.url, "j.jsonl", "--max-budget-usd", "1")) == 0
    assert (tmp_path / "j.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
