"""Reward-model scoring throughput: prefloop's scorer vs a batch-size-1 `pipeline` (the RLHFlow approach).

    python bench/rm_throughput.py          # 3 cases: tiny and 25.8M RMs on demo-sized inputs, 25.8M on long ones
    python bench/rm_throughput.py --quick  # smoke run: the tiny RM on 128 short pairs

Rows (pairs/s = (prompt, chosen, rejected) triples scored per wall second, model load excluded):
  pipeline bs=1    `transformers.pipeline("text-classification")`, one call per (prompt, response), in input
                   order: what RLHFlow's iterative-DPO scripts do; in fp32, and again in the dtype prefloop's
                   `auto` picks (RLHFlow loads its RM in bf16): each prefloop row is compared with its own dtype
  prefloop fp32    `RewardModelJudge.score`: length-sorted, right-padded batches (up to `--batch-size`
                   sequences and the judge's token budget per forward), in fp32 like the pipeline
  prefloop auto    the same with the judge's default `dtype: auto`: bf16 where the CPU has native bf16
                   (avx512_bf16/AMX; this is what a user gets), else fp32 again

Both score the same texts (the judge's own formatting, passed to the pipeline as strings); the script checks the
fp32 scores agree with the pipeline's and reports how often the auto-dtype scores order each (chosen, rejected)
pair as the pipeline's do. Random weights built locally (no downloads): throughput does not depend on what the RM
learned. Ratios, not absolute numbers, are the result: every row is measured in the same run on a noisy machine.
Writes bench/results/rm_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # bench/machine.py (scripts run as `python bench/X.py`)

SIZES = {  # TinyConfig fields
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
}


def build_rm(out: Path, size: str) -> Path:
    import torch
    from transformers import LlamaForSequenceClassification

    from prefloop.demo.tiny import TinyConfig, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = None  # score raw text: prompt + response + EOS
    config = build_model(tokenizer, TinyConfig(max_position_embeddings=512, **SIZES[size])).config
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(out)
    return out


def make_pairs(count: int, seed: int, short: bool = False) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): prompts of 8-200 and responses of 4-200 characters (= tokens), or, `short`,
    the demo task's shape: "a+b=" and a 1-3 digit answer."""
    rng = random.Random(seed)
    if short:
        out = []
        for _ in range(count):
            a, b = rng.randrange(100), rng.randrange(100)
            out.append((f"{a}+{b}=", str(a + b), str(a + b + rng.choice([-10, -1, 1, 10]))))
        return out
    text = lambda lo, hi: "".join(rng.choices(string.ascii_letters + " ", k=rng.randint(lo, hi)))  # noqa: E731
    return [(text(8, 200), text(4, 200), text(4, 200)) for _ in range(count)]


def first(result):
    """The pipeline's one result for one text (it nests it in lists, depending on `top_k`)."""
    while isinstance(result, list):
        result = result[0]
    return result



def measure(size: str, count: int, short: bool, batch_size: int) -> dict:
    """pairs/s of both scorers on one RM and one input set, measured back to back."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from prefloop.judge.reward_model import RewardModelJudge

    pairs = make_pairs(count, seed=0, short=short)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_rm(Path(tmp) / "rm", size)
        params = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(path).parameters())
        judge = RewardModelJudge(str(path), batch_size=batch_size, dtype="float32")
        prompts = [p for p, _, _ in pairs] * 2
        responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
        texts = [judge.text(p, r) for p, r in zip(prompts, responses, strict=True)]
        judge.score(prompts[:4], responses[:4])  # warm-up
        start = time.perf_counter()
        ours = judge.score(prompts, responses)
        ours_s = time.perf_counter() - start
        judge.close()
        auto = RewardModelJudge(str(path), batch_size=batch_size)
        auto.score(prompts[:4], responses[:4])
        start = time.perf_counter()
        auto_scores = [value for value, _ in auto.score(prompts, responses)]
        auto_s = time.perf_counter() - start
        auto_dtype = auto.info["dtype"]
        auto.close()

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu",
                            function_to_apply="none", top_k=None)
        classify(texts[:2])  # warm-up
        start = time.perf_counter()
        # One call per text, as RLHFlow's scripts loop; the pipeline tokenizes with special tokens off, like us.
        base = [first(classify(t, tokenizer_kwargs={"add_special_tokens": False}))["score"] for t in texts]
        base_s = time.perf_counter() - start
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, auto_dtype))
        classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu",
                            function_to_apply="none", top_k=None)
        classify(texts[:2])
        start = time.perf_counter()
        for t in texts:
            classify(t, tokenizer_kwargs={"add_special_tokens": False})
        base_auto_s = time.perf_counter() - start
    diff = max(abs(a - b) for (a, _), b in zip(ours, base, strict=True))
    if diff > 1e-3:
        sys.exit(f"scores disagree (max |diff| = {diff:.2e}): the comparison would not be fair")
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    # Pair order agreement of the auto-dtype scores with the pipeline's: (chosen > rejected) the same way.
    agree = sum((auto_scores[i] > auto_scores[i + count]) == (base[i] > base[i + count]) for i in range(count))
    return {"model": size, "params": params, "inputs": "demo sums (~10 tokens)" if short else "10-400 tokens",
            "pairs": count, "mean_tokens": round(tokens / len(texts), 1), "auto_dtype": auto_dtype,
            "pairs_per_s": {"pipeline_bs1": round(count / base_s, 2), "prefloop": round(count / ours_s, 2),
                            "pipeline_bs1_auto": round(count / base_auto_s, 2),
                            "prefloop_auto": round(count / auto_s, 2)},
            "speedup": round(base_s / ours_s, 2), "speedup_auto": round(base_auto_s / auto_s, 2),
            "max_score_diff": diff, "auto_pair_order_agreement": round(agree / count, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128, help="pairs in the long-input case (x8 for short)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 pairs (x8 short), tiny RM only")
    parser.add_argument("--out", help="results JSON (default bench/results/rm_throughput[.quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.pairs = 16
    args.out = args.out or str(Path(__file__).parent / "results" / f"rm_throughput{'.quick' if args.quick else ''}.json")

    import torch

    runs = [measure("tiny", 8 * args.pairs, True, args.batch_size)]
    if not args.quick:
        runs += [measure("small", 8 * args.pairs, True, args.batch_size),
                 measure("small", args.pairs, False, args.batch_size)]
    print(f"\n{os.cpu_count()} cores, {torch.get_num_threads()} torch threads; scores agree within "
          f"{max(r['max_score_diff'] for r in runs):.1e}\n")
    print("| reward model | inputs | pairs | dtype | pipeline bs=1 pairs/s | prefloop pairs/s | speedup "
          "(target >= 10x) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        rate, name = r["pairs_per_s"], f"{r['params'] / 1e6:.1f}M ({r['model']}) | {r['inputs']} | {r['pairs']}"
        print(f"| {name} | float32 | {rate['pipeline_bs1']:,.1f} | {rate['prefloop']:,.1f} | {r['speedup']:.1f}x |")
        print(f"| {name} | {r['auto_dtype']} (auto) | {rate['pipeline_bs1_auto']:,.1f} | {rate['prefloop_auto']:,.1f} | "
              f"{r['speedup_auto']:.1f}x |")
    print("\nauto-dtype scores order each (chosen, rejected) pair as the fp32 pipeline does in "
          + ", ".join(f"{r['auto_pair_order_agreement']:.1%}" for r in runs) + " of pairs (random-weight RMs: "
          "many pairs are near ties)")
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": {**machine(), "torch_threads": torch.get_num_threads()},
              "batch_size": args.batch_size, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
