"""Wall time of the demo audit, this tree against an earlier revision, as a ratio.

    python bench/bench_audit_wall.py --before REV [--repeats 1] [--threads 1] [-- AUDIT ARGS...]

Checks REV out into a temporary git worktree and runs the same `safequant audit` (the demo by
default) from each tree in a fresh process, alternating, each into its own new run directory, with
the thread count pinned. Prints each run's wall time, the medians and the ratio after / before, and
whether the two trees wrote the same per-prompt rows (they should: the change under test is about
cost, not results). Not a test: it prints numbers; on a shared machine quote the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tree: Path, out: Path, audit_args: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))",
           "audit", "--out", str(out), *audit_args]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _rows(out: Path) -> list[dict]:
    keep = ("variant", "set", "id", "response", "verdict")
    return [{k: r.get(k) for k in keep} for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision to compare against (e.g. main~3)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("audit_args", nargs="*", help="arguments for `safequant audit` after `--` (default: the demo)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="safequant-wall-") as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before_tree), args.before], cwd=ROOT, check=True)
        try:
            times: dict[str, list[float]] = {"before": [], "after": []}
            rows = {}
            for i in range(args.repeats):
                for label, tree in (("before", before_tree), ("after", ROOT)):
                    out = Path(tmp) / f"{label}-{i}"
                    seconds = _run(tree, out, args.audit_args, args.threads)
                    times[label].append(seconds)
                    rows[label] = _rows(out)
                    print(f"{label:6s} run {i + 1}: {seconds:7.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, check=False)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"median wall time: before ({args.before}) {before:.1f} s, after {after:.1f} s; after / before = {after / before:.3f}")
    print(f"per-prompt rows identical: {rows['before'] == rows['after']}")


if __name__ == "__main__":
    main()
