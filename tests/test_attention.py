"""prefloop/attention.py: grouped-query attention kept grouped under a padding mask on a CPU. The logits equal
transformers' eager attention (its own reference implementation), and so do the gradients training takes from them; K
and V are no longer copied per group; HFGenerator's greedy answers on a left-padded batch equal transformers'
`generate` on each prompt alone; the generator, the train stage and the reward model run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from prefloop import attention
from prefloop.demo.tiny import build_model, build_tokenizer
from prefloop.gen import Sampling
from prefloop.gen.hf import HFGenerator

PROMPTS = ["7", "12+34=", "The quick brown fox jumps over the lazy dog, then", "Hello, w"]


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory) -> Path:
    """The tiny Llama with 4 query heads sharing 2 key/value heads (as SmolLM2's 9 share 3)."""
    tokenizer = build_tokenizer()
    config = build_model(tokenizer).config
    config.num_key_value_heads = 2
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**ids)
    out = tmp_path_factory.mktemp("gqa") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def padded_batch(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def count_repeats(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = sdpa_module.repeat_kv
    monkeypatch.setattr(sdpa_module, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))
    return calls


def test_logits_equal_eager_attention_without_copying_kv(gqa_model, monkeypatch):
    batch = padded_batch(gqa_model)
    assert (batch["attention_mask"] == 0).any()  # left padding: the case transformers' sdpa copies K and V for
    assert attention.implementation("cpu") == attention.NAME and attention.implementation("cuda") == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(gqa_model, attn_implementation="eager", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(gqa_model, attn_implementation=attention.implementation("cpu"),
                                                dtype=torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(gqa_model, attn_implementation="sdpa", dtype=torch.float32)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = eager(**batch).logits[real]
        calls = count_repeats(monkeypatch)
        torch.testing.assert_close(ours(**batch).logits[real], expected, atol=1e-5, rtol=1e-5)
        assert calls == []  # K and V stayed grouped
        torch.testing.assert_close(stock(**batch).logits[real], expected, atol=1e-5, rtol=1e-5)
        assert calls == [2] * 2 * ours.config.num_hidden_layers  # transformers' own sdpa: K and V repeated per layer


def test_gradients_equal_eager_attention(gqa_model):
    batch = padded_batch(gqa_model)
    real = batch["attention_mask"].bool()
    grads = []
    for implementation in ("eager", attention.implementation("cpu")):
        model = AutoModelForCausalLM.from_pretrained(gqa_model, attn_implementation=implementation,
                                                     dtype=torch.float32)
        logits = model(**batch).logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        (logps * (real[:, :-1] & real[:, 1:])).sum().backward()  # a real token predicted from a real position
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, atol=1e-5, rtol=1e-4, msg=name)


def test_hf_generator_greedy_equals_generate_per_prompt(gqa_model):
    gen = HFGenerator(str(gqa_model), dtype="float32", device="cpu", batch_size=8)
    assert gen.model.config._attn_implementation == attention.NAME
    got = [cs[0]["text"] for cs in gen.generate(PROMPTS, 1, Sampling(max_new_tokens=10, temperature=0.0))]
    gen.close()
    tokenizer = AutoTokenizer.from_pretrained(gqa_model)
    eager = AutoModelForCausalLM.from_pretrained(gqa_model, attn_implementation="eager", dtype=torch.float32)
    for prompt, text in zip(PROMPTS, got, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")
        out = eager.generate(**ids, do_sample=False, max_new_tokens=10)
        assert text == tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True), prompt


def test_the_stages_load_with_it(gqa_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from prefloop.judge.reward_model import RewardModelJudge
    from prefloop.train.dpo import TrainConfig, build_trainer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    trainer = build_trainer(TrainConfig(model=str(gqa_model), pairs=str(pairs), out=str(tmp_path / "out")))
    assert trainer.model.get_base_model().config._attn_implementation == attention.NAME
    AutoModelForSequenceClassification.from_pretrained(gqa_model, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(gqa_model).save_pretrained(tmp_path / "rm")
    assert RewardModelJudge(str(tmp_path / "rm"), device="cpu").model.config._attn_implementation == attention.NAME
