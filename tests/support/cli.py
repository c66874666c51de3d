"""Running the command line in tests, and checking the "never succeed silently" contract of a failure: exit 2, one
line on stderr, no traceback, and (``assert_refused``) no file under the watched folder created, changed or removed.

Three ways in: ``run_cli``/``command`` (the installed ``opentrans-hub`` script), ``module_cli`` (``python -m
opentrans_hub``, a fresh process), ``main_in_process`` (the same ``main`` in this process: no import cost)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("opentrans-hub")
REPO = Path(__file__).resolve().parents[2]


def command() -> list[str]:
    return [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "opentrans_hub"]


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI process: no HF_*/OPENTRANS_HUB_* variables of the user, a private registry and
    cache under ``root``, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPENTRANS_HUB_", "HUGGING"))}
    env.update({"OMP_NUM_THREADS": "1", "OPENTRANS_HUB_HOME": str(root / ".home"),
                "OPENTRANS_HUB_CACHE": str(root / ".cache"), "HF_HOME": str(root / ".hf"), "MPLBACKEND": "Agg"})
    env.update(extra)
    return env


def run_cli(root: Path, *args: object, env: dict[str, str] | None = None, timeout: int = 300
            ) -> subprocess.CompletedProcess:
    return subprocess.run(command() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=root, env=cli_env(root, **(env or {})))


def module_cli(*args: object, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: int = 300
               ) -> subprocess.CompletedProcess:
    """``python -m opentrans_hub ARGS`` in a fresh process (where the process boundary matters)."""
    return subprocess.run([sys.executable, "-m", "opentrans_hub", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def main_in_process(capsys, *args: object) -> tuple[int, str, str]:
    """The command line's ``main`` in this process (same parser and error handling): code, stdout, stderr."""
    from opentrans_hub.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(proc: subprocess.CompletedProcess, *needles: str, tag: str | None = ": error: ") -> str:
    """The process failed with exit 2 and one stderr line (holding ``tag`` and every needle), no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:], proc.stdout[-500:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    if tag is not None:
        assert tag in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links and FIFOs never followed or opened): kind, mode and content hash."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if rel.startswith((".home", ".cache", ".hf")):
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                state[rel] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[rel] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return state


def assert_refused(root: Path, *args: object, needles: tuple[str, ...] = (), env: dict[str, str] | None = None
                   ) -> str:
    """Run the CLI in ``root``; it must fail with exit 2 and one stderr line holding every needle, and leave every
    file under ``root`` as it was. Returns the line."""
    before = tree_state(root)
    line = one_line_error(run_cli(root, *args, env=env), *needles)
    assert tree_state(root) == before, "a failed command changed files"
    return line
