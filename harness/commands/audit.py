"""`safequant audit`: quantize, generate, judge and score every variant; write the run and report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from harness.commands.variant_args import add_variant_args

def _add_audit_args(p: argparse.ArgumentParser) -> None:
    from harness.config import AuditConfig

    d = AuditConfig()
    p.add_argument("--config", metavar="FILE", help="TOML file with audit settings (flags override it)")
    p.add_argument("--model", help=f"subject model: bundled name, local folder, .gguf file or hub id (default {d.model})")
    p.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="variants as [NAME=]METHOD[:SCHEME][:OPT=VAL,...] or [NAME=]DIR (a folder saved by "
                        "`safequant quantize`), or a third-party artifact of --model: [NAME=]FILE.gguf or [NAME=]DIR "
                        "(a Hugging Face folder, quantized or not; docs/shipping.md) "
                        f"(default: {' '.join(d.variants)}); fp is always evaluated first")
    p.add_argument("--prompt-sets", nargs="+", metavar="SET",
                   help="built-in set names or [NAME=]PATH files (default: " + " ".join(d.prompt_sets) + ")")
    p.add_argument("--limit", nargs="+", metavar="[SET=]N",
                   help="use only the first N prompts of each set, or of SET only (SET as the run names it, e.g. "
                        "--limit advbench=104, or --limit 50 advbench=104); default all")
    p.add_argument("--perplexity-text", metavar="TEXT",
                   help="text for perplexity: 'toy-heldout' or a UTF-8 file (default: toy-heldout for bundled models)")
    p.add_argument("--ppl-window", type=int, help=f"perplexity window in tokens (default {d.ppl_window})")
    p.add_argument("--ppl-stride", type=int, help=f"perplexity stride in tokens (default {d.ppl_stride})")
    p.add_argument("--ppl-max-tokens", type=int, help=f"score at most this many tokens of the text (default {d.ppl_max_tokens})")
    p.add_argument("--out", metavar="DIR", help=f"run directory; re-running into it resumes (default {d.out})")
    p.add_argument("--max-new-tokens", type=int, help=f"generation length (default {d.max_new_tokens})")
    p.add_argument("--batch-size", type=int, help=f"prompts per generation batch (default {d.batch_size})")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16 (default auto)")
    p.add_argument("--seed", type=int, help=f"seed for everything random (default {d.seed})")
    p.add_argument("--judges", nargs="+", metavar="JUDGE",
                   help=f"judges run on every response, the first is primary (default: {' '.join(d.judges)}); "
                        "see `safequant judges`")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding upstream benchmark files (advbench, harmbench, xstest, ...) for offline use")
    p.add_argument("--no-first-token", dest="first_token", action="store_false", default=None,
                   help="skip the generation-free first-token refusal probability")
    p.add_argument("--no-probes", dest="probes", action="store_false", default=None,
                   help="skip the SLR activation probes (per-layer accuracy, separability, transfer, 2D maps)")
    p.add_argument("--probe-layers", metavar="LAYERS", help="decoder layers to probe: all, 0,2,5 or 4-10 (default all)")
    p.add_argument("--bootstrap", type=int, help=f"paired bootstrap resamples for difference intervals (default {d.bootstrap})")
    p.add_argument("--system-prompt", help="system prompt for every generation (default none)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow model code from the model folder/hub (off by default: it runs arbitrary code)")
    p.add_argument("--pairs", nargs="+", metavar="A=B",
                   help="head-to-head paired statistics of variant A against variant B (e.g. aaq-w4a4kv4=ost-w4a4kv4); "
                        "every calibration method is also paired with its alpha-0 (AAQ: OST) or RTN counterpart at the same scheme")
    p.add_argument("--no-report", dest="report", action="store_false", default=None, help="skip report.html")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="results cache shared by run directories, keyed by content, so e.g. the fp generations of "
                        "one model are reused by the next audit (default $SAFEQUANT_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/safequant or ~/.cache/safequant)")
    p.add_argument("--no-cache", dest="cache_dir", action="store_const", const="none",
                   help="use no cache outside the run directory")
    g = p.add_argument_group("generation backend (docs/shipping.md)")
    g.add_argument("--backend", nargs="+", metavar="BACKEND",
                   help="hf (transformers on the fake-quantized model) or vllm (vLLM's engine on the variant's weights; "
                        "weight-only variants, full precision and third-party folders) for every variant, "
                        "NAME=BACKEND for one, e.g. --backend hf shipped=vllm (default hf)")
    g.add_argument("--tensor-parallel-size", type=int, metavar="N", help="vLLM: GPUs per model replica (default 1)")
    g.add_argument("--pipeline-parallel-size", type=int, metavar="N", help="vLLM: pipeline stages (default 1)")
    g.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION",
                   help="vLLM: fraction of GPU memory its engine may take; the audit's torch model shares the GPU "
                        f"(default {d.gpu_memory_utilization})")
    add_variant_args(p)


def _audit_config(args: argparse.Namespace):
    from harness.calibration_data import CalibrationOptions
    from harness.config import AuditConfig
    from harness.set_limits import SetLimits

    config = AuditConfig.from_toml(args.config) if args.config else AuditConfig()
    overrides = {k: getattr(args, k) for k in (
        "model", "base", "variants", "prompt_sets", "limit", "perplexity_text", "ppl_window", "ppl_stride",
        "ppl_max_tokens", "out", "max_new_tokens", "batch_size", "device", "dtype", "seed", "judges", "data_dir",
        "first_token", "bootstrap", "probes", "probe_layers", "system_prompt", "trust_remote_code", "report",
        *CalibrationOptions.KEYS, "ablate_layer", "probe_model", "pairs", "cache_dir", "backend",
        "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization")}
    if args.limit is not None:  # the items as the config records them (int or table), as a file gives them
        overrides["limit"] = SetLimits.parse(args.limit).setting()
    config = config.with_overrides(overrides)
    if isinstance(config.base, str) and config.base.lower() == "none":
        config.base = None
    return config


def cmd_audit(args: argparse.Namespace) -> int:
    from harness.audit import Audit

    audit = Audit(_audit_config(args))
    started = time.perf_counter()
    summary = audit.run(command=shlex.join(["safequant", *sys.argv[1:]]))
    print(format_summary(summary))
    print(f"\nrun directory: {audit.run_dir}  (wall time {time.perf_counter() - started:.1f} s)")
    if audit.config.report:
        print(f"report: {audit.run_dir / 'report.html'}")
    return 0


def format_summary(summary: dict) -> str:
    """The per-variant table printed at the end of an audit."""
    sets = summary["prompt_sets"]
    header = ["variant", *[f"refusal[{name}]" for name in sets], "perplexity", "ppl ratio"]
    lines = [header]
    for v in summary["variants"]:
        m = v["metrics"]
        lines.append([v["name"], *[f"{m['refusal'][name]:.1%}" for name in sets],
                      f"{m['perplexity']:.3f}", f"{m['perplexity_ratio']:.3f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)
    return "\n\n".join([table, *format_pairs(summary)])


def format_pairs(summary: dict) -> list[str]:
    """One terminal table per head-to-head pair (``summary["statistics"]["pairs"]``)."""
    from reports.pairs import flat_pair_stats, format_pair_rows, pair_rows

    roles = {name: s.get("role", name) for name, s in summary["prompt_sets"].items()}
    return [f"{b['a']} against {b['b']} ({'asked for' if b.get('origin') == 'user' else 'default pair'}):\n"
            + format_pair_rows(pair_rows(flat_pair_stats(b), roles, lambda d, direction: ""), b["a"], b["b"])
            for b in (summary.get("statistics") or {}).get("pairs") or []]


def register(sub) -> None:
    p = sub.add_parser("audit", help="quantize, generate, judge and score; write a run directory and report",
                       description="Without arguments: the demo audit of the bundled toy-chat model "
                                   "(toy-base as its unaligned reference) at fp and RTN W8A8, W4A16, W4A4, W4A4KV3 and W4A3.")
    _add_audit_args(p)
    p.set_defaults(func=cmd_audit)
