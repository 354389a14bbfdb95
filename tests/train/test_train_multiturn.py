"""A conversation from prompt to a trained DPO step: generate (hf) -> judge (python) -> pairs -> train (TRL), on a
tiny model whose chat template renders tools. TRL's tokenization is checked against `apply_chat_template` computed
here, and the logged step-1 loss against the DPO loss computed from the model's own log-probs on that rendering.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from toolchat import CONVERSATION, save_tool_model, template_ids, tool
from trainlog import LogCollector
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefloop.config import ConfigError
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.judge.pairs import PairsConfig
from prefloop.judge.pairs import run as pairs_run
from prefloop.judge.stage import JudgeConfig
from prefloop.judge.stage import run as judge_run
from prefloop.store import read_records
from prefloop.train.dpo import build_trainer, load_pairs
from prefloop.train.methods import method

SECOND = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "+1?"}]
STAGE_KWARGS = {"enable_thinking": False, "tools": [tool("sub")]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny model with a template that renders tools (conftest's `make_config` trains this one here)."""
    return save_tool_model(tmp_path_factory.mktemp("tools") / "model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA with random B: the policy (base + it) differs from the reference (the base) at step 1, so the first
    loss depends on the data instead of being ln 2."""
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                           task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft.save_pretrained(out)
    return out


def completion_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log p(completion | prompt), summed over the completion's tokens, from plain logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    token = logps.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return token[len(prompt_ids) - 1:].sum()


def dpo_loss(policy, reference, tokenizer, pairs: list[dict], beta: float, with_kwargs: bool = True) -> float:
    """The sigmoid DPO loss of `pairs` (one batch), each rendered by the chat template with its tools and
    chat_template_kwargs (or, `with_kwargs=False`, without them)."""
    losses = []
    for pair in pairs:
        kwargs = {"tools": json.loads(pair["tools"]), **pair["chat_template_kwargs"]} if with_kwargs else {}
        prompt = template_ids(tokenizer, pair["prompt"], **kwargs)
        margins = []
        for side in ("chosen", "rejected"):
            full = template_ids(tokenizer, pair["prompt"] + pair[side], generation_prompt=False, **kwargs)
            assert full[: len(prompt)] == prompt  # the generation prompt is a prefix of the rendered answer
            answer = full[len(prompt):]
            margins.append(completion_logp(policy, prompt, answer) - completion_logp(reference, prompt, answer))
        losses.append(-F.logsigmoid(beta * (margins[0] - margins[1])))
    return torch.stack(losses).mean().item()


def test_a_conversation_trains_one_dpo_step_on_its_own_rendering(tiny_model, adapter, make_config, tmp_path):
    """Two conversations (one with its own tools, one with the stage's) through every stage: the pairs keep the
    history and the tools, TRL's prompt ids are the template's rendering with them, and the logged step-1 loss is
    the DPO loss of the policy (base + adapter) against the base on that rendering."""
    tool_model = tiny_model
    rows = [{"id": "conv", "prompt": CONVERSATION, "tools": [tool("add"), tool("mul")]},
            {"id": "second", "prompt": SECOND}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    candidates = generate(GenerateConfig(model=str(tool_model), prompts=str(prompts), out=str(tmp_path / "c.jsonl"),
                                         n=4, max_new_tokens=6, dtype="float32", seed=1,
                                         chat_template_kwargs=STAGE_KWARGS))
    reward = tmp_path / "reward.py"
    reward.write_text("def fn(prompts, completions, **kw):\n"
                      "    return [float(sum(map(ord, c[0]['content'])) % 97) for c in completions]\n")
    judgments = judge_run(JudgeConfig(candidates=str(candidates), out=str(tmp_path / "j.jsonl"),
                                      reward_fn=f"{reward}:fn"))
    pairs_path = pairs_run(PairsConfig(judgments=str(judgments), out=str(tmp_path / "pairs.jsonl"),
                                       keep_truncated=True))

    # The pairs: TRL's conversational format, the whole history in `prompt`, the tools each prompt was sampled with.
    pairs = read_records(pairs_path)
    assert [p["id"] for p in pairs] == ["conv", "second"]
    sampled = {r["id"]: [c["text"] for c in r["completions"]] for r in read_records(candidates)}
    for pair, prompt in zip(pairs, (CONVERSATION, SECOND), strict=True):
        assert pair["prompt"] == prompt and pair["chat_template_kwargs"] == {"enable_thinking": False}
        for side in ("chosen", "rejected"):
            (message,) = pair[side]
            assert message["role"] == "assistant" and message["content"] in sampled[pair["id"]]
    assert json.loads(pairs[0]["tools"]) == rows[0]["tools"] and json.loads(pairs[1]["tools"]) == [tool("sub")]

    # TRL tokenizes each prompt as the chat template renders it with those tools and arguments.
    config = make_config("train", pairs_path, adapter=str(adapter), reference="initial", max_steps=1, max_length=128,
                         lr=1e-2)
    logs = LogCollector()
    trainer = build_trainer(config, callbacks=[logs])
    tokenizer = AutoTokenizer.from_pretrained(tool_model)
    for example, pair in zip(trainer.train_dataset, pairs, strict=True):
        kwargs = {"tools": json.loads(pair["tools"]), **pair["chat_template_kwargs"]}
        assert example["prompt_ids"] == template_ids(tokenizer, pair["prompt"], **kwargs)
        assert len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])) < 128
    assert tokenizer.decode(trainer.train_dataset[0]["prompt_ids"]) == (
        "tools: add,mul\nno-think\nsystem: Be exact.\nuser: 2+3=\nassistant: 5</s>\nuser: and times 4?\nassistant: ")

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before), "the adapter did not train"

    # Step 1's loss: policy = base + the adapter as loaded, reference = the base (reference=initial).
    base = AutoModelForCausalLM.from_pretrained(tool_model, dtype=torch.float32).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tool_model, dtype=torch.float32),
                                       str(adapter)).eval()
    expected = dpo_loss(policy, base, tokenizer, pairs, config.beta)
    assert logs.logs[0]["loss"] == pytest.approx(expected, abs=1e-4)
    # Rendered without the tools and arguments, the same pairs give another loss: the check above can fail.
    assert abs(dpo_loss(policy, base, tokenizer, pairs, config.beta, with_kwargs=False) - expected) > 1e-3


def template_pairs(tmp_path: Path, rows: int = 8) -> Path:
    """Pairs whose prompt is a conversation, with tools and chat_template_kwargs, as `prefloop pairs` writes them."""
    history = [{"role": "user", "content": "0+0="}, {"role": "assistant", "content": "0"}]
    out = [{"id": f"p{i}", "prompt": [*history, {"role": "user", "content": f"{i}+1="}],
            "chosen": [{"role": "assistant", "content": str(i + 1)}],
            "rejected": [{"role": "assistant", "content": str(i + 2)}],
            "tools": json.dumps([tool("add")]), "chat_template_kwargs": {"enable_thinking": False},
            "score_chosen": 1.0, "score_rejected": 0.0, "margin": 1.0, "meta": {"judge": "python"}}
           for i in range(rows)]
    return write_jsonl(tmp_path / "pairs.jsonl", out)


@pytest.mark.parametrize(("name", "ids"), [("kto", "prompt_ids"), ("sft", "input_ids")])
def test_kto_and_sft_render_prompts_with_the_pairs_tools(tiny_model, make_config, tmp_path, name, ids):
    """kto and sft keep `tools` and `chat_template_kwargs` beside their rows, and TRL renders the conversation
    with them (the tokenized rows start with the template's tools line)."""
    path = template_pairs(tmp_path)
    dataset = method(name).dataset(load_pairs(path, name))
    assert {"tools", "chat_template_kwargs"} <= set(dataset.column_names)
    trainer = build_trainer(make_config(name, path, method=name, max_length=128, max_steps=1))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    first = tokenizer.decode(trainer.train_dataset[0][ids])
    assert first.startswith("tools: add\nno-think\nuser: 0+0=\nassistant: 0</s>\nuser: ")


def test_pairs_with_tools_are_refused_where_they_would_be_ignored(tmp_path):
    """orpo and simpo do not pass `tools` to the template: refused before any model loads; so is a file whose rows
    disagree on having chat_template_kwargs (TRL would fail on the row without them)."""
    path = template_pairs(tmp_path)
    for name in ("orpo", "simpo"):
        with pytest.raises(ConfigError, match=f"TRL's {name} trainer does not pass"):
            load_pairs(path, name)
    rows = read_records(path)
    del rows[3]["chat_template_kwargs"]
    with pytest.raises(ConfigError, match=r"row 4 has no `chat_template_kwargs`"):
        load_pairs(write_jsonl(tmp_path / "mixed.jsonl", rows), "dpo")
