"""Generation with plain transformers (`model.generate`) on CPU or GPU, optionally with a PEFT adapter on top.

    from prefloop.gen import Sampling
    from prefloop.gen.hf import HFGenerator

    gen = HFGenerator("path/to/model", adapter="runs/r1/adapter")          # dtype/device auto-detected
    out = gen.generate(["2+2=", [{"role": "user", "content": "Hi"}]], n=4, sampling=Sampling(max_new_tokens=32))
    out[1][0]  # {"text": "...", "finish_reason": "stop" | "length", "num_tokens": 7}
    gen.close()

A plain-string prompt is tokenized as is (raw text, completion style, with the tokenizer's default special tokens,
e.g. Llama's BOS); a message list (one request, or a conversation to continue) goes through the tokenizer's chat
template with `add_generation_prompt=True` and the prompt's `Sampling.chat_template_kwargs` (e.g. `tools`).

`num_tokens` counts the tokens the model produced for that completion, padding excluded, *including* the EOS token
(or the token that completed a stop string) -- the same count as vLLM's `len(CompletionOutput.token_ids)`. So an
immediate EOS gives `text == ""`, `num_tokens == 1`, and a truncated completion has `num_tokens == max_new_tokens`.

Failure: `generate` is all-or-nothing. A prompt too long for the context raises `ValueError` before any work starts;
an exception mid-call (e.g. out of memory) propagates and the caller's chunk is retried on resume.
"""

from __future__ import annotations

import gc
import inspect
import logging
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer, StaticLayer

from prefloop import attention
from prefloop.device import resolve_device, resolve_dtype
from prefloop.gen import (
    Sampling,
    check_context,
    encode_prompt,
    merge_alternatives,
    prompt_seeds,
    prompt_template_kwargs,
)
from prefloop.records import Completion, Prompt

log = logging.getLogger(__name__)


def _prefill_groups(lengths: list[int], waste: float = 0.25, min_tokens: int = 256) -> list[tuple[int, int]]:
    """Contiguous row ranges of a batch (rows sorted longest first, as `HFGenerator._batches` makes them) to prefill
    together: a row starts a new group once padding it to the group's longest would waste more than `waste` of its
    row, provided the group already holds `min_tokens` padded tokens (tiny groups make slow, small matmuls)."""
    groups, start = [], 0
    for row in range(1, len(lengths)):
        longest = max(lengths[start:row])
        if lengths[row] < (1 - waste) * longest and (row - start) * longest >= min_tokens:
            groups.append((start, row))
            start = row
    return groups + [(start, len(lengths))] if lengths else groups


class HFGenerator:
    """The `Generator` protocol on `transformers`. `batch_size` counts sequences (prompts x n) per `generate` call."""

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        batch_size: int = 64,
        dtype: str = "auto",
        device: str = "auto",
        max_batch_tokens: int | None = None,
        kv_cache: str = "static",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if kv_cache not in ("dynamic", "static"):
            raise ValueError(f"kv_cache = {kv_cache!r}. Fix: use dynamic or static.")
        self.name = model + (f"+adapter:{adapter}" if adapter else "")
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.device = resolve_device(device)
        self.dtype, reason = resolve_dtype(dtype, self.device)
        log.info("hf generator: device=%s dtype=%s (%s)", self.device, str(self.dtype).removeprefix("torch."), reason)

        # Left padding: every prompt in a batch then ends at the same column, so the new tokens line up after it.
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{model}: the tokenizer has neither a pad nor an eos token; add one of them.")
            log.warning("hf generator: the tokenizer has no pad token; padding with eos %r", self.tokenizer.eos_token)
            self.tokenizer.pad_token = self.tokenizer.eos_token

        net = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype, attn_implementation="sdpa")
        attention.use_on(net, self.device)  # on CPUs, GQA stays grouped under padding masks (prefloop/attention.py)
        if adapter:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapter)
            # Inference only, and this copy of the base is ours: folding W + BA into the weights removes the extra
            # LoRA matmuls per layer (measured on CPU, n=8: +3% tokens/s on the 0.8M tiny model, +10% on a 25M one)
            # at the cost of rounding W + BA to the model dtype. Prompt-learning adapters have nothing to merge.
            if not net.active_peft_config.is_prompt_learning:
                net = net.merge_and_unload()
        self.model = net.to(self.device).eval()

        gen_config = self.model.generation_config
        eos = gen_config.eos_token_id if gen_config.eos_token_id is not None else []
        # Chat models often end turns with a token other than `tokenizer.eos_token` (e.g. Llama 3's <|eot_id|>); the
        # generation config lists those, so stop on the union.
        self.eos_ids = sorted({*([eos] if isinstance(eos, int) else eos), self.tokenizer.eos_token_id} - {None})
        # transformers fills unset knobs with its own defaults, top_k=50 among them; vLLM and OpenAI apply no top-k,
        # so keep the model's own top_k if it has one, else disable it (0).
        self._top_k = gen_config.top_k or 0
        text_config = self.model.config.get_text_config()
        self.max_context: int | None = getattr(text_config, "max_position_embeddings", None)
        self._id_cache: dict[tuple[str, ...], list[int]] = {}
        # Shared prefill (see `_prefill_once`) needs a plain model on transformers' default dynamic cache: not a
        # prompt-learning PEFT wrapper (virtual tokens), not a model with its own cache class (e.g. sliding window).
        supports = getattr(self.model, "_supports_default_dynamic_cache", None)
        self._share_prefill = (not hasattr(self.model, "peft_config") and callable(supports) and supports()
                               and gen_config.cache_implementation is None)
        # The KV cache: preallocated (`static`, transformers' StaticCache: each step writes its keys and values in
        # place) or grown by concatenation each step (`dynamic`). Static generated the same tokens faster on
        # every model bench/gen_throughput.py measures (its "prefloop hf" vs "prefloop hf dynamic" rows). Models
        # with a cache of their own (sliding windows, prompt-learning adapters) keep transformers' choice.
        self.kv_cache = kv_cache if self._share_prefill else "dynamic"
        # The shared prefill runs in length groups (`_prefill_once`) when every cache layer is a plain full-attention
        # one; sliding-window layers keep only their last tokens, leaving no slots to write a group into.
        self._group_prefill = (
            all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.model.config).layers)
            and all(type(layer) is StaticLayer for layer in StaticCache(config=self.model.config, max_cache_len=1).layers))
        forward = inspect.signature(self.model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}  # the prefill's logits: unused
        # Tokens actually decoded so far (greedy copies count once), for the stage's tokens/s.
        self.tokens_generated = 0

    def _encode(self, prompt: Prompt, template_kwargs: dict | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.name, template_kwargs)

    def _batches(self, lengths: list[int], n: int, max_new_tokens: int) -> list[list[int]]:
        """Prompt indices grouped into batches, longest first (an out-of-memory then shows up in the first batch)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        per_batch = max(1, self.batch_size // n)
        batches, start = [], 0
        while start < len(order):
            size = per_batch
            if self.max_batch_tokens:  # the KV cache grows with sequences x (longest prompt + new tokens)
                size = min(size, max(1, self.max_batch_tokens // (n * (lengths[order[start]] + max_new_tokens))))
            batches.append(order[start : start + size])
            start += size
        return batches

    def _completion(self, tokens: list[int], stop: list[str]) -> Completion:
        """Cut one generated row at its first EOS or stop string (whichever comes first) and count its tokens."""
        eos_at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        body = tokens if eos_at is None else tokens[:eos_at]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s and s in text]
        if hits:
            # The stop string is not part of the output (vLLM/OpenAI default). Find the shortest token prefix that
            # already contains it: that token is where the model "stopped" (decode is monotone in the prefix).
            lo, hi = 1, len(body)
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s and s in self.tokenizer.decode(body[:mid], skip_special_tokens=True) for s in stop):
                    hi = mid
                else:
                    lo = mid + 1
            return {"text": text[: min(hits)], "finish_reason": "stop", "num_tokens": lo}
        if eos_at is not None:
            return {"text": text, "finish_reason": "stop", "num_tokens": eos_at + 1}
        # No EOS and no stop string: the row ran to max_new_tokens, every token is real. Only if transformers ended
        # the row on a stop string we failed to see in the decoded text (e.g. one spanning a special token) is it
        # padded after the stop; don't count that padding.
        if stop:
            while tokens and tokens[-1] == self.tokenizer.pad_token_id:
                tokens = tokens[:-1]
        return {"text": text, "finish_reason": "length", "num_tokens": len(tokens)}

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> list[list[Completion] | None]:
        """`n` completions per prompt, in input order. Prompt i's k-th sample is drawn with the seed
        `sampling.seeds[i] + k` (default `sampling.seed + i * n + k`), whatever else shares its batch."""
        if self.model is None:
            raise RuntimeError("HFGenerator.generate called after close().")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        kwargs = prompt_template_kwargs(sampling, len(prompts))
        encoded = [self._encode(p, k) for p, k in zip(prompts, kwargs, strict=True)]
        check_context([len(e) for e in encoded], sampling.max_new_tokens, self.max_context)
        greedy = sampling.temperature <= 0
        # Greedy decoding is deterministic, so the n completions are identical: decode once and copy.
        per_prompt = 1 if greedy else n
        # Sampling is prefloop's `_RowSampler` (each row its own seeded generator), after which generate's greedy
        # step takes the one token left: what a prompt gets does not depend on the batch it shares.
        options = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            temperature=None, top_p=None, top_k=None,  # the model's generation_config must not warp again
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        seeds = prompt_seeds(sampling, len(prompts), n)
        capture = None
        if sampling.logprobs or sampling.top_logprobs:
            capture = _Capture(sampling.top_logprobs, self._ids_of(sampling.logprobs_for))
        if sampling.stop:  # lets generate end a row early; the cut itself is made in `_completion`
            options.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)

        results: list[list[Completion] | None] = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id
        for batch in self._batches([len(e) for e in encoded], per_prompt, sampling.max_new_tokens):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            processors = []
            if capture is not None:
                capture.reset()
                processors.append(capture)  # first: it records the raw distribution
            if not greedy:
                processors.append(_RowSampler([seeds[i] + k for i in batch for k in range(per_prompt)], sampling,
                                              self._top_k))
            options["logits_processor"] = LogitsProcessorList(processors)
            with torch.inference_mode():
                inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
                if per_prompt > 1 and width > 1 and self._share_prefill:
                    inputs = self._prefill_once(inputs, per_prompt, width + sampling.max_new_tokens)
                elif per_prompt > 1:
                    inputs = {k: v.repeat_interleave(per_prompt, 0) for k, v in inputs.items()}
                if self.kv_cache == "static" and "past_key_values" not in inputs:
                    inputs["past_key_values"] = StaticCache(config=self.model.config,
                                                            max_cache_len=width + sampling.max_new_tokens)
                out = self.model.generate(**inputs, **options)
                new = out[:, width:]
                steps = capture.finish(new) if capture is not None else None
            new_tokens = new.tolist()  # rows are prompt-major: p0 x k, p1 x k, ...
            for row, i in enumerate(batch):
                done = []
                for k in range(per_prompt):
                    tokens = new_tokens[row * per_prompt + k]
                    completion = self._completion(tokens, sampling.stop)
                    if steps is not None:
                        self._add_logprobs(completion, tokens, steps, row * per_prompt + k, sampling)
                    done.append(completion)
                self.tokens_generated += sum(c["num_tokens"] for c in done)
                results[i] = done if not greedy else [dict(done[0]) for _ in range(n)]
        return results

    def _prefill_once(self, inputs: dict, copies: int, max_len: int) -> dict:
        """Run the prompts through the model once and give `generate` that KV cache, copied for the `copies` samples.

        `generate(num_return_sequences=n)` copies every prompt n times *before* the prefill, so it computes each
        prompt's KV cache n times, on left-padded rows: at n=4 with 4-94-token prompts and 32 new tokens, that
        duplicated prefill was most of the FLOPs (bench/gen_throughput.py, 25M model: 64 rows 4.4 s -> 2.7 s with
        this). Here the prompts (all but their last token) go through the model once, the cache is repeated per
        sample (rows stay prompt-major, as generate orders them), and generate starts from the last prompt token.

        The prefill runs in groups of prompts of similar length (`_prefill_groups`), each padded only to its own
        longest: one batch padded to its longest prompt spent half its prefill on padding when prompts were 45
        tokens on average and 90 at most (100M model, 256 rows: the prefill was 13 of 34 s). A row's keys and
        values do not depend on its padding (positions count from its first real token, padding is masked), so each
        group's cache is written right-aligned into the batch's; the slots left of a row's prompt stay zero and
        masked. Sampling is unchanged; logits differ from a single padded prefill by float rounding only.
        """
        mask = inputs["attention_mask"]
        rows, width = mask.shape
        # Positions as generate derives them from the mask (GenerationMixin._prepare_position_ids_for_generation):
        # a left-padded row's first real token is position 0.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        lengths = mask.sum(-1).tolist()
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (keys, values) [rows, copies, h, len, d]
        if not self._group_prefill:
            return self._prefill_whole(inputs, positions, copies, max_len)
        static = StaticCache(config=self.model.config, max_cache_len=max_len) if self.kv_cache == "static" else None
        for lo, hi in _prefill_groups(lengths):
            span = max(lengths[lo:hi]) - 1  # the group's cached prompt tokens (all but each prompt's last)
            if span < 1:
                continue  # one-token prompts: nothing to cache before generate's first step
            cols = slice(width - 1 - span, width - 1)
            group = DynamicCache(config=self.model.config)
            self.model(input_ids=inputs["input_ids"][lo:hi, cols], attention_mask=mask[lo:hi, cols],
                       position_ids=positions[lo:hi, cols], past_key_values=group, use_cache=True, **self._keep_last)
            for i, layer in enumerate(group.layers):
                if i == len(layers):
                    layers.append(self._cache_tensors(layer, rows, copies, width - 1, static, i))
                for full, part in zip(layers[i], (layer.keys, layer.values), strict=True):
                    full[lo:hi, :, :, width - 1 - span : width - 1].copy_(part.unsqueeze(1))
        if static is not None:
            for layer in static.layers:
                layer.cumulative_length.add_(width - 1)
            cache = static
        else:
            cache = DynamicCache(config=self.model.config)
            for i, (keys, values) in enumerate(layers):
                cache.update(keys.flatten(0, 1), values.flatten(0, 1), i)
        return {"input_ids": inputs["input_ids"].repeat_interleave(copies, 0),
                "attention_mask": inputs["attention_mask"].repeat_interleave(copies, 0), "past_key_values": cache}

    def _prefill_whole(self, inputs: dict, positions: torch.Tensor, copies: int, max_len: int) -> dict:
        """The whole batch in one prefill padded to its longest prompt, its cache repeated per sample: for models
        whose cache layers are not plain full-attention ones (a sliding window keeps only its last tokens)."""
        cache = DynamicCache(config=self.model.config)
        mask = inputs["attention_mask"]
        self.model(input_ids=inputs["input_ids"][:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   past_key_values=cache, use_cache=True, **self._keep_last)
        cache.batch_repeat_interleave(copies)
        if self.kv_cache == "static":
            static = StaticCache(config=self.model.config, max_cache_len=max_len)
            for i, layer in enumerate(cache.layers):  # StaticLayer has no batch_repeat_interleave: copy it in
                static.update(layer.keys, layer.values, i)
            cache = static
        return {"input_ids": inputs["input_ids"].repeat_interleave(copies, 0),
                "attention_mask": mask.repeat_interleave(copies, 0), "past_key_values": cache}

    @staticmethod
    def _cache_tensors(layer, rows: int, copies: int, cached: int, static: StaticCache | None, index: int):
        """One layer's (keys, values) for the whole batch, viewed as [prompts, copies, heads, slots, head dim] and
        zeroed: the StaticCache's own preallocated tensors (lazily initialized to this layer's heads and sizes; the
        prompt fills slots [0, cached)), or fresh ones of `cached` slots for a dynamic cache."""
        k, v = layer.keys, layer.values
        if static is None:
            return tuple(t.new_zeros(rows, copies, t.shape[1], cached, t.shape[-1]) for t in (k, v))
        target = static.layers[index]
        target.lazy_initialization(k.new_empty(rows * copies, k.shape[1], 0, k.shape[-1]),
                                   v.new_empty(rows * copies, v.shape[1], 0, v.shape[-1]))
        return tuple(t.view(rows, copies, *t.shape[1:]) for t in (target.keys, target.values))

    def _add_logprobs(self, completion: Completion, tokens: list[int], steps: _Steps, row: int,
                      sampling: Sampling) -> None:
        count = completion["num_tokens"]
        completion["token_ids"] = tokens[:count]
        if sampling.logprobs:
            completion["logprobs"] = steps.chosen[row][:count]
        if sampling.top_logprobs:
            decode = self._token_text
            completion["tokens"] = [decode(t) for t in tokens[:count]]
            completion["top_logprobs"] = [
                # dict(zip(...)) first: an id both in the top k and asked for by `logprobs_for` counts once.
                merge_alternatives((decode(t), lp) for t, lp in dict(zip(ids, lps, strict=True)).items())
                for ids, lps in zip(steps.top_ids[row][:count], steps.top_values[row][:count], strict=True)
            ]

    def _ids_of(self, texts: tuple[str, ...]) -> list[int]:
        """Every vocabulary id whose text, stripped of spaces and brackets, is one of `texts` ("A" and " A")."""
        if not texts:
            return []
        key = tuple(texts)
        if key not in self._id_cache:
            wanted = set(texts)
            junk = " \t\n\r[]()*:\"'.▁Ġ"
            self._id_cache[key] = [i for i in range(len(self.tokenizer))
                                   if self.tokenizer.decode([i]).strip(junk) in wanted]
        return self._id_cache[key]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def close(self) -> None:
        """Free the model's memory; the generator cannot be used afterwards."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class _Steps:
    """Per row and generated step: the chosen token's log-prob, and the top-k alternatives' ids and log-probs."""

    chosen: list[list[float]]
    top_ids: list[list[list[int]]]
    top_values: list[list[list[float]]]


class _RowSampler(LogitsProcessor):
    """Samples every row with a generator of its own, seeded per prompt and sample, so what a prompt gets does not
    depend on which prompts share its batch or call: a resumed run samples what a straight run did (up to float
    rounding of a different batch shape, which moves a draw only when it falls within ~1e-6 of a boundary).

    Temperature, top-k and top-p are transformers' own warpers, applied as `generate(do_sample=True)` would; the
    row's draw then leaves one token, which generate's greedy step takes.
    """

    def __init__(self, seeds: list[int], sampling: Sampling, top_k: int) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        for warp in self.warpers:
            logits = warp(input_ids, logits)
        # Inverse-CDF: one uniform draw per row against the row's cumulative probabilities (in float64, so a token's
        # share of [0, 1) is its probability to ~1e-16). `torch.multinomial` drew one exponential per vocabulary
        # entry instead: 16-21% of decoding time on a 49k vocabulary (bench/README.md, section 1).
        cdf = logits.softmax(-1).cpu().double().cumsum(-1)
        draws = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        # right=True: the first token whose cumulative sum exceeds the draw; a zero-probability token (cut by top-k or
        # top-p) adds nothing to the sum, so it is never the first to exceed it.
        total = cdf[:, -1]
        target = torch.minimum(draws * total, torch.nextafter(total, torch.zeros_like(total)))  # < total: in range
        picks = torch.searchsorted(cdf, target.unsqueeze(-1), right=True)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(-1, picks.to(scores.device), 0.0)


class _Capture(LogitsProcessor):
    """Records log-probs while `generate` runs, from the raw logits (before temperature and top-p, which transformers
    applies after custom processors), as vLLM's default `raw_logprobs`.

    Only the previous step's distribution is kept: with `output_logits=True` transformers would hold every step's
    [rows, vocab] logits at once, gigabytes for a real vocabulary and a long answer.
    """

    def __init__(self, top_k: int, extra_ids: list[int] | None = None) -> None:
        self.top_k, self.extra = top_k, torch.tensor(extra_ids or [], dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:  # the token sampled at the previous step is now the last input
            self.chosen.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logprobs = scores.float().log_softmax(-1)
        if self.top_k:
            values, ids = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
            if len(self.extra):  # the asked-for tokens too (a token in both is merged by its text later)
                extra = self.extra.to(logprobs.device).expand(logprobs.shape[0], -1)
                values, ids = torch.cat([values, logprobs.gather(-1, extra)], -1), torch.cat([ids, extra], -1)
            self.top.append((values.cpu(), ids.cpu()))
        self.previous = logprobs
        return scores

    def finish(self, new: torch.Tensor) -> _Steps:
        """The recorded steps for the generated tokens `new` [rows, steps]."""
        if self.previous is not None:
            self.chosen.append(self.previous.gather(-1, new[:, len(self.chosen) : len(self.chosen) + 1]).squeeze(-1))
        rows = new.shape[0]
        chosen = torch.stack(self.chosen, dim=1).tolist() if self.chosen else [[] for _ in range(rows)]
        if self.top:
            values = torch.stack([v for v, _ in self.top], dim=1).tolist()
            ids = torch.stack([i for _, i in self.top], dim=1).tolist()
        else:
            values = ids = [[] for _ in range(rows)]
        self.reset()
        return _Steps(chosen, ids, values)

