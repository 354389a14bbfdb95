"""Config drift through the CLI: resuming an output with a setting that shapes it changed (the model, the
temperature, the reward function, the judge, the text of an llm judge's template file) is refused with exit 2 and
one line naming the changed keys and the fix; `--new-run` moves the old output aside and starts fresh; re-running a
finished stage loads no model, sends no request and changes no byte.

The drift check itself is unit-tested in tests/prefloop/test_runstate.py; the train stage's refusal in
tests/train/test_dpo.py::test_changed_config_is_refused and its finished re-run in
tests/reliability/test_disk.py::test_train_resumes_past_a_torn_checkpoint_and_temp_dirs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fake_server import FakeServer, chat_answer

import prefloop.gen.stage as gen_stage
from prefloop.cli import main
from prefloop.store import read_records


@pytest.fixture(autouse=True)
def _no_bar(monkeypatch):
    monkeypatch.setenv("PREFLOOP_NO_BAR", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """Two tiny model directories (the second stands for "another model")."""
    import torch

    from prefloop.demo.tiny import save_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("models")
    yield str(save_tiny(d / "policy")), str(save_tiny(d / "other"))
    torch.set_num_threads(threads)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refusal(capsys) -> list[str]:
    """The changed keys named by the single error line (and check the line's fix)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("prefloop ")]
    assert "Fix: restore those values to resume, or pass --new-run" in line
    return re.search(r"\(changed: ([^)]*)\)", line).group(1).split(", ")


def forbid(monkeypatch, module, name: str) -> None:
    def refuse(*a, **k):
        raise AssertionError(f"{name} must not be called")

    monkeypatch.setattr(module, name, refuse)


def test_generate_refuses_a_changed_model_or_sampling_then_new_run_and_done(models, tmp_path, capsys, monkeypatch):
    """An interrupted generate resumed with another --model or --temperature/--n is refused naming exactly those
    keys, loading nothing and touching nothing; --new-run moves the old output and its sidecars aside (bytes intact)
    and generates afresh; re-running the finished stage loads no model and changes no byte."""
    policy, other = models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+1="}) + "\n" for i in range(6)))
    out = tmp_path / "run" / "candidates.jsonl"
    args = ["-q", "generate", "--prompts", str(prompts), "--out", str(out), "--n", "2", "--max-new-tokens", "2",
            "--chunk-size", "2", "--dtype", "float32"]

    real, calls = gen_stage.load_generator, []

    class DiesInChunk2:
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def generate(self, prompts_, n, sampling):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt  # Ctrl-C in the second chunk
            return self.inner.generate(prompts_, n, sampling)

        def close(self):
            self.inner.close()

    monkeypatch.setattr(gen_stage, "load_generator", lambda *a, **k: DiesInChunk2(real(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--model", policy])
    monkeypatch.setattr(gen_stage, "load_generator", real)
    unfinished = snapshot(out.parent)
    assert sorted(unfinished) == ["candidates.config.yaml", "candidates.jsonl"]
    assert len(read_records(out)) == 2

    forbid(monkeypatch, gen_stage, "load_generator")
    assert main([*args, "--model", other]) == 2
    assert refusal(capsys) == ["model"]
    assert main([*args, "--model", policy, "--temperature", "0.7", "--n", "3"]) == 2
    assert refusal(capsys) == ["n", "temperature"]
    assert snapshot(out.parent) == unfinished

    monkeypatch.setattr(gen_stage, "load_generator", real)
    assert main([*args, "--model", policy, "--temperature", "0.7", "--new-run"]) == 0
    aside = {p.name.split(".old-")[0]: p.read_bytes() for p in out.parent.iterdir() if ".old-" in p.name}
    assert aside == unfinished  # moved aside whole, never deleted
    assert sorted(r["id"] for r in read_records(out)) == [f"q{i}" for i in range(6)]
    assert "temperature: 0.7" in (out.parent / "candidates.config.yaml").read_text()

    done = snapshot(out.parent)
    forbid(monkeypatch, gen_stage, "load_generator")
    assert main([*args, "--model", policy, "--temperature", "0.7", "--chunk-size", "5"]) == 0  # chunking: not drift
    assert snapshot(out.parent) == done


REWARDS = """
def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def shortness(prompts, completions, **columns):
    return [-float(len(c)) for c in completions]
"""


def test_judge_refuses_another_reward_function_or_judge(tmp_path, capsys):
    """A judge output resumed with another reward function, or another kind of judge, is refused naming the keys;
    nothing in the output folder changes."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{i}?", "completions": [
        {"text": "a" * (i + 1), "finish_reason": "stop"}, {"text": "b", "finish_reason": "stop"}]}) + "\n"
        for i in range(4)))
    out = tmp_path / "run" / "judgments.jsonl"
    args = ["-q", "judge", "--candidates", str(cands), "--out", str(out)]
    assert main([*args, "--reward-fn", f"{tmp_path / 'rewards.py'}:length"]) == 0
    (out.parent / "judgments.summary.json").unlink()  # as if killed before the end
    before = snapshot(out.parent)

    assert main([*args, "--reward-fn", f"{tmp_path / 'rewards.py'}:shortness"]) == 2
    assert refusal(capsys) == ["reward_fn"]
    assert main([*args, "--judge", "reward_model", "--reward-model", str(tmp_path / "rm")]) == 2
    assert {"judge", "reward_fn", "reward_model"} <= set(refusal(capsys))
    assert snapshot(out.parent) == before
    assert main([*args, "--reward-fn", f"{tmp_path / 'rewards.py'}:length"]) == 0  # the same judge resumes


def test_editing_an_llm_judge_template_file_is_refused_and_restoring_it_resumes(tmp_path, capsys):
    """An llm judge (through a loopback server) resumed after its --template file's text changed is refused naming
    `template_sha256`; with the text restored it resumes; once finished, a re-run sends no request to the judge and
    changes no byte."""
    template = tmp_path / "judge.yaml"
    original = "mode: pointwise\ntemplate: 'Rate {response} for {prompt}. End with Score: N'\n"
    template.write_text(original)
    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{i}+1=", "completions": [
        {"text": str(i + 1), "finish_reason": "stop"}, {"text": "x", "finish_reason": "stop"}]}) + "\n"
        for i in range(3)))
    out = tmp_path / "run" / "judgments.jsonl"
    with FakeServer() as server:
        server.script = lambda req: chat_answer("Score: 4")
        args = ["-q", "judge", "--candidates", str(cands), "--out", str(out), "--judge", "llm", "--judge-model", "m",
                "--judge-backend", "openai", "--base-url", server.url, "--mode", "pointwise", "--template",
                str(template), "--cache", "off", "--judge-engine", "{ready_timeout: 10, backoff_base: 0.01}"]
        assert main(args) == 0
        lines = out.read_bytes().splitlines(keepends=True)
        out.write_bytes(b"".join(lines[:1]))  # killed after the first record
        (out.parent / "judgments.summary.json").unlink()
        before, sent = snapshot(out.parent), len(server.generation_requests())

        template.write_text(original.replace("Rate", "Grade"))
        assert main(args) == 2
        assert refusal(capsys) == ["template_sha256"]
        assert snapshot(out.parent) == before and len(server.generation_requests()) == sent

        template.write_text(original)
        assert main(args) == 0
        assert out.read_bytes().startswith(lines[0])
        assert sorted(r["id"] for r in read_records(out)) == ["p0", "p1", "p2"]
        done, sent = snapshot(out.parent), len(server.generation_requests())
        assert main(args) == 0  # finished: nothing to do
        assert snapshot(out.parent) == done and len(server.generation_requests()) == sent


def test_pairs_refuses_another_strategy_and_a_finished_rerun_changes_nothing(tmp_path, capsys):
    """A finished pairs output is not silently rewritten with another strategy (refused naming it), and re-running
    the same command leaves every byte as it was."""
    judgments = tmp_path / "judgments.jsonl"
    judgments.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{i}?", "scores": [1.0, 0.5, 0.0],
                                             "completions": [{"text": t} for t in "abc"]}) + "\n" for i in range(3)))
    out = tmp_path / "run" / "pairs.jsonl"
    args = ["-q", "pairs", "--judgments", str(judgments), "--out", str(out)]
    assert main(args) == 0
    done = snapshot(out.parent)
    assert main([*args, "--strategy", "all_above_margin", "--min-margin", "0.2"]) == 2
    assert refusal(capsys) == ["min_margin", "strategy"]
    assert main(args) == 0
    assert snapshot(out.parent) == done
