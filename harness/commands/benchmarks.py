"""`safequant benchmarks`: list the benchmark registry; --check loads sets and verifies their files."""

from __future__ import annotations

import argparse


def cmd_benchmarks(args: argparse.Namespace) -> int:
    from harness.benchmarks import list_benchmarks, load_benchmarks

    if not args.check:
        print("benchmarks (load with NAME, NAME=PATH, or --data-dir DIR holding the upstream files):")
        for row in list_benchmarks():
            opts = f" [+{' +'.join(row['options'])}]" if row["options"] else ""
            print(f"  {row['name'] + opts:<30} {row['role']:<12} {row['description']}")
            if row["hub"] or row["files"]:
                where = ", ".join(row["files"]) if row["files"] else ""
                print(f"  {'':<30} {'':<12} files: {where or '-'}; hub: {row['hub'] or '-'}")
        return 0
    sets = load_benchmarks(args.check, data_dir=args.data_dir, limit=args.limit)
    for ps in sets:
        verified = getattr(ps, "verified", None)
        state = {True: "sha256 ok", False: "sha256 MISMATCH (not the upstream file)", None: "no known sha256"}[verified]
        print(f"{ps.name}: {len(ps)} prompts, role {ps.role}, {len(ps.categories)} categories, {state}")
        print(f"  source: {ps.source}")
        digest = getattr(ps, "sha256", None)
        if digest:
            print(f"  sha256: {digest}")
        cats = ", ".join(f"{c} {n}" for c, n in list(ps.categories.items())[:12])
        print(f"  categories: {cats}{' ...' if len(ps.categories) > 12 else ''}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("benchmarks", help="list benchmarks; --check loads them and verifies their files")
    p.add_argument("--check", nargs="+", metavar="SPEC", help="benchmarks to load: NAME, NAME=PATH, group names")
    p.add_argument("--data-dir", metavar="DIR", help="folder holding upstream benchmark files (also $SAFEQUANT_DATA_DIR)")
    p.add_argument("--limit", nargs="+", metavar="[SET=]N",
                   help="keep the first N prompts of each set, or of SET only (the grammar of `safequant audit --limit`)")
    p.set_defaults(func=cmd_benchmarks)
