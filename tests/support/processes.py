"""Starting the test workers and other Python subprocesses: environments, loopback ports, rank launching."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
WORKERS = TESTS / "workers"


def python_env(*front: str | Path, **extra: str) -> dict[str, str]:
    """This process's environment for a Python subprocess: ``front`` folders ahead on PYTHONPATH, the caller's
    PYTHONPATH kept behind them (so a worktree's package stays the one imported), ``extra`` variables set."""
    path = [str(p) for p in front] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker under ``tests/workers``: ``tests/`` on PYTHONPATH (for ``support``), one
    OpenMP thread, gloo kept on the loopback interface even where the hostname resolves elsewhere."""
    env = python_env(TESTS, OMP_NUM_THREADS="1", **extra)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def worker(name: str) -> list[str]:
    """The command line that runs ``tests/workers/<name>.py``."""
    return [sys.executable, str(WORKERS / f"{name}.py")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(name: str, rank_args, world: int = 2, timeout: float = 240) -> list[str]:
    """Run ``world`` processes of the worker ``name`` (``rank_args(rank, port)``: the arguments of one rank),
    wait for all, and return their merged stdout+stderr; any rank failing or hanging fails the test."""
    port = free_port()
    procs = [subprocess.Popen(worker(name) + [str(a) for a in rank_args(rank, port)], env=worker_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise AssertionError(f"{name} ranks timed out after {timeout}s") from None
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    return logs


def pip_install(source: Path, site: Path) -> Path:
    """Install the package at ``source`` into the private folder ``site`` with pip itself (a real .dist-info with
    entry points; no index, no dependencies); returns ``site``."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True, capture_output=True, text=True)
    return site


def install_copy(package: Path, tmp: Path) -> Path:
    """Install a copy of the source tree ``package`` (so no build files land beside it) into ``tmp/site``."""
    import shutil

    source = tmp / "src"
    shutil.copytree(package, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return pip_install(source, tmp / "site")
