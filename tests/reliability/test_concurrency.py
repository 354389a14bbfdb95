"""Two processes never write one output: a second run on an output another process is writing refuses at once.

docs/reliability.md "One writer per output". For every stage and the loop: process A (the real stage, in a process
of its own) is held at a gate inside its run -- after it has taken its lock and started writing -- while process B,
the same command in a fresh interpreter, starts. B must exit 2 within seconds with one line naming the output and
A's pid, and must not have touched A's files. Then the gate opens, A finishes, and its output is whole: every id
once. Finally a SIGKILLed holder never blocks the next run (the kernel drops its lock).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from killing import Subprocess, log_tail
from workdirs import loop_workdir

from prefloop.store import dumps, read_records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return loop_workdir(tmp_path_factory.mktemp("concurrency"), train=40, heldout=8)


def gate(target: str, gate_file: Path) -> str:
    """A prelude that makes `module:function` wait (up to 5 min) for `gate_file` before it runs: the process is held
    mid-stage, holding its lock, for as long as the test needs. `<gate_file>.reached` appears once it waits."""
    module, name = target.split(":")
    reached = f"{gate_file}.reached"
    return (f"import importlib, os, time\nm = importlib.import_module({module!r})\nowner, attr = m, {name!r}\n"
            f"if '.' in attr:\n    cls, attr = attr.split('.')\n    owner = getattr(m, cls)\n"
            f"orig = getattr(owner, attr)\n"
            f"def held(*a, **k):\n    t = time.monotonic()\n    open({reached!r}, 'a').close()\n"
            f"    while not os.path.exists({str(gate_file)!r}) and time.monotonic() - t < 300:\n"
            f"        time.sleep(0.02)\n    return orig(*a, **k)\nsetattr(owner, attr, held)\n")


def candidates(workdir: Path, out: Path) -> Path:
    """A finished candidates file for the judge (made once per test, by the real generate stage)."""
    from prefloop.gen.stage import GenerateConfig, run

    return run(GenerateConfig(model=str(workdir / "model"), prompts=str(workdir / "prompts.jsonl"), out=str(out),
                              n=2, max_new_tokens=4, dtype="float32"))


def stage_args(stage: str, workdir: Path, tmp_path: Path) -> tuple[list[str], Path, str]:
    """(argv, the output, the function to hold the process at) for one stage."""
    model = str(workdir / "model")
    if stage == "generate":
        out = tmp_path / "c.jsonl"
        return (["generate", "--model", model, "--prompts", str(workdir / "prompts.jsonl"), "--out", str(out),
                 "--n", "2", "--max-new-tokens", "4", "--dtype", "float32", "--chunk-size", "8"], out,
                "prefloop.store:JsonlStore.commit")
    if stage == "judge":
        out = tmp_path / "j.jsonl"
        return (["judge", "--candidates", str(candidates(workdir, tmp_path / "c.jsonl")), "--out", str(out),
                 "--judge", "python", "--reward-fn", f"{workdir / 'reward.py'}:length", "--chunk-size", "8"], out,
                "prefloop.store:JsonlStore.commit")
    if stage == "pairs":
        judgments = tmp_path / "j.jsonl"
        judgments.write_text("".join(dumps({"id": f"p{i}", "prompt": f"{i}+1=", "completions": [
            {"text": str(i + 1), "finish_reason": "stop"}, {"text": "x", "finish_reason": "stop"}],
            "scores": [1.0, 0.0], "statuses": ["ok", "ok"]}) for i in range(20)))
        out = tmp_path / "pairs.jsonl"
        return ["pairs", "--judgments", str(judgments), "--out", str(out)], out, "prefloop.judge.pairs:atomic_write"
    if stage == "train":
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{i}+1=", "chosen": str(i + 1),
                                             "rejected": str(i + 2)}) + "\n" for i in range(16)))
        out = tmp_path / "policy"
        return (["train", "--model", model, "--pairs", str(pairs), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--dtype", "float32", "--no-gradient-checkpointing", "--lora-r", "4"], out,
                "prefloop.train.dpo:build_trainer")
    out = tmp_path / "run"
    config = tmp_path / "loop.yaml"
    config.write_text(json.dumps({
        "out": str(out), "model": model, "prompts": str(workdir / "prompts.jsonl"),
        "eval_prompts": str(workdir / "heldout.jsonl"), "rounds": 1, "prompts_per_round": 16,
        "gen": {"n": 4, "max_new_tokens": 6, "dtype": "float32"},
        "judge": {"judge": "python", "reward_fn": f"{workdir / 'reward.py'}:length"},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 1, "batch_size": 4, "dtype": "float32", "gradient_checkpointing": False}}))
    return ["run", "--config", str(config)], out, "prefloop.store:JsonlStore.commit"


def wait_until(predicate, what: str, job, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert job.poll() is None, f"{what}: the holder exited {job.poll()}:\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s:\n{log_tail(log)}"
        time.sleep(0.05)


@pytest.mark.parametrize("stage", ["generate", "judge", "pairs", "train", "loop"])
def test_a_second_process_on_the_same_output_refuses_at_once(stage, workdir, zygote, tmp_path):
    argv, out, hold_at = stage_args(stage, workdir, tmp_path)
    lock = out.with_name(out.name + ".lock")
    opened = tmp_path / "gate"
    holder = zygote.start(argv, tmp_path / "a.log", prelude=gate(hold_at, opened))
    try:
        wait_until(Path(f"{opened}.reached").exists, "the holder at its gate", holder, tmp_path / "a.log")
        assert lock.exists()
        before = {p.name: p.read_bytes() for p in tmp_path.glob(f"{out.name}*") if p.is_file()}
        second = Subprocess().start(argv, tmp_path / "b.log")
        rc = second.wait()
        said = (tmp_path / "b.log").read_text()
        assert rc == 2, said
        lines = [x for x in said.splitlines() if x.strip()]
        assert len(lines) == 1, said  # one line, no traceback
        line = lines[0]
        command = "run" if stage == "loop" else stage
        assert line.startswith(f"prefloop {command}: error: {out} is being written by another process "
                               f"(pid {holder.pid},"), line
        assert "Fix: wait for it to finish, or stop it" in line
        after = {p.name: p.read_bytes() for p in tmp_path.glob(f"{out.name}*") if p.is_file()}
        assert after == before  # the refused run touched nothing of the holder's
        assert holder.poll() is None
    finally:
        opened.touch()
    assert holder.wait() == 0, log_tail(tmp_path / "a.log")
    assert not lock.exists()  # a run that ends removes its lock file
    if stage in ("generate", "judge"):
        ids = [r["id"] for r in read_records(out)]
        assert len(ids) == len(set(ids)) == 40
    # The output is finished: the same command again is a no-op, and succeeds.
    again = Subprocess().start(argv, tmp_path / "c.log")
    assert again.wait() == 0, log_tail(tmp_path / "c.log")


def test_a_killed_holder_never_blocks_the_next_run(workdir, zygote, tmp_path):
    argv, out, hold_at = stage_args("generate", workdir, tmp_path)
    holder = zygote.start(argv, tmp_path / "a.log", prelude=gate(hold_at, tmp_path / "never"))
    lock = out.with_name(out.name + ".lock")
    wait_until(lock.exists, "the holder's lock", holder, tmp_path / "a.log")
    holder.kill()
    assert lock.exists()  # left behind by the SIGKILL, but no longer locked
    resumed = Subprocess().start(argv, tmp_path / "b.log")
    assert resumed.wait() == 0, log_tail(tmp_path / "b.log")
    assert sorted(r["id"] for r in read_records(out)) == sorted(r["id"] for r in read_records(
        workdir / "prompts.jsonl"))
    assert not lock.exists()


def test_two_generate_launches_moments_apart_write_each_id_once(workdir, tmp_path):
    """The reported double launch, unscripted: two real `prefloop generate` on one --out, the second started once
    the first has written records and while it still runs (2,000 prompts); one refuses, every id is written once.
    Without the lock both write: thousands of duplicate ids."""
    from prefloop.store import dumps
    from prefloop.tasks.addition import make_prompts

    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(dumps(r) for r in make_prompts(2000, 1, "train")))
    argv, out, _ = stage_args("generate", workdir, tmp_path)
    argv[argv.index("--prompts") + 1] = str(prompts)
    runner = Subprocess()
    first = runner.start(argv, tmp_path / "a.log")
    wait_until(lambda: out.exists() and out.stat().st_size > 0, "the first run's records", first, tmp_path / "a.log")
    second = runner.start(argv, tmp_path / "b.log")
    assert first.poll() is None, "the first run ended before the second started: no overlap was tested"
    codes = (first.wait(), second.wait())
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) - len(set(ids)) == 0, f"{len(ids)} lines for {len(set(ids))} ids (exit codes {codes})"
    assert len(ids) == 2000 and codes == (0, 2), (log_tail(tmp_path / "a.log"), log_tail(tmp_path / "b.log"))


def test_sigterm_unwinds_the_stage_like_ctrl_c(workdir, tmp_path):
    """`kill PID` (SIGTERM, what schedulers send) runs prefloop's cleanup instead of dying on the spot: exit 143,
    the lock file removed (a finally block ran; with vLLM the same path shuts the engine's workers down), and the
    same command then resumes to a whole output."""
    argv, out, hold_at = stage_args("generate", workdir, tmp_path)
    opened = tmp_path / "gate"
    script = (gate(hold_at, opened) + "import sys\nfrom prefloop.cli import main\n"
              f"sys.exit(main({['-q', *argv]!r}))")
    with open(tmp_path / "a.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=log, start_new_session=True)
    lock = out.with_name(out.name + ".lock")
    deadline = time.monotonic() + 300
    while not Path(f"{opened}.reached").exists():
        assert proc.poll() is None and time.monotonic() < deadline, log_tail(tmp_path / "a.log")
        time.sleep(0.05)
    assert lock.exists()
    proc.send_signal(signal.SIGTERM)
    opened.touch()  # the store's exit path commits what it wrote; the gate must not hold that commit too
    assert proc.wait(timeout=120) == 143, log_tail(tmp_path / "a.log")
    assert not lock.exists()
    resumed = Subprocess().start(argv, tmp_path / "b.log")
    assert resumed.wait() == 0, log_tail(tmp_path / "b.log")
    assert len(read_records(out)) == 40
