"""Every number in the README's tables comes from a file in bench/results/: this renders them there.

    python bench/readme.py            # rewrite the tables of README.md and docs/real-model.md from bench/results
    python bench/readme.py --check    # exit 1 if a page differs from what the results say (a test runs this)

A table lives between `<!-- bench:NAME -->` and `<!-- /bench -->`; NAME picks the renderer below and the results
file it reads. Edit a result by re-running its benchmark, never by editing the page.
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
DOCS = (ROOT / "README.md", ROOT / "docs" / "real-model.md", ROOT / "docs" / "defaults.md",
        ROOT / "bench" / "README.md")  # the pages whose tables are rendered here


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def _cell(value, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def _rounds(d: dict, header: list[str], cells: Callable[[dict], list[str]]) -> list[str]:
    """A demo's per-round table: the round, its held-out accuracy, then `cells(round)`."""
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in d["rounds"]:
        label = "0 (base)" if r["round"] == 0 else str(r["round"])
        rows.append("| " + " | ".join([label, _pct(r["accuracy"]), *cells(r)]) + " |")
    return rows


def _head(d: dict, results: str, metric: str) -> str:
    first, last = d["rounds"][0]["accuracy"], d["rounds"][-1]["accuracy"]
    return (f"`{d['command']}` in a fresh directory on a {d['machine']['cores']}-core CPU ({d['machine']['cpu']}, "
            f"{d['machine']['date']}): {_minutes(d['wall_s'])} wall, peak RSS {d['peak_rss_mb']} MB, {metric} "
            f"{_pct(first)} → {_pct(last)} (`bench/results/{results}`")


def demo() -> str:
    d = _load("demo.json")
    rows = _rounds(d, ["round", "held-out accuracy", "pairs kept", "DPO s"],
                   lambda r: [_cell(r["pairs"]), _cell(r["train_s"], "{:.1f}")])
    return "\n".join([_head(d, "demo.json", "held-out accuracy") + "):", "", *rows])


def demo_instructions() -> str:
    d = _load("demo-instructions.json")
    rows = _rounds(d, ["round", "held-out strict accuracy", "pairs kept", "round s", "mean answer chars"],
                   lambda r: [_cell(r["pairs"]), f"{r['round_s']:.0f}", _cell(r.get("mean_answer_chars"), "{:.0f}")])
    plain = d.get("plain_questions") or {}
    rounds = sorted(plain, key=int)
    said = ""
    if len(rounds) >= 2:
        a, b = plain[rounds[0]], plain[rounds[-1]]
        said = (f" Plain questions answered greedily (\"What is the capital of France?\", ...): {a['correct']}/{a['total']}"
                f" right before, {b['correct']}/{b['total']} after.")
    head = _head(d, "demo-instructions.json", "held-out strict accuracy") + ", its report with answers beside it)."
    return "\n".join([head + said, "", *rows])


def length_control() -> str:
    """The instructions demo with length control off (its default) and on (bench/length_control.yaml)."""
    off, on = _load("demo-instructions.json"), _load("demo-instructions-length.json")
    header = ["round", "accuracy off", "accuracy on", "answer chars off", "answer chars on",
              "chosen / rejected chars off", "chosen / rejected chars on", "pairs off", "pairs on"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def pair(r: dict) -> str:
        if r.get("mean_chosen_chars") is None:
            return "–"
        return f"{r['mean_chosen_chars']:.0f} / {r['mean_rejected_chars']:.0f}"

    for a, b in zip(off["rounds"], on["rounds"], strict=True):
        label = "0 (base)" if a["round"] == 0 else str(a["round"])
        rows.append("| " + " | ".join([
            label, _pct(a["accuracy"]), _pct(b["accuracy"]), _cell(a.get("mean_answer_chars"), "{:.0f}"),
            _cell(b.get("mean_answer_chars"), "{:.0f}"), pair(a), pair(b), _cell(a["pairs"]), _cell(b["pairs"])]) + " |")
    head = (f"`{off['command']}` (off) and `{on['command']}` (on), each in a fresh directory on the same machine "
            f"({off['machine']['cpu']}; `bench/results/demo-instructions.json`, `demo-instructions-length.json`). "
            "Held-out strict accuracy, mean held-out answer length, and the mean length of the pairs' chosen and "
            "rejected answers:")
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


def generation_sizes() -> str:
    """bench/README's full tables of gen_throughput.json: one per model size, every column the script prints."""
    d = _load("gen_throughput.json")
    m = d["machine"]
    out = [f"`python bench/gen_throughput.py` ({m['date']}, `bench/results/gen_throughput.json`; {m['cores']} cores "
           f"of an {m['cpu']} with {m['cpu_flags']}). `rows` = sequences decoded together (the GEMM height of a "
           "decode step); `% roofline` holds each row against the GEMM rate at its own `rows`; `load` = the 1-minute "
           "load average when the row ended (above 2 = it shared the 2 cores with other jobs)."]
    for run in d["runs"]:
        gemm = ", ".join(f"{v} GFLOP/s ({k} rows)" for k, v in run["gemm_gflops"].items())
        out += ["", f"**{run['size']}** ({run['params'] / 1e6:.1f}M params; {run['prompts']} prompts "
                f"({run['mean_prompt_tokens']:.0f} tokens on average), n={run['n']}, max_new_tokens="
                f"{run['max_new_tokens']}, T=1; roofline: GEMMs at {gemm}; {run['mflop_per_token']} MFLOP/token)", "",
                "| backend | rows | tokens | seconds | tok/s | vs naive hf | roofline tok/s | % roofline | % roofline "
                "with prompts | start-up s | load |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['backend']} | {r['rows']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tok_s']:,.0f} | "
                f"{r['vs_naive']:.2f}x | {r['roofline_tok_s']:,.0f} | {r['roofline_pct']:.1f}% | "
                f"{_cell(r.get('roofline_pct_with_prompts'), '{:.1f}%')} | {_cell(r['startup_s'], '{:.0f}')} | "
                f"{r['load1']} |" for r in run["rows"]]
    return "\n".join(out)


def generation_smollm2() -> str:
    d = _load("gen_throughput-smollm2.json")
    run = d["runs"][0]
    rows = ["| backend | rows | tokens | tok/s | vs naive hf | % of roofline | % with prompts | start-up s | load |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {r['backend']} | {r['rows']} | {r['tokens']:,} | {r['tok_s']:,.0f} | {r['vs_naive']:.2f}x | "
             f"{r['roofline_pct']:.1f}% | {_cell(r.get('roofline_pct_with_prompts'), '{:.1f}%')} | "
             f"{_cell(r['startup_s'], '{:.0f}')} | {r['load1']} |" for r in run["rows"]]
    return "\n".join([
        f"`python bench/gen_throughput.py --sizes smollm2 --max-new-tokens {run['max_new_tokens']}` "
        f"({d['machine']['date']}, `bench/results/gen_throughput-smollm2.json`): SmolLM2-135M-Instruct "
        f"({run['params'] / 1e6:.1f}M parameters, fp32), {run['prompts']} instruction prompts in its chat template "
        f"({run['mean_prompt_tokens']:.0f} tokens on average) × n={run['n']} at T=1, up to {run['max_new_tokens']} "
        f"new tokens; naive hf on the first 16 prompts. Roofline: {run['mflop_per_token']:.0f} MFLOP per token at "
        "the GEMM rate of the row's own batch; load is the 1-minute load average as the row ended (2 = this "
        "job alone on the 2 cores).", "", *rows])


def dpo_smollm2() -> str:
    d = _load("dpo_train-smollm2.json")
    run = d["runs"][0]
    labels = {"prefloop": "prefloop default (LoRA r=16, ref = adapter off, CPU LM-head tiles)",
              "prefloop-nockpt": "prefloop, gradient checkpointing off",
              "prefloop-trl-tiles": "prefloop, TRL's LM-head tiles (the default before 2026-12-01)",
              "trl": "TRL default (full fine-tune + ref copy)"}
    rows = ["| row | s/step | tokens/s | CPU s | peak RSS MB | +RSS MB (training) |", "| --- | --- | --- | --- | --- | --- |"]
    for key, label in labels.items():
        r = run["rows"][key]
        rows.append(f"| {label} | {r['seconds'] / r['steps_timed']:.1f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['cpu_seconds']:.0f} | {r['peak_rss_mb']:,.0f} | {r['train_rss_mb']:,.0f} |")
    timed = run["rows"]["prefloop"]["steps_timed"]
    met = " and ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in run["target_met"].items())
    return "\n".join([
        f"`python bench/dpo_train.py --cases {run['case']}` ({d['date']}, `bench/results/dpo_train-smollm2.json`): "
        f"SmolLM2-135M-Instruct, {run['pairs']} chat pairs of {run['mean_tokens_per_pair']:.0f} tokens (prompt twice, "
        f"both answers), batch {run['batch_size']}, {timed} timed steps after {run['steps'] - timed} untimed, each "
        f"row in its own process. prefloop/TRL: {run['speed_ratio']:.2f}x the speed (target >= 1), "
        f"{run['peak_rss_ratio']:.2f}x the peak memory (target <= 0.6), {run['train_rss_ratio']:.2f}x the training "
        f"memory: {met}.", "", *rows])


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


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def judges_real() -> str:
    d = _load("judges-smollm2.json")
    pw, pt, fb = d["llm_pairwise"], d["llm_pointwise"], d["cai_feedback"]
    rows = ["| judge (SmolLM2-135M judging its own answers) | parsed | orders agree | first slot wins | agrees with "
            "the verifier | labels compared |", "| --- | --- | --- | --- | --- | --- |"]
    parsed = 1 - (pt["stats"]["parse_error_rate"] or 0) - (pt["stats"]["error_rate"] or 0)
    vs = pt["vs_verifier"]
    tied = f" ({vs['judge_ties']} of {vs['pairs_separated']} pairs tied)" if vs["agreement"] is not None else ""
    rows.append(f"| `--judge llm --mode pointwise` | {_rate(parsed)} | – | – | {_rate(vs['agreement'])}{tied} | "
                f"{vs['agree'] + vs['disagree']} |")
    for name, x in (("`--judge llm --mode pairwise`", pw), ("`--judge constitutional --mode feedback`", fb)):
        st = x["stats"]
        parsed = 1 - (st["parse_error_rate"] or 0) - (st["error_rate"] or 0)
        agree = x.get("orders_agree", st["agreement_rate"])
        rows.append(f"| {name} | {_rate(parsed)} | {_rate(agree)} | {_rate(st['first_position_win_rate'])} | "
                    f"{_rate(x['vs_verifier']['agreement'])} | {x['vs_verifier']['labels_the_verifier_separates']} |")
    rev, harm = d["cai_revise_instructions"], d["cai_revise_harmless"]
    hist = ", ".join(f"{k}: {v}" for k, v in fb["p_chosen_histogram"].items())
    lines = [f"`python bench/judges_real.py` ({d['machine']['date']}, `bench/results/judges-smollm2.json`): "
             f"{d['prompts']} instruction prompts, 4 answers each at T=0.8, judged by the same SmolLM2 on "
             f"{d['backend']}; the verifier (`instructions:reward`) gives the reference order.", "", *rows, "",
             f"- CAI feedback p_chosen (max of p, 1-p after averaging both orders): mean {fb['p_chosen_mean']:.3f}, "
             f"median {fb['p_chosen_median']:.3f}; histogram {hist}.",
             f"- CAI revise on one greedy answer per instruction prompt (`helpful_honest`, the verifier as "
             f"`verifier`): {rev['revision_better']} of {rev['verified']} revisions scored higher than their "
             f"original ({_rate(rev['revision_better_share'])}); statuses {rev['statuses']}.",
             f"- CAI revise with `harmless` on {harm['rows']} everyday and red-team prompts: statuses "
             f"{harm['statuses']}; every critique and revision is in the results file, for example:"]
    for x in (harm["examples"][1], harm["examples"][6]):
        ask = x["prompt"][-1]["content"] if isinstance(x["prompt"], list) else x["prompt"]
        lines += ["", f"  > **{ask}** original: \"{_clip(x['original'])}\" critique: \"{_clip(x['critique'])}\" "
                  f"revision: \"{_clip(x['revision'])}\""]
    stop = d["llm_pointwise_defaults"]
    lines += ["", f"With the judge stage's defaults (512 new tokens, two re-asks when an answer has no verdict), the "
              f"pointwise judge on 4 prompts ended with exit {stop['exit']}:", "", f"```\n{stop['error']}\n```"]
    return "\n".join(lines)


def _clip(text: str | None, n: int = 150) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def judge_eval() -> str:
    d = _load("judge-eval.json")
    rows = ["| judge | labelled | decided | accuracy [95% CI] | Cohen's κ [95% CI] | picks the longer (gold) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in d["judges"].items():
        acc = "–" if r["accuracy"] is None else f"{_rate(r['accuracy'])} [{_rate(r['accuracy_ci95'][0])}, " \
              f"{_rate(r['accuracy_ci95'][1])}]"
        k = "–" if r["cohens_kappa"] is None else f"{r['cohens_kappa']:.2f} [{r['cohens_kappa_ci95'][0]:.2f}, " \
            f"{r['cohens_kappa_ci95'][1]:.2f}]"
        lb = r["length_bias"]
        longer = "–" if lb["judge_picks_longer"] is None else f"{_rate(lb['judge_picks_longer'])} " \
                 f"({_rate(lb['gold_picks_longer'])})"
        rows.append(f"| {name} | {r['labelled_comparisons']} | {r['decided']} | {acc} | {k} | {longer} |")
    return "\n".join([f"`python bench/judge_eval.py` ({d['machine']['date']}, `bench/results/judge-eval.json`): "
                      "`prefloop judge-eval` of each judge above against the verifier's order of the same answers:",
                      "", *rows])


def defaults() -> str:
    d = _load("defaults.json")
    names = list(dict.fromkeys(name for task in d["tasks"].values() for name in task["settings"]))
    head = ["task (model, samples per prompt)", "before", *names]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for task in d["tasks"].values():
        model = "SmolLM2-135M" if "SmolLM2" in task["model"] else "tiny 0.8M Llama"
        cells = [f"{task['task']} ({model}, {task['n']})", _pct(task["base"]["accuracy"])]
        for name in names:
            r = task["settings"].get(name)
            cells.append("–" if r is None else f"{_pct(r['accuracy'])} ({100 * r['delta']:+.1f}; {r['pairs']} pairs)")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([f"`python bench/defaults.py` ({d['machine']['date']}, `bench/results/defaults.json`): held-out "
                      "accuracy after one round from the same samples; in brackets the change in points and the "
                      "pairs trained on.", "", *rows])


def methods() -> str:
    d = _load("methods.json")
    rows = ["| method | beta | lr | held-out before | after | rows trained | steps | train s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["methods"]:
        rows.append(f"| `{r['method']}` | {r['beta'] if not r['method'].startswith('sft') else '–'} | {r['lr']:g} | "
                    f"{_pct(r['accuracy_before'])} | {_pct(r['accuracy_after'])} | {r['rows_trained']} {r['rows']} | "
                    f"{r['steps']} | {r['train_s']:.0f} |")
    t = d["demo_train"]
    return "\n".join([f"`python bench/methods.py` ({d['machine']['date']}, `bench/results/methods.json`): one round of "
                      f"the addition demo per method from the same samples (batch {t['batch_size']}, {t['epochs']} "
                      "epochs, LoRA):", "", *rows])


def vllm_start() -> str:
    d = _load("vllm_start.json")
    rows = ["| model | engine start, vLLM's processes | in prefloop's process | faster | sampling tok/s, processes | "
            "in process | sampling speed, in process vs processes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        best = {mode: max(t["tokens_per_s"] for t in ts) for mode, ts in r["trials"].items()}
        rows.append(f"| {r['model']} | {r['best']['multiprocess']['start_s']:.1f} s | "
                    f"{r['best']['in-process']['start_s']:.1f} s | {r['start_speedup']:.2f}x | "
                    f"{best['multiprocess']:,.0f} | {best['in-process']:,.0f} | {r['sample_speedup']:.2f}x |")
    return "\n".join([f"`python bench/vllm_start.py` ({d['machine']['date']}, {d['machine']['cores']} cores, "
                      f"{d['machine']['cpu']}, `bench/results/vllm_start.json`): best of 2 fresh processes per mode, "
                      "modes alternating; sampling is 64 prompts x 4 answers of up to 64 tokens:", "", *rows])


TABLES: dict[str, Callable[[], str]] = {"demo": demo, "demo_instructions": demo_instructions, "generation": generation,
                                        "reward_model": reward_model, "judges_real": judges_real, "judge_eval": judge_eval,
                                        "defaults": defaults, "methods": methods,
                                        "generation_smollm2": generation_smollm2, "generation_sizes": generation_sizes, "dpo_smollm2": dpo_smollm2,
                                        "length_control": length_control, "vllm_start": vllm_start}
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
    stale = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"{', '.join(map(str, stale))}: a table differs from bench/results. Fix: python bench/readme.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
