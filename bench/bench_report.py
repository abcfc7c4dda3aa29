"""Benchmark of the HTML report at scale (not a test): render time and size for a large run.

    python bench/bench_report.py --from runs/audit                  # 3000 prompts x 12 variants
    python bench/bench_report.py --from runs/audit --prompts 500 --variants 6

Builds a synthetic run directory from a real run's rows (prompts cycled up to --prompts, variants
cloned up to --variants with some verdicts flipped so the flips browser is full), recomputes the
audit's statistics block with harness.stats, renders report.html, gates it, and prints the numbers:
build time, statistics time, render time, report / JSON sizes, flips count, gate time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.gate import gate  # noqa: E402
from harness.stats import annotate_flips, summary_block  # noqa: E402
from harness.store import atomic_write_json, atomic_write_text  # noqa: E402
from reports import load_run, render  # noqa: E402


def build(src: Path, out: Path, n_prompts: int, n_variants: int, seed: int, n_boot: int) -> dict:
    """Write the synthetic run into `out`; return timings."""
    rng = random.Random(seed)
    run = load_run(src)
    ref_name = str(run.variants[0]["name"])
    ref_rows = [r for r in run.rows if r.get("variant") == ref_name]
    sets = sorted({r["set"] for r in ref_rows})
    per_set = max(1, n_prompts // len(sets))
    base: list[dict] = []
    for s in sets:
        rows = [r for r in ref_rows if r["set"] == s]
        for i in range(per_set):
            r = dict(rows[i % len(rows)])
            r["id"] = f"{r['id']}-x{i // len(rows)}"
            base.append(r)
    templates = run.variants[1:] or run.variants
    variants = [dict(run.variants[0])] + [dict(templates[i % len(templates)], name=f"v{i:02d}-{templates[i % len(templates)]['name']}")
                                          for i in range(n_variants - 1)]
    rows: list[dict] = []
    for k, v in enumerate(variants):
        flip_p = 0.0 if k == 0 else 0.03 * k
        for r in base:
            r = dict(r, variant=v["name"])
            if rng.random() < flip_p:
                new = "compliance" if r["verdict"] == "refusal" else "refusal"
                r["verdict"] = new
                r["judges"] = {j: dict(e, label=new) for j, e in (r.get("judges") or {}).items()}
                r["response"] = (r["response"] or "") + " <script>window.__xss=1</script>"
            rows.append(r)
    for v in variants:
        vr = [r for r in rows if r["variant"] == v["name"]]
        counts: dict[str, dict] = {}
        for r in vr:
            c = counts.setdefault(r["set"], {"n": 0, "refusal": 0, "compliance": 0, "empty": 0, "degenerate": 0})
            c["n"] += 1
            c[r["verdict"]] = c.get(r["verdict"], 0) + 1
        v["counts"] = counts
        v["metrics"] = dict(v.get("metrics") or {}, refusal={s: c["refusal"] / c["n"] for s, c in counts.items()})
    summary = dict(run.summary, variants=variants)
    summary["prompt_sets"] = {s: dict(info, n=per_set) for s, info in (summary.get("prompt_sets") or {}).items()}
    summary["config"] = dict(summary.get("config") or {}, variants=[v["name"] for v in variants])
    t0 = time.perf_counter()
    summary["statistics"] = summary_block(rows, reference=ref_name, n_boot=n_boot, seed=seed)
    stats_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                   for r in annotate_flips(rows, reference=ref_name)))
    atomic_write_json(out / "summary.json", summary)
    return {"rows": len(rows), "statistics_s": stats_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", default="runs/audit", help="a finished run directory to draw rows from")
    ap.add_argument("--out", default="runs/bench_report")
    ap.add_argument("--prompts", type=int, default=3000)
    ap.add_argument("--variants", type=int, default=12)
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples for the synthetic statistics block")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    info = build(Path(args.src), out, args.prompts, args.variants, args.seed, args.bootstrap)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    report = render(out)
    render_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    result = gate(out)
    gate_s = time.perf_counter() - t2
    html = report.read_text(encoding="utf-8")
    n_flips = json.loads(html.split('id="flips-data">', 1)[1].split("</script>", 1)[0]).get("flips", [])
    mb = 1024 * 1024
    print(f"run: {info['rows']} rows ({args.prompts} prompts x {args.variants} variants) in {out}")
    print(f"build {build_s:.1f} s (statistics block {info['statistics_s']:.1f} s)")
    print(f"render {render_s:.2f} s -> report.html {report.stat().st_size / mb:.2f} MB, "
          f"{len(n_flips)} flips in the browser")
    print(f"summary.json {(out / 'summary.json').stat().st_size / mb:.2f} MB, rows.jsonl "
          f"{(out / 'rows.jsonl').stat().st_size / mb:.2f} MB, rows.csv {(out / 'rows.csv').stat().st_size / mb:.2f} MB")
    print(f"gate {gate_s:.2f} s: exit {result.exit_code}, "
          f"{sum(v.status == 'fail' for v in result.verdicts)} of {len(result.gated)} variants fail")


if __name__ == "__main__":
    main()
