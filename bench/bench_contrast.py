"""How much an aligned model (FT) and its unaligned reference (PT) disagree on calibration text:
the measurements behind AAQ's weak-contrast warning (``quantizers.aaq.WEAK_CONTRAST_TV``).

For each (FT, PT) pair and calibration source, prints the mean over calibration tokens of
``quantizers.losses.contrast_diagnostic``: total variation between the next-token distributions,
share of tokens whose top-1 differs, share of FT's top-K missing from PT's top-K, and mean
``|p_FT - p_PT|`` on S_diff. Pairs: toy-chat vs toy-base (the bundled toy family) and
smollm2-135m-instruct vs its refusal-ablated copy (``--base ablated``); sources: plain text
(toy-pretrain, or the last 60% of ../shared/data/wikitext2_test.raw) and ``chat:calibration``.

    OMP_NUM_THREADS=1 python bench/bench_contrast.py [--pairs toy smol] [--samples 8] [--len 256]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.raw"


def contrast(ft, pt, batches, k: int = 500) -> dict[str, float]:
    """Token-weighted mean contrast of ``ft`` and ``pt`` over ``batches``."""
    from quantizers.losses import contrast_diagnostic, contrastive_targets

    sums: dict[str, float] = {}
    for batch in batches:
        with torch.no_grad():
            ft_logits, pt_logits = ft(batch).logits, pt(batch).logits
        s_diff = contrastive_targets(ft_logits, pt_logits, k=k)["push"].index
        for key, value in contrast_diagnostic(ft_logits, pt_logits, s_diff, k=k).items():
            sums[key] = sums.get(key, 0.0) + value * batch.numel()
    tokens = sum(b.numel() for b in batches)
    return {key: value / tokens for key, value in sums.items()}


def main() -> None:
    from harness.ablation import ablate_refusal
    from harness.calibration_data import CalibrationSpec, load_calibration
    from harness.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["toy", "smol"], choices=["toy", "smol"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--ablate-layer", type=int, default=None,
                    help="layer of the refusal direction for smollm2's ablated base (default: searched)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    print("| FT | PT | calibration text | tokens | TV | top-1 differs | top-K differs | mean abs diff on S_diff |")
    print("|---|---|---|---|---|---|---|---|")
    for pair in args.pairs:
        ft = load_model("toy-chat" if pair == "toy" else "smollm2-135m-instruct", device="cpu")
        if pair == "toy":
            pt_model, pt_name, text, span = load_model("toy-base", device="cpu").model, "toy-base", "toy-pretrain", (0, 1)
        else:
            pt_model, pt_name = ablate_refusal(ft.model, ft.tokenizer, layer=args.ablate_layer).model, "ablated"
            text, span = str(WIKITEXT), (0.4, 1.0)
        for source, source_span in ((text, span), ("chat:calibration", (0.0, 1.0))):
            spec = CalibrationSpec(source, n_samples=args.samples, seq_len=args.len, batch_size=4, seed=0,
                                   span=source_span)
            batches = load_calibration(spec, ft.tokenizer, ft.model).batches
            c = contrast(ft.model, pt_model, batches)
            label = Path(source).name if source.startswith("/") else source
            print(f"| {ft.source.spec} | {pt_name} | {label} | {args.samples * args.len} | {c['tv']:.4f} | "
                  f"{c['top1_differs']:.3f} | {c['topk_differs']:.3f} | {c['sdiff_abs_diff']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
