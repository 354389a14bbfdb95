"""Training resumed after a SIGKILL is the same training: the losses after the resume and the final adapter equal
an uninterrupted run's, and the resumed adapter is the checkpointed one, not a fresh init.

The straight run and the resumed run train in this process; the killed run is a separate process (this file run
as a script) that stops itself at an exact point -- right after checkpoint s is saved, or inside the save of
checkpoint s, after the adapter, optimizer and RNG state are written and before `trainer_state.json` -- and waits
there to be SIGKILLed. Everything trains in fp32 on one torch thread, so the numbers are comparable across
processes. A checkpoint torn by the kill (no trainer state) must be skipped: the resume starts from the one before.

    pytest tests/reliability/test_train_resume.py -m "not slow"   # killed after a checkpoint, and mid-save (~30 s)
    pytest tests/reliability/test_train_resume.py -m slow         # continuing a previous round's adapter
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

STEPS, SAVE_EVERY = 8, 2
TIMEOUT = 900  # seconds for the killed run to reach its stop: generous, the box is shared (never a timing assertion)
REL = 1e-4  # losses and weights after the resume vs the straight run


class StepLosses(TrainerCallback):
    """Every logged training loss with its step (logging_steps=1: one per step)."""

    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


class AdapterAtStart(TrainerCallback):
    """The policy adapter's weights when training begins (after a resume has loaded its checkpoint), keyed as in
    the adapter file a checkpoint holds."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict

        self.step = state.global_step
        weights = get_peft_model_state_dict(model, adapter_name="default")
        self.weights = {k: v.detach().clone() for k, v in weights.items()}


class StopAfterSave(TrainerCallback):
    """In the killed run: once checkpoint `step` is whole, say so (a marker file) and wait to be killed."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            wait_to_be_killed(self.marker)


def wait_to_be_killed(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(TIMEOUT)
    os._exit(3)  # never killed: the test fails on the exit code


def stop_inside_save(step: int, marker: str) -> None:
    """In the killed run: stop inside checkpoint `step`'s save, just before its trainer_state.json (written last)."""
    from transformers.trainer_callback import TrainerState

    real = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if Path(json_path).parent.name == f"checkpoint-{step}":
            wait_to_be_killed(marker)
        return real(self, json_path)

    TrainerState.save_to_json = save_to_json


def child(spec_file: str) -> None:
    """The killed run: train with `spec`'s config on one thread until the stop it asks for."""
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(1)
    from prefloop.train.dpo import TrainConfig, run

    callbacks = []
    if spec["stop"] == "after_save":
        callbacks.append(StopAfterSave(spec["step"], spec["marker"]))
    else:
        stop_inside_save(spec["step"], spec["marker"])
    run(TrainConfig(**spec["config"]), callbacks=callbacks)
    sys.exit(4)  # finished without stopping: the test fails on the exit code


# -- the tests ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tiny model, 16 pairs (8 steps of 2), a round-1 adapter for the continue-an-adapter case, and a place for
    the straight runs (each trained once per module)."""
    from prefloop.demo.tiny import save_tiny
    from prefloop.train.dpo import TrainConfig, run

    d = tmp_path_factory.mktemp("train-resume")
    model = save_tiny(d / "model")
    rng = random.Random(3)
    rows = []
    for i in range(16):
        a, b = rng.randrange(99), rng.randrange(99)
        rows.append({"id": f"p{i}", "prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + i % 3)})
    pairs = d / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with one_thread():
        adapter = run(TrainConfig(**values(model, pairs, d / "round1", max_steps=3, save_steps=100)))
    return {"model": model, "pairs": pairs, "round1": adapter / "adapter", "dir": d, "straight": {}}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    # Tiny matrices gain nothing from intra-op threads, and the killed run uses one: the same reductions in both.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def values(model: Path, pairs: Path, out: Path, **overrides) -> dict:
    return {"model": str(model), "pairs": str(pairs), "out": str(out), "dtype": "float32", "batch_size": 2,
            "max_steps": STEPS, "save_steps": SAVE_EVERY, "keep_checkpoints": STEPS // SAVE_EVERY,
            "logging_steps": 1, "gradient_checkpointing": False, "lora_r": 4, "lora_alpha": 8, "lr": 1e-2,
            **overrides}


def train_here(config: dict) -> tuple[Path, StepLosses, AdapterAtStart]:
    from prefloop.train.dpo import TrainConfig, run

    losses, start = StepLosses(), AdapterAtStart()
    with one_thread():
        out = run(TrainConfig(**config), callbacks=[losses, start])
    return out, losses, start


def straight_run(inputs: dict, case: str, extra: dict) -> tuple[Path, StepLosses]:
    """The uninterrupted run of `case`."""
    if case not in inputs["straight"]:
        config = values(inputs["model"], inputs["pairs"], inputs["dir"] / f"straight-{case}", **extra)
        out, losses, _ = train_here(config)
        assert sorted(losses.losses) == list(range(1, STEPS + 1))
        inputs["straight"][case] = (out, losses)
    return inputs["straight"][case]


def kill_at(config: dict, stop: str, step: int, tmp_path: Path) -> None:
    """Run `config` in another process until it stops at `stop` of `step`, then SIGKILL it."""
    spec, marker, log = tmp_path / "spec.json", tmp_path / "stopped", tmp_path / "killed.log"
    spec.write_text(json.dumps({"config": config, "stop": stop, "step": step, "marker": str(marker)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFLOOP_NO_BAR": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, __file__, str(spec)], env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert marker.exists(), f"the run did not reach its stop (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def check_resume(inputs: dict, case: str, extra: dict, stop: str, step: int, tmp_path: Path, caplog) -> None:
    import logging

    from safetensors.torch import load_file

    straight, straight_losses = straight_run(inputs, case, extra)
    config = values(inputs["model"], inputs["pairs"], tmp_path / "train", **extra)
    kill_at(config, stop, step, tmp_path)

    checkpoints = tmp_path / "train" / "checkpoints"
    on_disk = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert on_disk == list(range(SAVE_EVERY, step + 1, SAVE_EVERY))  # killed exactly where asked
    torn = checkpoints / f"checkpoint-{step}"
    if stop == "inside_save":  # the adapter and optimizer are there, the trainer state is not
        assert (torn / "adapter_model.safetensors").is_file() and not (torn / "trainer_state.json").exists()
    resume_at = step if stop == "after_save" else step - SAVE_EVERY
    checkpoint = checkpoints / f"checkpoint-{resume_at}"
    # What the killed process saved equals what the straight run saved at that step: the kill lost nothing.
    saved = load_file(checkpoint / "adapter_model.safetensors")
    twin = load_file(straight / "checkpoints" / checkpoint.name / "adapter_model.safetensors")
    assert saved.keys() == twin.keys() and all(torch.equal(saved[k], twin[k]) for k in saved)

    with caplog.at_level(logging.WARNING, logger="prefloop"):
        out, losses, start = train_here(config)
    if stop == "inside_save":
        assert f"skipping {torn}" in caplog.text
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == STEPS
    assert Path(summary["resumed_from"]) == checkpoint

    # The adapter at the resume is the checkpoint's (B != 0: not a fresh LoRA init, whose B is zero).
    assert start.step == resume_at and start.weights.keys() == saved.keys()
    assert all(torch.equal(start.weights[k], saved[k]) for k in saved)
    b = [k for k in saved if "lora_B" in k]
    assert b and all(saved[k].abs().sum() > 0 for k in b)

    # Every step after the resume has the straight run's loss; the final adapters agree.
    assert sorted(losses.losses) == list(range(resume_at + 1, STEPS + 1))
    for s, loss in losses.losses.items():
        assert loss == pytest.approx(straight_losses.losses[s], rel=REL), f"step {s}"
    want = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=REL, atol=1e-6)
    # And the steps after the resume did train: the final adapter is not the checkpoint's.
    assert any(not torch.equal(got[k], saved[k]) for k in b)


def test_killed_after_a_checkpoint_resumes_as_if_never_killed(inputs, tmp_path, caplog):
    """SIGKILL right after checkpoint 4 of 8 is written: the re-run starts from checkpoint-4 with its adapter
    (B != 0, equal to the file), and steps 5-8 have the straight run's losses (rel 1e-4); same final adapter."""
    check_resume(inputs, "new", {}, "after_save", 4, tmp_path, caplog)


def test_killed_inside_a_checkpoint_save_resumes_from_the_one_before(inputs, tmp_path, caplog):
    """SIGKILL inside checkpoint 6's save (adapter and optimizer written, trainer state not): that torn checkpoint
    is skipped with a warning, the re-run starts from checkpoint-4, and steps 5-8 match the straight run."""
    check_resume(inputs, "new", {}, "inside_save", 6, tmp_path, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["previous", "initial"])
def test_continuing_an_adapter_resumes_the_trained_copy_not_the_loaded_one(inputs, tmp_path, caplog, reference):
    """Round 2 continues round 1's adapter (reference `previous`: TRL keeps a frozen "ref" copy of it beside the
    trained one; `initial`: the base). Killed after checkpoint 4, the re-run resumes the *trained* adapter of
    checkpoint 4 -- not the round-1 adapter it was loaded from -- and matches the straight run."""
    extra = {"adapter": str(inputs["round1"]), "reference": reference}
    check_resume(inputs, f"adapter-{reference}", extra, "after_save", 4, tmp_path, caplog)


if __name__ == "__main__":
    child(sys.argv[1])
