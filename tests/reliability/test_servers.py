"""Flaky servers under whole stages: generate (openai backend) and judge (llm judge, openai backend), against the
scripted loopback server (tests/fake_server.py).

Slow replies, hangs, 429 storms (with and without Retry-After), 5xx bursts and connection resets, and a server that
dies mid-stage and comes back on the same port. The contract checked after every scenario: the stage either
completes with every prompt exactly once -- and the same output a fault-free run gives -- or it stops with what it
finished kept on disk, and re-running the same command completes it: every id exactly once, no duplicates, the
records written before the stop kept byte-for-byte, and the summary's status `done`.

Per-request faults on single prompts are tested in tests/gen/test_openai.py; the faults here are server-wide
(storms, bursts, outages) and run through both stages.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from fake_server import FakeServer, Reply, Request, chat_answer, error

from prefloop.errors import StageFailed
from prefloop.gen import GenerationAborted
from prefloop.gen import openai as oa
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.judge.stage import JudgeConfig
from prefloop.judge.stage import run as judge
from prefloop.runstate import read_summary
from prefloop.store import read_records

N_PROMPTS = 18
Script = Callable[[Request], "Reply | None"]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """10 ms backoff base, so retry storms take little time; Retry-After waits are still honoured in full."""
    monkeypatch.setattr(oa, "BACKOFF_BASE", 0.01)
    monkeypatch.delenv("PREFLOOP_TEST_SERVERS_KEY", raising=False)


def scored_judge(req: Request) -> Reply:
    """A deterministic pointwise judge: the score is the response's length, capped at 5."""
    text = next(m["content"] for m in req.body["messages"] if m["role"] == "user")
    response = text.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
    return chat_answer(f"Score: {min(len(response), 5)}")


class Stage:
    """One stage over the same prompts, with the check that it finished every prompt exactly once."""

    def __init__(self, kind: str, tmp: Path):
        self.kind, self.tmp = kind, tmp
        self.ids = [f"q{i:02d}" for i in range(N_PROMPTS)]
        rng = random.Random(0)
        if kind == "generate":
            self.input = tmp / "prompts.jsonl"
            self.input.write_text("".join(json.dumps({"id": q, "prompt": f"{i}+{i % 7}="}) + "\n"
                                          for i, q in enumerate(self.ids)))
            self.script: Script = lambda req: None  # the server's normal completion
        else:
            self.input = tmp / "candidates.jsonl"
            rows, self.expected = [], {}
            for q in self.ids:
                texts = ["".join(rng.choices("abc ", k=rng.randint(1, 8))) for _ in range(3)]
                rows.append({"id": q, "prompt": f"{q}=", "completions": [
                    {"text": t, "finish_reason": "stop", "num_tokens": len(t) + 1} for t in texts]})
                self.expected[q] = [float(min(len(t), 5)) for t in texts]
            self.input.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.script = scored_judge

    def run(self, url: str, out: str = "out.jsonl", timeout: float = 30.0, max_retries: int = 6,
            max_failed_fraction: float = 0.1) -> Path:
        path = str(self.tmp / out)
        if self.kind == "generate":
            return generate(GenerateConfig(
                model="m", prompts=str(self.input), out=path, backend="openai", base_url=url, n=2,
                max_new_tokens=8, chunk_size=6, concurrency=3, request_timeout=timeout, max_retries=max_retries,
                ready_timeout=10.0, max_failed_fraction=max_failed_fraction, api_key_env="PREFLOOP_TEST_SERVERS_KEY"))
        return judge(JudgeConfig(
            candidates=str(self.input), out=path, judge="llm", judge_model="m", judge_backend="openai",
            base_url=url, mode="pointwise", cache="off", chunk_size=4, api_key_env="PREFLOOP_TEST_SERVERS_KEY",
            judge_engine={"ready_timeout": 10.0, "timeout": timeout, "max_retries": max_retries, "concurrency": 3},
            **({"max_failed_fraction": max_failed_fraction} if max_failed_fraction != 0.1 else {})))

    def check_done(self, out: Path) -> list[dict]:
        """Every id exactly once, every judgment ok (judge: the scripted scores), summary done."""
        rows = read_records(out)
        assert sorted(r["id"] for r in rows) == self.ids, "an id is missing or written twice"
        summary = read_summary(out)
        assert summary["status"] == "done", summary
        if self.kind == "generate":
            assert summary["failed"] == 0 and summary["written"] == N_PROMPTS
            assert all(len(r["completions"]) == 2 for r in rows)
        else:
            assert all(r["status"] == "ok" and set(r["statuses"]) == {"ok"} for r in rows)
            assert {r["id"]: r["scores"] for r in rows} == self.expected
        return rows


@pytest.fixture(params=["generate", "judge"])
def stage(request, tmp_path) -> Stage:
    return Stage(request.param, tmp_path)


def outputs(rows: list[dict]) -> dict[str, object]:
    return {r["id"]: r["completions"] if "scores" not in r else r["scores"] for r in rows}


def clean_run(stage: Stage) -> dict[str, object]:
    """The output of a fault-free run: what every completed faulty run must equal."""
    with FakeServer() as server:
        server.script = stage.script
        return outputs(stage.check_done(stage.run(server.url, out="clean.jsonl")))


class Storm:
    """The server answers `fault` to its first `count` generation requests (server-wide), then normally."""

    def __init__(self, server: FakeServer, fault: Callable[[], Reply], count: int, script: Script):
        self.server, self.fault, self.count, self.script, self.hits = server, fault, count, script, 0
        self.lock = threading.Lock()

    def __call__(self, req: Request) -> Reply | None:
        with self.lock:
            hit = self.hits < self.count
            self.hits += hit
        return self.fault() if hit else self.script(req)


# -- slow, hung, rate limited, failing: retried within the budget, and the output is the fault-free one ----------


def test_slow_replies_are_waited_for_not_retried(stage):
    """Every reply takes 0.3 s (well under the request timeout): nothing is retried, nothing is written twice."""
    expected = clean_run(stage)
    with FakeServer() as server:
        server.script, server.latency = stage.script, 0.3
        out = stage.run(server.url)
        sent = [json.dumps(r.prompt) for r in server.generation_requests()]
    assert len(sent) == len(set(sent)), "a slow request was sent again"
    assert outputs(stage.check_done(out)) == expected


def test_a_server_that_hangs_for_a_while_is_timed_out_and_retried(stage):
    """The first 8 requests hang (no answer, connection open) past the 0.5 s request timeout; each is abandoned
    and retried, and the stage completes with the fault-free output."""
    expected = clean_run(stage)
    with FakeServer() as server:
        server.script = storm = Storm(server, lambda: Reply(hang=30.0), 8, stage.script)
        out = stage.run(server.url, timeout=0.5, max_retries=9)
    assert storm.hits == 8
    assert outputs(stage.check_done(out)) == expected


@pytest.mark.parametrize("hint", ["none", "retry-after", "retry-after-ms"])
def test_a_429_storm_is_ridden_out(stage, hint):
    """The first 12 requests get 429 (server-wide, whichever prompts they carry), with no hint, `Retry-After: 1`
    or `retry-after-ms: 400`: every prompt is retried until it lands once; with a hint, no retry of a prompt comes
    sooner than the server asked."""
    expected = clean_run(stage)
    headers = {"none": {}, "retry-after": {"Retry-After": "1"}, "retry-after-ms": {"retry-after-ms": "400"}}[hint]
    wait = {"none": 0.0, "retry-after": 1.0, "retry-after-ms": 0.4}[hint]
    refusal = error(429, "Rate limit reached. Please try again later.", code="rate_limit_exceeded", headers=headers)
    with FakeServer() as server:
        server.script = storm = Storm(server, lambda: refusal, 12, stage.script)
        # 3 prompts are in flight when the storm starts: no one prompt can meet more than 10 of its 12 refusals.
        out = stage.run(server.url, max_retries=10)
        sent = server.generation_requests()
    assert storm.hits == 12
    assert outputs(stage.check_done(out)) == expected
    times: dict[str, list[float]] = {}
    for r in sent:
        times.setdefault(json.dumps(r.prompt), []).append(r.t)
    gaps = [b - a for ts in times.values() for a, b in pairwise(ts)]
    assert len(gaps) == 12  # each refusal cost exactly one more request of its prompt
    assert min(gaps) >= wait  # and it came no sooner than the server asked


@pytest.mark.parametrize("burst", ["5xx", "resets"])
def test_a_burst_of_server_errors_mid_stage_is_retried(stage, burst):
    """After 7 good replies, the next 10 are 500/502/503 (or connections reset mid-reply); then the server
    recovers. The stage completes with the fault-free output."""
    expected = clean_run(stage)
    faults = {"5xx": [error(500, "internal"), error(502, "bad gateway"), error(503, "overloaded")],
              "resets": [Reply(reset=True)]}[burst]
    count = {"n": 0}
    lock = threading.Lock()

    def script(req):
        with lock:
            count["n"] += 1
            k = count["n"]
        return faults[k % len(faults)] if 7 < k <= 17 else stage.script(req)

    with FakeServer() as server:
        server.script = script
        out = stage.run(server.url, max_retries=11)
    assert count["n"] > 17
    assert outputs(stage.check_done(out)) == expected


# -- past the retry budget --------------------------------------------------------------------------------------


def test_a_storm_longer_than_the_retry_budget(stage):
    """Every request is refused (503) after the first 5: generate stops at its failure ceiling, keeping the prompts
    that finished, and a re-run once the server is healthy completes it; the judge records each unserved judgment
    as `error` with its reason (never a score), counted in the summary."""
    healthy = {"on": False}
    good = {"n": 0}
    lock = threading.Lock()

    def script(req):
        with lock:
            good["n"] += 1
            k = good["n"]
        return stage.script(req) if healthy["on"] or k <= 5 else error(503, "overloaded")

    with FakeServer() as server:
        server.script = script
        if stage.kind == "generate":
            with pytest.raises(GenerationAborted, match="over the ceiling.*re-run the same command"):
                stage.run(server.url, max_retries=2)
            out = stage.tmp / "out.jsonl"
            before = out.read_bytes()
            kept = [r["id"] for r in read_records(out)]
            assert 0 < len(kept) < N_PROMPTS and len(kept) == len(set(kept))
            healthy["on"] = True
            stage.run(server.url, max_retries=2)
            assert out.read_bytes().startswith(before)
            stage.check_done(out)
        else:
            # Most judgments unserved: past its failure ceiling the judge stops, naming the first error, and writes
            # none of the batch; a re-run once the server is healthy judges every row.
            with pytest.raises(StageFailed, match="over the ceiling.*error: the judge backend failed"):
                stage.run(server.url, max_retries=2)
            out = stage.tmp / "out.jsonl"
            before = out.read_bytes() if out.exists() else b""  # batches under the ceiling are kept, if any
            healthy["on"] = True
            rows = read_records(stage.run(server.url, max_retries=2))
            assert sorted(r["id"] for r in rows) == stage.ids and out.read_bytes().startswith(before)
            assert all(s == "ok" for r in rows[len(before.splitlines()):] for s in r["statuses"])
            # Kept on record under a raised ceiling: each unserved judgment is `error` with its reason, never a score.
            healthy["on"], good["n"] = False, 0
            out = stage.run(server.url, "kept.jsonl", max_retries=2, max_failed_fraction=1)
            rows = read_records(out)
            statuses = [s for r in rows for s in r["statuses"]]
            assert "error" in statuses and statuses.count("ok") <= 5
            for r in rows:
                for status, score, reason in zip(r["statuses"], r["scores"], r["errors"], strict=True):
                    assert (status == "ok") == (score is not None)
                    assert status == "ok" or reason
            assert read_summary(out)["stats"]["error_rate"] > 0


# -- a server that dies mid-stage and comes back on the same port -------------------------------------------------


# The request at which the server dies: mid-way through the second chunk (generate: 6 prompts per chunk, one
# request each; judge: 4 rows per chunk, one request per completion, 3 completions a row).
DEATH_AT = {"generate": 10, "judge": 16}


class Outage:
    """Server A dies while answering its `at`-th generation request (that request never gets an answer); server B
    takes over A's port, listening `down` seconds later (None: when `back()` is called)."""

    def __init__(self, script: Script, at: int, down: float | None):
        self.a = FakeServer()
        self.b: FakeServer | None = None
        self.script, self.at, self.down = script, at, down
        self.a.script = self._a_script
        self.swapped = threading.Event()
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._died = False

    @property
    def url(self) -> str:
        return self.a.url

    def _a_script(self, req: Request) -> Reply | None:
        with self._lock:
            dying = self._died
            die = not dying and len(self.a.generation_requests()) >= self.at
            self._died |= die
        if die:
            threading.Thread(target=self._swap, daemon=True).start()
        if die or dying:
            return Reply(hang=60.0)  # dropped, unanswered, when the server closes
        return self.script(req)

    def _swap(self) -> None:
        try:
            self.a.close()
            self.b = FakeServer(port=self.a.port, start_after=self.down)
            self.b.script = self.script
        except BaseException as e:  # e.g. another process took the port in between: the test says so
            self.failure = e
        finally:
            self.swapped.set()

    def back(self) -> FakeServer:
        assert self.swapped.wait(30) and self.failure is None, self.failure
        self.b.listen()
        return self.b

    def close(self) -> None:
        self.a.close()
        self.swapped.wait(30)
        if self.b is not None:
            self.b.close()


@pytest.fixture
def outage_factory():
    made: list[Outage] = []

    def make(*args, **kw) -> Outage:
        made.append(Outage(*args, **kw))
        return made[-1]

    yield make
    for o in made:
        o.close()


def test_a_server_restarted_within_the_retry_budget_costs_nothing(stage, outage_factory, monkeypatch):
    """The server dies mid-stage (requests in flight get no answer, new connections are refused) and a new one
    listens on the same port 0.3 s later: the retries reach it and the stage completes in one run, with the
    fault-free output."""
    monkeypatch.setattr(oa, "BACKOFF_BASE", 0.2)  # 8 retries: at least 25 s of backoff, against a 0.3 s outage
    expected = clean_run(stage)
    outage = outage_factory(stage.script, at=DEATH_AT[stage.kind], down=0.3)
    out = stage.run(outage.url, max_retries=8)
    assert outage.swapped.is_set() and outage.failure is None
    assert len(outage.a.generation_requests()) >= DEATH_AT[stage.kind] and outage.b.generation_requests()
    assert outputs(stage.check_done(out)) == expected


def test_a_server_down_past_the_retry_budget_stops_the_stage_and_a_rerun_completes(stage, outage_factory):
    """The server dies mid-stage and stays down: the stage stops (GenerationAborted, naming the server and saying
    to re-run) instead of writing the unserved prompts as failures; what finished before is on disk. The server
    comes back on the same port, the same command resumes, and every id is there exactly once."""
    outage = outage_factory(stage.script, at=DEATH_AT[stage.kind], down=None)
    with pytest.raises(GenerationAborted, match=rf"{outage.url}.*re-run"):
        stage.run(outage.url, max_retries=3)
    out = stage.tmp / "out.jsonl"
    before = out.read_bytes()
    kept = read_records(out)
    assert 0 < len(kept) < N_PROMPTS and len({r["id"] for r in kept}) == len(kept)
    if stage.kind == "judge":
        assert all(r["status"] == "ok" for r in kept)  # no judgment was written as an error for the outage
    assert read_summary(out).get("status") != "done"

    server = outage.back()
    stage.run(outage.url, max_retries=3)
    assert out.read_bytes().startswith(before)
    stage.check_done(out)
    resent = [json.dumps(r.prompt) for r in server.generation_requests()]
    assert len(resent) == len(set(resent))  # each missing prompt asked once after the restart
    if stage.kind == "generate":  # and none that was on disk
        assert not {json.dumps(r["prompt"]) for r in kept} & set(resent)


# -- a seeded mix of everything, until done -----------------------------------------------------------------------


def chaos(seed: int, rate: float, script: Script) -> Script:
    """Each request, with probability `rate`: a hang, a 429 (with or without Retry-After), a 5xx or a reset."""
    rng, lock = random.Random(seed), threading.Lock()
    faults = [lambda: Reply(hang=30.0), lambda: error(429, "slow down"),
              lambda: error(429, "slow down", headers={"retry-after-ms": "50"}), lambda: error(500, "boom"),
              lambda: error(502, "bad gateway"), lambda: error(503, "overloaded"), lambda: Reply(reset=True)]

    def pick(req: Request) -> Reply | None:
        with lock:
            fault = rng.choice(faults) if rng.random() < rate else None
        return fault() if fault else script(req)

    return pick


@pytest.mark.parametrize("seed", [pytest.param(0, id="seed0"),
                                  *[pytest.param(s, id=f"seed{s}", marks=pytest.mark.slow) for s in range(1, 6)]])
def test_a_seeded_mix_of_faults_ends_with_every_prompt_exactly_once(stage, seed):
    """Half the requests fail in one of seven ways, with a tight retry budget: each run either completes or stops;
    re-running the same command (the faults go on) reaches `done` within a few runs, with every id once and the
    records of earlier runs kept byte-for-byte."""
    out = stage.tmp / "out.jsonl"
    runs, before = 0, b""
    with FakeServer() as server:
        server.script = chaos(seed, 0.5, stage.script)
        while read_summary(out).get("status") != "done":
            runs += 1
            assert runs <= 10, "no progress"
            try:
                stage.run(server.url, timeout=0.5, max_retries=2, max_failed_fraction=1.0)
            except GenerationAborted:
                pass
            if stage.kind == "judge":
                break  # the judge records unserved judgments as `error` and is done
            assert out.read_bytes().startswith(before)
            before = out.read_bytes()
    rows = read_records(out)
    assert sorted(r["id"] for r in rows) == stage.ids
    if stage.kind == "generate":
        stage.check_done(out)
    else:
        for r in rows:  # every judgment is the scripted score or a recorded failure, never anything else
            for status, score, want in zip(r["statuses"], r["scores"], stage.expected[r["id"]], strict=True):
                assert (status, score) == ("ok", want) or (status == "error" and score is None)
