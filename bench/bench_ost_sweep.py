"""OST learning-rate sweep on calibration data only (issue 12, part 4): which rotation and scale
rates the Cayley parametrisation wants, judged on text the evaluation never reads.

The authors' rates (0.0169 rotations, 0.00179 scales) were tuned for a Riemannian optimiser on the
Stiefel manifold; safequant learns Cayley-parametrised rotations with AdamW, so they need not
transfer. Every configuration is one ``safequant quantize --method ost`` in a process of its own
(``bench_aaq.quantize``: resumable, its log beside it), on the same calibration batches and seed;
each is scored by its perplexity on a **selection slice** of the WikiText-2 test file that is
neither calibration (``--calib-span``, default the last half) nor evaluation (the first tokens of
the file, which every README perplexity reads): by default characters 40-50%. The FP model is
scored on the same slice. Scores are cached in ``OUT/variants/NAME/sweep.json``, so re-running
prints the table without recomputing; two processes may share one ``--out`` with different
``--configs``.

    OMP_NUM_THREADS=1 python bench/bench_ost_sweep.py --steps 20 --out runs/ost-sweep \\
        --configs authors=lr_rotation=0.0169,lr_scale=0.00179 rot2x=lr_rotation=0.0338

``--evaluate NAME ...`` also scores the named configurations on the evaluation text (the first
``--eval-tokens`` tokens of the file), for the row that the selection picked; never pick by it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_aaq import Row, joined, quantize  # noqa: E402
from common.files import atomic_write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2_test.raw"
#: The default grid around the authors' rates: rotation rate x0.25..x2, scale rate x0.1..x10.
DEFAULT_CONFIGS = (
    "authors=lr_rotation=0.0169,lr_scale=0.00179",
    "rot0.5x=lr_rotation=0.00845,lr_scale=0.00179",
    "rot2x=lr_rotation=0.0338,lr_scale=0.00179",
    "scale10x=lr_rotation=0.0169,lr_scale=0.0179",
    "rot0.25x=lr_rotation=0.00423,lr_scale=0.00179",
)


def parse_config(text: str) -> tuple[str, str]:
    """``NAME=OPTIONS`` (OPTIONS as ``--option`` takes them) into ``(name, options)``."""
    name, sep, options = text.partition("=")
    if not sep or not name or "," in name:
        raise SystemExit(f"bench_ost_sweep: config {text!r} must be NAME=OPTIONS, e.g. rot2x=lr_rotation=0.0338")
    return name, options


def perplexity_of(model, tokenizer, text: str, tokens: int, window: int, label: str) -> float:
    from harness.perplexity import PerplexitySettings, perplexity

    settings = PerplexitySettings(source=label, window=window, stride=window, max_tokens=tokens, batch_size=4)
    return perplexity(model, tokenizer, text, settings, progress=False)["perplexity"]


def training_stats(info: dict) -> dict:
    """KL-top over the first and last 8 steps and the largest of the first 5 (the early spike)."""
    curve = info["metadata"]["calibration"]["curves"].get("kl_top") or info["metadata"]["calibration"]["curves"]["loss"]
    return {"first8": statistics.fmean(curve[:8]), "last8": statistics.fmean(curve[-8:]), "max5": max(curve[:5]),
            "seconds": info["metadata"]["calibration"]["seconds"],
            "peak_gib": info["metadata"]["calibration"].get("peak_memory_bytes", 0) / 2**30,
            "steps": f"{info['metadata']['calibration'].get('steps_run', len(curve))}"
                     + (" (guard stopped it)" if info["metadata"]["calibration"].get("stopped_early") else "")}


def score(folder: Path, texts: dict[str, str], args: argparse.Namespace) -> dict:
    """Perplexities of the saved variant in ``folder`` on each text (cached in ``sweep.json``)."""
    from quantizers.artifact import load_variant

    record = folder / "sweep.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    missing = [k for k in texts if k not in done]
    if missing:
        model, tok, _ = load_variant(folder)
        for key in missing:
            done[key] = perplexity_of(model, tok, texts[key], args.tokens if key == "select" else args.eval_tokens,
                                      args.window, key)
        atomic_write_json(record, done)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="NAME=OPTIONS",
                        help="configurations to train (default: the authors' rates and four around them)")
    parser.add_argument("--model", default="smol-chat")
    parser.add_argument("--scheme", default="w16a4-aasym-aclip0.9",
                        help="scheme trained against (default: 4-bit activations only, where part 4's loss is)")
    parser.add_argument("--steps", type=int, default=20, help="OST steps per configuration (default 20)")
    parser.add_argument("--options", default="checkpoint=true", help="options every configuration shares")
    parser.add_argument("--text", default=str(WIKITEXT), help="the WikiText-2 test file")
    parser.add_argument("--calib-span", default="0.5:1", help="calibration characters (default the last half)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--calib-batch", type=int, default=4)
    parser.add_argument("--select-span", default="0.4:0.5", help="selection characters (default 40-50%%)")
    parser.add_argument("--tokens", type=int, default=8192, help="selection tokens (default 8192)")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (default 512)")
    parser.add_argument("--evaluate", nargs="*", default=[], metavar="NAME",
                        help="also score these configurations on the evaluation text (the file's first tokens)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    configs = dict(parse_config(c) for c in args.configs)
    unknown = [n for n in args.evaluate if n not in configs]
    if unknown:
        print(f"error: --evaluate {unknown[0]!r} is not among --configs ({', '.join(configs)})", file=sys.stderr)
        return 2
    args.calib_text = args.text
    import torch

    from harness.calibration_data import parse_span
    from harness.errors import UserError
    from harness.models import load_model
    from harness.perplexity import load_text

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        text = load_text(args.text)
        lo, hi = parse_span(args.select_span)
        clo, chi = parse_span(args.calib_span)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if max(lo, clo) < min(hi, chi):
        print(f"error: --select-span {args.select_span} overlaps --calib-span {args.calib_span}: pick disjoint spans",
              file=sys.stderr)
        return 2
    texts = {"select": text[int(lo * len(text)): int(hi * len(text))], "eval": text}

    args.out.mkdir(parents=True, exist_ok=True)
    fp_record = args.out / "fp.json"
    fp = {} if not fp_record.is_file() else json.loads(fp_record.read_text())
    wanted = ("select", "eval") if args.evaluate else ("select",)
    if any(key not in fp for key in wanted):
        loaded = load_model(args.model, device="cpu")
        for key in wanted:
            if key not in fp:
                fp[key] = perplexity_of(loaded.model, loaded.tokenizer, texts[key],
                                        args.tokens if key == "select" else args.eval_tokens, args.window, key)
        atomic_write_json(fp_record, fp)
        del loaded

    print(f"# OST learning-rate sweep: {args.model}, {args.scheme}, {args.steps} steps, {args.calib_samples} x "
          f"{args.calib_len} calibration tokens (span {args.calib_span}, batch {args.calib_batch}), seed {args.seed}")
    print(f"- selection: perplexity on characters {args.select_span} of {args.text}, first {args.tokens} tokens, "
          f"{args.window}-token windows; FP {fp['select']:.3f}")
    if args.evaluate:
        print(f"- evaluation (not for choosing): the file's first {args.eval_tokens} tokens; FP {fp['eval']:.3f}")
    print("\n| config | options | KL-top first 8 | last 8 | max first 5 | selection ppl | x FP | eval x FP | "
          "train s | peak GiB | steps run |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    for name, options in configs.items():
        row = Row(name, "ost", args.scheme, joined(f"steps={args.steps}", args.options, options))
        quantize(row, args)
        folder = args.out / "variants" / name
        wanted = {k: v for k, v in texts.items() if k == "select" or name in args.evaluate}
        ppl = score(folder, wanted, args)
        stats = training_stats(json.loads((folder / "variant.json").read_text()))
        ev = f"{ppl['eval'] / fp['eval']:.3f}" if "eval" in ppl else ""
        print(f"| {name} | {options} | {stats['first8']:.3f} | {stats['last8']:.3f} | {stats['max5']:.3f} | "
              f"{ppl['select']:.3f} | {ppl['select'] / fp['select']:.3f} | {ev} | {stats['seconds']:.0f} | "
              f"{stats['peak_gib']:.2f} | {stats['steps']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
