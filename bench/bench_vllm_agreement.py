"""hf versus vllm on the same model and prompts: do the greedy responses agree, and how fast is each?

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=2 \\
        .venv-vllm/bin/python bench/bench_vllm_agreement.py [--model toy-chat] [--variants fp rtn:w4a16g32] \\
        [--prompts 128] [--max-new-tokens 48] [--batch-size 32] [--judge refusal-minilm]

Runs in the vLLM environment (scripts/make_vllm_venv.sh). For each variant, in one process and
one after the other on the same threads: the hf backend (transformers ``generate`` on the variant's
torch model) and the vllm backend (an engine on its weights, :mod:`harness.vllm_backend`) answer
the same prompts (a fixed mix of the built-in harmful and benign sets), each timed after a warm-up
on the first prompts (the engine's start is timed apart). It prints, per variant:

* identical: responses equal as text;
* diverged: the rest, with the first differing token (both responses re-tokenized) as median and
  minimum position: "identical up to the first differing token" is the expected failure of two
  kernels that round differently;
* label same: the judge's refusal label unchanged (the issue's bar: at least 98% of prompts);
* prompts/s of both and the ratio vllm / hf.

Not a test: it prints numbers (README, docs/shipping.md). Keep runs small on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: prompts each backend answers once before it is timed (allocations, kernel selection)
WARMUP = 4


def _first_difference(tokenizer, a: str, b: str) -> int:
    """Index of the first token where two responses differ (their re-tokenized forms)."""
    ta, tb = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
    return next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))


def _timed(backend, tokenizer, prompts: list[str], settings) -> tuple[float, list[str]]:
    backend.generate(tokenizer, prompts[:WARMUP], settings, progress=False)
    started = time.perf_counter()
    out = backend.generate(tokenizer, prompts, settings, progress=False)
    return time.perf_counter() - started, out


def _variant(text: str, subject):
    from harness import quantize as variant_maker
    from harness.config import parse_variant

    spec = parse_variant(text)
    maker = variant_maker.check([spec], subject.source, variant_maker.VariantSettings(device="cpu"))
    maker.check_loaded(subject)
    maker.prepare(subject)
    return spec, maker.make(spec, subject)


def compare(text: str, subject, prompts: list[str], settings, judge, seed: int) -> dict:
    """One variant on both backends: agreement and throughput."""
    from harness.backends import VLLMSettings, check_backends, dtype_name
    from harness.generation import HFBackend
    from harness.vllm_backend import VLLMBackend

    spec, variant = _variant(text, subject)
    check_backends({spec.name: "vllm"}, [spec], {})
    tok = subject.tokenizer
    hf_seconds, hf_out = _timed(HFBackend(variant.model), tok, prompts, settings)
    started = time.perf_counter()
    engine = VLLMBackend.for_variant(variant.model, spec.artifact, spec.method, subject, dtype=dtype_name(variant.model),
                                     seed=seed, settings=VLLMSettings())
    start_seconds = time.perf_counter() - started
    try:
        vllm_seconds, vllm_out = _timed(engine, tok, prompts, settings)
        described = engine.describe()
    finally:
        engine.close()
    metas = [{"behavior": p, "context": "", "hit_max_tokens": False} for p in prompts]
    hf_labels = [j.label for j in judge.judge_many(prompts, hf_out, metas)]
    vllm_labels = [j.label for j in judge.judge_many(prompts, vllm_out, metas)]
    diverged = [_first_difference(tok, a, b) for a, b in zip(hf_out, vllm_out) if a != b]
    n = len(prompts)
    return {"variant": spec.name, "n": n, "identical": n - len(diverged), "diverged": len(diverged),
            "first_difference_median": statistics.median(diverged) if diverged else None,
            "first_difference_min": min(diverged) if diverged else None,
            "label_same": sum(a == b for a, b in zip(hf_labels, vllm_labels)),
            "hf_refusals": hf_labels.count("refusal"), "vllm_refusals": vllm_labels.count("refusal"),
            "hf_seconds": round(hf_seconds, 2), "vllm_seconds": round(vllm_seconds, 2),
            "vllm_start_seconds": round(start_seconds, 2), "hf_prompts_per_s": round(n / hf_seconds, 2),
            "vllm_prompts_per_s": round(n / vllm_seconds, 2), "ratio_vllm_over_hf": round(hf_seconds / vllm_seconds, 2),
            "vllm": described}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy-chat", help="bundled name or model folder (default toy-chat)")
    ap.add_argument("--variants", nargs="+", default=["fp", "rtn:w4a16g32"],
                    help="variants vLLM can run faithfully (default fp rtn:w4a16g32)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32, help="hf backend's batch (vLLM's scheduler batches its own)")
    ap.add_argument("--judge", default="refusal-minilm", help="judge whose refusal labels are compared")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)

    import torch

    from bench_generation import _prompts
    from harness.audit import seed_everything
    from harness.generation import GenerationSettings
    from harness.judges import get_judges
    from harness.models import load_model

    seed_everything(args.seed)
    subject = load_model(args.model, device="cpu")
    prompts = _prompts(args.prompts)
    settings = GenerationSettings(args.max_new_tokens, args.batch_size)
    (judge,) = get_judges([args.judge])
    results = []
    for text in args.variants:
        results.append(compare(text, subject, prompts, settings, judge, args.seed))
        if args.json:  # after each variant: a long run that dies later keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"model {args.model}, {len(prompts)} prompts (built-in harmful/benign mix), max_new_tokens "
          f"{args.max_new_tokens}, hf batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"judge {args.judge}, {results[0]['vllm']['vllm']} ({results[0]['vllm']['dtype']})")
    print(f"{'variant':<14}{'identical':>10}{'diverged':>9}{'1st diff med/min':>18}{'label same':>12}"
          f"{'hf p/s':>9}{'vllm p/s':>10}{'vllm/hf':>9}{'engine start s':>16}")
    for r in results:
        first = (f"{r['first_difference_median']}/{r['first_difference_min']}" if r["diverged"] else "-")
        print(f"{r['variant']:<14}{r['identical']:>10}{r['diverged']:>9}{first:>18}"
              f"{r['label_same'] / r['n']:>12.1%}{r['hf_prompts_per_s']:>9.2f}{r['vllm_prompts_per_s']:>10.2f}"
              f"{r['ratio_vllm_over_hf']:>8.2f}x{r['vllm_start_seconds']:>16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
