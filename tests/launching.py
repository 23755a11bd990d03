"""How the tests start a script as a user would: `accelerate launch` or `accelerate-offload launch` on the CPU.

Every test that runs a script in a subprocess builds its command and environment here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

import psutil

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    # --quiet: no launcher traceback after a failing worker (the launcher then exits 1)
    "accelerate": ["accelerate.commands.launch", "--quiet"],
    # passes the worker's exit status through, and a SIGTERM on to the worker
    "accelerate-offload": ["accelerate_offload.cli", "launch"],
}


def environment(home: Path | None = None, **extra: str) -> dict[str, str]:
    """Offline, this checkout importable, no offload variables from the shell but `extra`'s; with `home`, the Hub
    cache and the trackers' files go under it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_OFFLOAD_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if home is not None:
        env.update(HF_HOME=str(home / "hf-home"), WANDB_MODE="offline", WANDB_DIR=str(home))
    env.update(extra)
    return env


def launch_command(
    script: str | Path,
    *args: str | Path,
    launcher: str = "accelerate",
    threads: int = 1,
    config_file: Path | None = None,
) -> list[str]:
    """`launcher` running `script args` on one CPU process in full precision, or as `config_file` says."""
    command = [sys.executable, "-m", *LAUNCHERS[launcher]]
    if config_file is None:
        command += ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
        command += ["--dynamo_backend", "no"]
    else:
        command += ["--config_file", str(config_file)]
    command += ["--num_cpu_threads_per_process", str(threads)]
    return command + [str(script), *map(str, args)]


def torchrun_command(script: str | Path, *args: str | Path, processes: int = 2) -> list[str]:
    """`script args` on `processes` CPU processes (accelerate launches several CPU processes only through MPI)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    return command + [str(script), *map(str, args)]


def run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    """Runs `command` to its end (in `environment()` unless `env` is given), its output captured."""
    return subprocess.run(
        command, cwd=cwd, env=env or environment(), capture_output=True, text=True, timeout=timeout, check=False
    )


def start(
    command: list[str],
    cwd: Path,
    stdout: IO[str] | int,
    stderr: IO[str] | int = subprocess.STDOUT,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Starts `command` (stderr into stdout unless given), for a test that acts while it runs."""
    return subprocess.Popen(command, cwd=cwd, env=env or environment(), stdout=stdout, stderr=stderr, text=True)


def worker(launcher: subprocess.Popen) -> psutil.Process:
    """The one process the launcher started (the script), which receives the signals a test sends."""
    (process,) = psutil.Process(launcher.pid).children()
    return process
