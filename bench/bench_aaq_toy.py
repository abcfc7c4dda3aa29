"""Does AAQ keep refusals that a perplexity-only objective loses? The toy-pair table.

Subject: ``toy-chat`` (FT, aligned); unaligned reference: ``toy-base`` (PT), or the refusal-ablated
copy of toy-chat (``--base ablated``). Every row is a variant of one `safequant audit` run (so the
numbers are exactly what the audit reports): refusal on the held-out harmful, benign and
over-refusal sets (primary judge: refusal phrases, greedy, 48 new tokens) and held-out
perplexity.

Sections (``--sections``):

* ``main``: FP, RTN, QuaRot, OST (alpha = 0, i.e. the KL-top loss) and AAQ at each ``--schemes``;
* ``ablated``: AAQ with the ablated reference instead of toy-base, plus the ablated copy's own
  refusal (it should be near toy-base's 0%);
* ``grid``: the alpha and K ablation of AAQ at the first scheme;
* ``cost``: calibration wall time and peak memory of AAQ versus OST on the same data, each run in
  a fresh process (peak RSS is per process), alternating, medians of ``--cost-repeats``.

    python bench/bench_aaq_toy.py                       # everything (~tens of minutes on 2 CPU cores)
    python bench/bench_aaq_toy.py --sections main --limit 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = ("harmful", "benign", "overrefusal")


def audit(out: Path, variants: list[str], base: str, args) -> dict:
    from harness.audit import Audit
    from harness.calibration_data import CalibrationOptions
    from harness.config import AuditConfig

    config = AuditConfig(model="toy-chat", base=base, variants=variants, out=str(out), limit=args.limit,
                         judges=["refusal-phrases"], first_token=False, probes=False, report=False,
                         device="cpu", seed=args.seed,
                         calibration=CalibrationOptions(samples=args.calib_samples, length=args.calib_len))
    return Audit(config).run(command="bench/bench_aaq_toy.py")


def rows_of(summary: dict, label: str = "") -> list[list[str]]:
    rows = []
    for v in summary["variants"]:
        m = v["metrics"]
        q = v.get("quantizer") or {}
        rows.append([v["name"] + label, *[f"{m['refusal'][s]:.1%}" for s in SETS], f"{m['perplexity']:.2f}",
                     f"{m['perplexity_ratio']:.3f}", f"{q.get('seconds') or 0:.1f}"])
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["variant", "refusal harmful", "refusal benign", "over-refusal", "ppl", "ppl / FP", "quantize s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def extra(options: str) -> str:
    return f":{options}" if options else ""


def section_main(args) -> None:
    variants = []
    for s in args.schemes:
        variants += [f"rtn:{s}", f"quarot:{s}", f"ost:{s}{extra(args.options)}", f"aaq:{s}{extra(args.options)}"]
    summary = audit(args.out / "main", variants, "toy-base", args)
    print("\n## FP, RTN, QuaRot, OST (alpha=0) and AAQ (base toy-base) on toy-chat\n")
    print(table(rows_of(summary)))


def section_ablated(args) -> None:
    from harness.ablation import ablate_refusal
    from harness.benchmarks import load_benchmarks
    from harness.generation import generate_responses
    from harness.judges import get_judges, judge_all
    from harness.models import load_model

    subject = load_model("toy-chat", device="cpu")
    started = time.perf_counter()
    result = ablate_refusal(subject.model, subject.tokenizer)
    seconds = time.perf_counter() - started
    judge = get_judges(["refusal-phrases"])
    rates = {}
    for ps in load_benchmarks(list(SETS), limit=args.limit):
        prompts = [r.prompt for r in ps.records]
        responses = generate_responses(result.model, subject.tokenizer, prompts, 48, 32, None)
        verdicts = judge_all(judge, prompts, responses, [{"behavior": p, "context": "", "hit_max_tokens": False} for p in prompts])
        rates[ps.name] = sum(v["refusal-phrases"]["label"] == "refusal" for v in verdicts) / len(prompts)
    print(f"\n## The ablated reference (layer {result.layer}, built in {seconds:.1f} s)\n")
    print("refusal of the ablated copy of toy-chat: " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items())
          + "  (toy-base: 0.0% on all three)")
    variants = [f"aaq-ablated-{s}=aaq:{s}{extra(args.options)}" for s in args.schemes]
    summary = audit(args.out / "ablated", variants, "ablated", args)
    print("\nAAQ with the ablated reference:\n")
    print(table(rows_of(summary)))


def section_grid(args) -> None:
    s = args.schemes[0]
    variants = [f"aaq-a{a}-k{k}=aaq:{s}:alpha={a},k={k}{',' + args.options if args.options else ''}"
                for a, k in [(a, 500) for a in args.alphas] + [(0.75, k) for k in args.ks if k != 500]]
    summary = audit(args.out / "grid", variants, "toy-base", args)
    print(f"\n## AAQ alpha and K ablation at {s}\n")
    print(table(rows_of(summary)))


COST_CHILD = """
import json, resource, sys, time, torch
from harness import quantize as maker
from harness.calibration_data import CalibrationOptions
from harness.config import VariantSpec
from harness.models import load_model, resolve_model
from quantizers import QuantScheme
method, scheme, samples, length, options = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
torch.set_num_threads(int(sys.argv[6]))
spec = VariantSpec(method, method, QuantScheme.parse(scheme), options)
variants = maker.check([spec], resolve_model("toy-chat"), maker.VariantSettings(
    base="toy-base", calibration=CalibrationOptions(samples=samples, length=length), device="cpu"))
subject = load_model("toy-chat", device="cpu")
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
variants.prepare(subject)
v = variants.make(spec, subject)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss0_kib": rss0}))
"""


def section_cost(args) -> None:
    options = dict(kv.split("=", 1) for kv in args.options.split(",") if kv) if args.options else {}
    runs: dict[str, list[dict]] = {"ost": [], "aaq": []}
    for _ in range(args.cost_repeats):
        for method in ("ost", "aaq"):
            out = subprocess.run([sys.executable, "-c", COST_CHILD, method, args.schemes[0], str(args.calib_samples),
                                  str(args.calib_len), json.dumps(options), str(args.threads)],
                                 capture_output=True, text=True, cwd=REPO, check=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_kib", "rss0_kib")} for m, rs in runs.items()}
    print(f"\n## Cost of AAQ versus OST ({args.schemes[0]}, {args.calib_samples} x {args.calib_len} tokens, "
          f"medians of {args.cost_repeats} alternating fresh-process runs)\n")
    print("| method | calibration + quantize s | peak RSS MiB | RSS after loading the subject MiB |\n|---|---|---|---|")
    for m in ("ost", "aaq"):
        print(f"| {m} | {med[m]['seconds']:.1f} | {med[m]['peak_kib'] / 1024:.0f} | {med[m]['rss0_kib'] / 1024:.0f} |")
    t_ratio = med["aaq"]["seconds"] / med["ost"]["seconds"]
    m_ratio = med["aaq"]["peak_kib"] / med["ost"]["peak_kib"]
    extra_ratio = (med["aaq"]["peak_kib"] - med["aaq"]["rss0_kib"]) / max(1.0, med["ost"]["peak_kib"] - med["ost"]["rss0_kib"])
    print(f"\nAAQ / OST: time {t_ratio:.2f}x, peak memory {m_ratio:.2f}x (above the loaded subject: {extra_ratio:.2f}x); "
          f"target <= 1.5x: {'PASS' if max(t_ratio, m_ratio) <= 1.5 else 'MISS'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["main", "ablated", "grid", "cost"],
                   choices=["main", "ablated", "grid", "cost"])
    p.add_argument("--schemes", nargs="+", default=["w4a4kv4", "w4a4kv3"])
    p.add_argument("--options", default="", help="extra options for ost and aaq, e.g. steps=50")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.25, 0.75, 1.5])
    p.add_argument("--ks", nargs="+", type=int, default=[50, 500, 2000])
    p.add_argument("--limit", type=int, help="prompts per set (default all)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--cost-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-aaq")
    args = p.parse_args()
    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in args.sections:
        started = time.perf_counter()
        globals()[f"section_{name}"](args)
        print(f"\n({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
