"""SIGKILL each stage at seeded random moments, resume with the same command, compare with an uninterrupted run.

For judge (python verifier), judge (llm through the openai backend, against a scripted loopback judge), pairs and
train: after every kill the output has no torn line (a torn tail is cut on the next open), everything written
before the kill is kept byte-for-byte, and the resumed run's result equals the uninterrupted one's (same ids,
each once, same scores; pairs byte-identical; training finishes from its last complete checkpoint). Generate
(hf) is covered the same way by tests/prefloop/test_kill_generate.py, and every phase of `prefloop run` by
tests/prefloop/test_loop.py::test_kill_in_every_phase_then_resume.

Kill moments are drawn from random.Random(seed) between the stage's start-up and its expected end; the counts of
kill points and records compared are printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_server import FakeServer, chat_answer

TIMEOUT = 300  # seconds per run: importing torch/trl on a loaded 2-core machine is slow

REWARD = """
import time
def slow_length(prompts, completions, **columns):
    time.sleep(0.15)  # one batch per chunk: the stage takes a few seconds, so kills land mid-run
    return [float(len(c)) for c in completions]
"""


def env() -> dict[str, str]:
    return {**os.environ, "PREFLOOP_NO_BAR": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefloop.cli", "-q", *args]


def run_to_end(command: list[str]) -> None:
    proc = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_after(command: list[str], delay: float, output: Path | None = None, trigger=None) -> bool:
    """Start `command`, SIGKILL it `delay` s after `output` exists (or `trigger()` is true; else after start).
    Returns whether it was killed (False: it finished first)."""
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    if output is not None or trigger is not None:
        ready = trigger or output.exists
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def whole_lines(path: Path) -> bytes:
    """The bytes up to the last newline: what a resume must keep unchanged."""
    if not path.exists():
        return b""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def check_jsonl(path: Path, ids: list[str]) -> list[dict]:
    rows = [json.loads(line) for line in path.read_bytes().splitlines()]  # every line parses: none torn
    assert sorted(r["id"] for r in rows) == sorted(ids)  # every id, each once
    return rows


def report(stage: str, kills: int, records: int, capsys) -> None:
    with capsys.disabled():
        print(f"\n[kill] {stage}: {kills} kill points, {records} records compared")


def kill_rounds(command: list[str], output: Path, seed: int, points: int, window: tuple[float, float]) -> int:
    """Kill `command` at `points` seeded moments (each followed by a resume attempt that is killed again), checking
    after each that the whole lines written so far survive. Returns the number of kills that landed."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(points):
        before = whole_lines(output)
        if kill_after(command, rng.uniform(*window), output if output.exists() else None):
            landed += 1
        assert whole_lines(output).startswith(before) or not before  # nothing written earlier was lost
    return landed


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("kill-candidates")
    rng = random.Random(0)
    rows, ids = [], []
    for i in range(600):
        texts = ["".join(rng.choices("abcdef ", k=rng.randint(1, 12))) for _ in range(4)]
        ids.append(f"p{i:04d}")
        rows.append({"id": ids[-1], "prompt": f"{i}+1=", "completions": [
            {"text": t, "finish_reason": "stop", "num_tokens": len(t) + 1} for t in texts]})
    path = d / "candidates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "reward.py").write_text(REWARD)
    return path, ids


@pytest.mark.parametrize("points", [pytest.param(3, id="default"), pytest.param(10, id="slow", marks=pytest.mark.slow)])
def test_kill_judge_python(tmp_path, candidates, points, capsys):
    path, ids = candidates
    args = ["judge", "--candidates", str(path), "--judge", "python", "--reward-fn",
            f"{path.parent / 'reward.py'}:slow_length", "--chunk-size", "30"]
    straight = tmp_path / "straight.jsonl"
    run_to_end(cli(*args, "--out", str(straight)))
    out = tmp_path / "killed.jsonl"
    kills = kill_rounds(cli(*args, "--out", str(out)), out, seed=points, points=points, window=(0.2, 2.5))
    run_to_end(cli(*args, "--out", str(out)))
    expected = {r["id"]: r["scores"] for r in check_jsonl(straight, ids)}
    assert {r["id"]: r["scores"] for r in check_jsonl(out, ids)} == expected
    assert json.loads((tmp_path / "killed.summary.json").read_text())["status"] == "done"
    assert kills >= 1
    report("judge python", kills, len(ids), capsys)


def scored_judge(req):
    """A deterministic pointwise judge: the score is the response's length, capped at 5."""
    text = next(m["content"] for m in req.body["messages"] if m["role"] == "user")
    response = text.split("<response>\n", 1)[1].split("\n</response>", 1)[0]
    return chat_answer(f"Score: {min(len(response), 5)}")


@pytest.mark.parametrize("points", [pytest.param(3, id="default"), pytest.param(10, id="slow", marks=pytest.mark.slow)])
def test_kill_judge_llm_through_a_server(tmp_path, candidates, points, capsys):
    path, ids = candidates
    with FakeServer() as server:
        server.script = scored_judge
        server.latency = 0.01
        args = ["judge", "--candidates", str(path), "--judge", "llm", "--judge-model", "m", "--judge-backend",
                "openai", "--base-url", server.url, "--mode", "pointwise", "--chunk-size", "40", "--cache", "off",
                "--top-logprobs", "0"]
        straight = tmp_path / "straight.jsonl"
        run_to_end(cli(*args, "--out", str(straight)))
        out = tmp_path / "killed.jsonl"
        kills = kill_rounds(cli(*args, "--out", str(out)), out, seed=points, points=points, window=(0.3, 3.0))
        run_to_end(cli(*args, "--out", str(out)))
    expected = {r["id"]: r["scores"] for r in check_jsonl(straight, ids)}
    assert {r["id"]: r["scores"] for r in check_jsonl(out, ids)} == expected
    assert kills >= 1
    report("judge llm (openai backend)", kills, len(ids), capsys)


@pytest.mark.parametrize("points", [pytest.param(3, id="default"), pytest.param(10, id="slow", marks=pytest.mark.slow)])
def test_kill_pairs(tmp_path, candidates, points, capsys):
    path, ids = candidates
    judgments = tmp_path / "judgments.jsonl"
    run_to_end(cli("judge", "--candidates", str(path), "--judge", "python", "--reward-fn",
                   "prefloop.addition:reward", "--out", str(judgments)))
    # Give every row distinct scores so every prompt makes pairs.
    rows = [json.loads(line) for line in judgments.read_text().splitlines()]
    for r in rows:
        r["scores"], r["statuses"] = [float(len(c["text"])) for c in r["completions"]], ["ok"] * 4
    big = tmp_path / "big.jsonl"  # 40x the rows: pair selection takes long enough to be killed mid-way
    big.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{k}"}) + "\n" for k in range(40) for r in rows))
    args = ["pairs", "--judgments", str(big), "--strategy", "all_above_margin"]
    straight = tmp_path / "straight.jsonl"
    run_to_end(cli(*args, "--out", str(straight)))
    out = tmp_path / "killed.jsonl"
    rng, kills = random.Random(points), 0
    started = tmp_path / "killed.config.yaml"  # written when the stage begins, before the pairs are selected
    for _ in range(points):
        started.unlink(missing_ok=True)
        kills += kill_after(cli(*args, "--out", str(out)), rng.uniform(0.0, 0.6), started)
        # Pairs are written whole (temp file + rename): after a kill there is no file, or the complete one.
        assert not out.exists() or out.read_bytes() == straight.read_bytes()
    run_to_end(cli(*args, "--out", str(out)))
    assert out.read_bytes() == straight.read_bytes()
    report("pairs", kills, straight.read_bytes().count(b"\n"), capsys)


@pytest.mark.parametrize("points", [pytest.param(3, id="default"), pytest.param(10, id="slow", marks=pytest.mark.slow)])
def test_kill_train(tmp_path, points, capsys):
    from prefloop.tiny import save_tiny

    model = save_tiny(tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    rng = random.Random(1)
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{a}+{b}=", "chosen": str(a + b),
                                         "rejected": str(a + b + 1)}) + "\n"
                             for i, (a, b) in enumerate((rng.randrange(99), rng.randrange(99)) for _ in range(64))))
    args = ["train", "--model", str(model), "--pairs", str(pairs), "--max-steps", "16", "--save-steps", "2",
            "--batch-size", "4", "--dtype", "float32", "--no-gradient-checkpointing", "--lora-r", "4",
            "--logging-steps", "1"]
    out = tmp_path / "train"
    checkpoints = out / "checkpoints"
    from prefloop.train.dpo import last_complete_checkpoint

    rng, kills = random.Random(points), 0
    for _ in range(points):
        # Each kill lands after this run has written a new checkpoint (during training or the next save).
        seen = {p.name for p in checkpoints.glob("checkpoint-*")} if checkpoints.exists() else set()
        fresh = lambda seen=seen: checkpoints.exists() and bool(  # noqa: E731
            {p.name for p in checkpoints.glob("checkpoint-*")} - seen)
        kills += kill_after(cli(*args, "--out", str(out)), rng.uniform(0.0, 1.0), trigger=fresh)
    run_to_end(cli(*args, "--out", str(out)))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 16 and summary["status"] == "done"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    if kills:  # the run that finished picked up a complete checkpoint, not step 0
        assert summary["resumed_from"] and Path(summary["resumed_from"]).name.startswith("checkpoint-"), summary
    assert last_complete_checkpoint(checkpoints) is not None
    report("train", kills, summary["steps"], capsys)
