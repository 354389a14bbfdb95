"""The API key never leaves the Authorization header: not into any file of a run, not into logs, not into errors.

A sentinel key is set in the environment; the scripted server (tests/fake_server.py) checks it on every request and
echoes it back inside its error messages (400, 429, 503, 401 and a malformed 200 body), the way some proxies and
servers quote the request. The CLI runs in a subprocess with every logger at DEBUG (and the SDK's own
`OPENAI_LOG=debug`), so what is checked is exactly what a user's terminal and log files would get. After each run,
every file under the test's directory (outputs, sidecar configs and summaries, the judge cache, the loop's
manifest, report and checkpoints) is read whole and must not contain the key; stdout and stderr neither. Each test
also checks that the echo really happened (the scrubbed `<api key>` placeholder shows up), so a pass means the key
was scrubbed, not that it was never sent back.

The in-process check with pytest's log capture is tests/gen/test_openai.py::test_api_key_never_logged_or_written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_server import FakeServer, Reply, Request, chat_answer, error

from prefloop.gen.openai import OpenAIGenerator
from prefloop.store import read_records

SECRET = "sk-prefloop-SENTINEL-4b1d9e7c0a"
KEY_ENV = "PREFLOOP_TEST_SECRET_KEY"
TIMEOUT = 600  # seconds per CLI run: the loop trains a tiny model, and torch imports slowly on a loaded machine
# The CLI with the root logger at DEBUG (its own basicConfig at INFO is then a no-op).
DEBUG_CLI = ("import logging, sys; logging.basicConfig(level=logging.DEBUG); from prefloop.cli import main; "
             "sys.exit(main(sys.argv[1:]))")


def cli(*args: str, key: str = SECRET) -> subprocess.CompletedProcess:
    env = {**os.environ, KEY_ENV: key, "OPENAI_LOG": "debug", "PREFLOOP_NO_BAR": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", DEBUG_CLI, *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def leaks(root: Path, *texts: str) -> list[str]:
    """Where the key appears: in any of `texts`, or in any file under `root` (read as bytes, whole)."""
    found = [f"text {i}" for i, t in enumerate(texts) if SECRET in t]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, f"nothing under {root}"
    return found + [str(p) for p in files if SECRET.encode() in p.read_bytes()]


def echo(req: Request) -> str:
    return f"request had `{req.headers.get('authorization')}`"


def prompt_text(req: Request) -> str:
    if "prompt" in req.body:
        return req.body["prompt"]
    return next(m["content"] for m in req.body["messages"] if m["role"] == "user")


def echoing(per_prompt: dict[str, list[Reply | None]], then=lambda req: None):
    """A script: a request whose prompt text contains key k gets per_prompt[k][attempt] (echoing the key where
    the reply builder says), past the list's end `then(req)`."""

    def script(req: Request) -> Reply | None:
        text = prompt_text(req)
        for k, replies in per_prompt.items():
            if k in text and req.attempt < len(replies):
                reply = replies[req.attempt]
                return reply(req) if callable(reply) else reply
        return then(req)

    return script


def echo_400(req):
    return error(400, f"This model's maximum context length is 8 tokens; {echo(req)}", code="context_length")


def echo_429(req):
    return error(429, f"Rate limit reached for {echo(req)}", code="rate_limit_exceeded",
                 headers={"retry-after-ms": "20"})


def echo_503(req):
    return error(503, f"upstream overloaded; {echo(req)}")


def echo_garbage(req):
    return Reply(raw=f'{{"choices": [{{"text": "{echo(req)}'.encode(), headers={"Content-Type": "application/json"})


def echo_401(req):
    return error(401, f"Incorrect API key provided: {echo(req)}", code="invalid_api_key")


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_never_writes_logs_or_prints_the_key(tmp_path):
    """generate (openai backend): per-prompt errors that echo the key (400; 503 until retries run out; a 429 and a
    malformed body, then success), then a revoked key mid-stage (401 echoing it), then at readiness (401 on
    /models): the key is in no file, no log line, no error message."""
    prompts = write(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"prompt-{i} {i}+1="} for i in range(6)])
    out = tmp_path / "candidates.jsonl"
    args = ["generate", "--model", "m", "--prompts", str(prompts), "--out", str(out), "--backend", "openai",
            "--api-key-env", KEY_ENV, "--n", "2", "--max-retries", "1", "--ready-timeout", "20",
            "--max-failed-fraction", "1.0", "--chunk-size", "3"]
    texts = []
    with FakeServer(expected_key=SECRET) as server:
        server.script = echoing({"prompt-1": [echo_400], "prompt-2": [echo_503] * 2, "prompt-3": [echo_429],
                                 "prompt-4": [echo_garbage]})
        first = cli(*args, "--base-url", server.url)
        assert first.returncode == 0, first.stderr[-3000:]
        assert sorted(r["id"] for r in read_records(out)) == ["p0", "p3", "p4", "p5"]

        server.script = echo_401  # the key is revoked: the re-run (p1, p2 left) stops at once
        revoked = cli(*args, "--base-url", server.url)
        assert revoked.returncode == 2 and "refused the API key (HTTP 401" in revoked.stderr

        server.models_reply = echo_401(Request("/v1/models", {}, {"authorization": f"Bearer {SECRET}"}, 0, 0))
        at_start = cli(*args, "--base-url", server.url)
        assert at_start.returncode == 2 and "refused the API key" in at_start.stderr
        assert all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in server.requests)  # it was sent
    for run in (first, revoked, at_start):
        texts += [run.stdout, run.stderr]
    assert "<api key>" in first.stderr and "<api key>" in revoked.stderr  # the echoes arrived, scrubbed
    assert "HTTP Response" in first.stderr or "Sending HTTP Request" in first.stderr  # the SDK's debug log ran
    assert leaks(tmp_path, *texts) == []


def pointwise(req: Request) -> Reply:
    return chat_answer("Score: 3")


def test_llm_judge_never_writes_logs_or_prints_the_key(tmp_path):
    """judge --judge llm --judge-backend openai: judgments that fail with echoed keys are stored as `error` with
    their reason (key scrubbed), the judge cache holds no key, and a 401 echoing the key, mid-stage or at
    readiness, stops the stage with a message that does not carry it."""
    rows = [{"id": f"r{i}", "prompt": f"row-{i}", "completions": [
        {"text": f"answer-{i}-{j}", "finish_reason": "stop", "num_tokens": 3} for j in range(2)]} for i in range(6)]
    candidates = write(tmp_path / "candidates.jsonl", rows)
    cache = tmp_path / "judge-cache"

    def args(out: str, url: str, cache: Path | str = cache) -> list[str]:
        return ["judge", "--candidates", str(candidates), "--out", str(tmp_path / out), "--judge", "llm",
                "--judge-model", "m", "--judge-backend", "openai", "--base-url", url, "--api-key-env", KEY_ENV,
                "--mode", "pointwise", "--cache", str(cache), "--chunk-size", "2", "--parse-retries", "0",
                "--judge-engine", '{"max_retries": 1, "ready_timeout": 20, "concurrency": 2}']

    with FakeServer(expected_key=SECRET) as server:
        server.script = echoing({"answer-1-0": [echo_400], "answer-2-1": [echo_503] * 2, "answer-3-0": [echo_429],
                                 "answer-4-1": [echo_garbage]}, then=pointwise)
        first = cli(*args("judgments.jsonl", server.url))
        assert first.returncode == 0, first.stderr[-3000:]
        judged = {r["id"]: r["statuses"] for r in read_records(tmp_path / "judgments.jsonl")}
        assert judged["r1"] == ["error", "ok"] and judged["r2"] == ["ok", "error"] and judged["r3"] == ["ok", "ok"]

        served = {"n": 0}

        def revoke_after_first_chunk(req):
            served["n"] += 1
            return pointwise(req) if served["n"] <= 4 else echo_401(req)

        server.script = revoke_after_first_chunk
        revoked = cli(*args("again.jsonl", server.url, cache="off"))  # (cached answers would need no request)
        assert revoked.returncode == 2 and "refused the API key (HTTP 401" in revoked.stderr
        assert [r["id"] for r in read_records(tmp_path / "again.jsonl")] == ["r0", "r1"]  # the first chunk is kept

        server.models_reply = echo_401(Request("/v1/models", {}, {"authorization": f"Bearer {SECRET}"}, 0, 0))
        at_start = cli(*args("third.jsonl", server.url, cache="off"))
        assert at_start.returncode == 2 and "refused the API key" in at_start.stderr
    assert any(cache.rglob("*")), "the judge cache was not written: it would not have been checked"
    assert "<api key>" in first.stderr and "<api key>" in revoked.stderr
    assert leaks(tmp_path, first.stdout, first.stderr, revoked.stdout, revoked.stderr, at_start.stdout,
                 at_start.stderr) == []


@pytest.mark.parametrize("key", [SECRET + "\n", f"  {SECRET}\r\n"], ids=["trailing-newline", "padded"])
def test_a_key_read_with_its_newline_is_used_without_it(key, monkeypatch):
    """A key exported from a file with its newline (or padded with spaces) is sent without the whitespace -- a
    header with a newline is refused by the HTTP library, whose error would quote the key -- and works."""
    monkeypatch.setenv(KEY_ENV, key)
    with FakeServer(expected_key=SECRET) as server:
        gen = OpenAIGenerator("m", base_url=server.url, api_key_env=KEY_ENV, ready_timeout=5)
        gen.close()
        assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {SECRET}"]


def test_a_key_with_a_control_character_inside_fails_without_quoting_it(monkeypatch):
    """A key with a newline in the middle cannot be sent; the error names the variable and never the key."""
    monkeypatch.setenv(KEY_ENV, SECRET[:10] + "\n" + SECRET[10:])
    with FakeServer() as server, pytest.raises(ValueError, match=f"\\${KEY_ENV} has a control character") as info:
        OpenAIGenerator("m", base_url=server.url, api_key_env=KEY_ENV, ready_timeout=5)
    assert SECRET[:10] not in str(info.value) and SECRET[10:] not in str(info.value)
    assert server.requests == []


# -- the loop ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_inputs(tmp_path_factory) -> Path:
    from prefloop.demo.tiny import save_tiny
    from prefloop.store import dumps
    from prefloop.tasks.addition import make_prompts

    d = tmp_path_factory.mktemp("secret-loop")
    save_tiny(d / "model")
    (d / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(8, 0, "train")))
    (d / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(3, 0, "heldout")))
    return d


def by_choice(req: Request) -> Reply:
    """A pointwise judge that scores the fake server's `s<seed>c<j>` completions j, so every prompt makes pairs."""
    text = prompt_text(req)
    response = text.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
    return chat_answer(f"Score: {int(response[-1]) if response[-1:].isdigit() else 0}")


def loop_config(inputs: Path, run_dir: Path, url: str) -> Path:
    import yaml

    config = {
        "out": str(run_dir), "model": str(inputs / "model"), "prompts": str(inputs / "prompts.jsonl"),
        "eval_prompts": str(inputs / "heldout.jsonl"), "rounds": 1, "prompts_per_round": 8,
        "gen": {"backend": "openai", "base_url": url, "api_key_env": KEY_ENV, "n": 3, "max_new_tokens": 8,
                "concurrency": 4, "max_retries": 2, "ready_timeout": 20},
        "judge": {"judge": "llm", "judge_model": "m", "judge_backend": "openai", "base_url": url,
                  "api_key_env": KEY_ENV, "mode": "pointwise", "cache": str(run_dir.parent / "cache"),
                  "judge_engine": {"max_retries": 2, "ready_timeout": 20}},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 2, "batch_size": 4, "save_steps": 1, "logging_steps": 1, "lora_r": 4,
                  "gradient_checkpointing": False, "dtype": "float32"},
    }
    path = run_dir.parent / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("phase", ["generate", "judge"])
def test_a_loop_whose_server_refuses_the_key_records_the_failure_without_it(loop_inputs, tmp_path, phase):
    """`prefloop run` with gen and judge on the openai backend; in round 1 the server answers 401 echoing the key
    to the generate (or the judge) phase: the run stops, the manifest and report record the failed phase, and
    neither they nor anything else in the run directory, the log or the error carries the key."""
    run_dir = tmp_path / "run"
    train = [r["prompt"] for r in read_records(loop_inputs / "prompts.jsonl")]
    kind = {"generate": "prompt", "judge": "messages"}[phase]  # generation sends raw text, the judge messages

    def refuse_round_1(req: Request) -> Reply | None:  # round 0 (the held-out baseline) is served
        if kind in req.body and any(p in prompt_text(req) for p in train):
            return echo_401(req)
        return by_choice(req) if "messages" in req.body else None

    with FakeServer(expected_key=SECRET) as server:
        server.script = refuse_round_1
        result = cli("run", "--config", str(loop_config(loop_inputs, run_dir, server.url)))
    assert result.returncode == 2, result.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["rounds"][0]["phases"]["eval"]["status"] == "done"
    failed = manifest["rounds"][1]["phases"][phase]
    assert failed["status"] == "failed" and "<api key>" in failed["error"]
    assert "<api key>" in result.stderr and (run_dir / "report.md").exists()
    assert leaks(tmp_path, result.stdout, result.stderr) == []


@pytest.mark.slow
def test_a_loop_round_through_an_echoing_server_keeps_the_key_out_of_the_run(loop_inputs, tmp_path):
    """A whole round (generate, judge, pairs, DPO training on the tiny model, held-out eval with the round's
    adapter loaded into the server) against a server whose transient errors echo the key: the round completes
    and no file of the run (checkpoints, adapter, manifest, report, configs, summaries, cache), no log line and
    no output carries the key."""
    run_dir = tmp_path / "run"
    transient = echoing({"0+": [echo_503], "3+": [echo_429], "7": [echo_garbage]},
                        then=lambda req: by_choice(req) if "messages" in req.body else None)
    with FakeServer(expected_key=SECRET) as server:
        server.script = transient
        result = cli("run", "--config", str(loop_config(loop_inputs, run_dir, server.url)))
        loaded = [r for r in server.requests if r.path.endswith("load_lora_adapter")]
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["rounds"][1]["phases"]["train"]["status"] == "done"
    assert loaded and (run_dir / "round_001" / "train" / "checkpoints").is_dir()
    assert "<api key>" in result.stderr
    assert leaks(tmp_path, result.stdout, result.stderr) == []
