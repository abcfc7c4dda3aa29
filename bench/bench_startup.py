"""Start-up cost of the file-only commands, as a ratio to a bare interpreter.

    python bench/bench_startup.py [--repeats 7]

Runs `python -c pass`, `safequant gate --help`, `safequant --help`, `safequant list` and, for
scale, `python -c "import torch"` in fresh processes, alternating, and prints the median wall time
of each and its ratio to the bare interpreter. `gate`, `report`, `compare`, `list` and `--help`
must not pay for torch or transformers (tests/test_startup.py checks the imports; this prints
what that saves).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))"
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "safequant gate --help": [sys.executable, "-c", CLI, "gate", "--help"],
    "safequant --help": [sys.executable, "-c", CLI, "--help"],
    "safequant list": [sys.executable, "-c", CLI, "list"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for label, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            times[label].append(time.perf_counter() - t0)
    bare = statistics.median(times["python -c pass"])
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:28s} median {med * 1000:8.1f} ms   {med / bare:6.1f}x bare python")


if __name__ == "__main__":
    main()
