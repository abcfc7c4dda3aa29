"""Per-token folding amplification on smol-chat: ``A_t = rms(g) ||n_t|| / ||n_t * g||`` at every
RMSNorm (``n_t`` the normalised input of token ``t``, ``g`` the norm weight), on four 512-token
windows of the WikiText-2 test file (its first 2,048 tokens, as the perplexity windows see them),
by position: the first token of a window (the attention sink) against the others. The per-layer
average (``bench_quarot_ablation.py --norm-stats``) weighs every token alike and hides it.

    OMP_NUM_THREADS=1 python bench/bench_quarot_sink.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quarot_ablation import run_with_input_hooks  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.perplexity import load_text  # noqa: E402
from quantizers.transforms import model_parts  # noqa: E402

#: Layers whose amplification is printed.
SHOWN_LAYERS = (1, 3, 5, 9, 12, 15, 20, 25, 29)


def token_amplification(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``A_t`` of every token of ``x`` ([batch, tokens, hidden]) at the RMSNorm ``mod``."""
    x = x.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
    g = mod.weight.double()
    return g.pow(2).mean().sqrt() * n.norm(dim=-1) / (n * g).norm(dim=-1)


def main() -> int:
    loaded = load_model("smol-chat", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    text = load_text(str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.raw"))[:40000]
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:2048].reshape(4, 512)
    norms = {f"{i} {kind}": norm for i, lp in enumerate(model_parts(model).layers)
             for kind, norm in (("in", lp.input_norm), ("post", lp.post_norm))}
    amplification: dict[str, torch.Tensor] = {}

    def record(name: str, mod: torch.nn.Module, x: torch.Tensor) -> None:
        amplification[name] = token_amplification(mod, x)  # [4, 512]

    with torch.inference_mode():
        run_with_input_hooks(model, norms, record, [ids])
    for i in SHOWN_LAYERS:
        for kind in ("in", "post"):
            a = amplification[f"{i} {kind}"]
            print(f"layer {i:2d} {kind:4s} A at position 0: {a[:, 0].mean():7.2f}  positions 1-511: "
                  f"median {a[:, 1:].median():5.2f}  max {a[:, 1:].max():6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
