"""Start-up of the light ``opentrans-hub`` commands vs a bare ``python -c "import torch"``, whole processes.

Every peer is a fresh subprocess, run ``--repeats`` times interleaved (median reported):

* ``opentrans-hub --version``, ``--help``, ``list``, ``info rn50-openai-imp21`` (a built-in recipe) and
  ``plugins list`` (loads every installed plugin), through the installed script (``python -m opentrans_hub``
  when there is none), with this checkout first on ``PYTHONPATH`` and a private, empty registry;
* ``python -c "import torch"`` (the reference: what every command paid before) and ``python -c pass`` (the
  interpreter alone).

Peak RSS is each child's own ``ru_maxrss`` (``os.wait4``), the largest over the repeats. Each command runs once
first with its output checked (exit 0), which also warms the page cache. The last line of stdout is one JSON
object.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("opentrans-hub")
COMMANDS = {"--version": ["--version"], "--help": ["--help"], "list": ["list"],
            "info": ["info", "rn50-openai-imp21"], "plugins list": ["plugins", "list"]}


def command_line(args: list[str]) -> list[str]:
    return ([str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "opentrans_hub"]) + args


def environment(home: Path) -> dict[str, str]:
    """The user's environment without HF_*/OPENTRANS_HUB_* settings, a private registry, this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "OPENTRANS_HUB_"))}
    env.update({"OPENTRANS_HUB_HOME": str(home / "home"), "OPENTRANS_HUB_CACHE": str(home / "cache"),
                "HF_HOME": str(home / "hf"), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
    return env


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one run of ``argv``, output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    return wall, usage.ru_maxrss / 1024  # KB on Linux


def main() -> None:
    args = _bench.parse(_bench.options(__doc__, repeats=5, quick="two repeats"), repeats=2)
    repeats = args.repeats
    with tempfile.TemporaryDirectory(prefix="oth-cli-startup-") as tmp:
        env = environment(Path(tmp))
        peers = {name: command_line(argv) for name, argv in COMMANDS.items()}
        peers["import torch"] = [sys.executable, "-c", "import torch"]
        peers["python"] = [sys.executable, "-c", "pass"]
        for name, argv in peers.items():  # checked once (and the page cache warmed) before timing
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
        times = _bench.Timings(*peers)
        rss: dict[str, float] = {name: 0.0 for name in peers}
        for rep in range(repeats):
            for name, argv in peers.items():
                wall, peak = timed(argv, env)
                times.add(name, wall)
                rss[name] = max(rss[name], peak)
            print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.wall.items()), flush=True)
    medians = times.medians()
    torch_s = medians["import torch"]
    commands = {name: {"median_s": round(medians[name], 3), "ratio_to_import_torch": round(medians[name] / torch_s, 3),
                       "peak_rss_mb": round(rss[name], 1)} for name in COMMANDS}
    result = {
        "repeats": repeats, **_bench.host(),
        "script": str(SCRIPT) if SCRIPT.exists() else "python -m opentrans_hub",
        "import_torch_s": round(torch_s, 3), "import_torch_peak_rss_mb": round(rss["import torch"], 1),
        "python_s": round(medians["python"], 3), "python_peak_rss_mb": round(rss["python"], 1),
        "commands": commands,
        "max_ratio_to_import_torch": max(c["ratio_to_import_torch"] for c in commands.values()),
        "all_s": times.all_s(3),
    }
    _bench.emit(result, args)


if __name__ == "__main__":
    main()
