"""`safequant quantize`: quantize one model with one method and save the variant folder.

The folder (safetensors + variant.json, see quantizers/artifact.py) is what `safequant audit
--variants NAME=DIR` and `safequant probe --variant NAME=DIR` evaluate without re-calibrating.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from harness.commands.variant_args import add_variant_args
from harness.errors import UserError


def cmd_quantize(args: argparse.Namespace) -> int:
    import time

    from harness import quantize as maker
    from harness.commands.variant_args import variant_settings
    from harness.config import VariantSpec, parse_options
    from harness.models import load_model, resolve_model
    from harness.store import check_writable
    from quantizers import QuantizerError, QuantScheme, build_quantizer
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
    source = resolve_model(args.model)
    spec = VariantSpec(f"{quantizer.name}-{scheme.label}", quantizer.name, scheme, options)
    variants = maker.check([spec], source, variant_settings(args))

    started = time.perf_counter()
    subject = load_model(source, args.device, args.dtype, args.trust_remote_code)
    variants.check_loaded(subject)
    variants.prepare(subject)
    command = shlex.join(["safequant", *sys.argv[1:]])
    if quantizer.writes_artifact:  # a library's own format (llm-compressor): its folder is the product
        return _save_artifact(variants, spec, subject, out, command, args.seed, started)
    # the subject is not needed after this: quantized in place where the method allows it
    variant = variants.make(spec, subject, consume_subject=True)
    record = variant.record
    path = save_variant(
        variant.model, out, tokenizer=subject.tokenizer, method=args.method, scheme=scheme,
        options=record["options"], metadata=record["metadata"], source=record["source_model"],
        calibration=record["calibration"], seconds=variant.seconds, overwrite=args.overwrite,
        extra={"calibration_prompts": record["calibration_prompts"], "base": record["base"],
               "command": command, "seed": args.seed},
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


def _save_artifact(variants, spec, subject, out: Path, command: str, seed: int, started: float) -> int:
    """Quantize with a method that saves its own format (``writes_artifact``) straight into
    ``out`` (atomically), with what made it in ``safequant_quantize.json``; the folder is then
    audited as a third-party artifact (`--variants NAME=DIR`, harness/artifacts.py)."""
    import time

    from common.files import atomic_folder, atomic_write_json
    from harness.artifacts import MADE_BY_FILE, describe_artifact

    with atomic_folder(out) as folder:
        variant = variants.make(spec, subject, consume_subject=True, artifact_dir=str(folder))
        record = variant.record
        atomic_write_json(folder / MADE_BY_FILE, {
            **{k: record[k] for k in ("method", "scheme", "options", "metadata", "calibration", "source_model",
                                      "seconds")}, "command": command, "seed": seed})
    quantization = describe_artifact(str(out))["quantization"]
    print(f"{spec.method} {spec.scheme.label}: quantized {subject.source.spec} in {variant.seconds:.1f} s "
          f"(total {time.perf_counter() - started:.1f} s); saved {quantization['type']} "
          f"({quantization['scheme']})")
    print(f"saved: {out} (audit it with --variants NAME={out})")
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
    p.add_argument("--method", required=True, help="quantizer name (see `safequant list`)")
    p.add_argument("--scheme", default="w4a4kv4", help="quantization scheme, e.g. w8a8, w4a16g128, w4a4kv4-aasym-aclip0.9 "
                                                      "(default w4a4kv4)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="quantizer option (repeatable, or comma-separated)")
    p.add_argument("--out", required=True, metavar="DIR", help="variant folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_variant_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and the method (default 0)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    p.set_defaults(func=cmd_quantize)
