"""`--engine ray`: Ray Data actors run prefloop's own Generator/Judge; the driver writes through prefloop's store.

Contracts: a driver killed mid-way and re-run loses and duplicates nothing and keeps the rows written before the
kill byte-for-byte; a request the cluster cannot fit fails naming the fix; the loop puts each phase on its stage's
engine. That Ray (and ray-llm) write exactly what the local engine writes is one test over every executor:
tests/scale/test_executors.py. One local Ray cluster (2 CPUs) is shared by the
module; a CLI subprocess reaches it through --ray-address (the "existing cluster" path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from needs import need_module
from workdirs import write_addition_prompts

need_module("ray", "ray", "pip install 'prefloop[ray]'")
need_module("ray", "ray.data", "pip install 'prefloop[ray]'")

from prefloop.config import ConfigError  # noqa: E402
from prefloop.gen.stage import GenerateConfig  # noqa: E402
from prefloop.gen.stage import run as generate  # noqa: E402
from prefloop.loop import LoopConfig  # noqa: E402
from prefloop.runstate import read_summary  # noqa: E402

N_PROMPTS = 1003  # not a multiple of any batch size: the last batch is a partial one


def write_prompts(path: Path, n: int = N_PROMPTS) -> Path:
    return write_addition_prompts(path, n)


def ids_of(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_bytes().splitlines()]


def gen_config(model: Path, prompts: Path, out: Path, **kw) -> GenerateConfig:
    return GenerateConfig(model=str(model), prompts=str(prompts), out=str(out), n=1, max_new_tokens=4,
                          temperature=0.0, chunk_size=128, **kw)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFLOOP_NO_BAR": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Its own session: the SIGKILL reaches the driver and anything it started, never this test process.
    return subprocess.Popen([sys.executable, "-m", "prefloop.cli", *args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.slow
def test_generate_on_ray_killed_midway_resumes_exactly_once(ray_cluster, tiny_model, tmp_path):
    """SIGKILL the `generate --engine ray` CLI once some rows are on disk; the re-run loses and duplicates no id
    and keeps the rows written before the kill byte-for-byte."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "candidates.jsonl"
    args = ["generate", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out), "--n", "2",
            "--max-new-tokens", "16", "--temperature", "0", "--engine", "ray", "--ray-address", ray_cluster,
            "--ray-actors", "2", "--ray-batch-size", "16"]
    proc = _cli(args, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 100:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    before = out.read_bytes()
    before = before[: before.rfind(b"\n") + 1]  # a torn tail (if any) is the store's to cut, not a kept row
    assert 100 <= before.count(b"\n") < N_PROMPTS

    second = _cli(args, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    after = out.read_bytes()
    assert after.startswith(before)
    ids = ids_of(out)
    assert len(ids) == len(set(ids)) == N_PROMPTS
    assert set(ids) == {f"q{i:05d}" for i in range(N_PROMPTS)}
    summary = read_summary(out)
    assert summary["status"] == "done" and summary["resumed"] == before.count(b"\n")
    assert summary["ray"]["address"] == ray_cluster


def test_a_request_the_cluster_cannot_fit_fails_naming_the_fix(ray_cluster, tiny_model, prompts, tmp_path):
    """Asking for GPUs a CPU cluster lacks stops at once with the fix (Ray itself would wait forever); nothing is
    left behind, so the corrected command starts fresh."""
    out = tmp_path / "candidates.jsonl"
    with pytest.raises(ConfigError, match="ray-num-gpus"):
        generate(gen_config(tiny_model, prompts, out, engine="ray", ray_actors=1, ray_num_gpus=1))
    assert not out.exists() and not (tmp_path / "candidates.config.yaml").exists()


def test_loop_phases_take_their_engine_from_the_stage_settings(tmp_path):
    """`gen: {engine: ray}` puts generation (and eval generation) on Ray while judging stays local; a bad engine
    name is refused when the loop config is built."""
    config = LoopConfig(out=str(tmp_path / "run"), model="m", prompts="p.jsonl",
                        gen={"engine": "ray", "ray_actors": 2}, judge={"reward_fn": "prefloop.tasks.addition:reward"})
    assert config.stage_config("generate", 1, config.gen).engine == "ray"
    assert config.stage_config("generate", 1, {**config.gen, **config.eval}).ray_actors == 2
    assert config.stage_config("judge", 1, {}).engine == "local"
    with pytest.raises(ConfigError, match="engine"):
        LoopConfig(out=str(tmp_path / "run2"), model="m", prompts="p.jsonl", gen={"engine": "slurm"},
                   judge={"reward_fn": "prefloop.tasks.addition:reward"})


@pytest.mark.slow
def test_loop_generates_on_ray_and_trains_locally(ray_cluster, tiny_model, tmp_path):
    """A 1-round loop with `gen: {engine: ray}`: generation and eval generation run on Ray actors, judging and
    DPO run in-process; the manifest records each phase's engine and every prompt is generated once."""
    from prefloop.config import from_dict
    from prefloop.loop import run as run_loop
    from prefloop.store import dumps, read_records
    from prefloop.tasks.addition import make_prompts

    (tmp_path / "prompts.jsonl").write_text("".join(dumps(r) for r in make_prompts(24, 0, "train")))
    (tmp_path / "heldout.jsonl").write_text("".join(dumps(r) for r in make_prompts(8, 0, "heldout")))
    (tmp_path / "reward.py").write_text("def length(prompts, completions, **columns):\n"
                                        "    return [float(len(c)) for c in completions]\n")
    values = {
        "out": str(tmp_path / "run"), "model": str(tiny_model), "prompts": str(tmp_path / "prompts.jsonl"),
        "eval_prompts": str(tmp_path / "heldout.jsonl"), "rounds": 1,
        "gen": {"n": 3, "max_new_tokens": 4, "dtype": "float32", "engine": "ray", "ray_actors": 2,
                "ray_batch_size": 8},
        "judge": {"judge": "python", "reward_fn": str(tmp_path / "reward.py") + ":length"},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 2, "batch_size": 4, "save_steps": 2, "logging_steps": 1,
                  "gradient_checkpointing": False, "dtype": "float32"},
    }
    root = run_loop(from_dict(LoopConfig, values))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    phases = manifest["rounds"][1]["phases"]
    assert phases["generate"]["summary"]["engine"] == "ray" and phases["generate"]["summary"]["ray"]["actors"] == 2
    assert phases["judge"]["summary"]["engine"] == "local"
    assert read_summary(root / "round_001" / "eval_candidates.jsonl")["engine"] == "ray"
    ids = [r["id"] for r in read_records(root / "round_001" / "candidates.jsonl")]
    assert sorted(ids) == sorted(r["id"] for r in read_records(root / "round_001" / "prompts.jsonl"))
    assert len(ids) == len(set(ids)) == 24
