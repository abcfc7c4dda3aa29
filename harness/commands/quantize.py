"""`safequant quantize`: quantize one model with one method and save the variant folder.

The folder (safetensors + variant.json, see quantizers/artifact.py) is what `safequant audit
--variants NAME=DIR` and `safequant probe --variant NAME=DIR` evaluate without re-calibrating.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from harness.errors import UserError


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """The ``--calib-*`` and ``--ablate-layer`` options, shared by `quantize` and `audit`."""
    from harness.calibration_data import CalibrationOptions

    d = CalibrationOptions()
    g = p.add_argument_group("calibration (methods that need data: gptq, smoothquant, quarot, ost, aaq, qrealign)")
    g.add_argument("--calib-text", metavar="SOURCE",
                   help="calibration text: a UTF-8 file, dataset:ID[:CONFIG]:SPLIT, toy-pretrain, or chat:calibration "
                        "(benign built-in calibration requests in the chat template, answered by the model itself; "
                        "chat:FILE for another prompt file) (default auto: toy-pretrain for bundled toy models, "
                        "WikiText-2 train through datasets otherwise)")
    g.add_argument("--calib-samples", type=int, metavar="N", help=f"calibration sequences (default {d.samples})")
    g.add_argument("--calib-len", type=int, metavar="TOKENS", help=f"tokens per calibration sequence (default {d.length})")
    g.add_argument("--calib-batch", type=int, metavar="N", help=f"sequences per calibration batch (default {d.batch})")
    g.add_argument("--calib-span", metavar="START:END",
                   help="use only this fraction of the calibration text, e.g. 0.4:1 to keep it apart from an "
                        f"evaluation text taken from the same file (default {d.span})")
    g.add_argument("--calib-prompts", metavar="SET",
                   help="labelled harmful/benign prompts for prompt-based calibration (Q-realign, --base ablated): "
                        f"'calibration' (built-in, disjoint from every evaluation set) or a prompt file (default {d.prompts})")
    g.add_argument("--allow-calibration-overlap", dest="allow_overlap", action="store_true", default=None,
                   help="evaluate even when evaluation prompts are also calibration prompts (not recommended)")
    g.add_argument("--probe-model", metavar="M",
                   help="aligned model whose SLR probes Q-realign uses: a model, or 'subject' (default auto: the known "
                        "aligned parent of a bundled model, e.g. toy-chat for toy-chat-eroded, else the subject)")
    g.add_argument("--ablate-layer", type=int, metavar="L",
                   help="with --base ablated: take the refusal direction at this decoder layer "
                        "(default: the layer whose ablation removes the most refusal)")


def calibration_options(args: argparse.Namespace, base=None):
    """CalibrationOptions from parsed ``--calib-*`` flags over ``base`` (defaults when None)."""
    from dataclasses import replace

    from harness.calibration_data import CalibrationOptions

    calib = base or CalibrationOptions()
    given = {"text": args.calib_text, "samples": args.calib_samples, "length": args.calib_len, "batch": args.calib_batch,
             "span": args.calib_span, "prompts": args.calib_prompts, "allow_overlap": args.allow_overlap}
    calib = replace(calib, **{k: v for k, v in given.items() if v is not None})
    for name, value in (("--calib-samples", calib.samples), ("--calib-len", calib.length), ("--calib-batch", calib.batch)):
        if value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
    return calib


def cmd_quantize(args: argparse.Namespace) -> int:
    import time

    from harness.config import parse_options
    from harness.models import load_model, resolve_model, unaligned_base
    from harness.quantize import (check_calibration_inputs, check_context, quantize_variant, resolve_base,
                                  resolve_probe_model)
    from harness.store import check_writable
    from quantizers import QuantizerError, QuantScheme, build_quantizer, get_quantizer
    from quantizers.artifact import save_variant

    # Validate everything before loading a model.
    options = parse_options(args.option or [], "--option ", " (e.g. --option alpha=0.5)")
    try:
        quantizer = build_quantizer(args.method, options)
        scheme = QuantScheme.parse(args.scheme)
        quantizer.check(scheme)
    except QuantizerError as exc:
        raise UserError(f"--method {args.method} --scheme {args.scheme}: {exc}") from None
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    check_writable(out)  # a parent that is a file or a read-only folder fails now, not after quantizing
    calib = calibration_options(args)
    source = resolve_model(args.model)
    cls = get_quantizer(args.method)
    base_spec = args.base
    if base_spec == "auto":
        base_spec = unaligned_base(source.spec) if cls.needs_base_model else None
    if base_spec and base_spec.lower() == "none":
        base_spec = None
    if cls.needs_base_model and not base_spec:
        raise UserError(f"--method {args.method} needs the unaligned base model: pass --base MODEL or --base ablated")
    if base_spec and base_spec.lower() != "ablated":
        resolve_model(base_spec)
    check_calibration_inputs(calib, source.kind, args.seed, text=cls.requires_calibration,
                             prompts=cls.uses_calibration_prompts or (cls.needs_base_model and (base_spec or "").lower() == "ablated"))

    started = time.perf_counter()
    subject = load_model(source, args.device, args.dtype, args.trust_remote_code)
    check_context(calib, subject.model, text=cls.requires_calibration)
    base = resolve_base(base_spec if cls.needs_base_model else None, subject, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, calib=calib, ablate_layer=args.ablate_layer)
    probe_model = None
    if cls.uses_calibration_prompts:
        probe_model = resolve_probe_model(args.probe_model or "auto", subject, device=args.device, dtype=args.dtype,
                                          trust_remote_code=args.trust_remote_code)
    variant = quantize_variant(args.method, scheme, options, subject, base, calib, args.seed, probe_model=probe_model)
    record = variant.record
    path = save_variant(
        variant.model, out, tokenizer=subject.tokenizer, method=args.method, scheme=scheme,
        options=record["options"], metadata=record["metadata"], source=record["source_model"],
        calibration=record["calibration"], seconds=variant.seconds, overwrite=args.overwrite,
        extra={"calibration_prompts": record["calibration_prompts"], "base": record["base"],
               "command": shlex.join(["safequant", *sys.argv[1:]]), "seed": args.seed},
    )
    print(f"{args.method} {scheme.label}: quantized {subject.source.spec} in {variant.seconds:.1f} s "
          f"(total {time.perf_counter() - started:.1f} s)")
    for stage in _calibration_logs(record["metadata"]):
        last = {k: v[-1] for k, v in stage.get("curves", {}).items() if v}
        early = f", stopped early: {stage['stopped_early']}" if stage.get("stopped_early") else ""
        print(f"  {stage.get('stage', 'calibration')}: {stage.get('steps_run')} steps, last "
              + ", ".join(f"{k}={v:.4g}" for k, v in last.items()) + early)
    print(f"saved: {path}")
    return 0


def _calibration_logs(metadata: dict) -> list[dict]:
    """CalibrationLog dicts found anywhere in a quantizer's metadata (one level deep)."""
    found = []
    for value in (metadata or {}).values():
        items = value if isinstance(value, list) else [value]
        found += [v for v in items if isinstance(v, dict) and "curves" in v and "steps_run" in v]
    return found


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model with one method and save the variant folder",
                       description="Quantize --model with --method at --scheme and save safetensors + variant.json "
                                   "to --out; audit it later with `safequant audit --variants NAME=DIR`.")
    p.add_argument("--model", default="toy-chat", help="subject (FT) model: bundled name, local folder, .gguf or hub id "
                                                       "(default toy-chat)")
    p.add_argument("--base", default="auto",
                   help="unaligned base (PT) model for methods that need one (aaq): a model, 'ablated' (build it from "
                        "--model by refusal-direction ablation) or 'none' (default auto: the bundled model's base, e.g. toy-base for toy-chat, smol-base for smol-chat)")
    p.add_argument("--method", required=True, help="quantizer name (see `safequant list`)")
    p.add_argument("--scheme", default="w4a4kv4", help="quantization scheme, e.g. w8a8, w4a16g128, w4a4kv4-aasym-aclip0.9 "
                                                      "(default w4a4kv4)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="quantizer option (repeatable, or comma-separated)")
    p.add_argument("--out", required=True, metavar="DIR", help="variant folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_calibration_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and the method (default 0)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    p.set_defaults(func=cmd_quantize)
