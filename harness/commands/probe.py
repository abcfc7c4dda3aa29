"""`safequant probe`: where in the network harmful and benign requests are told apart, and how much
quantization moved that boundary (per-layer SLR probes, separability, probe transfer, 2D maps).

This module is the glue between the harness (models, prompt sets, chat template, quantizer
registry) and the `probes` package, which never imports `harness`.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from harness.commands.variant_args import add_variant_args
from harness.errors import UserError

log = logging.getLogger(__name__)

_ROLE_PREFIX = re.compile(r"^\s*(harmful|benign|overrefusal)\s*=")


def load_labelled(spec: str, want: str, columns: str | None, limit: int | None):
    """Records of prompt set `spec` whose label is `want` (harmful|benign), first `limit` of them.

    A mixed file such as XSTest keeps its per-prompt labels: given as --benign, only its safe
    prompts are used (the others are dropped and counted in the log).
    """
    from harness.prompts import load_prompt_set, parse_column_map

    role = None if _ROLE_PREFIX.match(spec) else want
    pset = load_prompt_set(spec, parse_column_map(columns), role=role)
    kept = [r for r in pset.records if r.label == want]
    dropped = len(pset.records) - len(kept)
    if dropped:
        log.info("prompt set %s: using its %d %s prompts, leaving out %d labelled otherwise",
                 pset.name, len(kept), want, dropped)
    if not kept:
        raise UserError(f"prompt set {spec!r} has no prompts labelled {want}; pass a {want} set to --{want}")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be a positive integer, got {limit}")
        kept = kept[:limit]
    return pset, kept


def parse_variants(texts: list[str]):
    from harness.config import parse_variant

    specs = [parse_variant(t) for t in texts]
    specs = [s for s in specs if s.method != "fp"]  # fp is always the reference
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1 or n == "fp"})
    if dupes:
        raise UserError(f"variant name(s) {dupes} used twice (fp is the reference): name them, e.g. a=rtn:w4a4")
    return specs


def cmd_probe(args: argparse.Namespace) -> int:
    import json

    from harness import quantize as variant_maker
    from harness.commands.variant_args import variant_settings
    from harness.generation import chat_prompt
    from harness.models import load_model, resolve_model
    from harness.store import check_writable
    from probes.capture import check_layer_spec
    from probes.errors import ProbeError
    from probes.slr import check_classes
    from probes.suite import ProbeSettings, run_probe_suite
    from reports.atomic import atomic_write

    # Validate everything before loading a model, the variants' needs included (base model,
    # calibration data, calibration prompts that are also probe prompts).
    specs = parse_variants(args.variant or [])
    hset, harmful = load_labelled(args.harmful, "harmful", args.harmful_columns, args.limit)
    bset, benign = load_labelled(args.benign, "benign", args.benign_columns, args.limit)
    labels = [1] * len(harmful) + [0] * len(benign)
    import numpy as np

    try:
        check_classes(np.asarray(labels), what=f"--harmful {args.harmful} / --benign {args.benign}")
        for spec in (args.layers, args.map_layers):  # syntax now; the range once the model is loaded
            check_layer_spec(spec)
        settings = ProbeSettings(
            layers=args.layers, position=args.position, C=args.C, max_iter=args.max_iter,
            standardize=args.standardize, test_size=args.test_size, seed=args.seed, batch_size=args.batch_size,
            max_tokens=args.max_tokens, map_method=args.map_method, map_layers=args.map_layers,
            max_map_layers=args.max_map_layers, figure_formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
            figures=args.figures, stream=args.stream, progress=not args.quiet)
    except ProbeError as exc:
        raise UserError(str(exc)) from None
    out = Path(args.out)
    check_writable(out)
    source = resolve_model(args.model)
    evaluation = [(hset.name, r.id, r.prompt) for r in harmful] + [(bset.name, r.id, r.prompt) for r in benign]
    # The probe prompts' system prompt is the one a prompt-calibrated variant (Q-realign) calibrates with.
    maker = variant_maker.check(specs, source, variant_settings(args, system_prompt=args.system_prompt),
                                evaluation=evaluation)

    import torch

    torch.manual_seed(args.seed)
    loaded = load_model(source, args.device, args.dtype, args.trust_remote_code)
    maker.check_loaded(loaded)
    maker.prepare(loaded)
    tok = loaded.tokenizer
    prompts = [chat_prompt(tok, r.prompt, args.system_prompt) for r in (*harmful, *benign)]
    ids = [f"{hset.name}/{r.id}" for r in harmful] + [f"{bset.name}/{r.id}" for r in benign]
    records: dict[str, dict] = {}

    def builder(spec):
        def build():
            log.info("variant %s: %s (%s, %s)", spec.name, "loading" if spec.artifact else "quantizing",
                     spec.method, spec.scheme.label)
            variant = maker.make(spec, loaded)
            records[spec.name] = variant.record
            return variant.model
        return build

    out.mkdir(parents=True, exist_ok=True)
    result = run_probe_suite(loaded.model, {s.name: builder(s) for s in specs}, tok, prompts, labels,
                             out_dir=out, reference="fp", ids=ids, subdir="", settings=settings)
    if records:  # how each variant was made: the record variant.json and the audit summary carry
        atomic_write(out / "variants.json", json.dumps(records, indent=1, default=str) + "\n")
    print(format_table(result))
    print(f"\nprobe results: {out}  (layers.csv, layers.json, probe_summary.json, probes_*.safetensors, figures"
          + (", variants.json)" if records else ")"))
    return 0


def format_table(result: dict) -> str:
    """Per-layer table printed at the end: accuracy, AUROC, separability, transfer drop."""
    lines = [["variant", "layer", "acc", "auroc", "nonzero", "fisher", "dprime", "FP-probe acc", "drop"]]
    for v in result["variants"]:
        for r in v["layers"]:
            lines.append([v["name"], str(r["layer"]), _fmt(r["accuracy"]), _fmt(r["auroc"]), str(r["nonzero"]),
                          _fmt(r["fisher"], 4), _fmt(r["dprime"], 2), _fmt(r["transfer_accuracy"]),
                          "" if v["is_reference"] else _fmt(r["transfer_drop"], 3, signed=True)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    text = "\n".join("  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)
    best = "; ".join(f"{v['name']}: best layer {v['best_layer']} (acc {_fmt(v['best_accuracy'])}), "
                     f"capture {v['capture_seconds']:.1f} s, fit {v['fit_seconds']:.1f} s" for v in result["variants"])
    return text + "\n" + best


def _fmt(x, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def register(sub) -> None:
    p = sub.add_parser(
        "probe", help="per-layer SLR probes: where harmful and benign prompts separate, and what quantization moved",
        description="Capture hidden states of every decoder layer for harmful and benign prompts (chat template "
                    "applied), fit a sparse logistic-regression probe per layer on the FP model, measure Fisher "
                    "separability, apply the FP probe unchanged to each quantized variant, and draw 2D maps. "
                    "Example: safequant probe --model toy-chat --variant rtn:w4a4 --harmful harmful --benign benign")
    p.add_argument("--model", default="toy-chat", help="bundled name, local folder, .gguf file or hub id (default toy-chat)")
    p.add_argument("--variant", action="extend", nargs="+", metavar="VARIANT",
                   help="quantized variants as [NAME=]METHOD[:SCHEME][:OPT=VAL,...], e.g. rtn:w4a4 (repeatable); "
                        "the FP model is always the reference")
    p.add_argument("--harmful", default="harmful", metavar="SET",
                   help="harmful prompts: built-in set name or a .jsonl/.csv/.parquet file (default: harmful)")
    p.add_argument("--benign", default="benign", metavar="SET",
                   help="benign prompts; a mixed file (e.g. XSTest) contributes its safe prompts (default: benign)")
    p.add_argument("--harmful-columns", metavar="MAP", help="column mapping for the harmful file, e.g. prompt=goal")
    p.add_argument("--benign-columns", metavar="MAP", help="column mapping for the benign file")
    p.add_argument("--limit", type=int, help="use the first N prompts of each class")
    p.add_argument("--layers", default="all", help="decoder layers: all, 0,2,5, 4-10 or -1 (default all)")
    p.add_argument("--position", choices=("last", "mean"), default="last",
                   help="last prompt token (default, as Q-realign) or the mean over prompt tokens")
    p.add_argument("--out", default="runs/probe", metavar="DIR", help="output directory (default runs/probe)")
    p.add_argument("--map-method", choices=("pca", "lda", "tsne"), default="pca", help="2D map method (default pca)")
    p.add_argument("--map-layers", help="layers drawn as 2D maps (default: up to --max-map-layers, evenly spaced "
                                        "plus the best FP layer)")
    p.add_argument("--max-map-layers", type=int, default=4, help="how many layers to map by default (default 4)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="fit probes on raw activations (the paper's setting) instead of z-scored ones")
    p.add_argument("--C", type=float, default=1.0, help="inverse L1 strength of the probes (default 1.0)")
    p.add_argument("--max-iter", type=int, default=500, help="saga iterations (default 500)")
    p.add_argument("--test-size", type=float, default=0.2, help="held-out share of the stratified split (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the probes and the maps (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("--max-tokens", type=int, help="keep only the last N tokens of longer prompts")
    p.add_argument("--system-prompt", help="system prompt in the chat template (default none)")
    p.add_argument("--formats", default="svg,png", help="figure formats, comma-separated: svg, png, pdf (default svg,png)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="skip the figures")
    p.add_argument("--stream", action="store_true",
                   help="stream activations to .npy files under DIR/activations (large models; removed at the end)")
    add_variant_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    p.add_argument("--quiet-progress", dest="quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_probe)
