"""What one OST/AAQ training step costs, measured side by side with a plain training step of the
same model on the same tokens, plus a memory model fitted over layers and tokens.

Every measurement runs in its own child process (one thread pinned), so that each peak resident
set size (``ru_maxrss``, the whole process: model, data, autograd) belongs to that job alone.
Step times are the process's CPU time (``time.process_time``; with one thread this is the compute
a step needs, and it does not grow when other jobs share the cores, as wall time does), medians
over ``--steps`` steps (the first step is dropped as warm-up). Jobs:

* ``plain``: forward + backward of the model with trainable weights, cross-entropy on the tokens
  (no checkpointing): the step-time reference;
* ``plain-ckpt``: the same with gradient checkpointing per decoder layer: the memory reference;
* ``plain-bf16`` / ``ost-ckpt-bf16``: ``plain`` under bf16 autocast and ``ost-ckpt`` with
  ``autocast=bf16`` (what ``autocast=auto`` picks on a CPU with AMX-BF16 tiles or a GPU; every
  other job runs in fp32); a ``-bf16`` job's step ratio is to ``plain-bf16`` when it ran;
* ``ost`` / ``aaq``: the fused engine with its defaults (per-layer transforms, ``checkpoint=auto``,
  cached targets; AAQ's base is a second copy of the checkpoint: the cost does not depend on its
  weights); ``ost-ckpt`` / ``ost-nockpt``: OST with checkpointing forced on / off;
* ``aaq-ckpt``: AAQ with checkpointing forced on; ``ost-ckpt-nohold``: checkpointed OST that
  transforms the weights in every forward and recomputation instead of once per step
  (``hold_weights=false``, the path before the held weights);
* ``ost-old``: ``engine=parametrize``, the pre-rework parametrisation with today's cached targets;
  ``ost-prerework``: the code of the commit before the rework itself (``--old-tree DIR``, a
  checkout of 5a26806: every weight through ``parametrize`` each step, the FP reference
  deep-copied and run again on every step), no gradient accumulation.

``--steps 1`` runs the warm-up step only: a peak without a step time. ``--parallel N`` runs N
jobs at once, each still its own one-thread child.

``--micro-batches N`` runs every job's step as N micro-batches of ``batch / N`` sequences, each
forward and backward at once, then one step (gradient accumulation: the same tokens and FLOPs
per step, the activation memory of one micro-batch): how the recipe's 4 x 2,048 tokens per step
fit next to other jobs.

``--jobs`` picks the jobs (plain first: the step ratios are to it). The memory model is fitted to
``ost-ckpt`` (the configuration a model that does not fit without checkpointing runs).

The memory model fits ``peak = a + b * L + c * T + e * L * T`` (L decoder layers kept, T tokens
per step, bytes) to the fused OST job on truncated copies of the model, and extrapolates it to a
7B Llama by scaling each coefficient with what it counts (see docs/quantizers.md).

    OMP_NUM_THREADS=1 python bench/bench_ost_cost.py [--model smollm2-135m-instruct] [--batch 4 --seq 256]
    OMP_NUM_THREADS=1 python bench/bench_ost_cost.py --seq 2048 --micro-batches 4 --jobs plain plain-ckpt ost-ckpt aaq-ckpt \
        --parallel 2 --no-fit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

GIB = 1024**3


def _model(name: str, layers: int | None):
    from harness.models import load_model

    loaded = load_model(name, device="cpu", dtype="float32")
    model = loaded.model
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return loaded.tokenizer, model


def _tokens(tokenizer, batch: int, seq: int) -> list[torch.Tensor]:
    from harness.calibration_data import CalibrationSpec, load_calibration

    wiki = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.raw"
    spec = CalibrationSpec(str(wiki), n_samples=batch * 2, seq_len=seq, batch_size=batch, seed=0, span=(0.4, 1.0))
    return load_calibration(spec, tokenizer).batches


def _plain(model, batches, steps: int, checkpoint: bool, micro_batches: int, bf16: bool = False) -> list[float]:
    """CPU seconds of each plain training step (cross-entropy, every weight trainable); ``bf16``:
    under ``torch.autocast`` in bfloat16, as the transform jobs' ``autocast=bf16``."""
    import contextlib

    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    times = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        started = time.process_time()
        for part in ids.chunk(micro_batches):
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                out = model(input_ids=part, labels=part, use_cache=False)
            (out.loss / micro_batches).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.process_time() - started)
    return times


#: The transform jobs: ``job -> (method, options)`` on top of ``steps``, ``weights=rtn``, ``autocast=off``.
TRANSFORM_JOBS = {
    "ost": ("ost", {}),
    "ost-ckpt": ("ost", {"checkpoint": "true"}),
    "ost-ckpt-bf16": ("ost", {"checkpoint": "true", "autocast": "bf16"}),
    "ost-nockpt": ("ost", {"checkpoint": "false"}),
    "aaq": ("aaq", {}),
    "aaq-ckpt": ("aaq", {"checkpoint": "true"}),
    "ost-ckpt-nohold": ("ost", {"checkpoint": "true", "hold_weights": "false"}),
    "ost-old": ("ost", {"engine": "parametrize"}),
    "ost-prerework": ("ost", {}),
}
#: Plain training steps: the references (``plain-bf16``: under bf16 autocast, the reference of ``*-bf16``).
PLAIN_JOBS = ("plain", "plain-ckpt", "plain-bf16")
JOBS = (*PLAIN_JOBS, *TRANSFORM_JOBS)
#: Jobs whose child imports the project from ``--old-tree`` (a checkout of the commit before the
#: rework) instead of this one: the pre-rework step as it was, frozen reference copy run every step.
OLD_TREE_JOBS = ("ost-prerework",)


def _transform(method: str, options: dict, model, tokenizer, batches, steps: int, name: str, layers: int | None):
    from quantizers import QuantContext, build_quantizer

    stamps: list[float] = []
    # AAQ's base lives only in the context, as in `safequant quantize`: freed once its targets are cached
    ctx = QuantContext(tokenizer=tokenizer, calibration_batches=batches, seed=0,
                       base_model=_model(name, layers)[1] if method == "aaq" else None,
                       progress=lambda stage, i, n: stamps.append(time.process_time()) if stage == method else None)
    from quantizers import get_quantizer

    known = set(get_quantizer(method).option_names())  # an older tree lacks the newer options
    q = build_quantizer(method, {k: v for k, v in {"steps": steps, "weights": "rtn", "autocast": "off", **options}.items()
                                 if k in known})
    q.apply(model, "w4a4kv4", ctx)
    return [b - a for a, b in zip(stamps, stamps[1:])], q.metadata


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer, model = _model(args.model, args.layers)
    batches = _tokens(tokenizer, args.batch, args.seq)
    meta = {}
    if args.job in PLAIN_JOBS:
        times = _plain(model, batches, args.steps, checkpoint=args.job == "plain-ckpt",
                       micro_batches=args.micro_batches, bf16=args.job == "plain-bf16")[1:]
    else:
        method, options = TRANSFORM_JOBS[args.job]
        options = {**options, "micro_batches": args.micro_batches} if args.micro_batches > 1 else options
        times, meta = _transform(method, options, model, tokenizer, batches, args.steps, args.model, args.layers)
    print(json.dumps({"job": args.job, "step_s": statistics.median(times) if times else None, "steps_timed": len(times),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "target_cache_bytes": meta.get("training", {}).get("target_cache_bytes"),
                      "checkpoint": meta.get("training", {}).get("checkpoint"),
                      "hold_weights": meta.get("training", {}).get("hold_weights")}))


def run_child(job: str, args: argparse.Namespace, *, layers: int | None = None, seq: int | None = None,
              steps: int | None = None) -> dict:
    micro = 1 if job in OLD_TREE_JOBS else args.micro_batches  # the old path had no accumulation
    cmd = [sys.executable, __file__, "--child", job, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(seq or args.seq), "--steps", str(steps or args.steps), "--micro-batches", str(micro)]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    env = None
    if job in OLD_TREE_JOBS:
        if not args.old_tree:
            raise SystemExit(f"job {job} needs --old-tree DIR (e.g. `git archive 5a26806 | tar -x -C DIR`)")
        env = {**os.environ, "PYTHONPATH": str(Path(args.old_tree).resolve())}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit_memory(args: argparse.Namespace, known: dict[tuple[int, int], float]) -> np.ndarray:
    """Least-squares ``peak = a + b L + c T + e L T`` over ``--fit-layers`` x ``--fit-seqs``
    (``known`` holds points already measured, keyed by (layers, tokens))."""
    points = dict(known)
    for layers in args.fit_layers:
        for seq in args.fit_seqs:
            key = (layers, args.batch * seq)
            if key not in points:
                points[key] = float(run_child("ost-ckpt", args, layers=layers, seq=seq, steps=2)["peak_rss"])
            print(f"  fit point: L={key[0]} T={key[1]} peak={points[key] / GIB:.3f} GiB", flush=True)
    a = np.array([[1.0, L, T, L * T] for L, T in points])
    y = np.array(list(points.values()))
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coef


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="gradient accumulation: each step as N micro-batches of batch / N sequences (every job)")
    ap.add_argument("--old-steps", type=int, default=2, help="steps of the slow pre-rework path")
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", nargs="+", default=["plain", "plain-ckpt", "ost", "aaq", "ost-old"], choices=JOBS,
                    help="jobs to run, in order (plain first: the ratios are to it; plain-ckpt before the memory ratios)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="jobs run at once, each its own one-thread process (CPU time per step does not depend "
                         "on it; keep the sum of their peaks under the free memory)")
    ap.add_argument("--old-tree", default=None, metavar="DIR",
                    help="a checkout of the commit before the rework (5a26806), for the ost-prerework job")
    ap.add_argument("--no-fit", action="store_true", help="skip the memory-model grid")
    ap.add_argument("--fit-layers", type=int, nargs="+", default=None,
                    help="decoder layers kept for the memory fit (default: a third and all)")
    ap.add_argument("--fit-seqs", type=int, nargs="+", default=[128, 256], help="sequence lengths of the memory fit")
    args = ap.parse_args()
    if args.child:
        args.job = args.child
        child(args)
        return
    tokens = args.batch * args.seq
    if args.batch % args.micro_batches:
        raise SystemExit(f"--micro-batches {args.micro_batches} must divide --batch {args.batch}")
    print(f"model {args.model}, {args.batch} x {args.seq} = {tokens} tokens per step "
          f"({args.micro_batches} micro-batch(es) of {args.batch // args.micro_batches} x {args.seq}), one thread, "
          f"step = median CPU seconds of {args.steps - 1} steps after a warm-up", flush=True)
    print("| job | step (CPU s) | peak RSS (GiB) | step / plain | peak / plain-ckpt |")
    print("|---|---|---|---|---|")
    res = {}
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:  # each job its own one-thread child
        running = {job: pool.submit(run_child, job, args, steps=args.old_steps if job == "ost-old" else None)
                   for job in args.jobs}
    for job in args.jobs:
        res[job] = r = running[job].result()
        memory = f"{r['peak_rss'] / res['plain-ckpt']['peak_rss']:.2f}x" if "plain-ckpt" in res else "-"
        timed = r["step_s"] is not None  # --steps 1: the warm-up step only, a peak without a time
        seconds = f"{r['step_s']:.2f}" if timed else "-"
        ref = "plain-bf16" if job.endswith("-bf16") and "plain-bf16" in res else "plain"  # like with like
        step = f"{r['step_s'] / res[ref]['step_s']:.2f}x" if timed and ref in res else "-"
        print(f"| {job} | {seconds} | {r['peak_rss'] / GIB:.2f} | {step} | {memory} |", flush=True)
    for old_job in ("ost-old", "ost-prerework"):
        for new_job in ("ost", "ost-ckpt"):
            if old_job in res and new_job in res:
                old, new = res[old_job], res[new_job]
                print(f"{new_job} vs {old_job}: {old['step_s'] / new['step_s']:.1f}x faster per step, peak "
                      f"{new['peak_rss'] / GIB:.2f} GiB vs {old['peak_rss'] / GIB:.2f} GiB "
                      f"(targets cached: {new['target_cache_bytes'] / 2**20:.1f} MiB)")
    if "plain" in res and "ost-prerework" in res:  # no step cheaper than a plain one: the speed-up's ceiling
        print(f"ost-prerework = {res['ost-prerework']['step_s'] / res['plain']['step_s']:.2f} plain steps: "
              "the most any step that costs at least a plain forward + backward can gain on it")
    print("checkpointing per job: " + ", ".join(f"{job} {r['checkpoint']}" for job, r in res.items()
                                                if r.get("checkpoint") is not None))
    if args.no_fit:
        return
    new = res.get("ost-ckpt") or run_child("ost-ckpt", args, steps=2)  # the memory model is the checkpointed one
    from harness.models import load_model

    config = load_model(args.model, device="cpu").model.config
    layers = int(config.num_hidden_layers)
    args.fit_layers = sorted(set(args.fit_layers or [max(1, layers // 3), layers]))
    a, b, c, e = fit_memory(args, {(layers, tokens): float(new["peak_rss"])})
    print(f"memory model (fp32, {args.model}): peak = {a / GIB:.3f} GiB + {b / 2**20:.2f} MiB * L + "
          f"{c / 2**10:.1f} KiB * T + {e / 2**10:.3f} KiB * L * T")
    print(json.dumps({"a": a, "b": b, "c": c, "e": e, "hidden": config.hidden_size, "vocab": config.vocab_size,
                      "layers": layers, "intermediate": config.intermediate_size}))


if __name__ == "__main__":
    main()
