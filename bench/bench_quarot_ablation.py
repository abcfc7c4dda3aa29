"""Why QuaRot's weight-only 4-bit is worse than plain RTN on smol-chat: QuaRot's steps one at a time.

QuaRot (``quantizers.quarot``) is RMSNorm folding, then the residual rotation ``R1``, the per-head
value/output rotation ``R2`` and an online Hadamard on every down_proj input, then the weight step.
This script builds each prefix of that pipeline with the same pieces and the same seed (the
``fold+r1+r2+down`` transform is QuaRot's, bit for bit; ``--check-quarot`` compares it with the
quantizer itself) and prints, for each, WikiText-2 perplexity in full precision (must equal FP:
every step is an exact equivalence) and with RTN weights (MSE clip off and on).

``--layer-errors`` adds, per Linear, the relative output error ``||X (W - Q(W))^T|| / ||X W^T||``
on calibration inputs ``X`` of the full-precision (transformed) model, from ``H = X^T X``, for the
untransformed model and the chosen transforms: which layers the transform makes worse.

``--norm-stats`` prints, per RMSNorm, how much folding its weight amplifies a weight error spread
evenly over the columns (:func:`norm_amplification`).

``--only TYPES`` quantizes only those projection types (e.g. ``down_proj``), to attribute the
end-to-end loss. ``--dirs`` scores saved variant folders instead.

    OMP_NUM_THREADS=1 python bench/bench_quarot_ablation.py --transforms none fold fold+r1 fold+r1+r2 fold+r1+r2+down
    OMP_NUM_THREADS=1 python bench/bench_quarot_ablation.py --transforms none fold+r1+r2+down --layer-errors --weights
    OMP_NUM_THREADS=1 python bench/bench_quarot_ablation.py --dirs runs/quarotw/gptq-w4a16 runs/quarotw/quarot-gptq-w4a16

Data: evaluation = the first ``--eval-tokens`` tokens of ``../shared/data/wikitext2_test.raw`` in
non-overlapping 512-token windows; calibration inputs for ``--layer-errors`` = seeded windows from
the last half of the same file's characters (``--calib-span 0.5:1``), which the evaluation never
reaches. Nothing here is tuned.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_json  # noqa: E402
from harness.calibration_data import CalibrationSpec, load_calibration  # noqa: E402
from harness.errors import UserError  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.perplexity import PerplexitySettings, load_text, perplexity  # noqa: E402
from quantizers.fake_quant import fake_quant_weight, mse_clip_search  # noqa: E402
from quantizers.gptq import quantize_weights  # noqa: E402
from quantizers.modules import QuantLinear, iter_quant_linears, quantize_linear_layers  # noqa: E402
from quantizers.quarot import QuaRotQuantizer, hadamard_rotations  # noqa: E402
from quantizers.rtn import RTNOptions  # noqa: E402
from quantizers.scheme import QuantScheme  # noqa: E402
from quantizers.base import QuantContext  # noqa: E402
from quantizers.transforms import (  # noqa: E402
    ChainBuilder,
    fold_rmsnorms,
    fuse_chains,
    install_online_hadamards,
    model_parts,
    online_down_layers,
    rotation_chains,
)

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.raw"
STEPS = ("fold", "r1", "r2", "down")
#: The residual rotation ``R1`` each transformed model got (by ``id(model)``; None: none), so that
#: residual writers' errors can be mapped back to the original channels.
RESIDUAL_BASIS: dict[int, torch.Tensor | None] = {}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_transform(name: str) -> set[str]:
    """``none`` or ``+``-joined steps of :data:`STEPS` (``r1`` needs ``fold``)."""
    steps = set() if name == "none" else set(name.split("+"))
    unknown = steps - set(STEPS)
    if unknown:
        raise UserError(f"transform {name!r}: unknown step(s) {sorted(unknown)}; use none or +-joined {STEPS}")
    return steps


def transform(model: torch.nn.Module, steps: set[str], scheme: QuantScheme, seed: int = 0) -> dict:
    """Apply QuaRot's steps ``steps`` in place (same generator order as the quantizer: R1, R2, online);
    returns the online transforms for the weight step. As in QuaRot, only the down_proj layers the
    scheme quantizes get an online Hadamard (a skipped one stays a plain Linear, which would not
    apply it)."""
    parts = model_parts(model)
    generator = torch.Generator().manual_seed(seed)
    if "fold" in steps:
        fold_rmsnorms(parts)
    builder = ChainBuilder()
    r1, r2 = hadamard_rotations(parts, generator)
    rotation_chains(parts, builder, r1=r1 if "r1" in steps else None, r2=r2 if "r2" in steps else None)
    down = online_down_layers(parts, scheme) if "down" in steps else []
    online = install_online_hadamards(parts, builder, down_layers=down, generator=generator)
    fuse_chains(builder.chains())
    RESIDUAL_BASIS[id(model)] = r1.matrix().detach().double() if "r1" in steps else None
    return online


def weigh(model: torch.nn.Module, online: dict, weights: str, scheme: QuantScheme) -> None:
    """``fp``: wrap with the online transforms only; ``rtn`` / ``rtn-mse``: QuaRot's weight step."""
    if weights == "fp":
        quantize_linear_layers(model, QuantScheme(), lambda n, lin, s: lin.weight.detach().clone(),
                               input_transforms=online, wrap_all=True)
        return
    step = scheme.replace(w_clip_search=weights == "rtn-mse")
    quantize_weights(model, step, method="rtn", options=RTNOptions(), input_transforms=online)


def only_scheme(scheme: str, only: list[str] | None) -> QuantScheme:
    """``scheme`` with every projection type outside ``only`` (and lm_head) skipped."""
    base = QuantScheme.parse(scheme)
    if not only:
        return base
    bad = set(only) - set(PROJ)
    if bad:
        raise UserError(f"--only: unknown projection(s) {sorted(bad)}; choose from {PROJ}")
    return base.replace(skip=("lm_head", *[p for p in PROJ if p not in only]))


@torch.no_grad()
def input_hessians(model: torch.nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of every wrapped Linear's input as its matmul sees it (after the online
    transform), summed over the calibration batches."""
    hessians: dict[str, torch.Tensor] = {}

    def add(name: str, mod: torch.nn.Module, x: torch.Tensor) -> None:
        x = mod.quantize_input(x).reshape(-1, mod.in_features).double()
        h = hessians.get(name)
        hessians[name] = x.T @ x if h is None else h.add_(x.T @ x)

    run_with_input_hooks(model, dict(iter_quant_linears(model)), add, batches)
    return hessians


def run_with_input_hooks(model: torch.nn.Module, modules: dict[str, torch.nn.Module],
                         on_input: Callable[[str, torch.nn.Module, torch.Tensor], None], batches: list) -> None:
    """Run the batches with ``on_input(name, module, input)`` called on each named module's input."""
    hooks = [m.register_forward_pre_hook(lambda mod, args, _name=name: on_input(_name, mod, args[0]))
             for name, m in modules.items()]
    try:
        for batch in batches:
            model(input_ids=batch)
    finally:
        for h in hooks:
            h.remove()


def rtn_weight(w: torch.Tensor, scheme: QuantScheme, mse: bool) -> torch.Tensor:
    clip = mse_clip_search(w, scheme.w_bits, group_size=scheme.w_group_size, symmetric=scheme.w_symmetric) if mse else 1.0
    return fake_quant_weight(w, scheme.w_bits, group_size=scheme.w_group_size, symmetric=scheme.w_symmetric,
                             clip_ratio=clip)


def reader_norms(fp: torch.nn.Module) -> dict[str, torch.Tensor]:
    """For each residual writer (o_proj, down_proj) of the untransformed model: the weight ``g`` of
    the RMSNorm that next reads the residual (post_attention_layernorm after o_proj, the next
    layer's input_layernorm, or the final norm, after down_proj)."""
    parts = model_parts(fp)
    out = {}
    for i, lp in enumerate(parts.layers):
        nxt = parts.layers[i + 1].input_norm if i + 1 < len(parts.layers) else parts.final_norm
        out[f"{lp.prefix}.self_attn.o_proj"] = lp.post_norm.weight.detach().double().clone()
        out[f"{lp.prefix}.mlp.down_proj"] = nxt.weight.detach().double().clone()
    return out


@torch.no_grad()
def layer_errors(model: torch.nn.Module, hessians: dict, scheme: QuantScheme,
                 readers: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Per Linear: relative output error (``sqrt(tr(D H D^T) / tr(W H W^T))``, ``D = W - Q(W)``)
    and relative weight error, for RTN with the MSE clip off and on, plus the weight's and the
    input's max/rms (how outlier-heavy each is). With ``readers`` (:func:`reader_norms`), residual
    writers also get ``outg_*``: the error as the next norm sees it, back in the original residual
    channels (undoing ``R1``) and weighted by that norm's ``g``; the plain relative error counts
    every residual channel alike, also the massive one the next norm shrinks."""
    out = {}
    basis = RESIDUAL_BASIS.get(id(model))
    for name, module in iter_quant_linears(model):
        if scheme.skips(name):
            continue
        w = module.weight.detach().double()
        h = hessians[name]
        ref = torch.sum((w @ h) * w).item()
        row = {"w_max_over_rms": (w.abs().max() / w.pow(2).mean().sqrt()).item(),
               "x_col_rms_max_over_mean": (h.diagonal().sqrt().max() / h.diagonal().sqrt().mean()).item()}
        for mse in (False, True):
            d = w - rtn_weight(module.weight.detach().float(), scheme, mse).double()
            tag = "mse" if mse else "max"
            row[f"out_{tag}"] = (torch.sum((d @ h) * d).item() / ref) ** 0.5
            row[f"w_{tag}"] = (d.norm() / w.norm()).item()
            if readers is not None and name in readers:
                g = readers[name]
                def weighted(m: torch.Tensor) -> float:
                    m = m if basis is None else basis @ m  # rows back to the original channels
                    return torch.sum(((m * g[:, None]) @ h) * (m * g[:, None])).item()
                row[f"outg_{tag}"] = (weighted(d) / weighted(w)) ** 0.5
        out[name] = row
    out.update(value_output_errors(model, hessians, scheme))
    return out


@torch.no_grad()
def value_output_errors(model: torch.nn.Module, hessians: dict, scheme: QuantScheme) -> dict[str, dict]:
    """Per layer: the relative error of the value -> output path as one map, ``M = sum_h W_o[:, h]
    W_v[kv(h)]`` (``[hidden, hidden]``; unchanged by ``R2`` in full precision), quantized as
    ``Q(W_o) Q(W_v)``, on the value projection's inputs (attention mixes tokens in between, with
    weights summing to one). The per-matrix errors cannot see whether ``R2`` turns the two
    matrices' errors against each other."""
    parts = model_parts(model)
    hd, groups = parts.head_dim, parts.groups
    out = {}
    for lp in parts.layers:
        v_name, o_name = f"{lp.prefix}.self_attn.v_proj", f"{lp.prefix}.self_attn.o_proj"
        if scheme.skips(v_name) or scheme.skips(o_name) or v_name not in hessians:
            continue
        v, o = lp.v.weight.detach(), lp.o.weight.detach()
        h = hessians[v_name]

        def compose(wo: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
            wo, wv = wo.double(), wv.double()
            return sum(wo[:, i * hd:(i + 1) * hd] @ wv[(i // groups) * hd:(i // groups + 1) * hd]
                       for i in range(parts.heads))

        m = compose(o, v)
        ref = torch.sum((m @ h) * m).item()
        row = {}
        for mse in (False, True):
            d = m - compose(rtn_weight(o.float(), scheme, mse), rtn_weight(v.float(), scheme, mse))
            row[f"out_{'mse' if mse else 'max'}"] = (torch.sum((d @ h) * d).item() / ref) ** 0.5
        out[f"{lp.prefix}.self_attn.v_to_o"] = row
    return out


@torch.no_grad()
def norm_amplification(model: torch.nn.Module, batches: list) -> dict[str, dict]:
    """Per RMSNorm read by quantized linears: how much folding its weight ``g`` into them amplifies
    a weight error that is white over the columns (what per-channel RTN leaves after a rotation).

    With ``n = x / rms(x)`` the normalised input and ``m_j = E[n_j^2]``, a white error of relative
    size ``e`` on ``W diag(g)`` gives output error variance ``e^2 rms(W)^2 rms(g)^2 sum_j m_j``, one
    on ``W`` (unfolded, the norm applies ``g`` after) ``e^2 rms(W)^2 sum_j m_j g_j^2``. The ratio's
    square root, ``A = rms(g) sqrt(sum m / sum m g^2)``, is 1 when the input's energy does not sit
    in channels the norm weight shrinks; ``top`` is the channel with the most energy."""
    parts = model_parts(model)
    sums: dict[str, torch.Tensor] = {}
    norms = {f"{lp.prefix}.{kind}": getattr(lp, attr) for lp in parts.layers
             for kind, attr in (("input_layernorm", "input_norm"), ("post_attention_layernorm", "post_norm"))}

    def add(name: str, mod: torch.nn.Module, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(mod, "variance_epsilon", 1e-6))
        sums[name] = sums.get(name, 0) + n.pow(2).sum(0)

    run_with_input_hooks(model, norms, add, batches)
    out = {}
    for name, norm in norms.items():
        m, g = sums[name] / sums[name].sum(), norm.weight.detach().double()
        top = int(m.argmax())
        out[name] = {"amplification": (g.pow(2).mean() / (m * g.pow(2)).sum()).sqrt().item(),
                     "top_channel": top, "top_energy_share": m[top].item(), "g_top": g[top].item(),
                     "g_rms": g.pow(2).mean().sqrt().item(), "g_max": g.abs().max().item()}
    return out


def summarise(errors: dict[str, dict]) -> dict[str, dict]:
    """Mean of each statistic per projection type."""
    by_type: dict[str, dict] = {}
    for proj in (*PROJ, "v_to_o"):
        rows = [r for n, r in errors.items() if n.endswith(proj)]
        if rows:
            by_type[proj] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return by_type


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol-chat")
    parser.add_argument("--transforms", nargs="*", default=["none", "fold", "fold+r1", "fold+r1+r2", "fold+r1+r2+down"])
    parser.add_argument("--weights", nargs="*", default=["fp", "rtn", "rtn-mse"],
                        help="fp, rtn, rtn-mse (end-to-end perplexity; none: skip perplexity)")
    parser.add_argument("--scheme", default="w4a16")
    parser.add_argument("--only", nargs="*", help="quantize only these projection types")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--layer-errors", action="store_true")
    parser.add_argument("--norm-stats", action="store_true", help="folding's error amplification per RMSNorm")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--check-quarot", action="store_true", help="also run QuaRotQuantizer (weights=rtn)")
    parser.add_argument("--dirs", nargs="*", help="score saved variant folders instead")
    parser.add_argument("--out", default="runs/quarotw/ablation.json")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    settings = PerplexitySettings(source=str(WIKITEXT), window=args.window, stride=args.window,
                                  max_tokens=args.eval_tokens)
    text = load_text(str(WIKITEXT))
    results: dict = {"settings": settings.key(), "scheme": args.scheme, "rows": [], "layer_errors": {}}

    def score(label: str, model, tokenizer) -> float:
        t0 = time.perf_counter()
        ppl = perplexity(model, tokenizer, text, settings, progress=False)["perplexity"]
        print(f"{label:<40} ppl {ppl:9.3f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
        results["rows"].append({"label": label, "ppl": ppl})
        atomic_write_json(args.out, results)
        return ppl

    if args.dirs:
        from quantizers.artifact import load_variant

        for folder in args.dirs:
            model, tokenizer, _ = load_variant(folder)
            score(folder, model, tokenizer)
        return 0
    scheme = only_scheme(args.scheme, args.only)  # bad input fails before the model loads
    plan = [(name, parse_transform(name)) for name in args.transforms]
    loaded = load_model(args.model, device="cpu")
    fp, tokenizer = loaded.model, loaded.tokenizer
    calib = None
    if args.layer_errors or args.norm_stats:
        spec = CalibrationSpec(source=str(WIKITEXT), n_samples=args.calib_samples, seq_len=256, span=(0.5, 1.0))
        calib = load_calibration(spec, tokenizer).batches
    if args.norm_stats:
        stats = norm_amplification(fp, calib)
        results["norm_amplification"] = stats
        atomic_write_json(args.out, results)
        print(f"{'norm':<46} {'A':>6} {'top ch':>6} {'energy':>7} {'g[top]':>7} {'g rms':>6} {'g max':>6}")
        for name, r in stats.items():
            print(f"{name:<46} {r['amplification']:6.2f} {r['top_channel']:6d} {r['top_energy_share']:7.3f} "
                  f"{r['g_top']:7.3f} {r['g_rms']:6.3f} {r['g_max']:6.2f}", flush=True)
    for name, steps in plan:
        for weights in args.weights:
            model = copy.deepcopy(fp)
            online = transform(model, steps, scheme)
            weigh(model, online, weights, scheme)
            score(f"{name} {weights} {scheme.label}", model, tokenizer)
            del model
        if args.layer_errors:
            model = copy.deepcopy(fp)
            online = transform(model, steps, scheme)
            weigh(model, online, "fp", scheme)
            errors = layer_errors(model, input_hessians(model, calib), scheme, reader_norms(fp))
            results["layer_errors"][name] = {"per_layer": errors, "per_type": summarise(errors)}
            atomic_write_json(args.out, results)
            print(f"\nper-type mean relative errors, transform {name} ({scheme.label}):")
            print(f"{'proj':<10} {'out max':>8} {'out mse':>8} {'W max':>8} {'W mse':>8} {'W max/rms':>9} {'X colmax/mean':>13}")
            for proj, r in results["layer_errors"][name]["per_type"].items():
                if "w_max" not in r:  # the composite value -> output path
                    print(f"{proj:<10} {r['out_max']:8.4f} {r['out_mse']:8.4f}", flush=True)
                    continue
                print(f"{proj:<10} {r['out_max']:8.4f} {r['out_mse']:8.4f} {r['w_max']:8.4f} {r['w_mse']:8.4f} "
                      f"{r['w_max_over_rms']:9.1f} {r['x_col_rms_max_over_mean']:13.1f}"
                      + (f"  g-weighted {r['outg_max']:.4f} {r['outg_mse']:.4f}" if "outg_max" in r else ""), flush=True)
            del model
    if args.check_quarot:
        model = copy.deepcopy(fp)
        quantizer = QuaRotQuantizer({"weights": "rtn"})
        model = quantizer.apply(model, scheme, QuantContext(tokenizer=tokenizer, seed=0))
        score(f"QuaRotQuantizer weights=rtn {scheme.label}", model, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
