"""`safequant compare RUN_A RUN_B`: one page setting a candidate run against a baseline run.

E.g. this week's recipe (RUN_B) against last release's (RUN_A). Variants are paired by name (or
`--pair B=A`); on the prompts both runs answered (same set, id and prompt text) the paired
statistics are harness.stats.paired_compare, the same functions the audit uses within a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import UserError


def _pairs(args: argparse.Namespace, names_a: list[str], names_b: list[str]) -> list[tuple[str, str]]:
    """(variant in B, variant in A) pairs: --pair B=A, else every name both runs have."""
    if not args.pair:
        pairs = [(n, n) for n in names_b if n in names_a]
        if not pairs:
            raise UserError(f"runs {args.run_a!r} and {args.run_b!r} share no variant name: pair them with "
                            f"--pair B_VARIANT=A_VARIANT (A has {', '.join(names_a)}; B has {', '.join(names_b)})")
        return pairs
    out = []
    for text in args.pair:
        b, sep, a = text.partition("=")
        if not sep or b not in names_b or a not in names_a:
            raise UserError(f"--pair {text!r} must be B_VARIANT=A_VARIANT with names from the runs "
                            f"(A has {', '.join(names_a)}; B has {', '.join(names_b)})")
        out.append((b, a))
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.stats import paired_compare
    from reports.compare import CrossPair, render_compare
    from reports.pairs import format_pair_rows, pair_rows
    from reports.run import check_output_path, load_run, primary_judge, prompt_sets

    if args.bootstrap < 100:
        raise UserError(f"--bootstrap must be at least 100, got {args.bootstrap}")
    if args.output:
        check_output_path(Path(args.output), "compare.html", "--output")  # before the paired statistics
    run_a, run_b = load_run(Path(args.run_a)), load_run(Path(args.run_b))
    for run in (run_a, run_b):
        if not run.rows_present or not run.rows:
            raise UserError(f"run {str(run.run_dir)!r} has no rows.jsonl: compare needs per-prompt results; re-run its audit")
    names_a = [str(v["name"]) for v in run_a.variants]
    names_b = [str(v["name"]) for v in run_b.variants]
    judge = primary_judge(run_b)
    pairs = []
    for b, a in _pairs(args, names_a, names_b):
        rows_a = [r for r in run_a.rows if r.get("variant") == a]
        by_key = {(r.get("set"), r.get("id")): r for r in rows_a}
        # Same (set, id) but different text is a different prompt: leave it unpaired.
        rows_b = [r for r in run_b.rows if r.get("variant") == b
                  and by_key.get((r.get("set"), r.get("id")), {}).get("prompt") == r.get("prompt")]
        mismatched = sum(1 for r in run_b.rows if r.get("variant") == b) - len(rows_b)
        stats = {}
        for set_name in dict.fromkeys(r.get("set") for r in rows_b):
            stats[str(set_name)] = paired_compare([r for r in rows_a if r.get("set") == set_name],
                                                  [r for r in rows_b if r.get("set") == set_name], judge,
                                                  n_boot=args.bootstrap, seed=args.seed)
        for label in ("harmful", "benign"):
            sub_b = [r for r in rows_b if r.get("label") == label]
            if sub_b:
                stats[f"all {label}"] = paired_compare([r for r in rows_a if r.get("label") == label], sub_b, judge,
                                                       n_boot=args.bootstrap, seed=args.seed)
        pairs.append(CrossPair(b, a, stats, rows_a, rows_b, mismatched))
    out = render_compare(run_a, run_b, pairs, Path(args.output) if args.output else None, judge=judge)
    roles = {s.name: s.role for s in prompt_sets(run_b)}
    for p in pairs:
        print(f"{p.b} (B) against {p.a} (A), judge {judge or 'primary'}"
              + (f"; {p.unmatched} of B's prompts unmatched in A" if p.unmatched else ""))
        print(format_pair_rows(pair_rows(p.stats, roles, lambda d, direction: ""), "B", "A") + "\n")
    print(f"compare: {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare two run directories (e.g. a new recipe against the last release)")
    p.add_argument("run_a", metavar="RUN_A", help="baseline run directory (e.g. last release)")
    p.add_argument("run_b", metavar="RUN_B", help="candidate run directory (e.g. this week's recipe)")
    p.add_argument("--pair", action="append", metavar="B=A",
                   help="pair variant B of RUN_B with variant A of RUN_A (repeatable; default: same names)")
    p.add_argument("--output", metavar="FILE", help="where to write the HTML (default RUN_B/compare.html)")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="paired bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=cmd_compare)
