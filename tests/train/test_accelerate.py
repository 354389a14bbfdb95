"""The train stage under `accelerate launch`: 2 DDP ranks on CPU (gloo) train like 1 process with the same global
batch, write every output once, resume together, and the loop can run its train phase that way.

pytest tests/train/test_accelerate.py -q      # 2-rank DDP comparisons are marked slow (~35 s together)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefloop.config import ConfigError, dump_yaml, to_dict
from prefloop.loop import LoopConfig
from prefloop.loop import run as run_loop
from prefloop.store import dumps
from prefloop.tasks.addition import make_prompts
from prefloop.train.dpo import TrainConfig, run
from prefloop.train.launch import LaunchConfig, TrainLaunchError, _free_port, build_command, launch_config

REPO = Path(__file__).resolve().parents[2]
CPU_DDP = REPO / "examples" / "accelerate" / "cpu_ddp.yaml"

# Per-step loss tolerance, 1 process (batch 4) vs 2 ranks (batch 2 each). Both runs see the same 4 pairs at every
# step (accelerate hands rank r the r-th per-device batch of the same seeded order), the DPO loss is a mean over
# pairs, and DDP averages the two ranks' gradients, i.e. the mean over the same 4 pairs: the runs are the same
# computation in fp32 up to summation order and padding width, which moves losses by ~1e-7 (measured: 0 to print
# precision). A wrong data order or batch split changes step 2 onwards by ~1e-3, two orders of magnitude above this.
LOSS_ATOL = 1e-5


def fast_config(model: Path, pairs: Path, out: Path, **overrides) -> TrainConfig:
    """As conftest's: the tiny model in fp32, no dropout (TRL's default for DPO), one log line per step."""
    # loss sigmoid: a mean over pairs, so 2 ranks x 2 pairs average to 1 process x 4. The stage's default adds the SFT
    # term, a mean over each rank's tokens, which DDP averages per rank: with unequal token counts that differs from
    # the 4-pair token mean by ~3e-3, a property of DDP averaging, not of the data split this test checks.
    values = dict(model=str(model), pairs=str(pairs), out=str(out), dtype="float32", max_length=32, logging_steps=1,
                  gradient_checkpointing=False, lora_r=4, lora_alpha=8, loss=["sigmoid"])
    return TrainConfig(**{**values, **overrides})


def losses(out: Path, step: int = 4) -> list[float]:
    state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` as a user types it, 2 ranks from examples/accelerate/cpu_ddp.yaml, one thread each."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
           "--main_process_port", str(_free_port()), "-m", "prefloop.cli", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def write_spec(path: Path, config) -> Path:
    path.write_text(dump_yaml(to_dict(config)))
    return path


@pytest.fixture(scope="module")
def two_ranks(tiny_model, pairs_file, tmp_path_factory):
    """One 2-rank run (batch 2 per rank, 4 steps, checkpoint every 2) and its output."""
    d = tmp_path_factory.mktemp("ddp")
    config = fast_config(tiny_model, pairs_file, d / "out", batch_size=2, max_steps=4, save_steps=2)
    proc = launch(["--config", str(write_spec(d / "train.yaml", config))], d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config, proc


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_same_global_batch(two_ranks, tiny_model, pairs_file, tmp_path):
    """2 DDP ranks x batch 2 give the per-step losses and final adapter of 1 process x batch 4 (within LOSS_ATOL)."""
    config, proc = two_ranks
    single = run(fast_config(tiny_model, pairs_file, tmp_path / "single", batch_size=4, max_steps=4, save_steps=2))
    one, two = losses(single), losses(Path(config.out))
    print(f"\n1 process, batch 4: {one}\n2 ranks,  batch 2: {two}")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= LOSS_ATOL
    assert one[-1] < one[0]  # it trained: the comparison is not between two flat lines

    # Weights: 2 ranks sum gradients in another order than 1 process (and the kernels' order differs by CPU, e.g.
    # with AMX units), and Adam divides each step by sqrt(v): for a weight whose gradient is ~0, rounding noise can
    # flip its step's sign. Adam moves a weight at most ~lr per step, so no weight may differ by more than
    # 2 * lr * steps, and nearly all of them (99%) must agree to fp32 noise (1e-5); a wrong data order or batch
    # split moves most weights by far more (it already moves the losses by ~1e-3).
    w1 = load_file(single / "adapter" / "adapter_model.safetensors")
    w2 = load_file(Path(config.out) / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    bound = 2 * config.lr * 4
    diffs = torch.cat([(w2[name] - w1[name]).abs().flatten() for name in w1])
    assert diffs.max() <= bound, (diffs.max(), bound)
    assert (diffs <= 1e-5).float().mean() >= 0.99, f"{int((diffs > 1e-5).sum())} of {diffs.numel()} weights differ"

    summary = json.loads((Path(config.out) / "train_summary.json").read_text())
    assert (summary["processes"], summary["global_batch"], summary["steps"]) == (2, 4, 4)
    assert summary["final_loss"] == pytest.approx(two[-1])


@pytest.mark.slow
def test_two_ranks_write_outputs_and_log_lines_once(two_ranks):
    """Only the main rank writes the final adapter, summary and config, logs prefloop's lines and prints the path."""
    config, proc = two_ranks
    out = Path(config.out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "config.yaml", "train_summary.json"]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp or set-aside dir left
    printed = proc.stdout.splitlines()
    assert printed.count(str(out)) == 1  # the CLI's result line
    assert sum("{'loss': " in line for line in printed + proc.stderr.splitlines()) == 4  # one per step, not per rank
    for line in ("policy starts from", "2 processes", "train: 4 steps, final loss"):
        assert proc.stderr.count(line) == 1, (line, proc.stderr[-3000:])


@pytest.mark.slow
def test_two_ranks_resume_from_the_same_checkpoint(two_ranks, tmp_path):
    """Killed after checkpoint 2, a 2-rank re-run resumes there on both ranks and ends as the straight run did."""
    config, _ = two_ranks
    out = tmp_path / "out"
    shutil.copytree(config.out, out)
    # What a kill during step 3 leaves: config.yaml and checkpoint-2, no checkpoint-4, adapter or summary.
    for name in ("adapter", "train_summary.json", "checkpoints/checkpoint-4"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    proc = launch(["--config", str(write_spec(tmp_path / "train.yaml", replace(config, out=str(out))))], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resuming from") == 1
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(out / "checkpoints" / "checkpoint-2")
    assert losses(out) == pytest.approx(losses(Path(config.out)), abs=LOSS_ATOL)


@pytest.mark.slow
def test_two_ranks_refuse_a_changed_config_together(two_ranks, tmp_path):
    """A changed config is refused on every rank with the changed key named; no rank waits forever for another."""
    config, _ = two_ranks
    proc = launch(["--config", str(write_spec(tmp_path / "train.yaml", config)), "--beta", "0.5"], tmp_path)
    assert proc.returncode != 0
    assert "changed: beta" in proc.stderr


def test_launch_command_without_a_config_file_runs_local_ddp(tmp_path):
    """No accelerate config: N > 1 ranks go through accelerate's torchrun launcher (`--multi_gpu`, gloo on CPU) on a
    free port, one thread each, running `prefloop.cli train --config <spec>`."""
    cmd, env = build_command(tmp_path / "spec.yaml", LaunchConfig(num_processes=2, threads_per_process=1))
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--main_process_port" in cmd
    assert cmd[-5:] == ["-m", "prefloop.cli", "train", "--config", str(tmp_path / "spec.yaml")]
    assert env["OMP_NUM_THREADS"] == "1"


def test_launch_command_with_a_config_file_leaves_the_type_to_it(tmp_path):
    """With a config file its distributed_type decides (no `--multi_gpu` added); a port the user gives is kept."""
    launch_cfg = LaunchConfig(config_file=str(CPU_DDP), args=["--main_process_port", "29999"])
    cmd, _ = build_command(tmp_path / "spec.yaml", launch_cfg)
    assert cmd[cmd.index("--config_file") + 1] == str(CPU_DDP)
    assert "--multi_gpu" not in cmd
    assert cmd.count("--main_process_port") == 1 and "29999" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"  # the file's


def test_bad_launcher_settings_fail_before_any_work(tmp_path):
    """A missing accelerate config file or an unknown key is named when the loop config is read."""
    with pytest.raises(ConfigError, match="config_file.*not found"):
        launch_config({"config_file": str(tmp_path / "nope.yaml")})
    with pytest.raises(ConfigError, match="unknown key.*processes"):
        launch_config({"processes": 2})


# A reward that almost never ties on a random model's gibberish (its answers all have the length cap), so the
# one round makes pairs.
REWARD = "def spread(prompts, completions, **columns):\n    return [float(sum(map(ord, c)) % 97) for c in completions]\n"


def loop_values(d: Path, out: str, launcher: dict) -> dict:
    return {
        "out": str(d / out), "model": str(d / "model"), "prompts": str(d / "prompts.jsonl"),
        "eval_prompts": str(d / "heldout.jsonl"), "rounds": 1, "prompts_per_round": 8,
        "gen": {"n": 2, "max_new_tokens": 4, "chunk_size": 8, "dtype": "float32"},
        "judge": {"judge": "python", "reward_fn": str(d / "reward.py") + ":spread"},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 2, "batch_size": 2, "save_steps": 2, "logging_steps": 1,
                  "gradient_checkpointing": False, "dtype": "float32", "max_length": 32},
        "train_launcher": launcher,
    }


@pytest.fixture(scope="module")
def loop_dir(tiny_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loop")
    shutil.copytree(tiny_model, d / "model")
    (d / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(8, 0, "train")))
    (d / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(4, 0, "heldout")))
    (d / "reward.py").write_text(REWARD)
    return d


def test_loop_trains_under_accelerate_launch(loop_dir):
    """`train_launcher` runs the train phase as 2 ranks; gen/judge/eval stay in the loop; the manifest and outputs
    are those of the in-process path (adapter in round_001/train, summary in the manifest)."""
    launcher = {"num_processes": 2, "config_file": str(CPU_DDP), "threads_per_process": 1}
    root = run_loop(LoopConfig(**loop_values(loop_dir, "run", launcher)))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    phases = manifest["rounds"][1]["phases"]
    assert {p["status"] for p in phases.values()} == {"done"}
    assert phases["train"]["summary"]["processes"] == 2
    assert phases["train"]["summary"]["steps"] == 2
    assert manifest["rounds"][1]["trained_policy"]["adapter"] == str(root / "round_001" / "train" / "adapter")
    assert (root / "round_001" / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (root / "round_001" / "train.launch.log").is_file()


def test_loop_marks_a_failed_launch_with_its_output_tail(loop_dir):
    """A launch that fails (here: a flag accelerate rejects) marks the train phase failed with the launch's last
    lines in the manifest, and raises."""
    launcher = {"num_processes": 2, "config_file": str(CPU_DDP), "args": ["--no-such-flag"]}
    with pytest.raises(TrainLaunchError, match="no-such-flag"):
        run_loop(LoopConfig(**loop_values(loop_dir, "failed", launcher)))
    manifest = json.loads((loop_dir / "failed" / "manifest.json").read_text())
    train = manifest["rounds"][1]["phases"]["train"]
    assert train["status"] == "failed"
    assert "TrainLaunchError" in train["error"] and "no-such-flag" in train["error"]


EXAMPLES = Path(__file__).parent.parent.parent / "examples" / "accelerate"


@pytest.mark.parametrize(("name", "kind", "detail"), [
    ("cpu_ddp.yaml", "MULTI_GPU", {}), ("ddp.yaml", "MULTI_GPU", {}),
    ("fsdp.yaml", "FSDP", {"fsdp_version": 2}),
    ("deepspeed_zero2.yaml", "DEEPSPEED", {"zero_stage": 2}),
    ("deepspeed_zero3.yaml", "DEEPSPEED", {"zero_stage": 3, "zero3_save_16bit_model": True}),
])
def test_example_accelerate_configs_parse_as_what_they_say(name, kind, detail):
    """examples/accelerate/README.md says each file parses with accelerate's own loader: it does, as the kind of run
    its name says (FSDP 2, ZeRO-2/3); the launch command prefloop builds passes the file through."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(EXAMPLES / name))
    assert config.distributed_type.name == kind
    section = config.fsdp_config if kind == "FSDP" else config.deepspeed_config if kind == "DEEPSPEED" else {}
    assert {k: section.get(k) for k in detail} == detail
    command, _ = build_command(Path("train.yaml"), LaunchConfig(config_file=str(EXAMPLES / name)))
    assert command[command.index("--config_file") + 1] == str(EXAMPLES / name)
