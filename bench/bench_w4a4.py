"""W4A4 quality table for SmolLM2-135M-Instruct: WikiText-2 perplexity of each quantization method.

Prints a markdown table (FP, RTN W8A8/W4A16, GPTQ W4A16, and at W4A4KV4: RTN, GPTQ, SmoothQuant,
QuaRot with RTN and GPTQ weights, OST+GPTQ, AAQ+GPTQ) with each row's ratio to FP, quantization
wall time and peak resident memory during quantization, plus the targets of W4A4.md
(PASS/MISS). Methods not registered in this checkout print "not available".

Evaluation: the first ``--eval-tokens`` tokens of ``/work/shared/data/wikitext2_test.raw`` in
non-overlapping windows of ``--window``. WikiText-2 *train* is not available offline, so
calibration windows are drawn (seeded, fingerprinted: harness.calibration_data) from the last 60%
of the characters of the same test file, which the evaluation never reaches (checked).

    OMP_NUM_THREADS=1 python bench/bench_w4a4.py --methods fp rtn-w4a16 gptq-w4a16 --eval-tokens 4096

It takes many minutes on a CPU (each W4A4 method runs twice by default: plain ``w4a4kv4`` and
``w4a4kv4-aasym-aclip0.9``; narrow with ``--schemes``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

WIKITEXT = Path("/work/shared/data/wikitext2_test.raw")
CALIB_SPAN = (0.4, 1.0)


@dataclass(frozen=True)
class Row:
    """One table row: ``method`` is a registered quantizer name, ``weights`` its weight rounding."""

    key: str
    method: str
    weights: str = "rtn"
    w4a4: bool = True  # evaluated at every --schemes entry; else at ``scheme``
    scheme: str = ""
    target: tuple[str, float] | None = None  # (">=" or "<=", ratio to FP)
    options: dict = field(default_factory=dict)


ROWS = [
    Row("fp", "fp", weights="-", w4a4=False, scheme="fp"),
    Row("rtn-w8a8", "rtn", w4a4=False, scheme="w8a8"),
    Row("rtn-w4a16", "rtn", w4a4=False, scheme="w4a16"),
    Row("gptq-w4a16", "gptq", weights="gptq", w4a4=False, scheme="w4a16"),
    Row("rtn", "rtn", target=(">=", 100.0)),
    Row("gptq", "gptq", weights="gptq"),
    Row("smoothquant", "smoothquant"),
    Row("quarot", "quarot"),
    Row("quarot-gptq", "quarot", weights="gptq", target=("<=", 2.0)),
    Row("ost-gptq", "ost", weights="gptq", target=("<=", 1.3)),
    Row("aaq-gptq", "aaq", weights="gptq"),
]
#: Option names a transform method may use to pick its weight rounding (first found is used).
WEIGHT_OPTIONS = ("weights", "weight_method", "weight_quantizer")
STEP_OPTIONS = ("steps", "epochs", "iterations")


class PeakRSS:
    """Samples this process's resident set size in a background thread (max RSS of the process
    is monotonic, so it cannot give one row's peak)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _options_for(row: Row, cls, steps: int | None) -> dict | str:
    """The row's options for quantizer ``cls``, or a reason it cannot run."""
    names = cls.option_names()
    opts = dict(row.options)
    name = next((n for n in WEIGHT_OPTIONS if n in names), None)
    if row.weights == "gptq" and row.method != "gptq" and name is None:
        return f"not available ({row.method} has no GPTQ weight option)"
    if name is not None and row.weights in ("rtn", "gptq"):
        # explicit in both directions: a method's "auto" would pick GPTQ whenever calibration data exists
        opts[name] = row.weights
    if steps is not None:
        name = next((n for n in STEP_OPTIONS if n in names), None)
        if name is not None:
            opts[name] = steps
    return opts


def load_base(spec: str, subject: str, model, tokenizer):
    """AAQ's unaligned reference (PT) for ``--base``; says which one on stdout."""
    from harness.models import load_model, unaligned_base

    name = unaligned_base(subject) if spec == "auto" else spec
    if name is None or name == "ablated":
        from harness.ablation import ablate_refusal

        print(f"- AAQ base: {subject} with its refusal direction ablated", flush=True)
        return ablate_refusal(model, tokenizer).model
    print(f"- AAQ base: {name}", flush=True)
    return load_model(name, device="cpu").model


def with_fp_prefix(scheme: str, n: int) -> str:
    """``scheme`` with ``-fpprefix<n>`` added where it quantizes activations or KV (the attention
    sink kept in full precision: quantizers.fp_prefix); unchanged for n = 0 or weight-only schemes."""
    from quantizers.scheme import QuantScheme

    parsed = QuantScheme.parse(scheme)
    if n == 0 or not (parsed.quantizes_activations or parsed.quantizes_kv):
        return scheme
    return parsed.replace(fp_prefix=n).label


def _status(target, ratio: float) -> str:
    if target is None:
        return ""
    op, bound = target
    ok = ratio >= bound if op == ">=" else ratio <= bound
    return f"{'PASS' if ok else 'MISS'} ({op} {bound:g}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    keys = [r.key for r in ROWS]
    parser.add_argument("--methods", nargs="+", default=keys, choices=keys, metavar="ROW",
                        help=f"rows to run (default all): {' '.join(keys)}")
    parser.add_argument("--schemes", nargs="+", default=["w4a4kv4", "w4a4kv4-aasym-aclip0.9"],
                        help="schemes of the W4A4 rows (default: w4a4kv4 and w4a4kv4-aasym-aclip0.9)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens (default 16384)")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (default 512)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of learned methods (default: theirs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--text", default=str(WIKITEXT), help="WikiText-2 test file")
    parser.add_argument("--fp-prefix", type=int, default=0, metavar="N",
                        help="add -fpprefixN to every scheme that quantizes activations or KV, and apply it to the "
                             "--saved folders: the first N tokens of every window (the attention sink) keep "
                             "full-precision activations and KV entries (default 0: as the schemes say)")
    parser.add_argument("--base", default="auto",
                        help="AAQ's unaligned reference: a model, `ablated` (the subject with its refusal "
                             "direction ablated), or `auto` (the bundled base of --model, e.g. smol-base for "
                             "smol-chat; ablated where it has none)")
    parser.add_argument("--saved", nargs="*", default=[], metavar="DIR",
                        help="also score these `safequant quantize` folders (after the rows, same evaluation)")
    args = parser.parse_args(argv)
    from quantizers.artifact import is_variant_dir

    not_saved = [d for d in args.saved if not is_variant_dir(d)]
    if not_saved or args.fp_prefix < 0:
        what = (f"--saved {not_saved[0]!r} is not a `safequant quantize` folder (no variant.json): pass one"
                if not_saved else f"--fp-prefix {args.fp_prefix} must be >= 0")
        print(f"error: {what}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from harness.calibration_data import CalibrationSpec, load_calibration
    from harness.models import load_model
    from harness.perplexity import PerplexitySettings, load_text

    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    text = load_text(args.text)
    settings = PerplexitySettings(source=args.text, window=args.window, stride=args.window,
                                  max_tokens=args.eval_tokens, batch_size=4)
    eval_ids = tok(text[: args.eval_tokens * 16], add_special_tokens=False, verbose=False)["input_ids"][: args.eval_tokens]
    eval_chars = len(tok.decode(eval_ids))
    if eval_chars >= CALIB_SPAN[0] * len(text):
        print(f"error: {args.eval_tokens} evaluation tokens reach into the calibration span; use fewer", file=sys.stderr)
        return 2
    calib = None
    needs_calib = any(r.key in args.methods and r.method != "fp" and (r.weights == "gptq" or r.method not in ("rtn",))
                      for r in ROWS)
    if needs_calib:
        calib = load_calibration(CalibrationSpec(args.text, n_samples=args.calib_samples, seq_len=args.calib_len,
                                                 batch_size=4, seed=0, span=CALIB_SPAN), tok)

    print(f"# W4A4 bench: {args.model} (fp32, CPU, {args.threads} thread(s))\n")
    print(f"- evaluation: first {len(eval_ids)} tokens ({eval_chars} characters) of {args.text}, "
          f"windows of {args.window}, non-overlapping")
    if calib is not None:
        d = calib.describe()
        print(f"- calibration: {d['n_samples']} x {d['seq_len']} tokens drawn from the last 60% of the characters "
              f"of the same file (WikiText-2 train is not available offline; disjoint from the evaluation text), "
              f"fingerprint {d['fingerprint']}")
    if args.fp_prefix:
        print(f"- fpprefix{args.fp_prefix}: the first {args.fp_prefix} token(s) of every window keep full-precision "
              "activations and KV entries (quantizers.fp_prefix; --saved folders too)")
    print(f"- W4A4 schemes: {', '.join(args.schemes)}; targets from W4A4.md: RTN W4A4 >= 100x FP, "
          "QuaRot+GPTQ <= 2x FP, OST+GPTQ <= 1.3x FP\n")
    header = "| method | weights | scheme | perplexity | x FP | quantize s | peak RSS GiB | target |"
    print(header + "\n|---|---|---|---:|---:|---:|---:|---|", flush=True)

    return _run_rows(args, model, tok, text, settings, calib)


def _run_rows(args: argparse.Namespace, model, tok, text: str, settings, calib) -> int:
    """Quantize and score every chosen row, then the ``--saved`` folders; one table line each."""
    from harness.perplexity import perplexity
    from quantizers import QuantContext, available_quantizers, build_quantizer, get_quantizer

    available = set(available_quantizers())
    base_model = None
    fp_ppl = None
    for row in (r for r in ROWS if r.key in args.methods or (r.key == "fp")):
        schemes = [with_fp_prefix(s, args.fp_prefix) for s in (args.schemes if row.w4a4 else [row.scheme])]
        for scheme in schemes:
            line = f"| {row.method} | {row.weights} | {scheme} |"
            if row.method not in available:
                out = f"{line} not available | | | | {'MISS (not run)' if row.target else ''} |"
                print(out, flush=True)
                continue
            cls = get_quantizer(row.method)
            opts = _options_for(row, cls, args.steps)
            if isinstance(opts, str):
                out = f"{line} {opts} | | | | |"
                print(out, flush=True)
                continue
            if cls.needs_base_model and base_model is None:
                base_model = load_base(args.base, args.model, model, tok)
            ctx = QuantContext(tokenizer=tok, calibration_batches=calib.batches if calib else None,
                               reference_model=model, base_model=base_model, seed=0)
            subject = copy.deepcopy(model)
            with PeakRSS() as mem:
                started = time.perf_counter()
                quantized = build_quantizer(row.method, opts).apply(subject, scheme, ctx)
                seconds = time.perf_counter() - started
            ppl = perplexity(quantized, tok, text, settings, progress=False)["perplexity"]
            if row.key == "fp":
                fp_ppl = ppl
            ratio = ppl / fp_ppl if fp_ppl else float("nan")
            out = (f"{line} {ppl:.3f} | {ratio:.3f} | {seconds:.1f} | {mem.peak / 2**30:.2f} | "
                   f"{_status(row.target, ratio)} |")
            print(out, flush=True)
            del subject, quantized
    for folder in args.saved:
        from quantizers.artifact import load_variant

        saved, _, info = load_variant(folder)
        if args.fp_prefix:
            from quantizers.fp_prefix import enable_fp_prefix

            enable_fp_prefix(saved, args.fp_prefix)
            info["scheme"] = with_fp_prefix(info["scheme"], args.fp_prefix)
        ppl = perplexity(saved, tok, text, settings, progress=False)["perplexity"]
        ratio = ppl / fp_ppl if fp_ppl else float("nan")
        print(f"| {info['method']} (saved: {folder}) | {info['options'].get('weights', '-')} | {info['scheme']} | "
              f"{ppl:.3f} | {ratio:.3f} | {info.get('seconds') or 0:.1f} | | |", flush=True)
        del saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
