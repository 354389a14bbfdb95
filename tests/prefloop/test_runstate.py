"""Run state (docs/architecture.md "Run state"): config sidecar, drift refusal, done means done, --new-run.

The second half drives the real generate stage (`prefloop.gen.stage.run`, tiny local model, hf backend) through
the same transitions end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import prefloop.gen.stage as stage
from prefloop.config import ConfigError, from_dict, load_yaml
from prefloop.gen.stage import GenerateConfig
from prefloop.runstate import ConfigDriftError, StageRun, sidecar
from prefloop.store import InputError


def _cfg(tmp_path: Path, **kw) -> GenerateConfig:
    return GenerateConfig(model="m", prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "o.jsonl"), **kw)


def _run(cfg: GenerateConfig, new_run: bool = False, directory: bool = False) -> tuple[StageRun, str]:
    state = StageRun("generate", Path(cfg.out), cfg, directory=directory)
    return state, state.begin(new_run)


# --- StageRun ---------------------------------------------------------------------------------------------------


def test_sidecar_names():
    """A file output gets `<stem>.config.yaml` beside it; a directory output gets `config.yaml` inside it."""
    assert sidecar("runs/cands.jsonl", "config.yaml") == Path("runs/cands.config.yaml")
    assert sidecar("runs/model", "summary.json", directory=True) == Path("runs/model/summary.json")
    assert sidecar("runs/cands", "summary.json") == Path("runs/cands.summary.json")  # suffixless file output


def test_fresh_writes_loadable_config_with_hash(tmp_path):
    """A fresh start writes the resolved config beside the output; it loads back with --config to the same config."""
    cfg = _cfg(tmp_path, temperature=0.7, n=3)
    state, status = _run(cfg)
    assert status == "fresh"
    text = state.config_path.read_text(encoding="utf-8")
    assert text.startswith("# prefloop generate") and state.hash in text.splitlines()[0]
    assert from_dict(GenerateConfig, load_yaml(state.config_path)) == cfg


def test_fresh_resume_done_transitions(tmp_path):
    """fresh -> (output written) resume -> (finished done) done; an `incomplete` finish resumes again."""
    cfg = _cfg(tmp_path)
    state, status = _run(cfg)
    assert status == "fresh"
    Path(cfg.out).write_text('{"id": "a"}\n')
    assert _run(cfg)[1] == "resume"
    summary = state.finish("incomplete", prompts=2, written=1)
    assert summary["status"] == "incomplete" and summary["config_hash"] == state.hash and summary["written"] == 1
    assert _run(cfg)[1] == "resume"
    state.finish("done", prompts=2, written=2)
    assert json.loads(state.summary_path.read_text())["status"] == "done"
    assert _run(cfg)[1] == "done"


def test_done_without_output_resumes(tmp_path):
    """A summary saying done is not trusted when the output is gone: the stage resumes (regenerates)."""
    cfg = _cfg(tmp_path)
    state, _ = _run(cfg)
    Path(cfg.out).write_text('{"id": "a"}\n')
    state.finish("done")
    os.unlink(cfg.out)
    assert _run(cfg)[1] == "resume"


def test_changed_hashed_key_is_refused_naming_it(tmp_path):
    """Resuming with a changed output-defining key raises ConfigDriftError naming every changed key and the fix."""
    cfg = _cfg(tmp_path)
    _run(cfg)
    Path(cfg.out).write_text('{"id": "a"}\n')
    with pytest.raises(ConfigDriftError) as e:
        _run(dataclasses.replace(cfg, temperature=0.5))
    assert "temperature" in str(e.value) and "--new-run" in str(e.value)
    with pytest.raises(ConfigDriftError) as e:
        _run(dataclasses.replace(cfg, n=8, seed=3))
    assert "n, seed" in str(e.value)


def test_finished_output_with_changed_config_is_refused(tmp_path):
    """A finished output is not silently reused for a different config either."""
    cfg = _cfg(tmp_path)
    state, _ = _run(cfg)
    Path(cfg.out).write_text('{"id": "a"}\n')
    state.finish("done")
    with pytest.raises(ConfigDriftError, match="max_new_tokens"):
        _run(dataclasses.replace(cfg, max_new_tokens=5))


@pytest.mark.parametrize("change", [{"chunk_size": 7}, {"batch_size": 3}, {"dtype": "float32"}, {"new_run": False}])
def test_changing_unhashed_key_is_allowed(tmp_path, change):
    """Keys that do not define the output (chunk_size, batch_size, dtype) may change between resumes."""
    cfg = _cfg(tmp_path)
    _run(cfg)
    Path(cfg.out).write_text('{"id": "a"}\n')
    assert _run(dataclasses.replace(cfg, **change))[1] == "resume"


def test_same_values_different_number_types_are_not_drift(tmp_path):
    """`temperature=0` (Python API) and `temperature=0.0` (CLI/YAML) are the same config: resume, no drift."""
    cfg = _cfg(tmp_path, temperature=0, top_p=1)
    _run(cfg)
    Path(cfg.out).write_text('{"id": "a"}\n')
    assert _run(dataclasses.replace(cfg, temperature=0.0, top_p=1.0))[1] == "resume"


def test_setting_added_by_a_newer_version_resumes_at_its_default(tmp_path):
    """A config.yaml written before a setting existed resumes when the setting is at its default, and is refused
    (naming it) when it is not: the old run used the default."""
    cfg = _cfg(tmp_path)
    _run(cfg)
    Path(cfg.out).write_text('{"id": "a"}\n')
    config_yaml = sidecar(cfg.out, "config.yaml")
    old = load_yaml(config_yaml)
    del old["stop"], old["logprobs"]
    config_yaml.write_text(json.dumps(old))  # JSON is YAML
    assert _run(cfg)[1] == "resume"
    with pytest.raises(ConfigDriftError, match=r"changed: logprobs\)"):
        _run(dataclasses.replace(cfg, logprobs=True))


def test_output_without_config_is_refused(tmp_path):
    """An existing non-empty output with no config sidecar is refused (cannot tell how it was made)."""
    cfg = _cfg(tmp_path)
    Path(cfg.out).write_text('{"id": "a"}\n')
    with pytest.raises(ConfigDriftError) as e:
        _run(cfg)
    assert "o.config.yaml" in str(e.value) and "--new-run" in str(e.value)
    assert Path(cfg.out).read_text() == '{"id": "a"}\n'


def test_empty_output_without_config_starts_fresh(tmp_path):
    """An empty output file holds nothing to protect: the stage starts fresh."""
    cfg = _cfg(tmp_path)
    Path(cfg.out).write_text("")
    assert _run(cfg)[1] == "fresh"


def test_new_run_moves_old_output_aside(tmp_path):
    """--new-run moves the old output, config and summary aside under new names (never deletes) and starts fresh."""
    cfg = _cfg(tmp_path)
    state, _ = _run(cfg)
    Path(cfg.out).write_text('{"id": "old"}\n')
    state.finish("done")
    changed = dataclasses.replace(cfg, temperature=0.3)
    state2, status = _run(changed, new_run=True)
    assert status == "fresh"
    assert not Path(cfg.out).exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("o.jsonl.old-")]
    assert len(aside) == 1 and aside[0].read_text() == '{"id": "old"}\n'
    assert any(p.name.startswith("o.config.yaml.old-") for p in tmp_path.iterdir())
    assert any(p.name.startswith("o.summary.json.old-") for p in tmp_path.iterdir())
    assert load_yaml(state2.config_path)["temperature"] == 0.3


def test_new_run_twice_keeps_both_old_outputs(tmp_path):
    """Two --new-run restarts in quick succession keep both earlier outputs (the second must not overwrite the first)."""
    cfg = _cfg(tmp_path)
    _run(cfg)
    Path(cfg.out).write_text('{"id": "first"}\n')
    _run(cfg, new_run=True)
    Path(cfg.out).write_text('{"id": "second"}\n')
    _run(cfg, new_run=True)
    kept = sorted(p.read_text() for p in tmp_path.iterdir() if p.name.startswith("o.jsonl.old-"))
    assert kept == ['{"id": "first"}\n', '{"id": "second"}\n']


def test_directory_output_new_run_moves_dir(tmp_path):
    """For a directory output the sidecars live inside it, and --new-run moves the whole directory aside."""
    cfg = dataclasses.replace(_cfg(tmp_path), out=str(tmp_path / "model"))
    state, status = _run(cfg, directory=True)
    assert status == "fresh" and state.config_path == tmp_path / "model" / "config.yaml"
    assert _run(cfg, directory=True)[1] == "resume"  # only the sidecar inside: nothing made yet
    (tmp_path / "model" / "weights.bin").write_text("w")
    assert _run(cfg, directory=True)[1] == "resume"
    assert _run(cfg, new_run=True, directory=True)[1] == "fresh"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("model.old-")]
    assert len(aside) == 1 and (aside[0] / "weights.bin").read_text() == "w"


# --- the generate stage, end to end with the tiny model ---------------------------------------------------------

N_PROMPTS = 14


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    # One intra-op thread: on a shared 2-core box, torch's default thread pool spins against other processes and a
    # 4-token generation goes from ~0.5 s to ~12 s. The tiny model gains nothing from more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen_cfg(tmp_path, tiny_model, monkeypatch) -> GenerateConfig:
    monkeypatch.setenv("PREFLOOP_NO_BAR", "1")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i:02d}", "prompt": f"{i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(N_PROMPTS - 2)]
    rows += [{"id": "chat", "prompt": [{"role": "user", "content": "hi"}]}, {"prompt": "no id given"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return GenerateConfig(
        model=tiny_model,
        prompts=str(prompts),
        out=str(tmp_path / "cands.jsonl"),
        n=2,
        max_new_tokens=4,
        chunk_size=4,
        batch_size=8,
        dtype="float32",
    )


def _records(path: str | Path) -> list[dict]:
    data = Path(path).read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def _summary(cfg: GenerateConfig) -> dict:
    return json.loads(sidecar(cfg.out, "summary.json").read_text())


def test_generate_writes_every_prompt_once(gen_cfg):
    """A run writes exactly one candidates record per prompt, with n completions and the schema's fields."""
    out = stage.run(gen_cfg)
    recs = _records(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == N_PROMPTS
    assert {"p00", "p11", "chat"} <= set(ids)
    summary = _summary(gen_cfg)
    assert summary["status"] == "done" and summary["prompts"] == N_PROMPTS and summary["written"] == N_PROMPTS
    for r in recs:
        assert list(r)[:1] == ["id"]
        assert {"prompt", "completions", "model", "round", "config_hash"} <= set(r)
        assert r["config_hash"] == summary["config_hash"]
        assert len(r["completions"]) == 2
        for c in r["completions"]:
            assert isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length")
            assert 1 <= c["num_tokens"] <= 4
    by_id = {r["id"]: r for r in recs}
    assert by_id["chat"]["prompt"] == [{"role": "user", "content": "hi"}]
    assert by_id["p03"]["columns"] == {"answer": "6"}  # extra columns travel with the record


def test_generate_rerun_does_nothing(gen_cfg, monkeypatch):
    """Re-running a finished stage (even with new chunk/batch sizes) loads no model and changes no byte."""
    stage.run(gen_cfg)
    out_bytes = Path(gen_cfg.out).read_bytes()
    summary_bytes = sidecar(gen_cfg.out, "summary.json").read_bytes()

    def no_model(*a, **k):
        raise AssertionError("a finished stage must not load the model")

    monkeypatch.setattr(stage, "load_generator", no_model)
    stage.run(gen_cfg)
    stage.run(dataclasses.replace(gen_cfg, chunk_size=2, batch_size=3))
    assert Path(gen_cfg.out).read_bytes() == out_bytes
    assert sidecar(gen_cfg.out, "summary.json").read_bytes() == summary_bytes
    assert _summary(gen_cfg)["status"] == "done"


def test_generate_changed_temperature_refused(gen_cfg):
    """Re-running with another temperature is refused naming `temperature`; the output is untouched."""
    stage.run(gen_cfg)
    before = Path(gen_cfg.out).read_bytes()
    with pytest.raises(ConfigDriftError, match="temperature"):
        stage.run(dataclasses.replace(gen_cfg, temperature=0.5))
    assert Path(gen_cfg.out).read_bytes() == before


def test_generate_malformed_prompts_creates_nothing(gen_cfg, monkeypatch):
    """A broken prompts line raises InputError naming file:line before any model loads; no output or sidecar."""
    path = Path(gen_cfg.prompts)
    path.write_text(path.read_text() + '{"prompt": "broken\n')

    def no_model(*a, **k):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(stage, "load_generator", no_model)
    with pytest.raises(InputError, match=f":{N_PROMPTS + 1}"):
        stage.run(gen_cfg)
    assert not Path(gen_cfg.out).exists()
    assert not sidecar(gen_cfg.out, "config.yaml").exists()
    assert not sidecar(gen_cfg.out, "summary.json").exists()


def _wrap_generator(monkeypatch, fail):
    """Wrap the real backend; `fail(call_index, prompts)` may raise or return per-prompt None masks."""
    real = stage.load_generator
    calls = []

    class Wrapped:
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def generate(self, prompts, n, sampling):
            calls.append(len(prompts))
            mask = fail(len(calls), prompts)
            results = self.inner.generate(prompts, n, sampling)
            return [None if (mask and mask[i]) else r for i, r in enumerate(results)]

        def close(self):
            self.inner.close()

    monkeypatch.setattr(stage, "load_generator", lambda *a, **k: Wrapped(real(*a, **k)))
    return calls


def test_generate_crash_mid_run_keeps_chunks_and_resumes(gen_cfg, monkeypatch):
    """A crash in chunk 3 keeps chunks 1-2 byte-for-byte; the re-run writes only the rest, each prompt once."""

    def crash_on_third(call, prompts):
        if call == 3:
            raise RuntimeError("injected crash")

    _wrap_generator(monkeypatch, crash_on_third)
    with pytest.raises(RuntimeError, match="injected"):
        stage.run(gen_cfg)
    partial = Path(gen_cfg.out).read_bytes()
    assert len(partial.splitlines()) == 2 * gen_cfg.chunk_size
    assert not sidecar(gen_cfg.out, "summary.json").exists()
    monkeypatch.undo()
    monkeypatch.setenv("PREFLOOP_NO_BAR", "1")
    calls = _wrap_generator(monkeypatch, lambda call, prompts: None)
    stage.run(gen_cfg)
    final = Path(gen_cfg.out).read_bytes()
    assert final.startswith(partial)
    assert sum(calls) == N_PROMPTS - 2 * gen_cfg.chunk_size
    ids = [r["id"] for r in _records(gen_cfg.out)]
    assert len(ids) == len(set(ids)) == N_PROMPTS
    summary = _summary(gen_cfg)
    assert summary["status"] == "done" and summary["resumed"] == 2 * gen_cfg.chunk_size


def test_generate_failed_prompts_not_written_then_retried(gen_cfg, monkeypatch):
    """Prompts the backend reports as failed are not written, the run is `incomplete`, and a re-run retries them."""
    cfg = dataclasses.replace(gen_cfg, max_failed_fraction=0.5)
    _wrap_generator(monkeypatch, lambda call, prompts: [i == 0 for i in range(len(prompts))] if call <= 2 else None)
    stage.run(cfg)
    summary = _summary(cfg)
    assert summary["status"] == "incomplete" and summary["failed"] == 2
    assert len(_records(cfg.out)) == N_PROMPTS - 2
    monkeypatch.undo()
    monkeypatch.setenv("PREFLOOP_NO_BAR", "1")
    calls = _wrap_generator(monkeypatch, lambda call, prompts: None)
    stage.run(cfg)
    assert calls == [2]
    ids = [r["id"] for r in _records(cfg.out)]
    assert len(ids) == len(set(ids)) == N_PROMPTS
    assert _summary(cfg)["status"] == "done"


def test_generate_too_many_failures_stops(gen_cfg, monkeypatch):
    """Past `max_failed_fraction` the stage stops with an error saying records are kept and how to resume."""
    cfg = dataclasses.replace(gen_cfg, max_failed_fraction=0.1)
    _wrap_generator(monkeypatch, lambda call, prompts: [True] * len(prompts))
    with pytest.raises(RuntimeError, match="max_failed_fraction"):
        stage.run(cfg)


def test_generate_out_without_suffix(gen_cfg):
    """An --out path without a suffix still yields a JSONL file of candidates, or is refused up front (ConfigError)."""
    cfg = dataclasses.replace(gen_cfg, out=str(Path(gen_cfg.out).with_suffix("")))
    try:
        stage.run(cfg)
    except ConfigError:
        assert not Path(cfg.out).exists()
        return
    assert Path(cfg.out).is_file()
    assert len(_records(cfg.out)) == N_PROMPTS


def test_a_directory_output_killed_while_writing_its_config_starts_fresh(tmp_path):
    """A kill inside the config's atomic write leaves only `.config.yaml.<pid>.<rand>.tmp` in a directory output (a
    trained model's folder): that temp is not output, so the re-run starts fresh instead of refusing the folder
    as "exists but has no config.yaml" (found by the loop's kill test)."""
    out = tmp_path / "train"
    out.mkdir()
    (out / ".config.yaml.999999.abc123.tmp").write_text("partial: ")
    assert StageRun("train", out, _cfg(tmp_path), directory=True).begin() == "fresh"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
