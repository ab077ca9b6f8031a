"""``--processes N``: run the same command again under ``accelerate launch`` on N processes."""
from __future__ import annotations

import shlex
import sys

from .common import err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, args: list[str], port: int | None = None) -> list[str]:
    """``accelerate launch`` running ``python -m softprompt ARGS`` on ``processes`` processes of
    this host.  ``--multi_gpu`` selects accelerate's torchrun launcher, which is also the one that
    starts several CPU processes (gloo) on a host without GPUs."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or _free_port()),
            "-m", "softprompt", *args]


def _launch(processes: int, words: list[str], option: str) -> int:
    """Run this command again under ``accelerate launch`` without ``option`` (its own value)."""
    import subprocess

    args, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == option:
            skip = True
        elif not w.startswith(option + "="):
            args.append(w)
    cmd = launch_command(processes, args)
    err.print(f"launching {processes} processes: {shlex.join(cmd)}", markup=False)
    return subprocess.run(cmd).returncode
