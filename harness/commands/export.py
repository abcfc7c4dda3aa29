"""`safequant export`: write a saved variant in a deployable format (harness/variant_export.py)."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from harness.variant_export import export_variant

    record = export_variant(args.variant_dir, args.format, args.out, overwrite=args.overwrite)
    detail = ", ".join(f"{n} {t}" for t, n in sorted(record.get("tensor_types", {}).items()))
    error = record.get("max_relative_error")
    print(f"exported {record['variant']['method']} {record['variant']['scheme']} as {args.format} to {args.out}"
          + (f" ({detail}; largest relative weight change {error:.2e})" if detail else ""))
    print(f"audit it against the simulation: safequant audit --model {record['variant']['source_model'].get('spec') or 'MODEL'} "
          f"--variants sim={args.variant_dir} shipped={args.out} --pairs shipped=sim")
    return 0


def register(sub) -> None:
    from harness.variant_export import FORMATS

    p = sub.add_parser("export", help="write a saved variant in a deployable format (hf, gguf, compressed-tensors)",
                       description="Write the variant folder saved by `safequant quantize` as a plain Hugging Face "
                                   "folder (de-quantized weights), a GGUF file (Q4_0/Q8_0 blocks holding the "
                                   "variant's own grid) or a pack-quantized compressed-tensors folder. Variants a format cannot represent (activation or KV-cache "
                                   "quantization, online transforms; asymmetric weights in GGUF) are refused with "
                                   "the reason.")
    p.add_argument("variant_dir", metavar="VARIANT_DIR", help="folder written by `safequant quantize`")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf (plain de-quantized folder), gguf (Q4_0/Q8_0) or compressed-tensors (pack-quantized)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.set_defaults(func=cmd_export)
