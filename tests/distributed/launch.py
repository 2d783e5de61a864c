"""Start N processes with torchrun (`python -m torch.distributed.run`) on a free port, gloo on CPU."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(args: list[str], nproc: int = 2) -> list[str]:
    """The command line that runs ``args`` (a script and its arguments, or ``-m module ...``)
    in ``nproc`` ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def torch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_torchrun(args: list[str], nproc: int = 2, cwd: Path | None = None, timeout: float = 240):
    """Run to the end; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(torchrun_command(args, nproc), cwd=cwd, env=torch_env(), capture_output=True,
                          text=True, timeout=timeout)
