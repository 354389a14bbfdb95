"""A tiny local model whose chat template renders `tools` and `enable_thinking`, for the multi-turn tests.

prefloop's tiny template (prefloop/demo/tiny.py) ignores both, so a test on it would pass even if they never reached the
template. This one writes a first line naming the tools and a "no-think" line when `enable_thinking` is false,
then the conversation exactly as the tiny template does.
"""

from __future__ import annotations

from pathlib import Path

from prefloop.demo.tiny import CHAT_TEMPLATE, TinyConfig, save_tiny

TOOLS_TEMPLATE = (
    "{% if tools %}{{ 'tools: ' }}{% for t in tools %}{{ t['function']['name'] }}"
    "{% if not loop.last %}{{ ',' }}{% endif %}{% endfor %}{{ '\n' }}{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ 'no-think\n' }}{% endif %}"
) + CHAT_TEMPLATE


def tool(name: str) -> dict:
    """A tool schema in the form apply_chat_template, vLLM and TRL take."""
    return {"type": "function", "function": {"name": name, "description": f"{name} two numbers",
                                             "parameters": {"type": "object", "properties": {
                                                 "a": {"type": "number"}, "b": {"type": "number"}}}}}


# A conversation to continue: user, assistant, user (and the row's own tools).
CONVERSATION = [
    {"role": "system", "content": "Be exact."},
    {"role": "user", "content": "2+3="},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and times 4?"},
]


def save_tool_model(out: Path, context: int = 128) -> Path:
    """The tiny random Llama, its tokenizer carrying `TOOLS_TEMPLATE`."""
    from transformers import AutoTokenizer

    path = save_tiny(out, TinyConfig(max_position_embeddings=context))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def template_ids(tokenizer, messages: list[dict], generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids straight from `apply_chat_template` (tokenize=True): the reference the tests compare with."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False, **kwargs))
