"""Generation through any OpenAI-compatible server: vLLM's, `transformers serve`, OpenAI itself, ...

    # a local server; loading --adapter at runtime needs --enable-lora and the environment variable
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model M --enable-lora

    from prefloop.gen import Sampling
    from prefloop.gen.openai import OpenAIGenerator

    gen = OpenAIGenerator("M", base_url="http://127.0.0.1:8000/v1", adapter="runs/r1/adapter")  # waits for it
    out = gen.generate(["2+2=", [{"role": "user", "content": "Hi"}]], n=4, sampling=Sampling(max_new_tokens=32))
    out[1][0]  # {"text": "...", "finish_reason": "stop" | "length", "num_tokens": 7 | None}
    gen.close()

Plain-string prompts go to `/completions` (raw text), message lists to `/chat/completions` (the server applies the
chat template, to a whole conversation too); `endpoint="chat"` sends a string as one user message. A prompt's
`Sampling.chat_template_kwargs` travel as vLLM's server reads them: `tools` as the request's own `tools` (with
`tool_choice: "none"`, so the answer stays text, as the local backends record it, and a vLLM server needs no tool
parser; the template still shows the tools), everything else as `chat_template_kwargs` (a vLLM extension, sent
only when set). The API key comes from the environment
variable named by `api_key_env` and goes only into the `Authorization` header: never into logs, exception messages
or files (server text quoted in messages is scrubbed of it too, in case a server echoes it).

Failure semantics:
- The constructor polls `GET {base_url}/models` (else `/health` at the server root) until one answers 200, at most
  `ready_timeout` seconds (then TimeoutError naming the URL and the last answer); a 401/403 there fails at once.
- Every request has a hard `timeout`. Connection errors, timeouts, malformed bodies and HTTP 408/409/429/5xx are
  retried up to `max_retries` times with jittered exponential backoff, waiting at least what `Retry-After` asks.
  Other 4xx are not retried. A prompt that still fails is `None` in the result (logged with its reason; the stage
  counts it and a re-run retries it).
- Errors that would hit every prompt raise `GenerationAborted` with the prompts finished so far, after cancelling
  the requests in flight: `insufficient_quota`, 401/403, 404 (unknown model or route), logprobs not returned, and
  a server that still refuses connections when a prompt's retries run out (it went away: failing each prompt in
  turn would only record an outage as failed prompts).
- Replies with fewer than `n` choices (`transformers serve` ignores `n`) are topped up by more requests with new
  seeds; extra choices are dropped. Greedy (temperature 0) asks for one completion and copies it `n` times.
- `num_tokens` is exact when the reply says (the count of token logprobs, or `usage.completion_tokens` of a
  single-choice reply), else None.
- `usage` counts every reply's tokens (prefloop/budget.py). With a `budget`, no request starts once the spend passes
  it: those in flight finish (paid for), the call raises `GenerationAborted` with the finished prompts.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai

from prefloop.budget import Usage
from prefloop.gen import GenerationAborted, Sampling, merge_alternatives, prompt_template_kwargs
from prefloop.records import Completion, Prompt

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_BASE = 0.5  # seconds before the first retry; doubles per retry, times a random factor in [0.5, 1]
BACKOFF_MAX = 30.0  # cap on one computed backoff: past that, waiting longer rarely helps a struggling server
RETRY_AFTER_MAX = 120.0  # cap on a server-requested wait (as the openai SDK); longer means a quota window
EMPTY_REPLIES_MAX = 3  # replies with no choices at all before a prompt fails (one that ignores `n` still gives 1)
READY_POLL_MAX = 2.0  # the readiness poll interval grows from 0.05 s to this
RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx: timeouts, lock conflicts, rate limits, server errors
PLACEHOLDER_KEY = "EMPTY"  # local servers ignore the key, but the client sends one


class _Fatal(Exception):
    """Stop the whole call: the same error would hit every prompt."""


class _Failed(Exception):
    """One prompt failed for good; the message says why."""


class _Halted(Exception):
    """The budget is spent: this request is not sent (not a failure of the prompt)."""


class OpenAIGenerator:
    """The `Generator` protocol over HTTP. `concurrency` bounds requests in flight; `timeout` is per request.

    One `generate` call at a time per instance (the stage's way); the constructor blocks until the server is ready.
    """

    def __init__(self, model: str, adapter: str | None = None, base_url: str = "http://127.0.0.1:8000/v1",
                 api_key_env: str = "OPENAI_API_KEY", endpoint: str = "auto", concurrency: int = 16,
                 timeout: float = 600.0, max_retries: int = 6, ready_timeout: float = 300.0,
                 backoff_base: float | None = None) -> None:
        if endpoint not in ("auto", "chat", "completions"):
            raise ValueError(f"endpoint = {endpoint!r}. Fix: use auto, chat or completions.")
        if concurrency < 1 or timeout <= 0 or max_retries < 0:
            raise ValueError("need concurrency >= 1, timeout > 0 and max_retries >= 0.")
        self.name = model + (f"+adapter:{adapter}" if adapter else "")
        self.base_url = base_url.rstrip("/")
        self.endpoint, self.concurrency, self.timeout, self.max_retries = endpoint, concurrency, timeout, max_retries
        self.backoff_base = BACKOFF_BASE if backoff_base is None else backoff_base
        self.api_key_env = api_key_env
        key = (os.environ.get(api_key_env) or "").strip()  # a key file read whole brings its newline along
        if not key.isprintable():  # the HTTP library would refuse the header, quoting it (key and all) in its error
            raise ValueError(f"${api_key_env} has a control character (a line break?) inside the key, which cannot "
                             f"be sent. Fix: set {api_key_env} to the key alone.")
        if not key:
            if urlsplit(self.base_url).hostname == "api.openai.com":
                raise ValueError(f"{self.base_url} needs an API key and ${api_key_env} is not set. "
                                 f"Fix: export {api_key_env}=<your key> (or name another variable with api_key_env).")
            key = PLACEHOLDER_KEY
        self._key = key  # kept private: see `_scrub`
        self._auth = {"Authorization": f"Bearer {key}"}  # for our own requests (readiness, LoRA loading)
        # vLLM and `transformers serve` read chat `max_tokens` (the latter ignores `max_completion_tokens`); OpenAI's
        # newer models refuse it, naming the parameter, and we switch for good (see `_classify`).
        self._max_param = "max_tokens"
        self.requests = 0  # HTTP requests sent for generation (retries and top-ups included)
        self.tokens_generated = 0  # completion tokens in all replies (usage totals, so exact even when n > 1)
        self.usage = Usage(model)  # prompt and completion tokens of every reply, priced by the base model's name
        self.budget = None  # set by a stage: an object whose `exceeded()` gives a reason to stop sending, or None
        # max_retries=0: the SDK's own retries would hide the Retry-After/quota handling below and multiply waits.
        self._http = openai.DefaultAsyncHttpxClient(timeout=timeout)  # also ours for /models, /health, LoRA
        self._client = openai.AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=0, timeout=timeout,
                                          http_client=self._http)
        # One event loop in a thread for the generator's life: the client's connection pool belongs to one loop,
        # and `generate` stays synchronous even when the caller itself runs an event loop (e.g. Jupyter).
        self._loop: asyncio.AbstractEventLoop | None = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prefloop-openai", daemon=True)
        self._thread.start()
        try:
            self._run(self._wait_ready(ready_timeout))
            self.model = self._run(self._load_adapter(adapter)) if adapter else model
        except BaseException:
            self.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the caller: stop the requests in flight too
            raise

    def _scrub(self, text: object, limit: int = 300) -> str:
        """Server text fit for logs and messages: shortened, and never carrying the API key (a server may echo it)."""
        text = str(text)
        if self._key != PLACEHOLDER_KEY:
            text = text.replace(self._key, "<api key>")
        return text if len(text) <= limit else text[:limit] + "..."

    async def _wait_ready(self, ready_timeout: float) -> None:
        """Poll `/models` (then `/health`) until one answers 200; fail at once on 401/403, or at the deadline."""
        parts = urlsplit(self.base_url)
        urls = [f"{self.base_url}/models", f"{parts.scheme}://{parts.netloc}/health"]
        started, delay, last = time.monotonic(), 0.05, "no answer yet"
        deadline = started + ready_timeout
        while True:
            for url in urls:
                left = deadline - time.monotonic()
                try:
                    reply = await self._http.get(url, headers=self._auth, timeout=max(0.1, min(5.0, left)))
                except Exception as e:  # refused, reset, timed out: the server is not up (yet)
                    last = f"{url}: {type(e).__name__}: {self._scrub(e, 120)}"
                    break  # /health at the same host will not answer either
                if reply.status_code == 200:
                    log.info("openai: %s answered after %.1f s", url, time.monotonic() - started)
                    return
                last = f"{url}: HTTP {reply.status_code} {self._scrub(reply.text, 120)}"
                if reply.status_code in (401, 403):
                    raise PermissionError(f"{url} refused the API key (HTTP {reply.status_code}). "
                                          f"Fix: set ${self.api_key_env} to a key this server accepts.")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.base_url} was not ready within {ready_timeout:g} s (last: {last}). "
                                   "Fix: start the server, check base_url, or raise ready_timeout.")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, READY_POLL_MAX)

    async def _load_adapter(self, adapter: str) -> str:
        """Load a local PEFT adapter into the server through vLLM's runtime LoRA API; return the name to request."""
        path = Path(adapter).resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"adapter {adapter}: not a directory. Fix: pass a PEFT adapter directory.")
        name = adapter_name(path)
        url = f"{self.base_url}/load_lora_adapter"
        try:
            reply = await self._http.post(url, json={"lora_name": name, "lora_path": str(path)},
                                          headers=self._auth, timeout=self.timeout)
            status, text = reply.status_code, self._scrub(reply.text)
        except Exception as e:
            status, text = None, f"{type(e).__name__}: {self._scrub(e)}"
        if status == 200 or (status == 400 and "already" in text.lower()):
            log.info("openai: adapter %s is served as %r", path, name)
            return name
        raise RuntimeError(
            f"{url} did not load adapter {path} ({f'HTTP {status}: ' if status else ''}{text}). The server must "
            "load LoRA adapters at runtime. Fix: start it as `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m "
            "vllm.entrypoints.openai.api_server --model <base> --enable-lora --max-lora-rank <R >= adapter rank>`, "
            "or merge the adapter (`prefloop train ... --merge` writes <out>/merged), serve the merged model and "
            "drop --adapter."
        )

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> list[list[Completion] | None]:
        """`n` completions per prompt, in input order; `None` for a prompt that failed (see module docstring).

        Raises `ValueError` before any request for a message prompt sent to `endpoint="completions"`, and
        `GenerationAborted` (with the finished prompts) on a fatal error.
        """
        if self._loop is None:
            raise RuntimeError("OpenAIGenerator.generate called after close().")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        self._template_kwargs = prompt_template_kwargs(sampling, len(prompts))
        for i, (p, kwargs) in enumerate(zip(prompts, self._template_kwargs, strict=True)):
            if self.endpoint == "completions" and not isinstance(p, str):
                raise ValueError(f"prompt {i} is a message list, but endpoint='completions' sends raw text. "
                                 "Fix: use endpoint auto or chat, or give plain-string prompts.")
            if kwargs and isinstance(p, str) and self.endpoint != "chat":
                raise ValueError(f"prompt {i} is plain text sent to /completions, but has chat-template arguments "
                                 f"({', '.join(sorted(kwargs))}). Fix: give it as messages, or use endpoint chat.")
        return self._run(self._generate(prompts, n, sampling))

    async def _generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> list[list[Completion] | None]:
        results: list[list[Completion] | None] = [None] * len(prompts)
        self._retries: Counter[str] = Counter()  # by kind of error, for the log line below
        self._top_ups = 0
        self._slots = asyncio.Semaphore(self.concurrency)
        self._fatal: str | None = None  # set by the first fatal error: no request starts after it
        self._halt: str | None = None  # set when the budget is spent: no request starts after it, those in flight finish
        started, requests_before = time.monotonic(), self.requests

        async def one(i: int) -> None:
            results[i] = await self._prompt(i, prompts[i], n, sampling)

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
        try:
            await asyncio.gather(*tasks)
        except BaseException as e:
            for task in tasks:  # gather does not cancel the others when one raises
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not isinstance(e, _Fatal):
                raise
            log.error("openai: stopping: %s", e)
            raise GenerationAborted(str(e), results) from None
        finally:
            unfinished = sum(r is None for r in results)  # failed, or cancelled by a fatal error
            retries = ", ".join(f"{k} x{v}" for k, v in sorted(self._retries.items())) or "none"
            (log.warning if unfinished else log.info)(
                "openai: %d prompts, %d unfinished; %d requests, %d top-ups, retries: %s; %.1f s", len(prompts),
                unfinished, self.requests - requests_before, self._top_ups, retries, time.monotonic() - started)
        if self._halt:
            log.warning("openai: stopped sending: %s", self._halt)
            raise GenerationAborted(self._halt, results)
        done = [cs for cs in results if cs]
        if n > 1 and sampling.temperature > 0 and done and all(len({c["text"] for c in cs}) == 1 for cs in done):
            log.warning("openai: all %d completions of every prompt are identical: the server seems to decode "
                        "greedily (`transformers serve` samples only if the model's generation_config.json has "
                        '"do_sample": true)', n)
        return results

    async def _prompt(self, i: int, prompt: Prompt, n: int, sampling: Sampling) -> list[Completion] | None:
        """All `n` completions of one prompt, topping up short replies; None (logged) if it fails."""
        want = 1 if sampling.temperature <= 0 else n  # greedy: the n completions would be identical
        got: list[Completion] = []
        empty = attempt = 0
        try:
            while len(got) < want:
                self._top_ups += attempt > 0
                # Seeds differ per prompt and per top-up; vLLM gives the k-th of n choices seed + k, so random
                # (hashed) seeds rather than seed + 1 keep a top-up from repeating an earlier choice.
                # With per-prompt seeds (the stage's), a prompt's requests depend on the prompt alone.
                seed = (derive_seed(sampling.seeds[i], 0, attempt) if sampling.seeds
                        else derive_seed(sampling.seed, i, attempt))
                attempt += 1
                batch = await self._request(i, prompt, want - len(got), sampling, seed)
                empty = empty + 1 if not batch else 0
                if empty >= EMPTY_REPLIES_MAX:
                    raise _Failed(f"{empty} replies in a row had no choices")
                got += batch[: want - len(got)]
        except _Failed as e:
            log.warning("openai: prompt %d failed: %s", i, e)
            return None
        except _Halted:
            return None
        return got if want == n else [dict(got[0]) for _ in range(n)]

    async def _request(self, i: int, prompt: Prompt, k: int, sampling: Sampling, seed: int) -> list[Completion]:
        """One API call for `k` completions of prompt `i`, retried per the policy. Raises `_Failed` or `_Fatal`."""
        retries = 0
        while True:
            try:
                async with self._slots:  # held only while a request is in flight, not while backing off
                    if self._fatal:
                        raise _Fatal(self._fatal)
                    if self.budget is not None and not self._halt:
                        self._halt = self.budget.exceeded()
                    if self._halt:
                        raise _Halted
                    self.requests += 1
                    async with asyncio.timeout(self.timeout):  # the whole request, even if bytes trickle in
                        return await self._call(prompt, k, sampling, seed, self._template_kwargs[i])
            except Exception as e:
                try:
                    action, reason, wait = self._classify(e)
                except _Fatal as fatal:
                    self._fatal = self._fatal or str(fatal)
                    raise fatal from None
            if action == "again":
                continue
            if action == "fail":
                raise _Failed(reason)
            if retries >= self.max_retries:
                if reason.startswith("server unreachable"):
                    self._fatal = self._fatal or (
                        f"{self.base_url} stopped answering ({reason}, after {retries} retries). Fix: restart the "
                        "server (or check base_url), then re-run the same command to resume.")
                    raise _Fatal(self._fatal)
                raise _Failed(f"{reason}, after {retries} retries")
            retries += 1
            self._retries[reason.split(":")[0]] += 1
            backoff = min(BACKOFF_MAX, self.backoff_base * 2 ** (retries - 1)) * random.uniform(0.5, 1.0)
            if wait is not None:  # at least what the server asks, spread a little so clients do not return at once
                backoff = max(backoff, min(wait, RETRY_AFTER_MAX) * random.uniform(1.0, 1.1))
            log.debug("openai: prompt %d: %s; retry %d/%d in %.2f s", i, reason, retries, self.max_retries, backoff)
            await asyncio.sleep(backoff)

    async def _call(self, prompt: Prompt, k: int, sampling: Sampling, seed: int,
                    template_kwargs: dict[str, Any] | None = None) -> list[Completion]:
        chat = not isinstance(prompt, str) or self.endpoint == "chat"
        options: dict[str, Any] = dict(model=self.model, n=k, temperature=max(sampling.temperature, 0.0),
                                       top_p=sampling.top_p, seed=seed, timeout=self.timeout)
        if sampling.stop:
            options["stop"] = list(sampling.stop)
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            options[self._max_param] = sampling.max_new_tokens
            if sampling.logprobs or sampling.top_logprobs:
                options["logprobs"] = True  # the sampled tokens' log-probs
                if sampling.top_logprobs:
                    options["top_logprobs"] = sampling.top_logprobs
            extra: dict[str, Any] = {}
            if messages[-1]["role"] == "assistant":  # a prefill: continue that message (vLLM's extension)
                extra.update(continue_final_message=True, add_generation_prompt=False)
            template = dict(template_kwargs or {})
            tools = template.pop("tools", None)
            if tools:  # the standard field; "none": plain text back, no tool parser needed
                options["tools"], options["tool_choice"] = tools, "none"
            if template:
                extra["chat_template_kwargs"] = template  # vLLM's extension, passed to the template renderer
            if extra:
                options["extra_body"] = extra
            reply = await self._client.chat.completions.create(messages=messages, **options)
        else:
            if sampling.logprobs or sampling.top_logprobs:
                options["logprobs"] = sampling.top_logprobs  # the sampled tokens' log-probs, + top k alternatives
            reply = await self._client.completions.create(prompt=prompt, max_tokens=sampling.max_new_tokens,
                                                          **options)
        try:
            completions = parse_reply(reply, chat, sampling.logprobs, sampling.top_logprobs)
            usage = getattr(reply, "usage", None)  # exact in total even when per-choice counts are unknown
            tokens = int(getattr(usage, "completion_tokens", None) or sum(c["num_tokens"] or 0 for c in completions))
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a body that is not a completion
            raise ValueError(f"malformed reply: {type(e).__name__}: {e}") from None
        self.tokens_generated += tokens
        self.usage.add(getattr(reply, "usage", None), completions, prompt, sampling.max_new_tokens)
        return completions

    def _classify(self, e: Exception) -> tuple[str, str, float | None]:
        """(action, reason, Retry-After seconds) for a failed request: action is retry, fail or again (at once);
        raises `_Fatal` for errors that no retry or other prompt can get past."""
        if isinstance(e, (_Fatal, _Halted)):
            raise e
        if isinstance(e, (TimeoutError, openai.APITimeoutError)):
            return "retry", f"timeout: no reply within {self.timeout:g} s", None
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            # Not connected (nothing listens) vs dropped mid-request: only the first says the whole server is gone.
            # By name: the SDK's HTTP library is httpx or its fork httpx2, depending on the SDK's version.
            refused = any(c.__name__ == "ConnectError" for c in type(cause).__mro__)
            kind = "server unreachable" if refused else "connection error"
            return "retry", f"{kind}: {type(cause).__name__}: {self._scrub(cause, 120)}", None
        if isinstance(e, openai.APIStatusError):
            status, body = e.status_code, self._scrub(getattr(e, "message", e))
            if "insufficient_quota" in (e.code, e.type) or (status == 429 and "insufficient_quota" in body):
                raise _Fatal(f"the API account is out of quota (HTTP {status} insufficient_quota: {body}). "
                             "Fix: check the plan and billing details of the account behind "
                             f"${self.api_key_env}, then re-run to resume.") from None
            if status in (401, 403):
                raise _Fatal(f"{self.base_url} refused the API key (HTTP {status}: {body}). "
                             f"Fix: set ${self.api_key_env} to a key this server accepts.") from None
            if status == 404:
                raise _Fatal(f"{self.base_url} answered 404 for model {self.model!r} ({body}). Fix: use a model "
                             "name the server lists at /models, and an endpoint it serves (endpoint=...).") from None
            if status == 400 and self._max_param == "max_tokens" and (
                e.param == "max_tokens" or "max_completion_tokens" in body
            ):
                log.info("openai: the server refuses chat max_tokens; sending max_completion_tokens instead")
                self._max_param = "max_completion_tokens"
                return "again", "max_tokens refused", None
            reason = f"HTTP {status}: {body}"
            if status in RETRY_STATUS or status >= 500:
                return "retry", reason, retry_after(e.response.headers)
            return "fail", reason, None
        if isinstance(e, ValueError):  # unparseable JSON (from the SDK), or JSON that is not a completion
            reason = str(e) if str(e).startswith("malformed reply") else f"malformed reply: {type(e).__name__}: {e}"
            return "retry", self._scrub(reason, 200), None
        raise e

    def close(self) -> None:
        """Close the HTTP client and stop the event loop; the generator cannot be used afterwards. Idempotent."""
        if self._loop is None:
            return
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = None


def parse_reply(reply: Any, chat: bool, logprobs: bool, top_logprobs: int = 0) -> list[Completion]:
    """Completions from a (chat) completion reply, in choice order. Raises on a body of the wrong shape. Missing
    log-probs are fatal only when `logprobs` was asked for; `top_logprobs` alone is best effort (a judge falls back
    to the verdict's text), so a server that ignores it still serves judges."""
    if isinstance(reply, (str, bytes)):  # the SDK returns non-JSON bodies as text
        raise ValueError(f"expected a JSON completion, got text {reply[:80]!r}")
    choices = sorted(reply.choices, key=lambda c: c.index or 0)
    out: list[Completion] = []
    for c in choices:
        text = (c.message.content or "") if chat else c.text  # content is None for refusals / tool calls
        if not isinstance(text, str):
            raise TypeError(f"choice text is {type(text).__name__}")
        item: Completion = {"text": text, "finish_reason": "length" if c.finish_reason == "length" else "stop",
                            "num_tokens": None}
        if logprobs and c.logprobs is None:
            raise _Fatal("logprobs were asked for, but the server returned none (e.g. `transformers serve` "
                         "ignores them). Fix: use a server that returns them (vLLM), or turn logprobs off.")
        if c.logprobs is not None and (logprobs or top_logprobs):
            if chat:
                steps = c.logprobs.content or []
                tokens, values = [t.token for t in steps], [t.logprob for t in steps]
                tops = [{a.token: a.logprob for a in (t.top_logprobs or [])} for t in steps]
            else:
                tokens, values = c.logprobs.tokens or [], c.logprobs.token_logprobs or []
                tops = [dict(t or {}) for t in (c.logprobs.top_logprobs or [])]
            if logprobs:
                item["logprobs"] = [float(v) for v in values]
            if top_logprobs and any(tops):
                item["tokens"] = [str(t) for t in tokens]
                item["top_logprobs"] = [merge_alternatives((str(k), float(v)) for k, v in t.items()) for t in tops]
            item["num_tokens"] = len(values)
        out.append(item)
    usage = getattr(reply, "usage", None)
    if len(out) == 1 and out[0]["num_tokens"] is None and usage is not None and usage.completion_tokens is not None:
        out[0]["num_tokens"] = int(usage.completion_tokens)  # per choice only when there is one choice
    return out


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a server asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (KeyError, ValueError):
            pass
    try:
        when = email.utils.parsedate_to_datetime(headers["retry-after"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def derive_seed(seed: int, index: int, attempt: int) -> int:
    """Seed of one request: differs per prompt in the call and per top-up; leaves room for vLLM's seed + k."""
    digest = hashlib.sha256(f"{seed}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x3FFFFFFF


def adapter_name(path: Path) -> str:
    """Server-side name of an adapter: `prefloop-<hash>` of its absolute path and weight files' size and mtime.

    The same directory gives the same name (loading it again is a no-op); new weights at the same path (a re-run
    round) give a new name, because vLLM keeps serving the old weights under a name it already knows.
    """
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.glob("adapter_model*")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"prefloop-{h.hexdigest()[:12]}"
