"""API cost and budget (prefloop/budget.py) through the generate stage and the openai backend, against the scripted
loopback server (tests/fake_server.py), whose replies carry `usage`: prompt_tokens = the prompt's characters,
completion_tokens = each choice's characters + 1. Costs and limits are injected, so the fake is what is tested.

The contract: the summary's token counts are the sum of the server's usage fields; cost is tokens x the user's
price; `--dry-run` prints the estimate and touches nothing; `--max-budget-usd` stops at the chunk a hand
computation predicts, exit 2 with one line, keeping everything finished; a higher budget resumes, and the output
is byte-for-byte an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fake_server import FakeServer, Reply

from prefloop.budget import Meter, in_run, usd
from prefloop.cli import main
from prefloop.errors import BudgetExceeded
from prefloop.gen import encode_prompt
from prefloop.gen import openai as oa
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.runstate import read_summary
from prefloop.store import read_records

KEY_ENV = "PREFLOOP_TEST_BUDGET_KEY"
IN, OUT = 1000.0, 100.0  # USD per million tokens: $0.001 per prompt token, $0.0001 per completion token
PROMPTS = {f"p{i}": f"prompt {i}: " + "x" * (40 - len(f"prompt {i}: ")) for i in range(6)}  # 40 characters each


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(oa, "BACKOFF_BASE", 0.01)
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def prompts_file(tmp_path: Path, prompts: dict) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in prompts.items()))
    return path


def prices_file(tmp_path: Path, model: str = "m", inp: float = IN, out: float = OUT) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(f"{model}: {{input_per_mtok: {inp}, output_per_mtok: {out}}}\n")
    return path


def flags(tmp_path: Path, server: FakeServer, out: str = "c.jsonl", **kw) -> list[str]:
    """`prefloop generate` flags: 6 prompts of 40 characters, n=2, chunks of 2, one request at a time."""
    options = {"model": "m", "prompts": prompts_file(tmp_path, PROMPTS), "out": tmp_path / out, "backend": "openai",
               "base-url": server.url, "api-key-env": KEY_ENV, "n": 2, "max-new-tokens": 16, "chunk-size": 2,
               "concurrency": 1, "ready-timeout": 5, "request-timeout": 5, **kw}
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


def sent_usage(server: FakeServer) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, replies) as the server's own log says it reported them."""
    replies = [r.reply.json for r in server.generation_requests() if r.reply is not None and r.reply.status == 200]
    return (sum(r["usage"]["prompt_tokens"] for r in replies), sum(r["usage"]["completion_tokens"] for r in replies),
            len(replies))


def error_lines(capsys) -> list[str]:
    """The command's error lines on stderr (progress lines go there too, without a terminal)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("prefloop ")]


def cost(prompt_tokens: int, completion_tokens: int, inp: float = IN, out: float = OUT) -> float:
    return (prompt_tokens * inp + completion_tokens * out) / 1e6


def test_summary_counts_the_servers_usage_and_prices_it(tmp_path, server, capsys):
    """The summary's prompt/completion tokens and requests are the sums of the usage the server sent; cost_usd is
    those sums at the price table's rates."""
    assert main(["generate", *flags(tmp_path, server, prices=prices_file(tmp_path))]) == 0
    usage = read_summary(tmp_path / "c.jsonl")["usage"]
    prompt_tokens, completion_tokens, replies = sent_usage(server)
    assert prompt_tokens == 6 * 40 and replies == 6  # one request per prompt, n=2 in it
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["requests"]) == (
        prompt_tokens, completion_tokens, replies)
    assert usage["partial"] is False and usage["models"]["m"]["requests"] == 6
    assert usage["cost_usd"] == pytest.approx(cost(prompt_tokens, completion_tokens), abs=1e-8)


def test_a_server_that_omits_usage_is_counted_as_far_as_known_and_marked_partial(tmp_path, server):
    """Replies without `usage`: their completion tokens come from the choices' own counts (log-probs), their prompt
    tokens are unknown; the count says partial, and `cost_usd_max` charges the unknown at its worst case."""
    def no_usage(req):
        if req.prompt != PROMPTS["p1"]:
            return None
        body = server.normal_reply(req).json
        del body["usage"]
        return Reply(json=body)

    server.script = no_usage
    cfg = GenerateConfig(model="m", prompts=str(prompts_file(tmp_path, PROMPTS)), out=str(tmp_path / "c.jsonl"),
                         backend="openai", base_url=server.url, api_key_env=KEY_ENV, n=2, max_new_tokens=16,
                         logprobs=True, prices={"m": {"input_per_mtok": IN, "output_per_mtok": OUT}})
    usage = read_summary(generate(cfg))["usage"]
    with_usage = [r.reply.json["usage"] for r in server.generation_requests() if "usage" in r.reply.json]
    p1 = next(r for r in server.generation_requests() if r.prompt == PROMPTS["p1"]).reply.json
    p1_completion = sum(len(c["text"]) + 1 for c in p1["choices"])  # one log-prob per character, plus EOS
    assert len(with_usage) == 5 and usage["partial"] is True and usage["requests_without_usage"] == 1
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in with_usage)  # p1's prompt: unknown, not guessed
    assert usage["completion_tokens"] == sum(u["completion_tokens"] for u in with_usage) + p1_completion
    assert usage["models"]["m"]["unreported_prompt_tokens_max"] == math.ceil(40 / 4)
    assert usage["cost_usd_max"] == pytest.approx(usage["cost_usd"] + cost(10, 0), abs=1e-8)


def test_dry_run_prints_the_hand_computed_estimate_and_writes_nothing(tmp_path, capsys):
    """No tokenizer for a server's model name: prompt tokens at chars/4, rounded up per prompt. Nothing is sent
    (no server even listens) and nothing is written, not even a lock file."""
    prompts = {"a": "abcdefghij", "b": "hi", "c": [{"role": "user", "content": "hello world!"}]}  # 10, 2, 12 chars
    path = prompts_file(tmp_path, prompts)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["generate", "--model", "m", "--prompts", str(path), "--out", str(tmp_path / "out" / "c.jsonl"),
                 "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--n", "3", "--max-new-tokens", "5",
                 "--prices", "{m: {input_per_mtok: 2, output_per_mtok: 4}}", "--max-budget-usd", "1", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == before
    prompt_tokens = 3 + 1 + 3  # ceil(10/4), ceil(2/4), ceil(12/4)
    completion = 5 * 3 * 3  # max_new_tokens x n x prompts
    assert "3 to generate (0 already in" in printed and "3 requests, 9 completions" in printed
    assert f"prompt tokens: {prompt_tokens} (chars/4" in printed
    assert f"completion tokens: at most {completion} " in printed
    low, high = cost(prompt_tokens, 0, 2, 4), cost(prompt_tokens, completion, 2, 4)
    assert (low, high) == (0.000014, 0.000194)
    assert f"cost: {usd(low)} to {usd(high)}" in printed and "$0.000014 to $0.000194" in printed
    assert "max_budget_usd $1" in printed and "fits" in printed


def test_dry_run_counts_with_the_models_tokenizer_when_it_is_local(tmp_path, tiny_model, capsys):
    """A model directory on this machine: its tokenizer counts the prompt tokens, chat template included."""
    from transformers import AutoTokenizer

    prompts = {"a": "abcdefghij", "c": [{"role": "user", "content": "hello world!"}]}
    cfg = GenerateConfig(model=str(tiny_model), prompts=str(prompts_file(tmp_path, prompts)),
                         out=str(tmp_path / "c.jsonl"), backend="openai", base_url="http://127.0.0.1:9/v1",
                         n=1, max_new_tokens=4, dry_run=True)
    text = generate(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = sum(len(encode_prompt(tok, p)) for p in prompts.values())
    assert f"prompt tokens: {expected} ({tiny_model}'s tokenizer)" in text
    assert not (tmp_path / "c.jsonl").exists()


def test_a_budget_stop_at_the_predicted_chunk_then_a_higher_budget_resumes_to_the_uninterrupted_output(
        tmp_path, server, capsys):
    """Per prompt (40 characters, n=2): the server bills 40 prompt tokens and 2 x (digits of the seed + 4) <= 28
    completion tokens, so $0.041..$0.0428; the pre-chunk worst case is ceil(40/4) = 10 prompt tokens and 2 x 16
    completion tokens = $0.0132, $0.0264 a chunk of 2. With a $0.18 budget: chunk 1 ($0 + 0.0264) and chunk 2
    (<= $0.0856 + 0.0264) go; after chunk 2 the spend is <= $0.1712, under the budget; before chunk 3 it is
    >= $0.164 + 0.0264 > $0.18: the stage stops there, 4 prompts on disk, exit 2."""
    prices = prices_file(tmp_path)
    code = main(["generate", *flags(tmp_path, server, prices=prices, **{"max-budget-usd": 0.18})])
    [err] = error_lines(capsys)
    prompt_tokens, completion_tokens, replies = sent_usage(server)
    spent = cost(prompt_tokens, completion_tokens)
    assert code == 2
    assert replies == 4 and [r["id"] for r in read_records(tmp_path / "c.jsonl")] == ["p0", "p1", "p2", "p3"]
    assert err.startswith("prefloop generate: error: generate: budget reached: ")
    assert f"{usd(spent)} spent of max_budget_usd $0.18" in err
    assert f"the next chunk (2 rows) may cost up to {usd(2 * cost(10, 32))}" in err
    assert "Fix: raise --max-budget-usd" in err and "re-run the same command: it resumes" in err
    summary = read_summary(tmp_path / "c.jsonl")
    assert summary["status"] == "budget_exceeded" and summary["written"] == 4 and summary["failed"] == 0
    assert (summary["usage"]["prompt_tokens"], summary["usage"]["completion_tokens"]) == (prompt_tokens,
                                                                                        completion_tokens)
    assert summary["usage"]["cost_usd"] == pytest.approx(spent, abs=1e-8)

    # The same budget again: it stops before sending anything.
    assert main(["generate", *flags(tmp_path, server, prices=prices, **{"max-budget-usd": 0.18})]) == 2
    assert len(server.generation_requests()) == 4
    capsys.readouterr()

    # A higher budget resumes: the last chunk only, and the spend counts on from the first run's.
    assert main(["generate", *flags(tmp_path, server, prices=prices, **{"max-budget-usd": 1})]) == 0
    prompt_tokens, completion_tokens, replies = sent_usage(server)
    summary = read_summary(tmp_path / "c.jsonl")
    assert replies == 6 and summary["status"] == "done"
    assert (summary["usage"]["prompt_tokens"], summary["usage"]["completion_tokens"], summary["usage"]["requests"]) \
        == (prompt_tokens, completion_tokens, 6)

    with FakeServer() as clean:
        assert main(["generate", *flags(tmp_path, clean, out="straight.jsonl")]) == 0
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()


def test_a_spend_past_the_budget_mid_chunk_stops_sending_and_keeps_what_finished(tmp_path, server, capsys):
    """One chunk of 6, one request at a time, $0.1: the chunk's worst case (6 x $0.0132 = $0.0792, prompts at
    chars/4) passes the pre-check, but the server bills 40 prompt tokens a prompt, not 10: after 3 prompts
    (>= 3 x $0.041 = $0.123) the spend is past the budget, so the 4th request is never sent. The 3 finished
    prompts are kept (paid for), none is counted as failed, and a higher budget resumes to the straight output."""
    prices = prices_file(tmp_path)
    args = flags(tmp_path, server, prices=prices, **{"chunk-size": 6})
    assert main(["generate", *args, "--max-budget-usd", "0.1"]) == 2
    [err] = error_lines(capsys)
    assert "budget reached" in err and "of max_budget_usd $0.1." in err
    assert [r.prompt for r in server.generation_requests()] == [PROMPTS[f"p{i}"] for i in range(3)]
    assert [r["id"] for r in read_records(tmp_path / "c.jsonl")] == ["p0", "p1", "p2"]
    summary = read_summary(tmp_path / "c.jsonl")
    assert summary["status"] == "budget_exceeded" and summary["failed"] == 0 and summary["written"] == 3
    assert main(["generate", *args, "--max-budget-usd", "0.5"]) == 0
    with FakeServer() as clean:
        assert main(["generate", *flags(tmp_path, clean, out="straight.jsonl", **{"chunk-size": 6})]) == 0
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()


@pytest.mark.parametrize("case", ["negative", "not yaml", "missing key", "no price", "local backend"])
def test_bad_budget_or_prices_fail_in_one_line_naming_the_file_and_fix(tmp_path, server, capsys, case):
    """A negative budget, a malformed price file, a price without output_per_mtok, a budget over a model without a
    price, and a budget on a backend that bills nothing: exit 2, one line with the fix, nothing written."""
    prices = prices_file(tmp_path)
    extra = {"max-budget-usd": 1, "prices": prices}
    expect = [str(prices)]
    if case == "negative":
        extra["max-budget-usd"], expect = -1, ["max_budget_usd = -1", "Fix: e.g. --max-budget-usd 5"]
    elif case == "not yaml":
        prices.write_text("m: {input_per_mtok: 1, output_per_mtok: [\n")
        expect += ["invalid YAML", "Fix: give each model as"]
    elif case == "missing key":
        prices.write_text("m: {input_per_mtok: 1}\n")
        expect += ["model 'm'", "needs exactly input_per_mtok and output_per_mtok", "Fix:"]
    elif case == "no price":
        prices.write_text("other: {input_per_mtok: 1, output_per_mtok: 2}\n")
        expect = ["no price for model 'm'", "Fix: add `m: {input_per_mtok: USD, output_per_mtok: USD}`"]
    else:
        extra["backend"], expect = "hf", ["nothing here sends API requests", "Fix: drop --max-budget-usd"]
    assert main(["generate", *flags(tmp_path, server, **extra)]) == 2
    [err] = error_lines(capsys)
    assert all(e in err for e in expect), err
    assert not (tmp_path / "c.jsonl").exists() and server.requests == []


def test_a_loop_stage_counts_what_the_runs_other_stages_spent(tmp_path):
    """In a loop run, a stage's budget is the run's: `in_run` gives it what every other stage summary on disk
    says was spent (recomputed at the current prices), never its own (which the stage counts itself)."""
    run = tmp_path / "run"
    (run / "round_001").mkdir(parents=True)
    usage = {"models": {"m": {"prompt_tokens": 100, "completion_tokens": 100, "requests": 2}}}  # $0.11 each
    for stem in ("candidates", "judgments", "eval_candidates"):
        (run / "round_001" / f"{stem}.summary.json").write_text(json.dumps({"usage": usage}))
    prices = {"m": {"input_per_mtok": IN, "output_per_mtok": OUT}}
    out = run / "round_001" / "judgments.jsonl"
    values = in_run({"out": str(out)}, prices, 0.3, run)
    assert values["max_budget_usd"] == 0.3 and values["prices"] == prices
    assert values["spent_before_usd"] == pytest.approx(2 * cost(100, 100))  # the two others, not its own
    own = {"models": {"m": {"prompt_tokens": 100, "completion_tokens": 0, "requests": 1}}}  # $0.1 more
    meter = Meter("judge", out, prices, 0.3, values["spent_before_usd"], own)
    with pytest.raises(BudgetExceeded, match=r"judge: budget reached: \$0\.32 spent, \$0\.22 of it by the run's "
                       r"other stages, of max_budget_usd \$0\.3\. Everything finished is kept in .*judgments.jsonl"):
        meter.check()
