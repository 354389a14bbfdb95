"""Teach the tiny model 2-digit addition to a *weak* start: the demo's round-0 policy.

A plain torch loop (AdamW, causal-LM loss on the answer + EOS only) on the addition "train" split, formatted exactly
as the generator sees raw-text prompts: prompt characters (no BOS, no chat template), then the answer, then EOS.
The start is deliberately weak so the DPO rounds have room to improve it.

    python -m prefloop.demo.pretrain /tmp/policy0 [--steps N] [--seed S] [--samples 8]

Failure semantics: the model directory is written to a temp dir beside `out_dir` and `os.replace`d into place, so a
killed run leaves the previous `out_dir` (or none) or the new complete one, never a torn one; at worst a stale
`.<name>.*.tmp` sibling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefloop.demo.tiny import TinyConfig, build_model, build_tokenizer
from prefloop.store import atomic_dir
from prefloop.tasks.addition import make_prompts, split_size

# Defaults measured on the 2-core CPU dev box (torch 2.13, TinyConfig() ~0.8M params, 1 thread, ~14 steps/s at
# batch 64 with the probe; the box was shared with other jobs, so the seconds are upper bounds):
#   seed 0: stops at step 1200 after 85 s; held-out greedy accuracy 0.260 (1000 problems); sampling at T=1.0 on 200
#           held-out prompts: pass@1 0.16, pass@8 0.72, and 72% of prompts get both right and wrong samples among
#           8 (so the loop can make pairs from them).
#   seeds 1/2/3: stop at steps 1380/1000/280 (about 20-95 s); held-out greedy accuracy 0.278/0.297/0.290.
# Alternatives tried (steps to the stop, seeds 0/1/2[/3]): lr 2e-3 batch 32: 620/2920/1550/700; lr 1e-3 batch 32:
# 1150/2160/1530; lr 3e-3 batch 128: 540/1130/250 -- about as many examples, more variance. A fixed step count
# instead (cosine schedule from lr 3e-3, seed 0) gave 0.14 at 600 steps but 0.79 at 900 and 0.97 at 1200, and
# constant lr 3e-3 stayed below 0.10 for 1200 steps: hence the accuracy-based stop below.
STEPS = 3000  # a cap: training normally stops earlier, at STOP_AT_ACCURACY
BATCH_SIZE = 64
LR = 2e-3
WARMUP_STEPS = 20  # a short warmup keeps AdamW's first, noisy updates from blowing up the random init
# Learning the ones digit is a sharp phase transition (accuracy goes ~10% -> ~80% within a few hundred steps) whose
# step varies a lot with the seed (280 to 1380 for seeds 0-3), so a fixed step count cannot land reliably on a
# *weak* start. Instead training stops once greedy accuracy on a probe of unseen train-split problems reaches this.
STOP_AT_ACCURACY = 0.3
PROBE_SIZE = 256  # train-split problems held out of training, only to decide when to stop
PROBE_EVERY = 10  # steps between probes (a probe costs about one training step)
EVAL_BATCH_SIZE = 256


@contextlib.contextmanager
def few_threads(n: int = 1) -> Iterator[None]:
    import torch

    # One thread: the model is so small that a batch-64 step takes ~65 ms on 1 thread vs ~50 ms on 2, but with 2
    # threads on a 2-core box a step slows ~100x (5 s, measured) whenever another process is busy, because OpenMP
    # workers spin-wait for a descheduled sibling. One thread also makes the float summation order, hence the
    # weights, less dependent on the machine. Restored afterwards for the rest of the process.
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def encode_examples(tokenizer, records: list[dict[str, str]]) -> tuple[list[list[int]], list[int]]:
    """Token ids of `prompt + answer + EOS` per record, and the prompt length of each (its tokens are not trained)."""
    ids, prompt_lens = [], []
    for r in records:
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        ids.append(prompt + answer + [tokenizer.eos_token_id])
        prompt_lens.append(len(prompt))
    return ids, prompt_lens


def _batch(ids: list[list[int]], prompt_lens: list[int], pad_id: int):
    import torch

    # Right padding: positions then start at 0 on the first real token, the same as left-padded generation
    # (which derives positions from the attention mask).
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, p) in enumerate(zip(ids, prompt_lens, strict=True)):
        input_ids[i, : len(x)] = torch.tensor(x)
        labels[i, p : len(x)] = torch.tensor(x[p:])  # the answer and EOS only: the prompt is given, not learnt
        mask[i, : len(x)] = 1
    return input_ids, mask, labels


def _exact_match(logits, labels) -> list[bool]:
    """Per sequence: is every answer/EOS token the argmax given the true prefix?

    That is exactly "greedy decoding emits the answer then EOS" (greedy diverges at the first wrong argmax),
    read off one forward pass instead of a `generate` loop.
    """
    target = labels[:, 1:]
    return ((logits[:, :-1].argmax(-1) == target) | (target == -100)).all(dim=1).tolist()


def _probe_accuracy(model, input_ids, mask, labels) -> float:
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    hits = _exact_match(logits, labels)
    return sum(hits) / len(hits)


def pretrain(
    out_dir: str | Path,
    steps: int = STEPS,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    tiny: TinyConfig | None = None,
    log: Callable[[str], Any] = print,
    stop_at_accuracy: float | None = STOP_AT_ACCURACY,
) -> Path:
    """Train a fresh tiny model on the addition train split; save it to `out_dir`; return `out_dir`.

    Runs until greedy accuracy on a probe of unseen train-split problems reaches `stop_at_accuracy` (checked every
    PROBE_EVERY steps; None disables the check), or for `steps` AdamW steps at most. Deterministic for a given
    `seed` (init unless `tiny` is given, probe, batch order) on a given machine and thread count. Besides the model
    and tokenizer, `out_dir/pretrain.json` records the settings, why it stopped, the loss curve and the wall time.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    with few_threads():
        model, tokenizer, summary = _train(
            steps, seed, batch_size, lr, tiny or TinyConfig(seed=seed), log, stop_at_accuracy
        )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:  # a killed run leaves the old out_dir or none, never a torn one
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"pretrain saved {out} ({summary['steps']} steps, stop: {summary['stopped']}, {summary['train_seconds']}s)")
    return out


def _train(steps: int, seed: int, batch_size: int, lr: float, tiny: TinyConfig, log, stop_at_accuracy: float | None):
    import torch

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, tiny)
    model.train()

    records = make_prompts(split_size("train"), seed=seed, split="train")
    probe = _batch(*encode_examples(tokenizer, records[:PROBE_SIZE]), tokenizer.pad_token_id)
    ids, prompt_lens = encode_examples(tokenizer, records[PROBE_SIZE:])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    losses: list[float] = []
    probe_acc: list[tuple[int, float]] = []
    train_hits: list[bool] = []
    stopped = "max_steps"
    start = time.perf_counter()
    log_every = 100
    for step in range(steps):
        idx = torch.randint(len(ids), (batch_size,), generator=gen).tolist()
        input_ids, mask, labels = _batch([ids[i] for i in idx], [prompt_lens[i] for i in idx], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        loss = out.loss
        train_hits += _exact_match(out.logits.detach(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        # The probe costs about a training step, so it only runs once the exact-match rate on the last training
        # batches (free: read off the logits we already have; it lags the probe a little) says the transition began.
        train_hits = train_hits[-PROBE_EVERY * batch_size :]
        train_em = sum(train_hits) / len(train_hits)
        probed = None
        if stop_at_accuracy is not None and (step + 1) % PROBE_EVERY == 0 and train_em >= stop_at_accuracy / 2:
            probed = _probe_accuracy(model, *probe)
            probe_acc.append((step + 1, probed))
            if probed >= stop_at_accuracy:
                stopped = "accuracy"
        if (step + 1) % log_every == 0 or step == steps - 1 or stopped != "max_steps":
            recent = losses[-log_every:]
            acc = f", probe accuracy {probed:.3f}" if probed is not None else ""
            loss_avg = sum(recent) / len(recent)
            log(f"pretrain step {step + 1}/{steps} loss {loss_avg:.4f}, train exact-match {train_em:.3f}{acc}")
        if stopped != "max_steps":
            break
    seconds = time.perf_counter() - start
    if stop_at_accuracy is not None and stopped == "max_steps":
        log(f"pretrain: probe accuracy never reached {stop_at_accuracy} in {steps} steps; saving the weaker model")

    model.eval()
    summary = {
        "steps": len(losses),
        "max_steps": steps,
        "stopped": stopped,
        "stop_at_accuracy": stop_at_accuracy,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": WARMUP_STEPS,
        "tiny": vars(tiny),
        "train_seconds": round(seconds, 2),
        "losses": [round(x, 5) for x in losses],
        "probe_accuracy": probe_acc,
    }
    return model, tokenizer, summary


def _load(model_or_dir, tokenizer):
    if isinstance(model_or_dir, (str, Path)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_or_dir)
        model_or_dir = AutoModelForCausalLM.from_pretrained(model_or_dir)
    if tokenizer is None:
        raise ValueError("pass a tokenizer along with a model object (or pass a model directory instead)")
    model_or_dir.eval()
    return model_or_dir, tokenizer


def _generate(model, tokenizer, prompts: list[str], batch_size: int, **sampling) -> list[str]:
    import torch

    texts: list[str] = []
    with torch.inference_mode(), few_threads():
        for i in range(0, len(prompts), batch_size):
            # Left padding: a decoder-only model continues from the right edge. Raw text, no BOS, as in training.
            batch = prompts[i : i + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id, **sampling)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def accuracy(
    model_dir_or_model, tokenizer=None, records: list[dict] | None = None, batch_size: int = EVAL_BATCH_SIZE
) -> float:
    """Greedy accuracy on `records` (default: the 1000 held-out problems): decoded completion stripped == answer."""
    model, tokenizer = _load(model_dir_or_model, tokenizer)
    records = records if records is not None else make_prompts(split_size("heldout"), seed=0, split="heldout")
    texts = _generate(model, tokenizer, [r["prompt"] for r in records], batch_size, do_sample=False)
    return sum(t.strip() == r["answer"] for t, r in zip(texts, records, strict=True)) / max(1, len(records))


def sampled_accuracy(
    model_dir_or_model,
    tokenizer=None,
    records: list[dict] | None = None,
    n: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = EVAL_BATCH_SIZE,
) -> tuple[float, float, float]:
    """Sampling at `temperature`, `n` samples per prompt: (pass@1, pass@n, share of prompts with both right and
    wrong samples). The last one is what the loop can make preference pairs from."""
    import torch

    model, tokenizer = _load(model_dir_or_model, tokenizer)
    records = records if records is not None else make_prompts(200, seed=0, split="heldout")
    prompts = [r["prompt"] for r in records for _ in range(n)]
    with torch.random.fork_rng():  # seed the sampler without touching the caller's RNG state
        torch.manual_seed(seed)
        texts = _generate(model, tokenizer, prompts, batch_size, do_sample=True, temperature=temperature, top_k=0)
    right = [[texts[i * n + j].strip() == r["answer"] for j in range(n)] for i, r in enumerate(records)]
    k = max(1, len(records))
    return (
        sum(map(sum, right)) / (k * n),
        sum(any(x) for x in right) / k,
        sum(any(x) and not all(x) for x in right) / k,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pretrain the tiny demo policy on 2-digit addition.")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--stop-at-accuracy", type=float, default=STOP_AT_ACCURACY, help="<= 0 disables the early stop")
    p.add_argument("--samples", type=int, default=0, help="also report pass@1/pass@N at T=1.0 on 200 held-out prompts")
    args = p.parse_args(argv)
    start = time.perf_counter()
    stop = args.stop_at_accuracy if args.stop_at_accuracy > 0 else None
    out = pretrain(args.out_dir, args.steps, args.seed, args.batch_size, args.lr, stop_at_accuracy=stop)
    seconds = time.perf_counter() - start
    acc = accuracy(out)
    print(f"pretrain: {seconds:.1f}s; held-out greedy accuracy {acc:.3f} (1000 problems)")
    if args.samples:
        p1, pn, mixed = sampled_accuracy(out, n=args.samples)
        n = args.samples
        print(f"sampling T=1.0 on 200 held-out: pass@1 {p1:.3f}, pass@{n} {pn:.3f}, both right and wrong {mixed:.3f}")


if __name__ == "__main__":
    main()
