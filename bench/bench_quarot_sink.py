"""Per-token folding amplification on smol-chat: ``A_t = rms(g) ||n_t|| / ||n_t * g||`` at every
RMSNorm (``n_t`` the normalised input of token ``t``, ``g`` the norm weight), on four 512-token
windows of the WikiText-2 test file (its first 2,048 tokens, as the perplexity windows see them),
by position: the first token of a window (the attention sink) against the others. The per-layer
average (``bench_quarot_ablation.py --norm-stats``) weighs every token alike and hides it.

    OMP_NUM_THREADS=1 python bench/bench_quarot_sink.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.models import load_model  # noqa: E402
from harness.perplexity import load_text  # noqa: E402
from quantizers.transforms import model_parts  # noqa: E402
m = load_model("smol-chat", device="cpu")
model, tok = m.model, m.tokenizer
text = load_text(str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.raw"))[:40000]
ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:2048].reshape(4, 512)
parts = model_parts(model)
rec = {}
hooks = []
for i, lp in enumerate(parts.layers):
    for kind, norm in (("in", lp.input_norm), ("post", lp.post_norm)):
        def hook(mod, args, key=(i, kind)):
            x = args[0].double()
            n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
            g = mod.weight.double()
            a = g.pow(2).mean().sqrt() * n.norm(dim=-1) / (n * g).norm(dim=-1)
            rec[key] = a  # [4, 512]
        hooks.append(norm.register_forward_pre_hook(hook))
with torch.inference_mode():
    model(input_ids=ids)
for i in (1, 3, 5, 9, 12, 15, 20, 25, 29):
    for kind in ("in", "post"):
        a = rec[(i, kind)]
        print(f"layer {i:2d} {kind:4s} A at position 0: {a[:, 0].mean():7.2f}  positions 1-511: median {a[:, 1:].median():5.2f}  max {a[:, 1:].max():6.2f}")
