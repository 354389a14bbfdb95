"""The `prefloop` command line: input errors exit 2 naming file:line with nothing written, YAML + flags, merge, and
the generate -> judge -> pairs chain on a tiny local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefloop.cli import main

ENV = {**os.environ, "PREFLOOP_NO_BAR": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def prefloop(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would."""
    return subprocess.run(["prefloop", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = b'{"id": "a", "prompt": "1+1=", "answer": "2"}\n'
MALFORMED = {
    "broken_json": (b'{"id": "b", "prompt": "2+2="\n', 2),
    "missing_prompt": (b'{"id": "b", "question": "2+2="}\n', 2),
    "empty_prompt": (b'{"id": "b", "prompt": "   "}\n', 2),
    "non_utf8": (b'{"id": "b", "prompt": "caf\xe9"}\n', 2),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_generate_rejects_malformed_prompts_with_nothing_written(tmp_path, case):
    """A malformed prompts line exits 2 with "prefloop generate: error: FILE:LINE" and writes no output or sidecar."""
    bad_line, lineno = MALFORMED[case]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(GOOD + bad_line + GOOD.replace(b'"a"', b'"c"'))
    out_dir = tmp_path / "out"
    result = prefloop("generate", "--model", tmp_path / "no-model", "--prompts", prompts,
                      "--out", out_dir / "candidates.jsonl")
    assert result.returncode == 2, result.stderr
    assert "prefloop generate: error:" in result.stderr
    assert f"{prompts}:{lineno}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())  # no candidates, config or summary: nothing partial


def test_generate_rejects_non_utf8_json_file(tmp_path):
    """A `.json` prompts file with a non-UTF-8 byte exits 2 naming the file (not a UnicodeDecodeError traceback)."""
    prompts = tmp_path / "prompts.json"
    prompts.write_bytes(GOOD + b'{"id": "b", "prompt": "caf\xe9"}\n')
    result = prefloop("generate", "--model", tmp_path / "m", "--prompts", prompts, "--out", tmp_path / "o" / "c.jsonl")
    assert result.returncode == 2, result.stderr
    assert f"prefloop generate: error: {prompts}" in result.stderr
    assert not (tmp_path / "o").exists()


def test_generate_help_lists_sampling_and_shard_flags():
    """`prefloop generate --help` works and lists --max-new-tokens, --temperature and --shard."""
    result = prefloop("generate", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--max-new-tokens", "--temperature", "--shard", "--n", "--config"):
        assert flag in result.stdout


@pytest.mark.parametrize("command", ["judge", "pairs", "train", "run", "merge", "report", "demo", "export",
                                     "judge-eval", "models", None])
def test_every_subcommand_help_works(command):
    """`prefloop --help` and every subcommand's --help exit 0 (a bare % in a help text once crashed the first)."""
    result = prefloop(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    if command is None:
        assert "judge-eval" in result.stdout and "95% intervals" in result.stdout


def test_bad_shard_spec_exits_2(tmp_path):
    """A malformed --shard is a usage error (exit 2, "prefloop generate: error: ... --shard"), not a traceback."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(GOOD)
    result = prefloop("generate", "--model", "m", "--prompts", prompts, "--out", tmp_path / "c.jsonl", "--shard", "3/2")
    assert result.returncode == 2, result.stderr
    assert "prefloop generate: error:" in result.stderr and "--shard" in result.stderr


@pytest.mark.parametrize("spec", ["nocolon", "prefloop.tasks.addition:nope", "no_such_module_xyz:fn"])
def test_bad_reward_fn_exits_2(tmp_path, spec):
    """A wrong --reward-fn exits 2 with "prefloop judge: error:" naming the spec, and no traceback."""
    cands = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "prompt": "1+1=", "completions": [{"text": "2"}]}])
    result = prefloop("judge", "--candidates", cands, "--out", tmp_path / "j.jsonl", "--reward-fn", spec)
    assert result.returncode == 2, result.stderr
    assert "prefloop judge: error:" in result.stderr and spec.split(":")[0] in result.stderr
    assert "Traceback" not in result.stderr


def test_pairs_on_non_judgments_file_exits_2(tmp_path):
    """`prefloop pairs` on a file missing `scores` exits 2 naming file:line."""
    src = write_jsonl(tmp_path / "j.jsonl", [{"id": "a", "prompt": "p", "completions": [{"text": "x"}]}])
    result = prefloop("pairs", "--judgments", src, "--out", tmp_path / "pairs.jsonl")
    assert result.returncode == 2, result.stderr
    assert f"prefloop pairs: error: {src}:1" in result.stderr


def test_missing_required_flag_exits_2(tmp_path, capsys):
    """A missing required key exits 2 naming the flag."""
    assert main(["pairs", "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "--judgments" in capsys.readouterr().err


def _judgments(n: int) -> list[dict]:
    return [
        {"id": f"q{i}", "prompt": f"{i}+1=",
         "completions": [{"text": t, "finish_reason": "stop", "num_tokens": 1} for t in (str(i + 1), "x", "y")],
         "judge": "python:f", "scores": [1.0, 0.6, 0.0], "statuses": ["ok"] * 3, "errors": [None] * 3,
         "status": "ok", "round": 0, "config_hash": "abc"}
        for i in range(3)
    ]


def test_config_yaml_is_used_and_flags_win(tmp_path):
    """`--config` values are used, a flag overrides its key, and the resolved config is written beside the output."""
    src = write_jsonl(tmp_path / "j.jsonl", _judgments(3))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "judgments": str(src), "out": str(tmp_path / "pairs.jsonl"), "strategy": "all_above_margin",
        "min_margin": 0.9, "seed": 5,
    }))
    result = prefloop("pairs", "--config", cfg, "--min-margin", "0.5")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load((tmp_path / "pairs.config.yaml").read_text())
    assert resolved["strategy"] == "all_above_margin" and resolved["seed"] == 5  # from the YAML
    assert resolved["min_margin"] == 0.5  # the flag won
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6  # 1.0>0.6 (0.4) is below 0.5; 1.0>0.0 and 0.6>0.0 are kept, for each of 3 prompts
    assert {p["meta"]["strategy"] for p in pairs} == {"all_above_margin"}


def test_merge_unions_by_id_and_is_idempotent(tmp_path):
    """`prefloop merge` unions shard files by id (first occurrence wins) and merging again changes nothing."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "v": "a"}, {"id": "2", "v": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "2", "v": "a"}, {"id": "3", "v": "b"}])
    out = tmp_path / "m.jsonl"
    result = prefloop("merge", "--out", out, a, b)
    assert result.returncode == 0, result.stderr
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in merged] == ["1", "2", "3"]
    first = out.read_bytes()

    assert prefloop("merge", "--out", out, a, b).returncode == 0
    assert out.read_bytes() == first
    assert main(["merge", "--out", str(tmp_path / "m2.jsonl"), str(out), str(a), str(b)]) == 0
    assert (tmp_path / "m2.jsonl").read_bytes() == first  # merging the merge with its inputs is the same merge


def test_generate_judge_pairs_chain_on_tiny_model(tmp_path, tiny_model):
    """generate -> judge -> pairs through the CLI on a tiny random model writes every file with a done summary."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "add-1-2", "prompt": "1+2=", "answer": "3"},
        {"id": "add-4-5", "prompt": "4+5=", "answer": "9"},
        {"id": "add-7-1", "prompt": [{"role": "user", "content": "7+1="}], "answer": "8"},
    ])
    cands, judg, pairs = tmp_path / "candidates.jsonl", tmp_path / "judgments.jsonl", tmp_path / "pairs.jsonl"

    result = prefloop("generate", "--model", tiny_model, "--prompts", prompts, "--out", cands, "--n", "2",
                      "--max-new-tokens", "4", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in cands.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["add-1-2", "add-4-5", "add-7-1"]
    for r in records:
        assert len(r["completions"]) == 2
        assert all(c["num_tokens"] <= 4 and c["finish_reason"] in ("stop", "length") for c in r["completions"])
        assert "answer" in r["columns"]

    result = prefloop("judge", "--candidates", cands, "--out", judg, "--judge", "python",
                      "--reward-fn", "prefloop.tasks.addition:reward")
    assert result.returncode == 0, result.stderr
    judgments = [json.loads(line) for line in judg.read_text().splitlines()]
    assert len(judgments) == 3
    assert all(s in (0.0, 1.0) for j in judgments for s in j["scores"])
    assert {j["id"]: j["prompt"] for j in judgments}["add-7-1"] == [{"role": "user", "content": "7+1="}]
    assert sum(json.loads((tmp_path / "judgments.summary.json").read_text())["completion_statuses"].values()) == 6

    # Text and message prompts cannot share one TRL dataset: pairs refuses the mix, naming a line of each.
    result = prefloop("pairs", "--judgments", judg, "--out", pairs)
    assert result.returncode == 2 and "mixes prompt styles: line 1" in result.stderr and "line 3" in result.stderr
    assert not pairs.exists()
    judg.write_text("".join(line + "\n" for line in judg.read_text().splitlines() if "add-7-1" not in line))
    # A random model's 4-token answers are all cut off at max_new_tokens: no pair is usable, and pairs says so.
    result = prefloop("pairs", "--judgments", judg, "--out", pairs)
    assert result.returncode == 2, result.stderr
    assert "0 pairs from 2 prompts (dropped: truncated 4, too_few_usable 2)" in result.stderr
    assert "--keep-truncated" in result.stderr and not list(tmp_path.glob("pairs*"))

    for out, stage in ((cands, "generate"), (judg, "judge")):
        summary = json.loads(out.with_name(f"{out.stem}.summary.json").read_text())
        assert summary["stage"] == stage and summary["status"] == "done"
        assert out.with_name(f"{out.stem}.config.yaml").exists()

    # A second run of the same chain is a no-op: finished stages are not redone.
    before = cands.read_bytes()
    result = prefloop("generate", "--model", tiny_model, "--prompts", prompts, "--out", cands, "--n", "2",
                      "--max-new-tokens", "4", "--dtype", "float32")
    assert result.returncode == 0 and cands.read_bytes() == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "examples").glob("*.yaml")))
def test_example_configs_are_valid(name):
    """Every shipped recipe parses into a LoopConfig (every stage's keys checked) without running anything."""
    from prefloop.config import from_dict, load_yaml
    from prefloop.loop import LoopConfig

    from_dict(LoopConfig, load_yaml(Path(__file__).parent.parent / "examples" / name), name)
