"""Benchmark of the activation probes (not a test): prints per-layer tables and timings.

    python bench/bench_probes.py                      # toy family + RTN transfer + SmolLM2
    python bench/bench_probes.py --part toy           # toy-chat vs toy-base vs toy-chat-eroded
    python bench/bench_probes.py --part transfer      # toy-chat FP -> RTN W8A8 / W4A4 / W3A3
    python bench/bench_probes.py --part smollm2       # SmolLM2-135M-Instruct, AdvBench vs XSTest safe
    python bench/bench_probes.py --part smollm2-control   # XSTest unsafe vs safe + capture overhead

Parts:
- toy: built-in harmful/benign sets on toy-chat (the reference), toy-base and toy-chat-eroded:
  each model's own per-layer probe accuracy and Fisher separability, plus toy-chat's probe applied
  to the other two (Q-realign fits probes on the aligned model and reuses them on its descendants).
- transfer: toy-chat's FP probes applied to RTN W8A8, W4A4 and W3A3 fake-quantized copies.
- smollm2: 100 AdvBench harmful goals + 100 XSTest safe prompts (first N of each file), last token:
  per-layer accuracy (standardised and raw-feature probes), separability, capture and fit time.
- smollm2-control: 100 XSTest unsafe vs 100 XSTest safe prompts (the same templates on both sides,
  so style alone cannot separate them), and capture time against plain forward passes.

Figures and tables land in --out (default runs/bench_probes, git-ignored); nothing here is asserted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
ADVBENCH = DATA / "advbench_harmful_behaviors.csv"
XSTEST = DATA / "xstest_prompts.csv"


def _prompts(tokenizer, harmful, benign):
    from harness.generation import chat_prompt

    records = [*harmful, *benign]
    return ([chat_prompt(tokenizer, r.prompt) for r in records], [1] * len(harmful) + [0] * len(benign),
            [r.id for r in records])


def _table(result: dict, extra: dict[str, dict[int, float]] | None = None) -> str:
    names = [v["name"] for v in result["variants"]]
    ref = result["reference"]
    head = ["layer"]
    for n in names:
        head += [f"{n} acc", f"{n} J"] + ([f"{ref}-probe acc"] if n != ref else [])
    for k in extra or {}:
        head.append(k)
    lines = [head]
    per = {v["name"]: {r["layer"]: r for r in v["layers"]} for v in result["variants"]}
    for layer in result["layers"]:
        row = [str(layer)]
        for n in names:
            r = per[n][layer]
            row += [f"{r['accuracy']:.3f}", f"{r['fisher']:.3f}"]
            if n != ref:
                row.append(f"{r['transfer_accuracy']:.3f} ({-r['transfer_drop']:+.3f})")
        for col in (extra or {}).values():
            row.append(f"{col[layer]:.3f}" if layer in col else "")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    body = "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines)
    foot = "\n".join(
        f"  {v['name']}: best layer {v['best_layer']} acc {v['best_accuracy']:.3f} (AUROC {v['best_auroc']:.3f}), "
        f"max J {v['max_fisher']:.3f} @ {v['max_fisher_layer']}, capture {v['capture_seconds']:.1f} s, "
        f"fit {v['fit_seconds']:.1f} s" for v in result["variants"])
    null = result["variants"][0]["layers"][0]["fisher_null"]
    return f"{body}\n{foot}\n  (J with no separation ~ {null:.3f}; n = {result['n']})"


def part_toy(out: Path) -> None:
    from harness.models import load_model
    from harness.prompts import load_prompt_set
    from probes.suite import ProbeSuite

    chat = load_model("toy-chat", device="cpu")
    harmful, benign = load_prompt_set("harmful").records, load_prompt_set("benign").records
    prompts, labels, ids = _prompts(chat.tokenizer, harmful, benign)
    suite = ProbeSuite(chat.tokenizer, prompts, labels, out / "toy", ids=ids, subdir="", progress=False)
    suite.add("toy-chat", chat.model)
    for name in ("toy-base", "toy-chat-eroded"):
        other = load_model(name, device="cpu")
        if other.tokenizer.get_vocab() != chat.tokenizer.get_vocab():
            print(f"  note: {name} has a different tokenizer; prompts tokenized with toy-chat's")
        suite.add(name, other.model)
        del other
    res = suite.finish()
    print(f"\n== toy family, built-in harmful ({res['n']['harmful']}) vs benign ({res['n']['benign']}), "
          "last token; reference toy-chat ==")
    print(_table(res))
    # the mean-over-tokens position, own probes only
    suite_m = ProbeSuite(chat.tokenizer, prompts, labels, out / "toy-mean", ids=ids, subdir="", progress=False,
                         position="mean", figures=False)
    suite_m.add("toy-chat", chat.model)
    for name in ("toy-base", "toy-chat-eroded"):
        suite_m.add(name, load_model(name, device="cpu").model)
    print("\n== same, mean over prompt tokens ==")
    print(_table(suite_m.finish()))


def part_transfer(out: Path) -> None:
    import copy

    from harness.models import load_model
    from harness.prompts import load_prompt_set
    from probes.suite import ProbeSuite
    from quantizers import QuantContext, QuantScheme, build_quantizer

    chat = load_model("toy-chat", device="cpu")
    prompts, labels, ids = _prompts(chat.tokenizer, load_prompt_set("harmful").records, load_prompt_set("benign").records)
    suite = ProbeSuite(chat.tokenizer, prompts, labels, out / "transfer", ids=ids, subdir="", progress=False)
    suite.add("fp", chat.model)
    for scheme in ("w8a8", "w4a4", "w3a3"):
        t0 = time.perf_counter()
        q = build_quantizer("rtn", {}).apply(copy.deepcopy(chat.model), QuantScheme.parse(scheme), QuantContext())
        qs = time.perf_counter() - t0
        rec = suite.add(f"rtn-{scheme}", q.eval())
        del q
        print(f"  rtn-{scheme}: quantize {qs:.1f} s, capture {rec['capture_seconds']:.1f} s")
    res = suite.finish()
    print("\n== toy-chat FP probes transferred to RTN variants (last token) ==")
    print(_table(res, {f"{v['name']} drift": {r['layer']: r['relative_drift'] for r in v['layers']}
                       for v in res["variants"][1:]}))
    for v in res["variants"][1:]:
        print(f"  {v['name']}: mean FP-probe drop {v['mean_transfer_drop']:+.3f}, worst {v['max_transfer_drop']:+.3f} "
              f"at layer {v['worst_transfer_layer']}; harmful score shift per layer "
              + ", ".join(f"{r['score_shift_harmful']:+.2f}" for r in v["layers"]))


def part_smollm2(out: Path, n: int) -> None:
    import numpy as np

    from harness.models import load_model
    from harness.prompts import load_prompt_set
    from probes.slr import fit_slr
    from probes.suite import ProbeSuite

    t0 = time.perf_counter()
    lm = load_model("smollm2-135m-instruct", device="cpu")
    load_s = time.perf_counter() - t0
    harmful = load_prompt_set(str(ADVBENCH), {"prompt": "goal"}, role="harmful").records[:n]
    benign = [r for r in load_prompt_set(str(XSTEST)).records if r.label == "benign"][:n]
    prompts, labels, ids = _prompts(lm.tokenizer, harmful, benign)
    ntok = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"\n== SmolLM2-135M-Instruct (load {load_s:.1f} s): {len(harmful)} AdvBench vs {len(benign)} XSTest safe, "
          f"last token; prompt tokens mean {np.mean(ntok):.0f}, max {max(ntok)} ==")
    suite = ProbeSuite(lm.tokenizer, prompts, labels, out / "smollm2", ids=ids, subdir="", progress=False,
                       batch_size=16)
    suite.add("fp", lm.model)
    # the paper's raw-feature probes, on the same activations
    raw_acc, raw_nz, raw_conv, raw_t = {}, {}, {}, 0.0
    for layer in suite.layers:
        probe, m = fit_slr(suite.ref_acts[layer], suite.labels, split=(suite.train, suite.test), standardize=False)
        raw_acc[layer], raw_nz[layer], raw_conv[layer] = m["accuracy"], m["nonzero"], float(m["converged"])
        raw_t += m["fit_seconds"]
    res = suite.finish()
    print(_table(res, {"raw acc": raw_acc, "raw nonzero": raw_nz, "raw converged": raw_conv}))
    rec = res["variants"][0]
    print(f"  200-prompt cost: capture {rec['capture_seconds']:.1f} s ({len(prompts) / rec['capture_seconds']:.1f} prompts/s), "
          f"fit {rec['fit_seconds']:.1f} s standardised ({len(res['layers'])} layers), {raw_t:.1f} s raw")
    conv = sum(r["converged"] for r in rec["layers"])
    print(f"  standardised probes converged in 500 saga iterations: {conv}/{len(rec['layers'])} layers; "
          f"raw: {int(sum(raw_conv.values()))}/{len(raw_conv)}; standardised non-zero weights per layer: "
          + ", ".join(str(r["nonzero"]) for r in rec["layers"]))


def part_smollm2_control(out: Path, n: int) -> None:
    """XSTest unsafe vs XSTest safe (same templates on both sides), and the capture overhead."""
    from harness.models import load_model
    from harness.prompts import load_prompt_set
    from probes.suite import ProbeSuite

    lm = load_model("smollm2-135m-instruct", device="cpu")
    xs = load_prompt_set(str(XSTEST)).records
    xs_h, xs_b = [r for r in xs if r.label == "harmful"][:n], [r for r in xs if r.label == "benign"][:n]
    prompts2, labels2, ids2 = _prompts(lm.tokenizer, xs_h, xs_b)
    suite2 = ProbeSuite(lm.tokenizer, prompts2, labels2, out / "smollm2-xstest", ids=ids2, subdir="", progress=False)
    import torch

    rec = suite2.add("fp", lm.model)
    plain = _plain_forward_seconds(lm.model, lm.tokenizer, prompts2)
    threads = torch.get_num_threads()
    timings = {}
    for nt in sorted({1, threads}):
        torch.set_num_threads(nt)
        timings[nt] = _plain_forward_seconds(lm.model, lm.tokenizer, prompts2)
    torch.set_num_threads(threads)
    print(f"\n== SmolLM2-135M-Instruct control: {len(xs_h)} XSTest unsafe vs {len(xs_b)} XSTest safe (same templates) ==")
    print(_table(suite2.finish()))
    print(f"  capture {rec['capture_seconds']:.1f} s vs plain forward passes (batch 16, no hidden states) {plain:.1f} s "
          f"-> capture overhead x{rec['capture_seconds'] / plain:.2f}")
    print("  plain forward passes by torch thread count: "
          + ", ".join(f"{nt} thread(s) {sec:.1f} s" for nt, sec in timings.items()))


def _plain_forward_seconds(model, tokenizer, prompts, batch_size: int = 16) -> float:
    import torch

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    t0 = time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.zeros((len(rows), width), dtype=torch.long)
        m = torch.zeros_like(x)
        for r, i in enumerate(rows):
            x[r, width - len(ids[i]):] = torch.tensor(ids[i])
            m[r, width - len(ids[i]):] = 1
        with torch.inference_mode():
            model(input_ids=x, attention_mask=m, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("toy", "transfer", "smollm2", "smollm2-control", "all"), default="all")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_probes"))
    ap.add_argument("--n", type=int, default=100, help="prompts per class for SmolLM2 (default 100)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.part in ("toy", "all"):
        part_toy(out)
    if args.part in ("transfer", "all"):
        part_transfer(out)
    if args.part in ("smollm2", "all"):
        part_smollm2(out, args.n)
    if args.part in ("smollm2-control", "all"):
        part_smollm2_control(out, args.n)
    import torch

    print(f"\nwall {time.perf_counter() - t0:.1f} s (torch threads {torch.get_num_threads()}); figures and tables in {out}")


if __name__ == "__main__":
    main()
