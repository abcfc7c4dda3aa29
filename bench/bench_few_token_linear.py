"""Benchmark of the few-token fake-quantized Linear (not a test): CPU ms of one forward + backward of
:func:`quantizers.few_token_linear.few_token_linear` against the route it replaces (the weight
smoothed by autograd's ``mul``, ``fake_quant_weight(..., fused=True)``, ``F.linear``), per token
count, on SmolLM2-135M's weight shapes, with the CLI's malloc settings.

    python bench/bench_few_token_linear.py                      # tokens 1 2 4 8 16, one thread
    python bench/bench_few_token_linear.py --tokens 1 4 --repeat 9

Why: the few-token route turns the weight gradient's reductions into products with the tokens, so
its cost grows with the token count while the dense route's does not; this measures where they
cross (``few_token_linear.MAX_TOKENS``). Random weights and inputs (seeded), asymmetric 8-bit
grids with learnable clipping as Q-realign's default; ``gate_proj`` and ``q_proj`` with a smoothing
factor per input column, ``down_proj`` without (its range cached, as Q-realign does). The
minimum over ``--repeat`` runs of ``--number`` calls of process CPU time is reported (robust to
other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"gate_proj": (1536, 576, True), "q_proj": (576, 576, True), "down_proj": (576, 1536, False)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--number", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    from common.allocator import tune_glibc_malloc

    tune_glibc_malloc()
    import torch
    import torch.nn.functional as F

    from quantizers.fake_quant import fake_quant_weight, range_stats
    from quantizers.few_token_linear import few_token_linear

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"CPU ms per forward + backward, {args.threads} thread(s), min over {args.repeat} x {args.number} calls")
    print(f"{'linear':>10} {'tokens':>6} {'dense':>8} {'few':>8} {'few/dense':>9}")
    for name, (out_f, in_f, smoothed) in SHAPES.items():
        weight = torch.randn(out_f, in_f, generator=g) * 0.05
        stats = None if smoothed else range_stats(weight, symmetric=False)
        factor = (torch.rand(in_f, generator=g) + 0.5).requires_grad_(smoothed)
        up = torch.full((out_f,), 3.9, requires_grad=True)
        low = torch.full((out_f,), 3.9, requires_grad=True)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, in_f, generator=g, requires_grad=True)
            gy = torch.randn(1, tokens, out_f, generator=g)

            def dense() -> None:
                w = weight * factor if smoothed else weight
                q = fake_quant_weight(w, 8, symmetric=False, clip_ratio=torch.sigmoid(up),
                                      clip_ratio_low=torch.sigmoid(low), fused=True, stats=stats)
                F.linear(x, q).backward(gy)

            def few() -> None:
                few_token_linear(x, weight, factor if smoothed else None, 8, symmetric=False,
                                 clip_ratio=torch.sigmoid(up), clip_ratio_low=torch.sigmoid(low),
                                 stats=stats).backward(gy)

            ms = {}
            for label, fn in (("dense", dense), ("few", few)):
                fn()
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = time.process_time()
                    for _ in range(args.number):
                        fn()
                    best = min(best, (time.process_time() - t0) / args.number * 1000.0)
                ms[label] = best
            print(f"{name:>10} {tokens:>6} {ms['dense']:8.3f} {ms['few']:8.3f} {ms['few'] / ms['dense']:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
