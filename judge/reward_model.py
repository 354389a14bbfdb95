"""The `reward_model` judge: a sequence-classification reward model scores each (prompt, response).

    prefloop judge --candidates c.jsonl --out j.jsonl --judge reward_model --reward-model PATH_OR_ID \
        [--rm-output 0|LABEL] [--rm-template auto|chat|raw]

- Bradley-Terry RMs (one logit) and multi-objective heads (`--rm-output` picks the score: an index, or a name
  from the model's `id2label`).
- (prompt, response) is formatted with the RM's own chat template (`chat`: the prompt's messages plus the
  response as the assistant turn; a string prompt becomes a user message), or as raw text `prompt + response +
  EOS` (`raw`, exactly as TRL's `RewardTrainer` formats standard pairs); `auto` uses the template when the
  tokenizer has one.
- Sequences are sorted by length and batched (up to `batch_size` sequences and `max_batch_tokens` padded
  tokens per forward), padded on the right with the
  tokenizer's pad token (eos when it has none), and the model's `pad_token_id` is set to match, so the score is
  read at each sequence's last real token: a score does not depend on what it was batched with.
- A sequence longer than the model's context is an `error` with the reason (never silently truncated, which
  would score a different response); a non-finite score is an `error` too.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prefloop import attention
from prefloop.config import ConfigError
from prefloop.device import resolve_device, resolve_dtype
from prefloop.judge import ScoringKind, Verdict
from prefloop.judge.cache import CachedJudge, JudgeCache
from prefloop.records import Prompt

log = logging.getLogger(__name__)

TEMPLATES = ("auto", "chat", "raw")


class RewardModelJudge:
    """See module docstring. `score` is the engine; `judge` maps it over candidates records."""

    def __init__(self, model: str, batch_size: int = 32, dtype: str = "auto", device: str = "auto",
                 output: str = "0", template: str = "auto", max_length: int | None = None,
                 max_batch_tokens: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if template not in TEMPLATES:
            raise ValueError(f"rm_template = {template!r}. Fix: use one of {', '.join(TEMPLATES)}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        model = _resolve(model)
        self.batch_size = batch_size
        self.device = resolve_device(device)
        # Padded tokens per forward. On a CPU the forward is compute-bound and big activations fall out of cache:
        # measured on 2 cores (25.8M RM, 10-400 token inputs) 4 sequences per batch beat 1 by 1.2x and 32 lost
        # to 1 by 1.3x, so CPU batches stop near 2k tokens; short inputs still batch `batch_size` at a time.
        self.max_batch_tokens = max_batch_tokens or (32768 if self.device.type == "cuda" else 2048)
        self.dtype, reason = resolve_dtype(dtype, self.device)
        log.info("reward model: device=%s dtype=%s (%s)", self.device, str(self.dtype).removeprefix("torch."), reason)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "right"
        net = AutoModelForSequenceClassification.from_pretrained(model, dtype=self.dtype)
        attention.use_on(net, self.device)  # on CPUs, GQA stays grouped under padding masks (prefloop/attention.py)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{model}: the tokenizer has neither a pad nor an eos token; add one of them.")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The classifier reads the last token that is not padding: it must know which id pads.
        net.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = net.to(self.device).eval()
        self.column = _output_column(net.config, output)
        self.template = template if template != "auto" else ("chat" if self.tokenizer.chat_template else "raw")
        context = getattr(net.config.get_text_config(), "max_position_embeddings", None)
        self.max_length = max_length or context
        self.name = f"reward_model:{model}"
        self.info = {"engine": "transformers", "model": model, "dtype": str(self.dtype).removeprefix("torch."),
                     "device": str(self.device), "output": output, "template": self.template}

    def text(self, prompt: Prompt, response: str) -> str:
        """The exact text the reward model scores for (prompt, response)."""
        if self.template == "raw":
            if not isinstance(prompt, str):
                raise ValueError(f"{self.name}: message prompts need a chat template, and this tokenizer has none. "
                                 "Fix: --rm-template raw works only with plain-text prompts.")
            # As TRL's RewardTrainer formats standard (text) pairs: the score is read at an appended EOS.
            eos = self.tokenizer.eos_token or ""
            return prompt + response + ("" if response.endswith(eos) else eos)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                  tokenize=False)

    def _encode(self, prompts: list[Prompt], responses: list[str]) -> list[list[int]]:
        """Token ids per (prompt, response), tokenized in one call (a fast tokenizer batches it natively)."""
        texts = [self.text(p, r) for p, r in zip(prompts, responses, strict=True)]
        if not texts:
            return []
        # A chat template writes its own special tokens (BOS...); raw text gets the tokenizer's defaults.
        return self.tokenizer(texts, add_special_tokens=self.template == "raw")["input_ids"]

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[tuple[float | None, str | None]]:
        """(score, None) or (None, reason) per (prompt, response), in order."""
        if self.model is None:
            raise RuntimeError("RewardModelJudge used after close().")
        encoded = self._encode(prompts, responses)
        out: list[tuple[float | None, str | None]] = [(None, None)] * len(encoded)
        fits = []
        for i, ids in enumerate(encoded):
            if self.max_length and len(ids) > self.max_length:
                out[i] = (None, f"{len(ids)} tokens, longer than the reward model's {self.max_length}")
            else:
                fits.append(i)
        fits.sort(key=lambda i: len(encoded[i]))  # similar lengths per batch: little padding
        pad = self.tokenizer.pad_token_id
        batches, start = [], 0
        while start < len(fits):  # sorted by length: the padded size of a batch is its last row's length
            end = start + 1
            while (end < len(fits) and end - start < self.batch_size
                   and (end - start + 1) * len(encoded[fits[end]]) <= self.max_batch_tokens):
                end += 1
            batches.append(fits[start:end])
            start = end
        for batch in batches:
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for i, value in zip(batch, logits[:, self.column].float().tolist(), strict=True):
                out[i] = (value, None) if math.isfinite(value) else (None, f"the reward model returned {value}")
        return out

    def judge(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        flat = [(r, i) for r, row in enumerate(rows) for i in range(len(row["completions"]))]
        results = self.score([rows[r]["prompt"] for r, _ in flat],
                             [rows[r]["completions"][i]["text"] for r, i in flat])
        verdicts: list[Verdict] = [{"scores": [None] * len(row["completions"]),
                                    "statuses": ["error"] * len(row["completions"]),
                                    "errors": [None] * len(row["completions"])} for row in rows]
        for (r, i), (value, error) in zip(flat, results, strict=True):
            verdicts[r]["scores"][i] = value
            verdicts[r]["statuses"][i] = "ok" if error is None else "error"
            verdicts[r]["errors"][i] = error
        return verdicts

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _resolve(model: str) -> str:
    """The reward model's path (`prefloop.models`: a local path that is not a model says so and is never looked up
    on the hub). GGUF files and `prefloop train` outputs hold policies (causal LMs), not reward models: refused."""
    from prefloop.models import is_gguf, is_train_output, resolve_model

    if is_gguf(model) or is_train_output(model):
        kind = "a GGUF file" if is_gguf(model) else "a `prefloop train` output"
        raise ConfigError(f"{model}: {kind} holds a policy (a causal LM), not a reward model. Fix: pass a "
                          f"sequence-classification model, or train one from it: python -m prefloop.train.reward "
                          f"--model {model} --pairs PAIRS --out RM.")
    return resolve_model(model)


def _output_column(config, output: str | int) -> int:
    """The logit that is the score: an index, or a label name from `id2label` (multi-objective heads)."""
    labels = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = config.num_labels
    text = str(output)
    if text.lstrip("-").isdigit():
        index = int(text)
        if not -n <= index < n:
            raise ValueError(f"rm_output {output!r}: the head has {n} outputs (0..{n - 1}).")
        return index % n
    if text in labels:
        return labels[text]
    raise ValueError(f"rm_output {output!r} is neither an index (0..{n - 1}) nor a label "
                     f"({', '.join(labels) or 'the model has no id2label'}).")


@dataclass
class RewardModelOptions(ScoringKind):
    """The `reward_model` judge kind (registered in `prefloop.judge.KINDS`): --reward-model and its --rm-* flags."""

    model: str
    batch_size: int = 32
    dtype: str = "auto"
    output: str = "0"
    template: str = "auto"
    max_length: int | None = None

    generator: ClassVar[bool] = False
    cached: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: Any) -> RewardModelOptions:
        if not config.reward_model:
            raise ConfigError("--judge reward_model needs --reward-model PATH (a sequence-classification model).")
        return cls(config.reward_model, config.batch_size, config.dtype, config.rm_output, config.rm_template,
                   config.max_length)

    def load(self, cache: JudgeCache | None = None) -> RewardModelJudge | CachedJudge:
        judge = RewardModelJudge(self.model, batch_size=self.batch_size, dtype=self.dtype, output=self.output,
                                 template=self.template, max_length=self.max_length)
        return CachedJudge(judge, cache) if cache is not None else judge
