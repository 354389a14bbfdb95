"""Every number in the README's tables comes from a file in bench/results/: this renders them there.

    python bench/readme.py            # rewrite the README's tables from bench/results/*.json
    python bench/readme.py --check    # exit 1 if the README differs from what the results say (a test runs this)

A table lives between `<!-- bench:NAME -->` and `<!-- /bench -->` in README.md; NAME picks the renderer below and
the results file it reads. Edit a result by re-running its benchmark, never by editing the README.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def demo() -> str:
    d = _load("demo.json")
    rows = ["| round | held-out accuracy | pairs kept | DPO s |", "| --- | --- | --- | --- |"]
    for r in d["rounds"]:
        label = "0 (base)" if r["round"] == 0 else str(r["round"])
        pairs = "–" if r["pairs"] is None else str(r["pairs"])
        train = "–" if r["train_s"] is None else f"{r['train_s']:.1f}"
        rows.append(f"| {label} | {_pct(r['accuracy'])} | {pairs} | {train} |")
    first, last = d["rounds"][0]["accuracy"], d["rounds"][-1]["accuracy"]
    head = (f"`{d['command']}` in a fresh directory on a {d['machine']['cores']}-core CPU ({d['machine']['cpu']}, "
            f"{d['machine']['date']}): {_minutes(d['wall_s'])} wall, peak RSS {d['peak_rss_mb']} MB, held-out "
            f"accuracy {_pct(first)} → {_pct(last)} (`bench/results/demo.json`):")
    return "\n".join([head, "", *rows])


def generation() -> str:
    d = _load("gen_throughput.json")
    out = []
    for run in d["runs"]:
        out += [f"{run['params'] / 1e6:.1f}M-parameter Llama, {run['prompts']} prompts × n={run['n']}, up to "
                f"{run['max_new_tokens']} new tokens:", "",
                "| backend | tok/s | vs naive hf | % of roofline |", "| --- | --- | --- | --- |"]
        out += [f"| {r['backend']} | {r['tok_s']:,.0f} | {r['vs_naive']:.2f}x | {r['roofline_pct']:.1f}% |"
                for r in run["rows"]]
        out.append("")
    return "\n".join([f"`python bench/gen_throughput.py` ({d['machine']['date']}, `bench/results/gen_throughput.json`; "
                      "the roofline is the achieved FLOP/s of the model's own GEMM shapes over its FLOPs per token):",
                      "", *out]).rstrip()


def reward_model() -> str:
    d = _load("rm_throughput.json")
    rows = ["| reward model | inputs | dtype | `pipeline` batch 1 (RLHFlow) | prefloop | speedup |",
            "| --- | --- | --- | --- | --- | --- |"]
    for run in d["runs"]:
        size = f"{run['params'] / 1e6:.1f}M"
        pps = run["pairs_per_s"]
        rows.append(f"| {size} | {run['inputs']} | float32 | {pps['pipeline_bs1']:,.1f} pairs/s | "
                    f"{pps['prefloop']:,.1f} pairs/s | {run['speedup']:.1f}x |")
        rows.append(f"| {size} | {run['inputs']} | {run['auto_dtype']} (auto) | {pps['pipeline_bs1_auto']:,.1f} pairs/s "
                    f"| {pps['prefloop_auto']:,.1f} pairs/s | {run['speedup_auto']:.1f}x |")
    return "\n".join([f"`python bench/rm_throughput.py` ({d['date']}, `bench/results/rm_throughput.json`; each row's "
                      "two columns in one run, scores equal within 1e-6):", "", *rows])


TABLES: dict[str, Callable[[], str]] = {"demo": demo, "generation": generation, "reward_model": reward_model}
BLOCK = re.compile(r"(<!-- bench:(\w+) -->\n)(.*?)(<!-- /bench -->)", re.S)


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"README.md: unknown table <!-- bench:{m.group(2)} -->. Fix: one of {', '.join(TABLES)}.")
        return m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if README.md is not what the results say.")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print("README.md: a table differs from bench/results. Fix: python bench/readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
