"""Where one OST/AAQ training step's time goes: ``torch.profiler`` over one step (after a warm-up
step) of the fused engine, next to one plain forward + backward of the same model on the same
tokens, grouped into matmuls, fake-quant/elementwise work and the rest.

The buckets are by operator name (``aten::mm``/``bmm``/``addmm``/``linear``... are matmuls;
rounding, clamping, min/max, where and the arithmetic around them are elementwise), self CPU
time, so each microsecond is counted once. The profiler's times are wall durations of each
operator: on a shared machine compare the shares within one profile, not seconds across
profiles (bench/bench_ost_cost.py measures CPU time). Run with one thread, e.g.::

    OMP_NUM_THREADS=1 python bench/profile_ost_step.py --layers 10 [--method ost] [--seq 256]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ost_cost import _model, _tokens  # noqa: E402  (the cost bench's model and token loaders)

log = logging.getLogger("profile_ost_step")

MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def _bucket(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul/attention"
    if any(word in name for word in ("copy_", "clone", "contiguous", "cat", "_to_copy", "index", "gather",
                                      "scatter", "embedding", "fill_", "zero_", "empty", "resize")):
        return "copies/indexing"
    if any(word in name for word in ("softmax", "log_softmax", "nll", "cross_entropy", "topk", "logsumexp")):
        return "softmax/loss"
    return "elementwise (fake-quant, scales, norms, activations, optimiser)"


def _report(prof, title: str, top: int, shapes: bool = False) -> float:
    events = prof.key_averages(group_by_input_shape=shapes)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    buckets: dict[str, float] = defaultdict(float)
    for e in events:
        buckets[_bucket(e.key)] += e.self_cpu_time_total / 1e6
    print(f"\n## {title}: {total:.2f} s self CPU")
    for name, seconds in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {name:70s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    print(f"  top {top} operators by self CPU:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        shape = f"  {e.input_shapes}" if shapes else ""
        print(f"    {e.key:60s} {e.self_cpu_time_total / 1e6:7.3f} s  x{e.count}{shape}")
    return total


def profile_plain(model, batches) -> profile:
    """Profile the second of two plain forward + backward steps (the first warms up)."""
    model.train()
    for step in range(2):
        ids = batches[step % len(batches)]
        with profile(activities=[ProfilerActivity.CPU]) if step == 1 else contextlib.nullcontext() as prof:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
    return prof


def profile_method(method: str, model, tokenizer, batches, name: str, layers: int | None, options: dict) -> profile:
    """Profile step 2 of 3 of the fused engine (the profiler starts when step 1 reports, stops at step 2)."""
    from quantizers import QuantContext, build_quantizer

    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)

    def progress(stage: str, i: int, n: int) -> None:
        if stage != method:
            return
        if i == 1:
            prof.start()
        elif i == 2:
            prof.stop()

    base = _model(name, layers)[1] if method == "aaq" else None
    ctx = QuantContext(tokenizer=tokenizer, calibration_batches=batches, base_model=base, seed=0, progress=progress)
    q = build_quantizer(method, {"steps": 3, "weights": "rtn", "autocast": "off", **options})
    q.apply(model, "w4a4kv4", ctx)
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--method", default="ost", choices=["ost", "aaq"])
    ap.add_argument("--option", action="append", default=[], help="quantizer option key=value (repeatable)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--shapes", action="store_true", help="group the operator list by input shapes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    options = dict(kv.split("=", 1) for kv in args.option)
    print(f"model {args.model}, layers {args.layers or 'all'}, {args.batch} x {args.seq} tokens, one thread, "
          f"{args.method} options {options}")
    plain = None
    if not args.skip_plain:
        tokenizer, model = _model(args.model, args.layers)
        plain = _report(profile_plain(model, _tokens(tokenizer, args.batch, args.seq)), "plain forward + backward",
                        args.top)
    tokenizer, model = _model(args.model, args.layers)
    prof = profile_method(args.method, model, tokenizer, _tokens(tokenizer, args.batch, args.seq), args.model,
                          args.layers, options)
    fused = _report(prof, f"{args.method} fused step", args.top, args.shapes)
    if plain:
        print(f"\n{args.method} step / plain step (profiled self CPU): {fused / plain:.2f}x")


if __name__ == "__main__":
    main()
