"""The openai backend against a scripted loopback server (tests/gen/fake_server.py): faults injected per request.

Each stage-level test also checks the bookkeeping: every prompt is in the output exactly once, or counted as failed
in the summary (and a re-run fills it in) -- never written twice, never silently missing.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from email.utils import formatdate
from pathlib import Path

import pytest
from fake_server import FakeServer, Reply, error

from prefloop.gen import GenerationAborted, Sampling
from prefloop.gen import openai as oa
from prefloop.gen.openai import OpenAIGenerator
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.runstate import read_summary
from prefloop.store import read_records

CHAT = [{"role": "user", "content": "p-chat"}]
PROMPTS = {"p0": "p0", "p1": "p1", "p2": "p2", "p3": "p3", "p4": CHAT}
KEY_ENV = "PREFLOOP_TEST_OPENAI_KEY"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Millisecond backoff, so retry tests take no time (Retry-After waits are still honoured); no key set."""
    monkeypatch.setattr(oa, "BACKOFF_BASE", 0.01)
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def config(tmp_path: Path, server: FakeServer, prompts: dict | None = None, **kw) -> GenerateConfig:
    prompts = PROMPTS if prompts is None else prompts
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in prompts.items()))
    options = dict(model="m", prompts=str(path), out=str(tmp_path / "c.jsonl"), backend="openai", n=2,
                   base_url=server.url, api_key_env=KEY_ENV, max_new_tokens=8, request_timeout=5.0,
                   max_retries=3, ready_timeout=5.0, concurrency=4, max_failed_fraction=0.5)
    return GenerateConfig(**{**options, **kw})


def check_exactly_once(out: Path, ids: list[str], failed: int = 0) -> list[dict]:
    """Every id once in `out`, or counted as failed in the summary; returns the rows."""
    rows = read_records(out)
    written = [r["id"] for r in rows]
    assert len(written) == len(set(written)), "a prompt was written twice"
    summary = read_summary(out)
    assert summary["failed"] == failed and summary["written"] == len(written)
    assert set(written) <= set(ids)
    assert len(written) + summary["failed"] == len(ids), "a prompt went missing"
    assert all(len(r["completions"]) == 2 for r in rows)
    return rows


def attempts(server: FakeServer, prompt) -> list:
    return [r for r in server.generation_requests() if r.prompt == prompt]


# -- transient faults: retried, then every prompt lands once -----------------------------------------------------

TRANSIENT = {
    "500s": [error(500, "boom"), error(502, "bad gateway"), error(503, "overloaded")],
    "408/409": [error(408, "request timeout"), error(409, "lock conflict")],
    "429": [error(429, "rate limited", code="rate_limit_exceeded")],
    "hang": [Reply(hang=60.0)],  # longer than the request timeout (2 s for this case)
    "reset mid-response": [Reply(reset=True)],
    "garbage json": [Reply(raw=b'{"choices": [{"tex', headers={"Content-Type": "application/json"})],
    "html body": [Reply(raw=b"<html>502 bad gateway</html>")],
    "wrong shape": [Reply(json={"hello": "world"})],
}


@pytest.mark.parametrize("fault", TRANSIENT, ids=list(TRANSIENT))
def test_transient_faults_are_retried_then_succeed(tmp_path, server, fault):
    """Connection resets, timeouts, bad bodies and 408/409/429/5xx are retried; the prompt then succeeds and the
    stage writes every prompt exactly once."""
    faults = TRANSIENT[fault]
    server.script = lambda r: faults[r.attempt] if r.prompt == "p1" and r.attempt < len(faults) else None
    started = time.monotonic()
    # 5 s per request (2 s for the hang): a loaded CI box must not time out the healthy requests and retry them.
    out = generate(config(tmp_path, server, request_timeout=2.0 if fault == "hang" else 5.0))
    check_exactly_once(out, list(PROMPTS))
    assert len(attempts(server, "p1")) == len(faults) + 1
    assert all(len(attempts(server, p)) == 1 for p in ("p0", "p2", "p3"))
    assert time.monotonic() - started < 30  # a hang costs one request timeout, not the server's 60 s


def test_retry_after_is_honoured(tmp_path, server):
    """429 with `Retry-After: 1`: the retry comes no sooner than 1 s later (backoff alone would be ~10 ms)."""
    server.script = lambda r: (error(429, "slow down", headers={"Retry-After": "1"})
                               if r.prompt == "p1" and r.attempt == 0 else None)
    out = generate(config(tmp_path, server))
    first, second = attempts(server, "p1")
    assert 1.0 <= second.t - first.t < 3
    check_exactly_once(out, list(PROMPTS))


def test_retry_after_formats():
    """Seconds, milliseconds (`retry-after-ms` wins) and HTTP dates; junk means no hint."""
    assert oa.retry_after({"retry-after": "3"}) == 3.0
    assert oa.retry_after({"retry-after": "3", "retry-after-ms": "250"}) == 0.25
    assert 8 <= oa.retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert oa.retry_after({"retry-after": formatdate(time.time() - 10, usegmt=True)}) == 0.0
    assert oa.retry_after({"retry-after": "soon"}) is None and oa.retry_after({}) is None


def test_hung_request_times_out_and_retries(server):
    """A request the server never answers is abandoned after `timeout` and retried."""
    server.script = lambda r: Reply(hang=60.0) if r.attempt == 0 else None
    gen = OpenAIGenerator("m", base_url=server.url, timeout=2.0, max_retries=2)
    started = time.monotonic()
    out = gen.generate(["a", "b"], n=1, sampling=Sampling())
    gen.close()
    assert all(cs is not None for cs in out) and len(server.generation_requests()) == 4
    assert 2.0 <= time.monotonic() - started < 30  # one timeout, then the retries answer at once


def test_retries_exhausted_fail_the_prompt_and_a_rerun_fills_it_in(tmp_path, server, caplog):
    """After max_retries the prompt is None (logged with its reason, counted in the summary, not written);
    re-running once the server is healthy writes just that prompt."""
    server.script = lambda r: error(503, "overloaded") if r.prompt == "p2" else None
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        out = generate(config(tmp_path, server, max_retries=2))
    assert len(attempts(server, "p2")) == 3
    assert "prompt 2 failed: HTTP 503" in caplog.text and "after 2 retries" in caplog.text
    check_exactly_once(out, list(PROMPTS), failed=1)
    assert read_summary(out)["status"] == "incomplete"
    before = out.read_bytes()
    server.script = lambda r: None
    generate(config(tmp_path, server, max_retries=2))
    assert out.read_bytes().startswith(before)  # records on disk kept byte for byte
    check_exactly_once(out, list(PROMPTS))
    assert len(attempts(server, "p2")) == 4 and len(attempts(server, "p0")) == 1


def test_other_4xx_is_not_retried(tmp_path, server):
    """A 400 (e.g. prompt too long) fails that prompt at once; the others are written."""
    server.script = lambda r: error(400, "prompt is too long") if r.prompt == "p3" else None
    out = generate(config(tmp_path, server))
    assert len(attempts(server, "p3")) == 1
    check_exactly_once(out, list(PROMPTS), failed=1)


# -- fatal errors ---------------------------------------------------------------------------------------------


def test_insufficient_quota_stops_without_retry_and_keeps_finished(tmp_path, server):
    """`insufficient_quota` (a 429) is not retried: the stage fails naming the billing problem, the prompts
    finished before it are on disk, and a re-run after the fix writes the rest exactly once."""
    quota = error(429, "You exceeded your current quota, please check your plan and billing details.",
                  code="insufficient_quota", type="insufficient_quota")
    server.script = lambda r: quota if r.prompt == "p3" else None
    cfg = config(tmp_path, server, concurrency=1, chunk_size=2)  # chunks [p0 p1] [p2 p3] [p4], in order
    with pytest.raises(RuntimeError, match=r"out of quota.*insufficient_quota.*billing.*PREFLOOP_TEST_OPENAI_KEY"):
        generate(cfg)
    assert [r.prompt for r in server.generation_requests()] == ["p0", "p1", "p2", "p3"]  # no retry, no p4
    out = Path(cfg.out)
    assert [r["id"] for r in read_records(out)] == ["p0", "p1", "p2"]
    before = out.read_bytes()
    server.script = lambda r: None
    generate(cfg)
    assert out.read_bytes().startswith(before)
    check_exactly_once(out, list(PROMPTS))
    assert len(server.generation_requests()) == 6  # p3 again, then p4


def test_fatal_error_cancels_requests_in_flight(server):
    """With requests in flight, a fatal reply aborts the call at once; `partial` holds the prompts that finished."""
    slow = Reply(hang=3.0)  # a normal reply after 3 s (or when the server closes)
    server.script = lambda r: error(429, "quota", code="insufficient_quota") if r.prompt == "x" else slow
    gen = OpenAIGenerator("m", base_url=server.url, concurrency=2, timeout=5)
    started = time.monotonic()
    with pytest.raises(GenerationAborted, match="out of quota") as info:
        gen.generate(["q0", "x"] + [f"q{i}" for i in range(1, 10)], n=1, sampling=Sampling())
    assert time.monotonic() - started < 2  # q0 was not waited for
    gen.close()
    assert info.value.partial == [None] * 11
    assert [r.prompt for r in server.generation_requests()] in (["q0", "x"], ["x", "q0"])


def test_401_at_readiness_is_fatal_at_once(tmp_path, monkeypatch):
    """A server refusing the key on /models fails the stage immediately, naming the environment variable."""
    monkeypatch.setenv(KEY_ENV, "wrong")
    with FakeServer(expected_key="right") as server:
        started = time.monotonic()
        with pytest.raises(PermissionError, match=f"refused the API key.*{KEY_ENV}"):
            generate(config(tmp_path, server))
        assert time.monotonic() - started < 1 and len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_during_generation_is_fatal(tmp_path, server, status):
    """401/403 on a completion request is not a per-prompt failure: the stage stops, naming the variable."""
    server.script = lambda r: error(status, "key revoked") if r.prompt == "p1" else None
    with pytest.raises(RuntimeError, match=f"refused the API key.*HTTP {status}.*{KEY_ENV}"):
        generate(config(tmp_path, server, concurrency=1))
    assert len(attempts(server, "p1")) == 1
    assert [r["id"] for r in read_records(tmp_path / "c.jsonl")] == ["p0"]


def test_unknown_model_is_fatal(server):
    """404 (vLLM's answer to an unknown model name) would fail every prompt the same way: stop at once."""
    server.script = lambda r: error(404, "The model `nope` does not exist.", type="NotFoundError")
    gen = OpenAIGenerator("nope", base_url=server.url, concurrency=1)
    with pytest.raises(GenerationAborted, match="answered 404 for model 'nope'.*Fix: use a model name"):
        gen.generate(["a", "b", "c"], n=1, sampling=Sampling())
    gen.close()
    assert len(server.generation_requests()) == 1


def test_logprobs_missing_from_replies_is_fatal(server):
    """Logprobs asked of a server that ignores them (transformers serve): a clear error, not silent omission."""
    def no_logprobs(r):
        body = server.normal_reply(r).json
        for c in body["choices"]:
            c["logprobs"] = None
        return Reply(json=body)

    server.script = no_logprobs
    gen = OpenAIGenerator("m", base_url=server.url)
    with pytest.raises(GenerationAborted, match="returned none"):
        gen.generate(["a"], n=1, sampling=Sampling(logprobs=True))
    gen.close()


# -- readiness ------------------------------------------------------------------------------------------------


def test_waits_for_a_server_that_starts_late(tmp_path):
    """The stage polls until the server listens (1 s late here), then generates everything."""
    with FakeServer(start_after=1.0) as server:
        started = time.monotonic()
        out = generate(config(tmp_path, server))
        assert time.monotonic() - started >= 1.0
        assert server.requests[0].path == "/v1/models"
    check_exactly_once(out, list(PROMPTS))


def test_readiness_deadline_names_url_and_last_error(tmp_path):
    """A server that never listens: TimeoutError after ready_timeout, naming the URL and what was seen."""
    with FakeServer(start_after=None) as server:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"{server.url} was not ready within 1 s.*/v1/models: ConnectError"):
            generate(config(tmp_path, server, ready_timeout=1.0))
        assert 1.0 <= time.monotonic() - started < 4
    assert not (tmp_path / "c.jsonl").exists() or not read_records(tmp_path / "c.jsonl")


def test_readiness_falls_back_to_health(server):
    """A server without /models (404) is ready when /health at its root answers 200."""
    server.models_reply = error(404, "no such route")
    gen = OpenAIGenerator("m", base_url=server.url)
    gen.close()
    assert [r.path for r in server.requests] == ["/v1/models", "/health"]


# -- n, seeds, parameters ---------------------------------------------------------------------------------------


def test_server_ignoring_n_is_topped_up_with_new_seeds(tmp_path, server):
    """One choice per reply: the backend asks again for the rest, each time with another seed, until n."""
    server.max_choices = 1
    out = generate(config(tmp_path, server, n=3))
    rows = read_records(out)
    assert len(rows) == len(PROMPTS) and all(len(r["completions"]) == 3 for r in rows)
    for prompt in PROMPTS.values():
        sent = attempts(server, prompt)
        assert [r.body["n"] for r in sent] == [3, 2, 1]
        assert len({r.body["seed"] for r in sent}) == 3
    for r in rows:
        assert len({c["text"] for c in r["completions"]}) == 3
        assert all(c["num_tokens"] == len(c["text"]) + 1 for c in r["completions"])  # from usage: one choice


def test_greedy_server_is_flagged(server, caplog):
    """A server that ignores temperature (transformers serve without do_sample) gives n identical samples: warned."""
    server.max_choices = 1
    server.script = lambda r: Reply(json={**server.normal_reply(r).json,
                                          "choices": [{"index": 0, "text": "same", "finish_reason": "stop"}]})
    gen = OpenAIGenerator("m", base_url=server.url)
    with caplog.at_level(logging.WARNING, logger="prefloop"):
        gen.generate(["a", "b"], n=3, sampling=Sampling())
    gen.close()
    assert "are identical: the server seems to decode greedily" in caplog.text


def test_more_choices_than_asked_are_cut_to_n(server):
    """A server returning more choices than `n` asked for: the first n are kept."""
    server.script = lambda r: Reply(choices=5)
    gen = OpenAIGenerator("m", base_url=server.url)
    out = gen.generate(["a", "b"], n=2, sampling=Sampling())
    gen.close()
    assert [[c["text"][-2:] for c in cs] for cs in out] == [["c0", "c1"], ["c0", "c1"]]


def test_replies_without_choices_fail_the_prompt(tmp_path, server):
    """A server that keeps returning no choices fails that prompt after a bounded number of tries (counted)."""
    server.script = lambda r: Reply(choices=0) if r.prompt == "p1" else None
    out = generate(config(tmp_path, server))
    assert len(attempts(server, "p1")) == oa.EMPTY_REPLIES_MAX
    check_exactly_once(out, list(PROMPTS), failed=1)
    server.script = lambda r: None
    generate(config(tmp_path, server))
    check_exactly_once(out, list(PROMPTS))


def test_request_parameters(server):
    """Sampling maps onto the API: max_tokens, temperature, top_p, stop, n; a seed per prompt (the same on a
    repeat call), raw text to /completions and messages to /chat/completions."""
    gen = OpenAIGenerator("m", base_url=server.url)
    sampling = Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3, stop=["\n", "END"])
    gen.generate(["a", "b", CHAT], n=2, sampling=sampling)
    gen.generate(["a", "b", CHAT], n=2, sampling=sampling)
    gen.close()
    sent = server.generation_requests()
    assert sorted(r.path for r in sent[:3]) == ["/v1/chat/completions"] + ["/v1/completions"] * 2
    for r in sent:
        assert r.body["model"] == "m" and r.body["max_tokens"] == 5 and r.body["n"] == 2
        assert r.body["temperature"] == 0.7 and r.body["top_p"] == 0.9 and r.body["stop"] == ["\n", "END"]
        assert "logprobs" not in r.body
    first, again = ({json.dumps(r.prompt): r.body["seed"] for r in half} for half in (sent[:3], sent[3:]))
    assert len(set(first.values())) == 3 and first == again
    assert next(r for r in sent if "messages" in r.body).body["messages"] == CHAT


def test_greedy_asks_once_and_copies(server):
    """temperature 0: one greedy completion per prompt (temperature=0, n=1 on the wire), copied n times."""
    gen = OpenAIGenerator("m", base_url=server.url)
    out = gen.generate(["a"], n=3, sampling=Sampling(temperature=0.0))
    gen.close()
    (req,) = server.generation_requests()
    assert req.body["temperature"] == 0 and req.body["n"] == 1
    assert out[0][0] == out[0][1] == out[0][2] and out[0][0] is not out[0][1]


def test_logprobs_and_num_tokens(server):
    """logprobs: completions ask `logprobs=0`, chat `logprobs=true`; each completion keeps its tokens' log-probs
    and num_tokens = their count. Without logprobs, num_tokens comes from usage only for single-choice replies."""
    gen = OpenAIGenerator("m", base_url=server.url)
    out = gen.generate(["a", CHAT], n=2, sampling=Sampling(logprobs=True))
    assert [r.body["logprobs"] for r in server.generation_requests()] == [0, True]
    for c in out[0] + out[1]:
        assert c["logprobs"] == [-0.25] * (len(c["text"]) + 1) and c["num_tokens"] == len(c["text"]) + 1
    many = gen.generate(["a"], n=2, sampling=Sampling())
    one = gen.generate(["a"], n=1, sampling=Sampling())
    gen.close()
    assert [c["num_tokens"] for c in many[0]] == [None, None] and "logprobs" not in many[0][0]
    assert one[0][0]["num_tokens"] == len(one[0][0]["text"]) + 1
    assert gen.tokens_generated > 0


def test_finish_reasons_are_normalised(server):
    """`length` stays; any other normal ending (eos, stop_sequence, stop) becomes `stop`."""
    server.finish_reasons = ["eos", "length", "stop_sequence", "stop"]
    gen = OpenAIGenerator("m", base_url=server.url)
    out = gen.generate(["a"], n=4, sampling=Sampling())
    gen.close()
    assert [c["finish_reason"] for c in out[0]] == ["stop", "length", "stop", "stop"]


def test_endpoint_choice(server):
    """endpoint=chat wraps raw text as one user message; endpoint=completions refuses messages before any
    request, with the fix."""
    gen = OpenAIGenerator("m", base_url=server.url, endpoint="chat")
    gen.generate(["hello"], n=1, sampling=Sampling())
    gen.close()
    (req,) = server.generation_requests()
    assert req.path == "/v1/chat/completions" and req.body["messages"] == [{"role": "user", "content": "hello"}]
    gen = OpenAIGenerator("m", base_url=server.url, endpoint="completions")
    with pytest.raises(ValueError, match="prompt 1 is a message list.*Fix: use endpoint auto or chat"):
        gen.generate(["ok", CHAT], n=1, sampling=Sampling())
    gen.close()
    assert len(server.generation_requests()) == 1


def test_chat_max_tokens_refused_switches_to_max_completion_tokens(server):
    """OpenAI's newer models refuse chat `max_tokens`, naming it: switch to `max_completion_tokens` for good."""
    refusal = error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                    "'max_completion_tokens' instead.", code="unsupported_parameter", param="max_tokens")
    server.script = lambda r: refusal if "max_tokens" in r.body and "messages" in r.body else None
    gen = OpenAIGenerator("m", base_url=server.url, concurrency=1)
    out = gen.generate([CHAT, CHAT, "raw"], n=1, sampling=Sampling(max_new_tokens=7))
    gen.close()
    assert all(cs is not None for cs in out)
    chat = [r.body for r in server.generation_requests() if "messages" in r.body]
    assert [("max_tokens" in b, b.get("max_completion_tokens")) for b in chat] == [(True, None), (False, 7),
                                                                                    (False, 7)]
    raw = [r.body for r in server.generation_requests() if "prompt" in r.body]
    assert [b["max_tokens"] for b in raw] == [7]  # /completions keeps max_tokens


def test_concurrency_is_bounded(server):
    """No more than `concurrency` requests are in flight at once (counted by the server)."""
    server.latency = 0.1
    gen = OpenAIGenerator("m", base_url=server.url, concurrency=3)
    gen.generate([f"q{i}" for i in range(12)], n=1, sampling=Sampling())
    gen.close()
    assert server.max_inflight == 3


def test_failure_ceiling_stops_the_stage(tmp_path, server):
    """Every request failing: the stage stops after the first chunk that crosses max_failed_fraction."""
    server.script = lambda r: error(500, "down")
    prompts = {f"p{i}": f"p{i}" for i in range(8)}
    with pytest.raises(RuntimeError, match="8 prompts failed|4 of 8 prompts failed, over the ceiling"):
        generate(config(tmp_path, server, prompts, chunk_size=4, max_failed_fraction=0.25, max_retries=1))
    assert sorted({r.prompt for r in server.generation_requests()}) == ["p0", "p1", "p2", "p3"]
    assert len(server.generation_requests()) == 4 * 2
    # Nothing was made, so nothing is left behind: the same command after a fix starts fresh.
    assert not (tmp_path / "c.jsonl").exists()


# -- adapters, keys, lifecycle ----------------------------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path) -> Path:
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


def test_adapter_is_loaded_and_requested_by_name(server, adapter):
    """The adapter is loaded through /v1/load_lora_adapter under a name derived from its path, then requested
    by that name; loading it again ("already loaded") is fine; new weights at the same path get a new name."""
    gen = OpenAIGenerator("m", adapter=str(adapter), base_url=server.url)
    gen.generate(["a"], n=1, sampling=Sampling())
    gen.close()
    load = next(r for r in server.requests if r.path == "/v1/load_lora_adapter")
    name = oa.adapter_name(adapter)
    assert load.body == {"lora_name": name, "lora_path": str(adapter.resolve())} and name.startswith("prefloop-")
    assert server.generation_requests()[0].body["model"] == name and gen.name == f"m+adapter:{adapter}"
    server.lora_reply = error(400, f"The lora adapter '{name}' has already been loaded.")
    OpenAIGenerator("m", adapter=str(adapter), base_url=server.url).close()
    time.sleep(0.01)
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained weights")
    assert oa.adapter_name(adapter) != name


@pytest.mark.parametrize("reply", [error(404, "Not Found"), error(400, "LoRA is not enabled")])
def test_adapter_refused_explains_both_fixes(server, adapter, reply):
    """A server that cannot load adapters at runtime: the error gives both fixes (runtime LoRA, or merge)."""
    server.lora_reply = reply
    with pytest.raises(RuntimeError, match=r"did not load adapter.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.*"
                                           r"--enable-lora --max-lora-rank.*--merge"):
        OpenAIGenerator("m", adapter=str(adapter), base_url=server.url)


def test_api_key_never_logged_or_written(tmp_path, monkeypatch, caplog, capfd):
    """The key is sent (the server checks it) but appears in no file, log record, output or exception -- even
    when the server echoes it back in error messages on failing and fatal paths."""
    secret = "sk-SENTINEL-7f3a9c1d2e"
    monkeypatch.setenv(KEY_ENV, secret)
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included

    def echo(r):
        if r.prompt == "p1":
            return error(400, f"bad request with {r.headers['authorization']}")
        if r.prompt == "p2":
            return error(503, f"overloaded; you sent {r.headers['authorization']}")
        return None

    with FakeServer(expected_key=secret) as server:
        server.script = echo
        out = generate(config(tmp_path, server, max_retries=1, max_failed_fraction=1.0))
        check_exactly_once(out, list(PROMPTS), failed=2)
        server.script = lambda r: error(401, f"revoked: {r.headers['authorization']}")
        with pytest.raises(RuntimeError) as info:
            generate(config(tmp_path, server))
        assert all(r.headers["authorization"] == f"Bearer {secret}" for r in server.requests)
    text = "".join(traceback.format_exception(info.value)) + caplog.text + "".join(capfd.readouterr())
    assert "<api key>" in text and secret not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_api_openai_com_needs_a_key():
    """No key for api.openai.com fails before any request, naming the variable (local servers get a placeholder)."""
    with pytest.raises(ValueError, match=f"needs an API key and \\${KEY_ENV} is not set"):
        OpenAIGenerator("gpt-4o-mini", base_url="https://api.openai.com/v1", api_key_env=KEY_ENV)


def test_close_closes_the_client(server):
    """close() closes the HTTP client and stops the loop thread; it is idempotent; generate afterwards refuses."""
    gen = OpenAIGenerator("m", base_url=server.url)
    client = gen._client
    gen.close()
    gen.close()  # idempotent
    assert client.is_closed() and not gen._thread.is_alive()
    with pytest.raises(RuntimeError, match="after close"):
        gen.generate(["a"], n=1, sampling=Sampling())
