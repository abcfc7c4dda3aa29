"""Benchmark of the elementwise and reduction ops a fake-quant pass is built from (not a test): ms
per call on one weight-sized float32 tensor, on this CPU, with the CLI's malloc settings.

    python bench/bench_cpu_ops.py                 # 1,536 x 576 (SmolLM2's gate_proj), one thread
    python bench/bench_cpu_ops.py --threads 2 --rows 576 --cols 1536

Why: on the CPU some ops cost far more than the bytes they move (bool outputs, ``clamp`` with two
tensor bounds, index-returning reductions, ``nonzero``), so :class:`quantizers.fake_quant._FusedFakeQuant`
is written with the cheap ones only. The minimum over ``--repeat`` runs of ``--number`` calls is
reported (robust to other processes on a shared machine); the tensors stay in cache, so these are
the ops' compute costs, not their memory traffic.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--number", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=25)
    args = ap.parse_args(argv)
    from common.allocator import tune_glibc_malloc

    tune_glibc_malloc()
    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.cols, generator=g)
    y = torch.randn(args.rows, args.cols, generator=g)
    out = torch.empty_like(x)
    row = torch.rand(args.rows, 1, generator=g) + 0.5
    top = x.amax(-1, keepdim=True)
    mask = x > 2.5
    ops = {
        "amax (row)": lambda: x.amax(-1, keepdim=True),
        "aminmax (row)": lambda: torch.aminmax(x, dim=-1, keepdim=True),
        "max (row, with indices)": lambda: x.max(-1, keepdim=True),
        "sum (row)": lambda: x.sum(-1),
        "div by row, out=": lambda: torch.div(x, row, out=out),
        "mul, new tensor": lambda: torch.mul(x, y),
        "round_ in place": lambda: out.round_(),
        "clamp_ float bounds": lambda: out.clamp_(-1.0, 1.0),
        "clamp_min row bound, out=": lambda: torch.clamp_min(x, -row, out=out),
        "clamp_max_ row bound": lambda: out.clamp_max_(row),
        "clamp_ two row bounds": lambda: out.clamp_(-row, row),
        "eq to row, float out=": lambda: torch.eq(x, top, out=out),
        "ne, bool output": lambda: torch.ne(x, y),
        "masked_fill (bool mask)": lambda: x.masked_fill(mask, 0.0),
        "nonzero (bool mask)": lambda: mask.nonzero(as_tuple=True),
        "addcmul": lambda: torch.addcmul(x, x, y, value=-1.0),
        "vecdot (row)": lambda: torch.linalg.vecdot(x, y),
    }
    print(f"{args.rows} x {args.cols} float32, {args.threads} thread(s), min over {args.repeat} x {args.number} calls")
    for name, op in ops.items():
        op()
        ms = min(timeit.repeat(op, number=args.number, repeat=args.repeat)) / args.number * 1000.0
        print(f"{name:28s} {ms:8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
