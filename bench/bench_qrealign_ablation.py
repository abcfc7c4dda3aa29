"""Ablations of Q-realign on smol-chat-eroded (not a test): which option moves the refusal decision?

    python bench/bench_qrealign_ablation.py                            # the default ablations, reduced recipe
    python bench/bench_qrealign_ablation.py --only paper qout1         # a subset (another process can take the rest)
    python bench/bench_qrealign_ablation.py --ablation m2=probe_margin=2 self=probe_model=subject
    python bench/bench_qrealign_ablation.py --table                    # print the table of what is finished

Each ablation is one ``safequant quantize --method qrealign`` run (a subprocess, so every row pays
its own model loading and its peak memory is its own) with the recipe options (``--recipe``) and
the ablation's own options in front of them; ``probe_model=M`` is passed as ``--probe-model M``
(``subject``: probes fitted on the eroded model itself). Scored without generating, so a dozen
rows fit in an hour of one CPU thread:

* the quantized model's **first-token refusal probability** (the logit lens at the last block, i.e.
  the model's real next-token distribution, summed over refusal-opening tokens) on the 32 harmful
  and 32 benign calibration records that Q-realign holds out of calibration and of the probe fit
  (``metadata["diagnostics"]``, :mod:`probes.realign`), beside the eroded FP model's and the aligned
  parent's. On the reduced-recipe audit of the README it tracks generated refusal (harmful: FP
  0.438 / 56% refused, the paper's loss 0.464 / 62%, qout1 0.857 / 91%, smol-chat 0.963 / 97%) and
  its benign value tracks over-refusal (0.074 FP, 0.250 qout1 with XSTest-safe 19% -> 69%);
* WikiText-2 perplexity on the first ``--ppl-tokens`` tokens of the test file (512-token windows,
  as ``bench_qrealign.py --part smol``), against the eroded FP model's;
* calibration wall time (the quantize run) and the process peak memory the method records.

The held-out records come from the same calibration pool as the calibration prompts, so a row that
looks good here still needs ``bench_qrealign.py --part smol`` (generation, judges, the evaluation
sets) before it counts. Rows are written to ``--out``/NAME (variant folder + ``ablation.json``);
a finished row is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.raw"
#: The reduced recipe of the README's smol tables (48 prompts, 1/2 epochs: 2,160 block steps).
REDUCED_RECIPE = "n_prompts=48,epochs_shallow=1,epochs_deep=2"
QOUT1 = "loss=output,output_blocks=1,lr_clip=0.3"
DEFAULT_ABLATIONS = (
    "paper=loss=paper",
    "paper-self=probe_model=subject",
    "paper-margin2=probe_margin=2",
    "paper-margin6=probe_margin=6",
    "paper-lr0.3=lr_clip=0.3",
    "paper-deep=probe_blocks=15-29",
    "paper-shallow=probe_blocks=0-14",
    "paper-n96=n_prompts=96",
    "paper-ep2-4=epochs_shallow=2,epochs_deep=4",
    "paper-mal0.5=malicious_fraction=0.5",
    f"qout1={QOUT1}",
    f"qout1-w0.5={QOUT1},output_weight=0.5",
    f"qout1-mal0.5={QOUT1},malicious_fraction=0.5",
    f"qout1-n96={QOUT1},n_prompts=96",
    f"qout1-ep2-4={QOUT1},epochs_shallow=2,epochs_deep=4",
    f"qout3={QOUT1},output_blocks=3",
)


def parse_ablation(spec: str) -> tuple[str, dict[str, str], str | None]:
    """``NAME=KEY=VALUE,...`` -> (name, quantizer options, --probe-model or None)."""
    name, _, body = spec.partition("=")
    if not name or not body:
        raise ValueError(f"ablation {spec!r} must be NAME=KEY=VALUE[,KEY=VALUE...]")
    parts = [part for part in body.split(",") if part]
    if any("=" not in part for part in parts):
        raise ValueError(f"ablation {spec!r}: every option must be KEY=VALUE")
    options = dict(part.split("=", 1) for part in parts)
    return name, options, options.pop("probe_model", None)


def run_ablation(name: str, options: dict[str, str], probe_model: str | None, args) -> dict:
    """Quantize one row (unless its variant folder is finished), then score it; returns the row."""
    folder = Path(args.out) / name
    result_file = folder / "ablation.json"
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    recipe = dict(part.split("=", 1) for part in args.recipe.split(",") if part)
    merged = {**recipe, **options}
    cmd = [sys.executable, "-m", "harness.cli", "-q", "quantize", "--model", args.model, "--method", "qrealign",
           "--scheme", args.scheme, "--probe-model", probe_model or args.probe_model, "--seed", str(args.seed),
           "--out", str(folder), "--overwrite", "--option", ",".join(f"{k}={v}" for k, v in merged.items())]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    if code != 0:
        raise ValueError(f"row {name}: `safequant quantize` exited {code} (its error is above); fix the row's options")
    seconds = time.perf_counter() - started
    info = json.loads((folder / "variant.json").read_text(encoding="utf-8"))
    row = {"name": name, "options": merged, "own_options": options, "probe_model": probe_model or args.probe_model,
           "quantize_seconds": round(seconds, 1), **score_variant(folder, info, args)}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1), encoding="utf-8")
    tmp.replace(result_file)
    return row


def score_variant(folder: Path, info: dict, args) -> dict:
    """Held-out refusal probabilities from the variant's diagnostics, and its perplexity."""
    import torch

    from quantizers.artifact import load_variant

    torch.set_num_threads(args.threads)
    meta = info.get("metadata") or {}
    diag = meta.get("diagnostics") or {}
    readout = {model: doc["layers"][-1].get("lens", {}) for model, doc in (diag.get("models") or {}).items()}
    model, tokenizer, _ = load_variant(folder)
    return {"readout": readout, "perplexity": wikitext_perplexity(model, tokenizer, args.ppl_tokens),
            "peak_memory_mib": round(meta.get("peak_memory_bytes", 0) / 2**20, 1),
            "block_steps": sum(b.get("steps_run", 0) for b in meta.get("blocks", []))}


def wikitext_perplexity(model, tokenizer, tokens: int) -> float:
    from harness.perplexity import PerplexitySettings, load_text, perplexity

    settings = PerplexitySettings(source=str(WIKITEXT), window=512, stride=512, max_tokens=tokens)
    return round(perplexity(model, tokenizer, load_text(str(WIKITEXT)), settings, progress=False)["perplexity"], 3)


def fp_perplexity(args) -> float:
    """The eroded FP model's perplexity on the same tokens (cached in ``--out``/fp.json)."""
    cache = Path(args.out) / "fp.json"
    key = {"model": args.model, "ppl_tokens": args.ppl_tokens}
    if cache.is_file() and (doc := json.loads(cache.read_text(encoding="utf-8")))["key"] == key:
        return doc["perplexity"]
    import torch

    from harness.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    ppl = wikitext_perplexity(loaded.model, loaded.tokenizer, args.ppl_tokens)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "perplexity": ppl}), encoding="utf-8")
    return ppl


def table(rows: list[dict], fp_ppl: float | None, model: str, probe_model: str = "auto") -> str:
    """The README table: per row the held-out first-token refusal probability (harmful, benign), the
    harmful-compliance cut it implies against the eroded FP model, perplexity and cost."""
    lines = ["| ablation | options (besides the recipe) | refusal P, held-out harmful | benign | "
             "compliance cut (P) | WikiText-2 ppl | calibration | peak |", "|---|---|---|---|---|---|---|---|"]
    first = rows[0]["readout"] if rows else {}
    for label, key in ((f"aligned parent ({probe_model}), FP", "aligned"), (f"{model} FP", "fp")):
        if key in first:
            ppl = f"{fp_ppl:.3f} (1.000x)" if key == "fp" and fp_ppl else "–"
            lines.append(f"| {label} | – | {first[key]['harmful']:.3f} | {first[key]['benign']:.3f} | – | {ppl} | – | – |")
    for row in rows:
        q, fp = row["readout"].get("quantized", {}), row["readout"].get("fp", {})
        cut = "–"
        if q and fp and fp["harmful"] < 1:
            cut = f"{(q['harmful'] - fp['harmful']) / (1 - fp['harmful']):.0%}"
        ratio = f" ({row['perplexity'] / fp_ppl:.3f}x)" if fp_ppl else ""
        opts = ",".join(f"{k}={v}" for k, v in row["own_options"].items()) + (
            f" probe-model {row['probe_model']}" if row["probe_model"] != probe_model else "")
        lines.append(f"| {row['name']} | {opts} | {q.get('harmful', float('nan')):.3f} | "
                     f"{q.get('benign', float('nan')):.3f} | {cut} | {row['perplexity']:.3f}{ratio} | "
                     f"{row['quantize_seconds']:.0f} s | {row['peak_memory_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smol-chat-eroded", help="the eroded subject")
    ap.add_argument("--probe-model", default="auto", help="aligned model for the probes (auto: smol-chat)")
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--recipe", default=REDUCED_RECIPE, help="qrealign options every row shares "
                    f"(default the reduced recipe {REDUCED_RECIPE}; '' for the paper's full recipe)")
    ap.add_argument("--ablation", nargs="+", default=list(DEFAULT_ABLATIONS), metavar="NAME=KEY=VALUE,...",
                    help="rows to run (probe_model=M becomes --probe-model M)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these rows of --ablation")
    ap.add_argument("--table", action="store_true", help="print the table of finished rows, run nothing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_qrealign_ablation"))
    args = ap.parse_args(argv)
    try:
        specs = [parse_ablation(s) for s in args.ablation]
    except ValueError as exc:
        print(f"bench_qrealign_ablation: error: {exc}", file=sys.stderr)
        return 2
    unknown = set(args.only or ()) - {name for name, _, _ in specs}
    if unknown:
        print(f"bench_qrealign_ablation: error: --only {sorted(unknown)} not among the ablations "
              f"{[n for n, _, _ in specs]}", file=sys.stderr)
        return 2
    rows = []
    for name, options, probe_model in specs:
        if args.only and name not in args.only:
            continue
        done = Path(args.out) / name / "ablation.json"
        if args.table and not done.is_file():
            continue
        try:
            rows.append(run_ablation(name, options, probe_model, args))
        except ValueError as exc:
            print(f"bench_qrealign_ablation: error: {exc}", file=sys.stderr)
            return 2
    fp_ppl = fp_perplexity(args) if not args.table or (Path(args.out) / "fp.json").is_file() else None
    print(f"{args.model} {args.scheme}, recipe {args.recipe or 'the paper full recipe'}, probes from "
          f"{args.probe_model} unless said")
    print(table(rows, fp_ppl, args.model, args.probe_model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
