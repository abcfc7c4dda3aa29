"""Judge throughput, as a ratio to a bare regex pass over the same responses.

Why a ratio: the absolute rate depends on the machine and on what else runs on it; the ratio to
one lower-case + one regex search per response says how much work a judge adds. Responses: the
XSTest v2 dev split's completions (if ../shared/data has it) and the project's labelled files,
repeated to ``--n``. The median of ``--repeats`` timings (on a shared machine the median moves
less than the best). The trained judge is timed on distinct texts
(its encoder caches repeated ones), batched, with ``torch`` using ``--threads`` threads.

    python bench/bench_judges.py [--n 20000] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import time

from harness.judges import TRAIN_FILE, VALIDATION_FILE, degeneracy, get_judge, load_labelled
from harness.judges.trained import DEV_FILE

BARE = re.compile(r"i can'?t|i cannot|i'm sorry|as an ai")


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="responses per timing of the rule judges")
    ap.add_argument("--n-model", type=int, default=600, help="distinct responses for the trained judge")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    pool = [it["response"] for path in (DEV_FILE, TRAIN_FILE, VALIDATION_FILE) if path.is_file()
            for it in load_labelled(path)]
    responses = (pool * (args.n // len(pool) + 1))[: args.n]
    prompts = [""] * len(responses)
    print(f"{len(responses)} responses (from {len(pool)} distinct, mean {sum(map(len, pool)) / len(pool):.0f} chars)")
    bare = _median(lambda: [BARE.search(r.lower()) for r in responses], args.repeats)
    print(f"| judge | responses/s | time / bare regex |\n|---|---|---|\n| bare regex pass | {len(responses) / bare:,.0f} | 1.0 |")
    rows = [("degeneracy() alone", lambda: [degeneracy(r) for r in responses])]
    for name in ("refusal-phrases", "gcg-prefixes", "xstest-rule"):
        judge = get_judge(name)
        rows.append((name, lambda j=judge: j.judge_many(prompts, responses)))
    for name, fn in rows:
        t = _median(fn, args.repeats)
        print(f"| {name} | {len(responses) / t:,.0f} | {t / bare:.1f} |")
    judge = get_judge("refusal-minilm")
    distinct = pool[: args.n_model]
    per_bare = bare / len(responses)
    # One timing only: the encoder caches what it has seen, so a repeat would time the cache.
    t = _median(lambda: judge.judge_many([""] * len(distinct), distinct), 1)
    print(f"| refusal-minilm ({args.threads} threads, batch {judge.encoder.batch_size}) | {len(distinct) / t:,.1f} | "
          f"{t / len(distinct) / per_bare:,.0f} |")


if __name__ == "__main__":
    main()
