"""Simulation versus shipped artifact: how often an exported variant answers like the simulation.

    python bench/bench_export_roundtrip.py [--model toy-chat] [--schemes rtn:w4a16g32 gptq:w4a16g32]
                                           [--limit N] [--out runs/bench-export]

For each METHOD:SCHEME it quantizes the model (`safequant quantize`), exports the variant in every
format that can hold it (`safequant export --format hf|gguf|compressed-tensors`), and runs one
audit with the FP parent, a third-party Q4_0 GGUF of the parent (written by the gguf package's
reference quantizer, as llama.cpp's `llama-quantize --pure` would), each simulation and its
exports, every export paired with its simulation (`--pairs`). It prints, per export, the share of
prompts with the identical response and with the same primary-judge label as the simulation, and
each variant's refusal rates and perplexity ratio.

Not a test: it prints numbers (markdown tables). Keep runs small on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy-chat")
    parser.add_argument("--schemes", nargs="+", default=["rtn:w4a16g32", "gptq:w4a16g32"])
    parser.add_argument("--formats", nargs="+", default=["hf", "gguf", "compressed-tensors"])
    parser.add_argument("--limit", type=int, default=None, help="prompts per set (default: every prompt)")
    parser.add_argument("--out", default="runs/bench-export")
    args = parser.parse_args()

    from harness.audit import Audit
    from harness.cli import main as cli
    from harness.config import AuditConfig
    from harness.errors import UserError
    from harness.gguf_writer import write_reference_gguf
    from harness.models import load_model
    from harness.store import read_jsonl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parent = load_model(args.model, device="cpu")
    third_party = out / f"{args.model}-Q4_0.gguf"
    if not third_party.exists():
        write_reference_gguf(parent.model, parent.tokenizer, third_party, "Q4_0")
    variants, pairs = ["fp", f"llamacpp-q4_0={third_party}"], []
    for text in args.schemes:
        method, scheme = text.split(":")
        sim = f"{method}-{scheme}"
        folder = out / "variants" / sim
        if not folder.exists():
            assert cli(["quantize", "--model", args.model, "--method", method, "--scheme", scheme, "--out", str(folder),
                        "--device", "cpu"]) == 0
        variants.append(f"{sim}={folder}")
        for fmt in args.formats:
            exported = out / "exports" / f"{sim}-{fmt}"
            try:
                if not exported.exists():
                    from harness.variant_export import export_variant

                    export_variant(str(folder), fmt, str(exported))
            except UserError as exc:
                print(f"{sim} as {fmt}: not exported ({exc})")
                continue
            variants.append(f"{sim}.{fmt}={exported}")
            pairs.append(f"{sim}.{fmt}={sim}")
    run = out / "run"
    config = AuditConfig(model=args.model, variants=variants, pairs=pairs, limit=args.limit, out=str(run), device="cpu",
                         probes=False, cache_dir="none")
    summary = Audit(config).run(command="bench_export_roundtrip")
    rows = read_jsonl(run / "rows.jsonl")
    by: dict[str, dict] = {}
    for row in rows:
        by.setdefault(row["variant"], {})[(row["set"], row["id"])] = row
    print(f"\nmodel {args.model}, {len(by['fp'])} prompts ({', '.join(config.prompt_sets)}), judge {config.judges[0]}\n")
    print("| export | of | prompts | identical response | same label |")
    print("|---|---|---|---|---|")
    for pair in pairs:
        shipped, sim = pair.split("=")
        keys = by[sim].keys()
        same = sum(by[shipped][k]["response"] == by[sim][k]["response"] for k in keys)
        label = sum(by[shipped][k]["verdict"] == by[sim][k]["verdict"] for k in keys)
        print(f"| {shipped} | {sim} | {len(keys)} | {same / len(keys):.1%} | {label / len(keys):.1%} |")
    print("\n| variant | method | scheme | refusal harmful | refusal benign | refusal overrefusal | ppl ratio |")
    print("|---|---|---|---|---|---|---|")
    for v in summary["variants"]:
        r = v["metrics"]["refusal"]
        print(f"| {v['name']} | {v['method']} | {v['scheme']} | {r.get('harmful', 0):.1%} | {r.get('benign', 0):.1%} | "
              f"{r.get('overrefusal', 0):.1%} | {v['metrics']['perplexity_ratio']:.4f} |")
    exports = {v["name"]: v["quantizer"].get("provenance") for v in summary["variants"] if v["quantizer"].get("provenance")}
    (out / "provenance.json").write_text(json.dumps(exports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
