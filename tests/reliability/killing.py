"""The kill-test harness: run a stage in a process of its own, SIGKILL it at a seeded moment, resume, check the files.

    runner = Subprocess()                               # `python -m prefloop.cli -q <args>` per run
    job = runner.start(["judge", ...], log_path)        # its own process group (a vLLM engine dies with it)
    killed = kill_at(job, trigger=lambda: lines(out) >= 40, delay=0.1)

Two ways to start a stage, both a separate process that is killed with SIGKILL:
- `Subprocess`: a fresh interpreter per run, exactly as a user runs the CLI.
- `Zygote`: one interpreter imports torch, transformers and TRL once, then forks a child per run that calls
  `prefloop.cli.main(args)` (what `python -m prefloop.cli` calls). The stage under test runs, writes and dies in
  the child exactly as in a fresh interpreter; only the ~10-20 s of imports per run are saved, which is what lets
  a test kill a model stage several times within its time budget.

Kill moments come from a `random.Random(seed)`: a delay after the process starts ("time"), or once the output has
reached a number of lines ("lines") or a new checkpoint appeared ("checkpoint"), plus a seeded jitter. A kill that
comes after the stage has finished does not count as landed; the drivers in test_kill.py then start over on a new
output, so every test lands the number of kills it asks for.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT = 900  # seconds a single run may take: generous, the box is shared and slow (never a timing assertion)
POLL = 0.005  # seconds between checks of a kill trigger


def stage_env(**extra: str) -> dict[str, str]:
    # One thread: on a shared 2-core machine torch's default pool spins against other processes (10x slower).
    return {**os.environ, "PREFLOOP_NO_BAR": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


class Job:
    """One run of a stage. `poll()` is its exit code or None; `kill()` SIGKILLs its whole process group."""

    pid: int

    def poll(self) -> int | None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"pid {self.pid} still running after {timeout} s")
            time.sleep(0.02)
        return rc


class PopenJob(Job):
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.pid = proc, proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        # The leader is our child and not yet reaped while poll() is None, so its group id cannot have been reused.
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


class Subprocess:
    """Each run is `python -m prefloop.cli -q <args>` in a new session (its own process group)."""

    def __init__(self, **env: str) -> None:
        self.env = stage_env(**env)

    def start(self, args: list[str], log: Path) -> Job:
        with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "prefloop.cli", "-q", *args], env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        return PopenJob(proc)


# The zygote: answers {"ready"} once its imports are done, then reads one JSON job per line on stdin, forks a child
# per job (a new session, output to the job's log, running prefloop's CLI after the job's optional prelude), answers
# {"pid"} and later {"rc"}; a "kill" line SIGKILLs the child's group. It reaps the child itself, so a kill can never
# reach a pid that has been reused.
ZYGOTE = r"""
import json, os, select, signal, sys
exec(sys.argv[1])  # the imports paid once
def answer(obj):
    os.write(1, (json.dumps(obj) + "\n").encode())
answer({"ready": True})
def lines():
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(0, 65536)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield line.decode()
def child(job):
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0); os.dup2(log, 1); os.dup2(log, 2)
    code = 1
    try:
        exec(job.get("prelude") or "", {"__name__": "prelude"})  # failure injection for a targeted kill point, if the test asks for one
        from prefloop.cli import main
        code = main(job["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
commands = lines()
for line in commands:
    if not line.startswith("{"):
        continue  # a "kill" for a child that had already ended
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(job)
    answer({"pid": pid})
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            answer({"rc": os.waitstatus_to_exitcode(status)})
            break
        ready, _, _ = select.select([0], [], [], 0.005)
        if ready:
            if next(commands, None) != "kill":
                raise SystemExit("zygote: stdin closed")
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # not yet in its own group: the child alone
                os.kill(pid, signal.SIGKILL)
"""


class ZygoteJob(Job):
    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote, self.pid, self.rc = zygote, pid, None

    def poll(self) -> int | None:
        if self.rc is None:
            try:
                self.rc = self.zygote.answers.get_nowait()["rc"]
            except queue.Empty:
                pass
        return self.rc

    def kill(self) -> None:
        if self.poll() is None:
            self.zygote.send("kill")
            self.rc = self.zygote.answer()["rc"]


class Zygote:
    """A process that imported the heavy modules once and forks a child per run (see module docstring)."""

    def __init__(self, preload: str, **env: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, preload], env=stage_env(**env),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.answers: queue.Queue[dict] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.answer() == {"ready": True}  # imports done: a run's time is its own

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(json.loads(line))

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = TIMEOUT) -> dict:
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the zygote did not answer (exit code {self.proc.poll()})") from None

    def start(self, args: list[str], log: Path, prelude: str = "") -> Job:
        """Fork a child running `prefloop -q <args>`, after executing `prelude` (e.g. a patch that kills it)."""
        self.send(json.dumps({"argv": ["-q", *args], "log": str(log), "prelude": prelude}))
        return ZygoteJob(self, self.answer()["pid"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def log_tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no log)"


def run_to_end(runner, args: list[str], log: Path) -> float:
    """Run a stage to its end; return its wall time in seconds. Fails the test, showing the log, unless it exits 0."""
    started = time.monotonic()
    rc = runner.start(args, log).wait()
    assert rc == 0, f"exit {rc}:\n{log_tail(log)}"
    return time.monotonic() - started


def kill_at(job: Job, log: Path, delay: float, trigger: Callable[[], bool] | None = None) -> bool:
    """Wait for `trigger()` (if any), then `delay` seconds, then SIGKILL `job`'s process group.

    Returns True if the kill landed on a running stage, False if the stage had already finished (it must have
    exited 0). The trigger is checked every few ms, so a kill lands within a write or two of the moment asked.
    """
    deadline = time.monotonic() + TIMEOUT
    while trigger is not None and not trigger() and job.poll() is None:
        assert time.monotonic() < deadline, f"no progress in {TIMEOUT} s:\n{log_tail(log)}"
        time.sleep(POLL)
    end = time.monotonic() + delay
    while job.poll() is None and time.monotonic() < end:
        time.sleep(min(POLL, max(0.0, end - time.monotonic())))
    if job.poll() is not None:
        assert job.poll() == 0, f"exit {job.poll()}:\n{log_tail(log)}"
        return False
    job.kill()
    return True


def survivors(pgid: int) -> list[str]:
    """Processes (not zombies) still in process group `pgid`: what a killed stage left running, e.g. an engine."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if rest[0] != "Z" and int(rest[2]) == pgid:  # fields after the name: state, ppid, pgrp
            alive.append(f"{stat.parent.name} ({name})")
    return alive


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def split_tail(data: bytes) -> tuple[bytes, bytes]:
    """(the complete newline-terminated lines, the torn tail after the last newline)."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


def parse_lines(data: bytes, what: str) -> list[dict]:
    """Every line parses as a JSON object (none torn) and no id repeats. Returns the records in file order."""
    rows = []
    for n, line in enumerate(data.splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{what}:{n} is torn or garbage: {line[:200]!r}") from None
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{what}: an id is written twice"
    return rows


def check_torn(path: Path, fragments: list[bytes]) -> None:
    """`<path>.torn` holds the torn tails cut on resume, in order. (A kill between saving a cut tail and cutting it
    saves that tail twice: nothing is lost, so a repeat is allowed.)"""
    torn = Path(f"{path}.torn")
    data = torn.read_bytes() if torn.exists() else b""
    pos = 0
    for i, fragment in enumerate(fragments):
        assert data.startswith(fragment, pos), f"{torn}: expected the torn tail {fragment[:80]!r} at byte {pos}"
        pos += len(fragment)
        following = fragments[i + 1] if i + 1 < len(fragments) else None
        while data.startswith(fragment, pos) and not (following and data.startswith(following, pos)):
            pos += len(fragment)
    assert pos == len(data), f"{torn}: unexpected bytes {data[pos : pos + 80]!r}"


@dataclass
class Tally:
    """What a kill test did, printed (and appended to $PREFLOOP_KILL_TALLY as JSON) so totals can be quoted."""

    stage: str
    points: int  # kill points asked for
    tried: int = 0  # kills attempted
    landed: int = 0  # kills that hit a running stage
    sequences: int = 1  # kill-and-resume sequences (a new one starts when a stage finished before its kill)
    records: int = 0  # records compared with the uninterrupted run
    unit: str = "records"  # what `records` counts
    kinds: dict[str, int] = field(default_factory=dict)  # landed kills by trigger
    after_done: int = 0  # landed kills that came after the stage wrote its summary (while the process exited)
    started: float = field(default_factory=time.monotonic)

    def landed_at(self, kind: str, after_done: bool = False) -> None:
        self.landed += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.after_done += after_done

    def report(self, capsys) -> None:
        seconds = round(time.monotonic() - self.started, 1)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        with capsys.disabled():
            print(f"\n[kill] {self.stage}: {self.landed} kill points landed ({kinds}; {self.after_done} after the "
                  f"stage's end) of {self.tried} tried, {self.sequences} sequence(s), {self.records} records "
                  f"compared, {seconds} s")
        if os.environ.get("PREFLOOP_KILL_TALLY"):
            row = {"stage": self.stage, "points": self.points, "landed": self.landed, "tried": self.tried,
                   "sequences": self.sequences, "records": self.records, "unit": self.unit, "kinds": self.kinds,
                   "after_done": self.after_done, "seconds": seconds}
            with open(os.environ["PREFLOOP_KILL_TALLY"], "a") as f:
                f.write(json.dumps(row) + "\n")
