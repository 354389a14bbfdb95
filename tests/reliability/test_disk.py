"""Garbage on disk and a disk that stops taking writes, each met by the stage that meets it in real use.

Garbage: a torn candidates tail (half line, partial UTF-8, a garbage line) under a resumed `generate`; temp files a
killed `atomic_write` left beside a `pairs` output; a torn checkpoint, a temp model dir and a half-done directory
swap under a resumed `train`. Each is cut, removed or restored, and logged.

Resources: a really full disk (a 128 KiB tmpfs) mid-`generate`, a file system remounted read-only under a resume,
and an unwritable output folder (real permissions: as root, the stage runs without CAP_DAC_OVERRIDE). Each ends
with exit 2 and one line naming the file and the fix; what was on disk stays byte-identical with no torn line,
and the re-run after the fix completes. The mounts need root (CAP_SYS_ADMIN); without it those tests are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prefloop.gen.stage as gen_stage
from prefloop.cli import main
from prefloop.gen.stage import GenerateConfig

N = 12  # prompts in the shared generate run
CHUNK = 4


@pytest.fixture(autouse=True)
def _no_bar(monkeypatch):
    monkeypatch.setenv("PREFLOOP_NO_BAR", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    # One intra-op thread: the tiny model gains nothing from more, and a shared 2-core box stalls with them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_prompts(path: Path, n: int) -> list[str]:
    """`n` addition prompts with a non-ASCII character in each (so lines can be cut inside a UTF-8 sequence)."""
    ids = [f"q{i:04d}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": q, "prompt": f"café {i}+{i % 7}="}, ensure_ascii=False) + "\n"
                            for i, q in enumerate(ids)), encoding="utf-8")
    return ids


def gen_config(model: str, prompts: Path, out: Path, **kw) -> GenerateConfig:
    values = dict(model=model, prompts=str(prompts), out=str(out), n=2, max_new_tokens=3, chunk_size=CHUNK,
                  batch_size=16, dtype="float32")
    return GenerateConfig(**{**values, **kw})


def gen_args(config: GenerateConfig) -> list[str]:
    return ["-q", "generate", "--model", config.model, "--prompts", config.prompts, "--out", config.out,
            "--n", str(config.n), "--max-new-tokens", str(config.max_new_tokens), "--chunk-size",
            str(config.chunk_size), "--batch-size", str(config.batch_size), "--dtype", config.dtype]


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> tuple[GenerateConfig, list[bytes], list[str]]:
    """One finished generate run: its config, its lines, its ids. Tests copy it to stage their own crash."""
    d = tmp_path_factory.mktemp("finished")
    ids = write_prompts(d / "prompts.jsonl", N)
    config = gen_config(tiny_model, d / "prompts.jsonl", d / "candidates.jsonl")
    gen_stage.run(config)
    return config, Path(config.out).read_bytes().splitlines(keepends=True), ids


def crashed_copy(finished, out: Path, keep: int, tail: bytes = b"") -> GenerateConfig:
    """`out` as a run killed after `keep` records would leave it: those lines, `tail`, the config, no summary."""
    config, lines, _ = finished
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(lines[:keep]) + tail)
    shutil.copy(Path(config.out).with_name("candidates.config.yaml"), out.with_name(f"{out.stem}.config.yaml"))
    return gen_config(config.model, Path(config.prompts), out)


def check_whole(path: Path, ids: list[str]) -> list[dict]:
    """Every line of `path` is a whole JSON record and every id is there exactly once."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(ids)
    return rows


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("prefloop ")]


# --- garbage on disk ----------------------------------------------------------------------------------------------


def _half(line: bytes) -> bytes:
    return line[: len(line) // 2]


def _inside_utf8(line: bytes) -> bytes:
    return line[: line.index("é".encode()) + 1]  # the first byte of a two-byte character


@pytest.mark.parametrize("tail", [
    pytest.param(lambda line: _half(line), id="half-line"),
    pytest.param(lambda line: _inside_utf8(line), id="partial-utf8"),
    pytest.param(lambda line: _inside_utf8(line) + b'"}\n', id="partial-utf8-whole-line"),
    pytest.param(lambda line: b"\x00\x00{garbage\n" + _half(line), id="garbage-line-then-half-line"),
])
def test_generate_resumes_onto_a_torn_candidates_file(finished, tmp_path, caplog, tail):
    """generate resuming onto a torn tail cuts it (kept in .torn, logged), keeps the whole records byte-for-byte and
    ends with every prompt exactly once."""
    _, lines, ids = finished
    torn = tail(lines[5])
    config = crashed_copy(finished, tmp_path / "candidates.jsonl", keep=5, tail=torn)
    with caplog.at_level(logging.WARNING, logger="prefloop.store"):
        gen_stage.run(config)
    assert f"cut a torn tail of {len(torn)} bytes" in caplog.text
    assert (tmp_path / "candidates.jsonl.torn").read_bytes() == torn
    out = Path(config.out)
    assert out.read_bytes().startswith(b"".join(lines[:5]))
    check_whole(out, ids)
    summary = json.loads((tmp_path / "candidates.summary.json").read_text())
    assert summary["status"] == "done" and summary["resumed"] == 5 and summary["written"] == N


def dead_pid() -> int:
    """A pid no process can have (above the kernel's pid_max)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2**22 + 1


def write_judgments(path: Path) -> Path:
    rows = [{"id": f"p{i}", "prompt": f"{i}+1=", "scores": [1.0, 0.0, 0.5],
             "completions": [{"text": t, "finish_reason": "stop", "num_tokens": 2} for t in (str(i + 1), "x", "y")]}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_removes_temp_files_left_by_a_killed_atomic_write(tmp_path, caplog):
    """Temps a killed writer left beside the pairs output and its sidecars are removed and logged by the next run;
    a temp whose writer is alive is left alone; the output equals a clean run's."""
    judgments = write_judgments(tmp_path / "judgments.jsonl")
    assert main(["-q", "pairs", "--judgments", str(judgments), "--out", str(tmp_path / "clean" / "pairs.jsonl")]) == 0
    out = tmp_path / "run" / "pairs.jsonl"
    out.parent.mkdir()
    stale = [out.with_name(f".pairs.jsonl.{dead_pid()}.k2j3h4g5.tmp"),  # killed mid-write: half an output
             out.with_name(".pairs.summary.json.a1b2c3d4.tmp"),  # the name temps had before they carried a pid
             out.with_name(f".pairs.config.yaml.{dead_pid()}.zz99yy88.tmp")]
    for path in stale:
        path.write_bytes(b'{"id": "p0", "prompt": "0+')
    live = out.with_name(f".pairs.jsonl.{os.getppid()}.q1w2e3r4.tmp")  # a writer that is still running
    live.write_bytes(b"in flight")
    with caplog.at_level(logging.WARNING, logger="prefloop.store"):
        assert main(["-q", "pairs", "--judgments", str(judgments), "--out", str(out)]) == 0
    for path in stale:
        assert not path.exists() and f"removed {path.name}, left by an interrupted write" in caplog.text
    assert live.read_bytes() == b"in flight"
    assert out.read_bytes() == (tmp_path / "clean" / "pairs.jsonl").read_bytes()


def test_train_resumes_past_a_torn_checkpoint_and_temp_dirs(tiny_model, tmp_path, caplog, monkeypatch):
    """train re-run after a kill: the checkpoint without trainer_state.json is skipped (logged) for the last complete
    one, a temp adapter dir is removed, a half-done adapter swap is undone (logged); then a finished re-run loads
    no model and changes nothing."""
    import prefloop.train.dpo as dpo

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{i}+{i}=", "chosen": str(2 * i),
                                         "rejected": str(2 * i + 1)}) + "\n" for i in range(8)))
    config = dpo.TrainConfig(model=tiny_model, pairs=str(pairs), out=str(tmp_path / "train"), dtype="float32",
                             batch_size=4, max_length=32, max_steps=4, save_steps=2, logging_steps=1,
                             gradient_checkpointing=False, lora_r=4, lora_alpha=8, keep_checkpoints=3)
    out = dpo.run(config)
    # The kill: while saving checkpoint-4 (its trainer state, written last, is missing), with garbage from earlier
    # kills beside the adapter: a temp dir of a final save, and an old adapter moved aside by an interrupted swap.
    (out / "train_summary.json").unlink()
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    os.replace(out / "adapter", out / ".adapter.old")
    temp = out / f".adapter.{dead_pid()}.x7y8z9w0.tmp"
    temp.mkdir()
    (temp / "adapter_model.safetensors").write_bytes(b"half")

    with caplog.at_level(logging.WARNING):
        dpo.run(config)
    assert "skipping" in caplog.text and "checkpoint-4: no trainer_state.json" in caplog.text
    assert f"removed {temp.name}, left by an interrupted write" in caplog.text
    assert "restored from .adapter.old" in caplog.text
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == 4
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "config.yaml", "train_summary.json"]
    assert (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()  # saved again, whole

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def no_model(*a, **k):
        raise AssertionError("a finished train stage must not load a model")

    monkeypatch.setattr(dpo, "build_trainer", no_model)
    dpo.run(config)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- a disk that stops taking writes ----------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size under tmp_path; unmounted afterwards. Skips without the privilege."""
    mounted = []

    def mount(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}); the injected-ENOSPC "
                        "test in test_resources.py covers the logic")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_really_full_disk_stops_generate_with_one_line_and_no_torn_record(tiny_model, tmp_path, tmpfs, capsys):
    """On a tmpfs that fills up mid-chunk: exit 2, one line naming the file, the cause and the fix; the file holds
    only whole records (the failed write's fragment is cut back, nothing in .torn); after freeing space the same
    command completes, keeping every earlier byte."""
    ids = write_prompts(tmp_path / "prompts.jsonl", 120)
    disk = tmpfs("128k")
    (disk / "filler").write_bytes(b"\0" * 96 * 1024)  # what else is on the disk: ~30 records' room is left
    config = gen_config(tiny_model, tmp_path / "prompts.jsonl", disk / "candidates.jsonl", n=4, max_new_tokens=8,
                        chunk_size=16, batch_size=64)
    assert main(gen_args(config)) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith(f"prefloop generate: error: cannot write {config.out}: No space left on device")
    assert "(the disk is full). Fix: free space" in line and "re-run the same command" in line
    assert "Traceback" not in err
    before = Path(config.out).read_bytes()
    rows = [json.loads(raw) for raw in before.splitlines()]  # no torn line: the fragment was cut back
    assert before.endswith(b"\n") and 0 < len(rows) < 120 and len({r["id"] for r in rows}) == len(rows)
    assert not Path(f"{config.out}.torn").exists() and not (disk / "candidates.summary.json").exists()

    (disk / "filler").unlink()  # the user frees space
    assert main(gen_args(config)) == 0
    assert Path(config.out).read_bytes().startswith(before)
    check_whole(Path(config.out), ids)


def test_a_read_only_file_system_stops_the_resume_and_keeps_the_records(finished, tmpfs, capsys):
    """Resuming onto a file system remounted read-only: exit 2, one line naming the file and the fix; the records
    are untouched; after remounting read-write the same command completes."""
    disk = tmpfs("1m")
    config = crashed_copy(finished, disk / "candidates.jsonl", keep=6)
    before = Path(config.out).read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    try:
        assert main(gen_args(config)) == 2
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert f"cannot write {disk}" in line and "Read-only file system (the file system is read-only)" in line
    assert "Fix: remount it read-write" in line and "Traceback" not in err
    assert Path(config.out).read_bytes() == before
    assert main(gen_args(config)) == 0
    assert Path(config.out).read_bytes().startswith(before)
    check_whole(Path(config.out), finished[2])


def _run_without_root_bypass(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI as a user that file permissions apply to: as root, with CAP_DAC_OVERRIDE & co. dropped."""
    command = [sys.executable, "-m", "prefloop.cli", *args]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be made to apply")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]
    env = {**os.environ, "PREFLOOP_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_an_unwritable_output_folder_fails_at_once_naming_the_file(finished, tmp_path):
    """An output folder the user cannot write to: exit 2 before any model loads, one line naming the output's file
    (not a temp name) and the fix; nothing is created."""
    config = gen_config(finished[0].model, Path(finished[0].prompts), tmp_path / "locked" / "candidates.jsonl")
    Path(config.out).parent.mkdir()
    Path(config.out).parent.chmod(0o555)
    try:
        result = _run_without_root_bypass(gen_args(config))
    finally:
        Path(config.out).parent.chmod(0o755)
    (line,) = error_lines(result.stderr)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    first = Path(config.out).with_name("candidates.jsonl.lock")  # the first file a stage writes: its lock
    assert line == (f"prefloop generate: error: cannot write {first}: Permission denied (no permission to write "
                    "there). Fix: give this user write permission on it and its folder (or choose another --out), "
                    "then re-run the same command to resume; what was written before is intact.")
    assert list(Path(config.out).parent.iterdir()) == []


def test_a_read_only_output_file_fails_the_resume_and_stays_intact(finished, tmp_path):
    """Resuming onto a candidates file the user may not write: exit 2 naming it; its bytes unchanged."""
    config = crashed_copy(finished, tmp_path / "candidates.jsonl", keep=6)
    Path(config.out).chmod(0o444)
    before = Path(config.out).read_bytes()
    result = _run_without_root_bypass(gen_args(config))
    (line,) = error_lines(result.stderr)
    assert result.returncode == 2 and f"cannot write {config.out}: Permission denied" in line
    assert Path(config.out).read_bytes() == before
