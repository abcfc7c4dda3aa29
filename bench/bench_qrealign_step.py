"""Benchmark of one Q-realign block step (not a test): what a calibration step of one decoder block
costs, benign against malicious, before and after the exact speed-ups (the hand-written
straight-through fake-quant, ``fake_quant(fused=True)``; the last-token forward of
:mod:`quantizers.last_token`; frozen quantized weights for the no-grad propagation), at one and two
threads, side by side in one process.

    python bench/bench_qrealign_step.py                          # smol-chat-eroded, blocks 0 and 20, 1 and 2 threads
    python bench/bench_qrealign_step.py --threads 1 --profile    # plus a torch.profiler table per mode
    python bench/bench_qrealign_step.py --threads 1 --clock cpu --modes benign malicious   # CPU ms, two modes

A step is what ``QRealignQuantizer._calibrate_block`` runs per calibration sample (batch 1, the
paper's recipe): the block's forward with learnable clipping and smoothing installed
(:class:`~quantizers.qrealign.QRealignBlock`), ``qrealign_loss``, the backward pass and the AdamW
step, through the shared ``run_calibration`` loop. Modes (``-before``: the code before this change):

* ``benign-before`` / ``benign-dense`` / ``benign``: full forward, MSE to the FP block output over
  every token, autograd / fused fake-quant with the weight gradient as a dense matrix / fused
  fake-quant and the few-token Linear (:mod:`quantizers.few_token_linear`; what the code runs now);
* ``malicious-before``: full forward, autograd fake-quant, probe loss at the last token;
  ``malicious-full``: the same with the fused fake-quant (dense weight gradient);
  ``malicious-dense``: fused fake-quant and the last-token forward, dense weight gradients (the
  code before the few-token Linear); ``malicious``: all of it with the few-token Linear (what the
  code runs now);
* ``propagate-before`` / ``propagate``: the no-grad forward that hands ``X_q`` on after a block
  (per sample), re-quantizing the weights on every call / once (``QRealignBlock.frozen``);
  ``fp-target``: the no-grad FP forward that makes ``F_i(X_fp)`` (per sample).

Inputs are the chat-formatted built-in ``calibration`` prompts (harmful for malicious steps, benign
for benign ones; the recipe's 128-token cap, they are shorter), the block's FP inputs, the
per-channel activation maxima of those prompts. The modes run interleaved in ``--rounds`` rounds
of ``--steps`` steps each, cycling over ``--prompts`` prompts; the table gives the median over
rounds of the mean ms per step, and the full recipe's block-step time it implies
(``n_prompts x sum over blocks of epochs``, 75% malicious) for a step cost averaged over the
measured blocks. ``--clock cpu`` times the process's CPU time instead of the wall clock: on a
shared machine, with one thread, that is the step's work without the time other processes hold
the core. glibc malloc is tuned as the CLI tunes it (``common/allocator.py``). Results go to
``--out`` (default runs/bench_qrealign_step, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_qrealign_step")

MODES = ("benign-before", "benign-dense", "benign", "malicious-before", "malicious-full", "malicious-dense",
         "malicious", "propagate-before", "propagate", "fp-target")


def block_inputs(model, batches, index: int):
    """FP inputs of decoder block ``index`` for every batch, with the layer kwargs."""
    import torch

    from quantizers.calibration import capture_layer_inputs, decoder_layers, run_layer

    captured = capture_layer_inputs(model, batches, 0)
    hidden = captured.hidden
    with torch.no_grad():
        for layer in list(decoder_layers(model))[:index]:
            hidden = [run_layer(layer, h, kw) for h, kw in zip(hidden, captured.kwargs)]
    return hidden, captured.kwargs


def time_block(model, index: int, scheme, stats, data: dict, args) -> dict[str, list[float]]:
    """Per round, ms per step of every mode on block ``index`` (see the module docstring)."""
    import torch

    from quantizers.calibration import decoder_layers, run_calibration, run_layer
    from quantizers.last_token import last_token_forward
    from quantizers.qrealign import QRealignBlock, QRealignOptions, qrealign_loss

    layer = decoder_layers(model)[index]
    hidden, kwargs, targets, labels = data["hidden"], data["kwargs"], data["targets"], data["labels"]
    mal = [k for k in range(len(hidden)) if bool(labels[k].all())]
    ben = [k for k in range(len(hidden)) if not bool(labels[k].any())]
    w = torch.randn(hidden[0].shape[-1], generator=torch.Generator().manual_seed(0)) / 64.0

    def train(rows, fused: bool, last: bool, few: bool = True) -> float:
        def loss_fn(k: int, _step: int):
            if last:
                out, target = last_token_forward(layer, hidden[k], kwargs[k]), targets[k][:, -1:]
            else:
                out, target = run_layer(layer, hidden[k], kwargs[k]), targets[k]
            return qrealign_loss(out, target, labels[k], w, 0.0)

        block = QRealignBlock(model, index, scheme, QRealignOptions(), stats, fused=fused, few_token=few).install()
        try:
            cpu0 = time.process_time()
            with torch.enable_grad():
                cal = run_calibration(loss_fn, block.param_groups(), rows, args.steps, show_progress=False)
            cpu = time.process_time() - cpu0
        finally:
            block.remove()
        return 1000.0 * (cpu if args.clock == "cpu" else cal.seconds) / cal.steps_run

    def no_grad_pass(frozen: bool | None) -> float:
        """ms per sample of the no-grad forward: the learnable block with per-call (False) or
        frozen (True) quantized weights, or the FP block (None)."""
        block = QRealignBlock(model, index, scheme, QRealignOptions(), stats).install() if frozen is not None else None
        rows = mal + ben
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        try:
            t0 = clock()
            with block.frozen() if frozen else torch.no_grad():
                for s in range(args.steps):
                    run_layer(layer, hidden[rows[s % len(rows)]], kwargs[rows[s % len(rows)]])
            return 1000.0 * (clock() - t0) / args.steps
        finally:
            if block is not None:
                block.remove()

    runs = {
        "benign-before": lambda: train(ben, False, False),
        "benign-dense": lambda: train(ben, True, False, few=False),
        "benign": lambda: train(ben, True, False),
        "malicious-before": lambda: train(mal, False, False),
        "malicious-full": lambda: train(mal, True, False, few=False),
        "malicious-dense": lambda: train(mal, True, True, few=False),
        "malicious": lambda: train(mal, True, True),
        "propagate-before": lambda: no_grad_pass(False),
        "propagate": lambda: no_grad_pass(True),
        "fp-target": lambda: no_grad_pass(None),
    }
    runs = {m: runs[m] for m in args.modes}
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    for _ in range(args.warmup_rounds):
        for run in runs.values():
            run()
    for _ in range(args.rounds):
        for mode, run in runs.items():
            times[mode].append(run())
    if args.profile:
        profile(runs, index)
    return times


def profile(runs: dict, index: int) -> None:
    """torch.profiler's top operators (self CPU time) of one round of each training mode."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for mode in [m for m in ("benign-before", "benign-dense", "benign", "malicious-before", "malicious-dense",
                             "malicious") if m in runs]:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            runs[mode]()
        print(f"\n== profile: block {index}, {mode} (one round)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def recipe_minutes(ms: dict[str, float], n_prompts: int, n_blocks: int, malicious: float, mode: str,
                   benign: str) -> float:
    """Minutes of block steps for the paper's full recipe at these per-step costs."""
    from quantizers.qrealign import QRealignOptions

    opts = QRealignOptions(n_prompts=n_prompts, malicious_fraction=malicious)
    steps = sum(opts.epochs_for(i, n_blocks) for i in range(n_blocks)) * n_prompts
    per_step = malicious * ms[mode] + (1 - malicious) * ms[benign]
    return steps * per_step / 60000.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smol-chat-eroded")
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 20])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, default=8, help="harmful and as many benign prompts cycled over")
    ap.add_argument("--steps", type=int, default=16, help="steps per mode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup-rounds", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or the process's CPU time (one thread on a loaded machine: the work, without "
                         "the time other processes hold the core; summed over threads with more than one)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to time (default: all)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables (first thread count)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_qrealign_step"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from common.allocator import tune_glibc_malloc

    tune_glibc_malloc()  # as the CLI does: freed tensor memory stays in the process
    import torch

    from harness.calibration_data import load_calibration_prompts
    from harness.models import load_model
    from quantizers import QuantScheme, build_quantizer
    from quantizers.calibration import decoder_layers, input_channel_absmax, run_layer
    from quantizers.qrealign import QRealignOptions, _batches

    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    records = load_calibration_prompts()
    chosen = ([r for r in records if r["label"] == "harmful"][:args.prompts]
              + [r for r in records if r["label"] == "benign"][:args.prompts])
    batches = _batches(tok, chosen, QRealignOptions(), torch.device("cpu"))
    labels = [torch.tensor([r["label"] == "harmful"]) for r in chosen]
    scheme = build_quantizer("qrealign", {}).effective_scheme(QuantScheme.parse(args.scheme))
    stats = input_channel_absmax(model, batches)
    n_blocks = len(decoder_layers(model))
    tokens = [b["input_ids"].shape[1] for b in batches]
    results: dict = {"model": args.model, "scheme": scheme.label, "tokens_mean": statistics.mean(tokens),
                     "tokens_range": [min(tokens), max(tokens)], "blocks": {}, "argv": sys.argv[1:]}
    for index in args.blocks:
        hidden, kwargs = block_inputs(model, batches, index)
        layer = decoder_layers(model)[index]
        with torch.no_grad():
            targets = [run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]
        data = {"hidden": hidden, "kwargs": kwargs, "targets": targets, "labels": labels}
        for threads in args.threads:
            torch.set_num_threads(threads)
            times = time_block(model, index, scheme, stats, data, args)
            med = {m: round(statistics.median(v), 2) for m, v in times.items()}
            results["blocks"].setdefault(str(index), {})[str(threads)] = {"median_ms": med, "rounds_ms": times}
            log.info("block %d, %d thread(s): %s", index, threads, med)
            args.profile = False
    lines = [f"{args.model} {scheme.label}, prompts of {results['tokens_mean']:.1f} tokens "
             f"({min(tokens)}-{max(tokens)}); median {args.clock} ms per step over {args.rounds} rounds of {args.steps}",
             f"{'block':>5} {'thr':>3} " + " ".join(f"{m:>16}" for m in args.modes)]
    for index, per_thread in results["blocks"].items():
        for threads, r in per_thread.items():
            lines.append(f"{index:>5} {threads:>3} " + " ".join(f"{r['median_ms'][m]:>16.2f}" for m in args.modes))
    for threads in map(str, args.threads):
        mean = {m: statistics.mean(results["blocks"][str(b)][threads]["median_ms"][m] for b in args.blocks)
                for m in args.modes}
        for label, mal, ben in (("before", "malicious-before", "benign-before"),
                                ("dense", "malicious-dense", "benign-dense"), ("now", "malicious", "benign")):
            if mal in mean and ben in mean:
                minutes = recipe_minutes(mean, 200, n_blocks, 0.75, mal, ben)
                results.setdefault("recipe_minutes", {}).setdefault(threads, {})[label] = round(minutes, 1)
                lines.append(f"full recipe block steps ({threads} thread(s), mean of the blocks above, {label}): "
                             f"{minutes:.1f} min")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
