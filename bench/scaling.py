"""Generation scaling with the hf backend: 1x, 2x, 4x the prompts, and 2 shards in parallel vs 1 process.

    python bench/scaling.py            # demo-architecture model, 256/512/1024 prompts -> results/scaling.json
    python bench/scaling.py --quick    # 64/128/256 prompts, fewer tokens: smoke run (< 2 min)

Every row is the real CLI in a fresh process, `prefloop generate --backend hf`, as a user runs it:

  1x / 2x / 4x     one process, OMP_NUM_THREADS=2 (both cores), on the first P, 2P, 4P prompts. Linear scaling means
                   the same seconds per prompt at every size: `per-prompt vs 1x` should stay ~1.00.
  1 process        the 2x prompt set, one process, OMP_NUM_THREADS=2.
  1 process, 1 thr the same with OMP_NUM_THREADS=1 (what each shard gets): shows what a second thread buys.
  2 shards         the 2x prompt set as `--shard 0/2` and `--shard 1/2`, two processes started together, each with
                   OMP_NUM_THREADS=1 (2 x 1 thread = the same 2 cores), then `prefloop merge`; wall time includes
                   the merge. The merged file must hold every prompt once.

Seconds are wall time of the command (python start-up and model load included, as a user waits) and, apart, the
stage's own `seconds` from its summary; CPU s = user + system seconds of the child processes. Each row is the
fastest of `--repeats` (2) fresh runs: on a shared machine the least disturbed run is the one that measures the
code (a first run, 1 repeat, under a load average of ~5 put the 1x row at 3x the per-prompt time of the 2x row). The model is `prefloop.demo.tiny.TinyConfig()` (the demo's architecture, random
weights, 128-token context) built locally; prompts are mixed-length text (4-60 characters = tokens). This machine
is shared, so ratios measured in one run are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def make_prompts(path: Path, count: int) -> None:
    rng = random.Random(0)
    letters = string.ascii_letters + " "
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"p{i:06d}", "prompt": "".join(rng.choices(letters, k=rng.randint(4, 60)))})
                    + "\n")


def generate(model: Path, prompts: Path, out: Path, threads: int, args, shard: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "prefloop.cli", "generate", "--model", str(model), "--prompts", str(prompts),
               "--out", str(out), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
               "--dtype", "float32", "--backend", "hf"]
    if shard:
        command += ["--shard", shard]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{proc.args} failed ({proc.returncode}):\n{err.decode()[-2000:]}")


def summary(out: Path) -> dict:
    return json.loads(out.with_name(f"{out.stem}.summary.json").read_text())


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one(model: Path, prompts: Path, out: Path, threads: int, args) -> dict:
    """Best (least disturbed) of `--repeats` fresh runs; each repeat starts from an empty output."""
    best = None
    for _ in range(args.repeats):
        shutil.rmtree(out.parent, ignore_errors=True)
        start, cpu = time.perf_counter(), children_cpu()
        wait(generate(model, prompts, out, threads, args))
        wall = time.perf_counter() - start
        s = summary(out)
        run = {"wall_s": round(wall, 2), "stage_s": s["seconds"], "cpu_s": round(children_cpu() - cpu, 1),
               "tokens": s["tokens"], "records": count_lines(out)}
        best = run if best is None or run["wall_s"] < best["wall_s"] else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256, help="P: the 1x prompt count")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per row, the fastest kept: the machine is shared, the least disturbed run is "
                        "the one that says what the code costs")
    parser.add_argument("--quick", action="store_true", help="smoke run: P=64, 16 tokens, 1 repeat")
    parser.add_argument("--out", help="results JSON (default bench/results/scaling[.quick].json)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats = 64, 16, 1

    sys.path.insert(0, str(Path(__file__).parent))
    from machine import machine

    from prefloop.demo.tiny import save_tiny

    work = Path(tempfile.mkdtemp(prefix="prefloop-scaling-"))
    model = save_tiny(work / "model")
    files = {}
    for k in (1, 2, 4):
        files[k] = work / f"prompts{k}x.jsonl"
        make_prompts(files[k], k * args.prompts)  # same seed: each set extends the smaller one

    rows = []
    for k in (1, 2, 4):
        print(f"== {k}x", file=sys.stderr, flush=True)
        r = one(model, files[k], work / f"out{k}x" / "c.jsonl", 2, args)
        rows.append({"run": f"{k}x prompts, 1 process x 2 threads", "prompts": k * args.prompts, **r})
    base = rows[0]
    for r in rows:
        r["per_prompt_vs_1x"] = round((r["stage_s"] / r["prompts"]) / (base["stage_s"] / base["prompts"]), 2)

    two = 2 * args.prompts
    print("== 1 process, 1 thread", file=sys.stderr, flush=True)
    single = {"run": "2x prompts, 1 process x 1 thread", "prompts": two,
              **one(model, files[2], work / "single1" / "c.jsonl", 1, args)}
    print("== 2 shards", file=sys.stderr, flush=True)
    outs = [work / "shards" / f"s{i}.jsonl" for i in range(2)]
    merged = work / "shards" / "merged.jsonl"
    wall = generated = cpu = None
    for _ in range(args.repeats):  # best of `--repeats`, as for the other rows
        shutil.rmtree(work / "shards", ignore_errors=True)
        start, cpu0 = time.perf_counter(), children_cpu()
        procs = [generate(model, files[2], outs[i], 1, args, shard=f"{i}/2") for i in range(2)]
        for proc in procs:
            wait(proc)
        gen_s = time.perf_counter() - start
        subprocess.run([sys.executable, "-m", "prefloop.cli", "merge", "--out", str(merged), *map(str, outs)],
                       check=True, capture_output=True)
        total = time.perf_counter() - start
        if wall is None or total < wall:
            wall, generated, cpu = total, gen_s, children_cpu() - cpu0
            shard_summaries = [summary(o) for o in outs]
    records = count_lines(merged)
    if records != two:
        raise RuntimeError(f"merged shards hold {records} records, expected {two}")
    sharded = {"run": "2x prompts, 2 shards x 1 thread + merge", "prompts": two, "wall_s": round(wall, 2),
               "generate_wall_s": round(generated, 2), "merge_s": round(wall - generated, 2),
               "stage_s": max(s["seconds"] for s in shard_summaries), "cpu_s": round(cpu, 1),
               "tokens": sum(s["tokens"] for s in shard_summaries), "records": records,
               "shard_prompts": [s["prompts"] for s in shard_summaries]}
    one2 = rows[1]
    sharded["speedup_vs_1_process_2_threads"] = round(one2["wall_s"] / sharded["wall_s"], 2)
    single["speedup_vs_1_process_2_threads"] = round(one2["wall_s"] / single["wall_s"], 2)
    rows += [single, sharded]

    print(f"\nhf backend, demo-architecture model (0.8M, fp32), n={args.n}, max_new_tokens={args.max_new_tokens}, "
          "chunk_size 256, batch_size 64\n")
    print("| run | prompts | wall s | stage s | CPU s | tokens | s/prompt vs 1x | speedup vs 1 proc x 2 thr (2x set) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['prompts']} | {r['wall_s']:.1f} | {r['stage_s']:.1f} | {r['cpu_s']} | {r['tokens']} | "
              f"{r.get('per_prompt_vs_1x', '-')} | {r.get('speedup_vs_1_process_2_threads', '-')} |")
    linear = rows[2]["per_prompt_vs_1x"]
    targets = {"linear_4x_per_prompt_vs_1x": {"value": linear, "target": "0.8-1.25", "met": 0.8 <= linear <= 1.25},
               "two_shards_speedup": {"value": sharded["speedup_vs_1_process_2_threads"], "target": ">= 1.0",
                                      "met": sharded["speedup_vs_1_process_2_threads"] >= 1.0}}
    for name, t in targets.items():
        print(f"target {name}: {t['value']} ({t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    out = Path(args.out or RESULTS / f"scaling{'.quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "n": args.n, "max_new_tokens": args.max_new_tokens,
                               "repeats": args.repeats, "load1_end": os.getloadavg()[0],
                               "rows": rows, "targets": targets}, indent=2) + "\n")
    print(f"\nwrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
