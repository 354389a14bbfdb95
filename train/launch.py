"""Run the train stage as N ranks under `accelerate launch`, from a process that is not itself launched (the loop).

    from prefloop.train.launch import LaunchConfig, launch_train
    launch_train(train_config, LaunchConfig(num_processes=2, config_file="examples/accelerate/cpu_ddp.yaml"))

In a loop YAML (generation and judging stay in the loop process; only training is launched):

    train_launcher: {num_processes: 2, config_file: examples/accelerate/ddp.yaml}

The resolved `TrainConfig` is written beside the output (`round_001/train.launch.yaml`) and the launch runs
`python -m accelerate.commands.launch [flags] -m prefloop.cli train --config round_001/train.launch.yaml`, so the
ranks run exactly the config the in-process path would have run, into the same output directory, and the stage's
own resume, drift refusal and "already done" check apply unchanged.

Failure semantics: the launch's combined output is echoed to stderr and appended to `round_001/train.launch.log`;
a non-zero exit raises `TrainLaunchError` carrying the last lines (the rank's traceback or `prefloop train: error:`
line) and the log's path. If this process is interrupted, or dies, the launch is terminated with it (its whole
process group; on Linux the launcher also gets SIGTERM when its parent dies), so a re-run never finds a stray
trainer still writing the same checkpoints. A re-run resumes from the last complete checkpoint, as in-process.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from prefloop.config import ConfigError, dump_yaml, field, from_dict, to_dict
from prefloop.errors import PrefloopError
from prefloop.store import atomic_write

log = logging.getLogger(__name__)

TAIL_LINES = 30  # lines of the launch's output kept for the error message (a Python traceback fits)


class TrainLaunchError(PrefloopError, RuntimeError):
    """`accelerate launch` of the train stage exited non-zero; the message carries its last lines."""


@dataclass
class LaunchConfig:
    num_processes: int | None = field(
        None,
        help="Ranks in all (accelerate's --num_processes: over every machine). Default: the config_file's, else 2.",
    )
    config_file: str | None = field(
        None,
        help="An accelerate config (DDP, FSDP, DeepSpeed), e.g. examples/accelerate/ddp.yaml. Without one, N > 1 "
        "ranks run as local DDP (`--multi_gpu`; gloo on CPU-only machines).",
    )
    args: list[str] = field(
        [],
        help="More `accelerate launch` flags, verbatim, e.g. [--num_machines, '2', --machine_rank, '0', "
        "--main_process_ip, 10.0.0.1, --main_process_port, '29500'].",
    )
    threads_per_process: int | None = field(
        None,
        help="OMP_NUM_THREADS for each rank (default: $OMP_NUM_THREADS, else CPU cores / local ranks). Ranks that "
        "each start a thread per core oversubscribe the CPU and stall.",
    )

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"train_launcher.num_processes = {self.num_processes} must be >= 1.")
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise ConfigError(
                f"train_launcher.config_file = {self.config_file}: file not found. Fix: give a path to an accelerate "
                "config (see examples/accelerate/), relative to the directory you run prefloop from."
            )
        if isinstance(self.args, str):
            self.args = shlex.split(self.args)
        self.args = [str(a) for a in self.args]
        if self.threads_per_process is not None and self.threads_per_process < 1:
            raise ConfigError(f"train_launcher.threads_per_process = {self.threads_per_process} must be >= 1.")


def launch_config(values: dict) -> LaunchConfig:
    """The loop's `train_launcher` mapping as a `LaunchConfig` (unknown keys named)."""
    return from_dict(LaunchConfig, dict(values), "loop config `train_launcher`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in `args` (accelerate spells flags with underscores)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def build_command(spec: Path, launch: LaunchConfig) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment that run `prefloop train --config spec` as N ranks."""
    from accelerate.commands.config.config_args import load_config_from_file

    file_cfg = load_config_from_file(launch.config_file) if launch.config_file else None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if file_cfg is not None:
        cmd += ["--config_file", str(launch.config_file)]
    n = launch.num_processes or (file_cfg.num_processes if file_cfg is not None else 2)
    machines = int(_flag(launch.args, "--num_machines") or (file_cfg.num_machines if file_cfg is not None else 1))
    if file_cfg is None:
        # accelerate 1.x starts N local processes only through its torchrun launcher (`--multi_gpu`); `--cpu`
        # with N > 1 silently starts ONE process unless given an MPI hostfile. Without CUDA, the ranks use gloo.
        cmd += ["--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1 and "--multi_gpu" not in launch.args:
            cmd.append("--multi_gpu")
    cmd += ["--num_processes", str(n)]
    port_set = _flag(launch.args, "--main_process_port") or (file_cfg is not None and file_cfg.main_process_port)
    if n > 1 and machines == 1 and not port_set:
        cmd += ["--main_process_port", str(_free_port())]  # two runs on one box must not both take 29500
    cmd += launch.args
    cmd += ["-m", "prefloop.cli", "train", "--config", str(spec)]

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    local = max(n // max(machines, 1), 1)
    threads = launch.threads_per_process or int(env.get("OMP_NUM_THREADS") or max((os.cpu_count() or 1) // local, 1))
    env["OMP_NUM_THREADS"] = str(threads)
    return cmd, env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the launcher if the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the launch's whole process group (the launcher and its ranks), then kill what is left."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def launch_train(config, launch: LaunchConfig) -> Path:
    """Run the train stage for `config` (a `TrainConfig`) as `launch` says; return `config.out` once it is done.

    Raises `TrainLaunchError` (with the output's last lines and the log path) if the launch fails or ends without
    the stage's summary saying done."""
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.with_name(f"{out.name}.launch.yaml")
    atomic_write(spec, dump_yaml(to_dict(config), header="# prefloop train config, run by `accelerate launch`"))
    log_path = out.with_name(f"{out.name}.launch.log")
    cmd, env = build_command(spec, launch)
    log.info("train: %s (OMP_NUM_THREADS=%s); output also in %s", shlex.join(cmd), env["OMP_NUM_THREADS"], log_path)

    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with open(log_path, "ab") as sink:  # appended: a retried launch keeps the failed attempt's log above it
        sink.write(f"$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, so `_stop` reaches every rank and only them
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            for raw in proc.stdout:
                sink.write(raw)
                sink.flush()
                text = raw.decode("utf-8", errors="replace")
                sys.stderr.write(text)
                shown = text.rstrip("\n").rsplit("\r", 1)[-1]  # a progress bar's last state, not every redraw
                if shown.strip():
                    tail.append(shown)
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    last = "\n".join(tail)
    if code != 0:
        raise TrainLaunchError(
            f"`accelerate launch` of the train stage exited with code {code}.\n--- last lines ---\n{last}\n---\n"
            f"Full output: {log_path}. Config: {spec}. Fix the cause and re-run the same command: training resumes "
            "from its last complete checkpoint."
        )
    summary_path = out / "train_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    if summary.get("status") != "done":
        raise TrainLaunchError(
            f"`accelerate launch` exited 0 but {summary_path} does not say done. Was the launched "
            f"script prefloop's train stage? Full output: {log_path}.\n--- last lines ---\n{last}"
        )
    return out
