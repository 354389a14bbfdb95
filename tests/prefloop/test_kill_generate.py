"""Kill -9 the generate stage at seeded random moments, resume, and check exactly-once, byte-stable output.

DESIGN.md "The store": a crash loses at most the chunk in flight, records already on disk are kept byte-for-byte,
a torn tail is cut (and kept in `.torn`), and resume is keyed by id. Each round runs the real stage (tiny local
model, hf backend) in a subprocess and SIGKILLs it once the output has reached a seeded random number of lines
(always after the model has loaded and written something in that round), plus a seeded random delay.
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

SCRIPT = """
import sys
from prefloop.gen.stage import GenerateConfig, run
model, prompts, out = sys.argv[1:4]
run(GenerateConfig(model=model, prompts=prompts, out=out, n=2, max_new_tokens=8, chunk_size=16, batch_size=32,
                   dtype="float32", seed=1))
"""
NL = b"\n"
ROUND_TIMEOUT = 240  # seconds; importing torch on a loaded 2-core box can take ~15 s


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from prefloop.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


def _write_prompts(path: Path, n: int) -> set[str]:
    """`n` prompts: mostly given ids, some derived from content, some conversational. Returns the ids."""
    from prefloop.records import load_prompts

    rows = []
    for i in range(n):
        if i % 10 == 3:
            rows.append({"prompt": [{"role": "user", "content": f"add {i} and {i % 13}"}]})  # derived id
        elif i % 10 == 7:
            rows.append({"prompt": f"{i} * {i % 9} ="})  # derived id
        else:
            rows.append({"id": f"q-{i:05d}", "prompt": f"{i}+{i % 11}=", "answer": str(i + i % 11)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {r["id"] for r in load_prompts(path).records}


def _env() -> dict[str, str]:
    # One thread: on a shared 2-core machine torch's default pool spins against other processes (10x slower).
    return {**os.environ, "PREFLOOP_NO_BAR": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(model: str, prompts: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-c", SCRIPT, model, str(prompts), str(out)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(complete newline-terminated lines, torn tail after the last newline)."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


def _check_lines(complete: bytes) -> list[str]:
    """Every complete line parses as a candidates record; ids are unique. Returns the ids in file order."""
    ids = []
    for n, line in enumerate(complete.splitlines(), start=1):
        rec = json.loads(line)  # a torn line anywhere but the tail would fail here
        assert set(rec) >= {"id", "prompt", "completions", "config_hash"}, f"line {n}: {line[:120]!r}"
        assert len(rec["completions"]) == 2
        ids.append(rec["id"])
    assert len(ids) == len(set(ids)), "a prompt was written twice"
    return ids


def _kill_and_resume(tmp_path: Path, model: str, seed: int, kills: int, n_prompts: int) -> None:
    rng = random.Random(seed)
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "cands.jsonl"
    all_ids = _write_prompts(prompts, n_prompts)
    snapshots: list[bytes] = []  # the complete lines on disk after each kill
    expected_torn = b""
    killed = 0
    finished_early = False

    for k in range(kills):
        log = tmp_path / f"round{k}.log"
        start_lines = _count_lines(out)
        # A seeded kill point: a random number of new lines into this round, spread so the rounds share ~90% of
        # the run (always >= 1 new line, so the kill lands after the model has loaded and begun writing).
        share = max(1, (int(n_prompts * 0.9) - start_lines) // (kills - k))
        target = start_lines + rng.randint(1, share)
        proc = _start(model, prompts, out, log)
        deadline = time.monotonic() + ROUND_TIMEOUT
        # Wait until this round has written at least one line (model loaded) and the file reached the target.
        while proc.poll() is None and _count_lines(out) < target:
            assert time.monotonic() < deadline, f"round {k} made no progress:\n{log.read_text()[-3000:]}"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))  # lands anywhere in the chunk: mid-generate, mid-write, mid-fsync
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
        if proc.returncode not in (0, -signal.SIGKILL):
            pytest.fail(f"round {k} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")

        data = out.read_bytes()
        complete, tail = _split(data)
        _check_lines(complete)  # no torn line except possibly the tail
        if snapshots:
            assert complete.startswith(snapshots[-1]), f"round {k} rewrote records already on disk"
        snapshots.append(complete)
        print(f"round {k}: target {target} lines, killed at {complete.count(NL)} lines + {len(tail)} torn bytes")
        expected_torn += tail
        if not tail and rng.random() < 0.5:
            # SIGKILL cannot tear a single write() on a local disk, so inject what a power cut could leave: half of
            # a line, which the resumed run must cut into `.torn`, never join with its next row.
            last = complete.splitlines(keepends=True)[-1]
            fragment = last[: len(last) // 2]
            with open(out, "ab") as f:
                f.write(fragment)
            expected_torn += fragment
        if proc.returncode == 0:
            finished_early = True
            break  # finished before the kill landed; nothing more to interrupt

    assert killed >= 1, "no kill landed before the run finished"
    log = tmp_path / "final.log"
    proc = _start(model, prompts, out, log)
    try:
        proc.wait(timeout=ROUND_TIMEOUT * 2)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]

    final = out.read_bytes()
    assert final.endswith(b"\n")
    ids = _check_lines(final)
    assert sorted(ids) == sorted(all_ids), "every prompt exactly once"
    for snap in snapshots:
        assert final.startswith(snap), "records written before a kill changed"
    torn = Path(f"{out}.torn")
    assert (torn.read_bytes() if torn.exists() else b"") == expected_torn
    summary = json.loads((tmp_path / "cands.summary.json").read_text())
    assert summary["status"] == "done" and summary["prompts"] == n_prompts and summary["failed"] == 0
    if not finished_early:
        assert summary["resumed"] == len(snapshots[-1].splitlines())


@pytest.mark.parametrize(
    "seed,kills,n_prompts",
    [
        pytest.param(0, 3, 500, id="3-kills"),
        pytest.param(1, 10, 1200, id="10-kills", marks=pytest.mark.slow),
    ],
)
def test_sigkill_at_random_points_then_resume_is_exactly_once(tmp_path, tiny_model, seed, kills, n_prompts):
    """SIGKILL at seeded random points: complete lines survive byte-for-byte, tails go to .torn, each id once."""
    _kill_and_resume(tmp_path, tiny_model, seed, kills, n_prompts)
