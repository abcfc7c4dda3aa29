"""Where a realignment loss can act: per-layer diagnostics for Q-realign.

Q-realign (Tan et al., arXiv 2601.08089) pushes the quantized hidden state of harmful prompts to
the harmful side of the aligned model's SLR probe at every layer. Whether that can restore the
refusals depends on *where* the fine-tune eroded them:

* if the aligned probes still read the eroded model's harmful prompts as harmful (logits well
  above 0), the softplus loss is already near zero and has little gradient left;
* if the eroded model's refusal decision only departs from the aligned one in the last layers
  (a logit lens, nostalgebraist 2020: each layer's last-token hidden state read through the final
  norm and the LM head), a loss placed on the earlier layers' representation cannot reach it.

:func:`model_diagnostics` measures both for one model on one prompt set (per layer: the probe
logit distribution of each class and the mean probability of a refusal first token);
:func:`divergence` compares the eroded model with its aligned parent and names the layer from
which the refusal decision differs. Works on any causal LM :mod:`probes.capture` can read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .capture import capture
from .errors import ProbeError

__all__ = ["QUANTILES", "logit_stats", "lens_refusal_prob", "model_diagnostics", "divergence"]

#: Quantiles recorded for each class's probe-logit distribution.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def logit_stats(values: Any) -> dict[str, float]:
    """Mean, standard deviation, :data:`QUANTILES` and the share on the harmful side (> 0)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ProbeError("no probe logits to summarise; pass at least one prompt of each class")
    out = {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std())}
    out.update({f"q{round(q * 100)}": float(np.quantile(v, q)) for q in QUANTILES})
    out["positive"] = float((v > 0).mean())
    return out


def lens_refusal_prob(model, hidden: np.ndarray, token_ids: Sequence[int], batch_size: int = 64) -> np.ndarray:
    """Logit lens: probability of a refusal first token (``token_ids``) when the last-token hidden
    states ``hidden`` ``[n, H]`` of one layer are read through the model's final norm and LM head."""
    import torch

    from common.layout import final_readout, read_out

    norm, head = final_readout(model)
    if head is None:
        raise ProbeError(f"model {type(model).__name__} has no LM head; the logit lens needs one")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ProbeError("no refusal token ids for the logit lens; pass the tokenizer's refusal first tokens")
    out = []
    with torch.inference_mode():
        for start in range(0, len(hidden), batch_size):
            probs = torch.softmax(read_out(norm, head, torch.as_tensor(np.asarray(hidden[start:start + batch_size]))), dim=-1)
            out.append(probs[:, ids.to(probs.device)].sum(-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def model_diagnostics(model, tokenizer, prompts: Sequence[str], labels: Sequence[int],
                      directions: Mapping[int, tuple[Any, float]], token_ids: Sequence[int] | None = None, *,
                      max_tokens: int | None = None) -> dict[str, Any]:
    """Per decoder layer of ``model`` on chat-formatted ``prompts`` (labels 1 harmful / 0 benign):
    the distribution of the probe logit ``h . w + b`` (``directions[layer] = (w, b)``, the aligned
    model's probes) for each class, and with ``token_ids`` the mean logit-lens refusal probability
    of each class. Returns ``{"layers": [{layer, probe: {harmful, benign}, lens: {harmful, benign}}]}``."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(prompts) or not ((y == 1).any() and (y == 0).any()):
        raise ProbeError("diagnostics need one label per prompt and prompts of both classes")
    acts = capture(model, tokenizer, list(prompts), layers=sorted(directions), position="last",
                   max_tokens=max_tokens, progress=False, desc="realign diagnostics")
    rows = []
    for layer in acts.layers:
        X = np.asarray(acts.get(layer), dtype=np.float64)
        w, b = directions[layer]
        logit = X @ np.asarray(w, dtype=np.float64).reshape(-1) + float(b)
        row: dict[str, Any] = {"layer": int(layer),
                               "probe": {"harmful": logit_stats(logit[y == 1]), "benign": logit_stats(logit[y == 0])}}
        if token_ids:
            p = lens_refusal_prob(model, acts.get(layer), token_ids)
            row["lens"] = {"harmful": float(p[y == 1].mean()), "benign": float(p[y == 0].mean())}
        rows.append(row)
    return {"n_harmful": int((y == 1).sum()), "n_benign": int((y == 0).sum()), "layers": rows}


def divergence(aligned: Mapping[str, Any], eroded: Mapping[str, Any], share: float = 0.5,
               min_gap: float = 0.05) -> dict[str, Any]:
    """Where the eroded model's refusal decision departs from the aligned one, from the two
    :func:`model_diagnostics` results: per layer the aligned-minus-eroded gap of the mean
    logit-lens refusal probability on harmful prompts; ``layer`` is the first layer from which the
    gap stays at or above ``share`` of the final layer's gap (None when the final gap is below
    ``min_gap``: the two decide alike). ``probe_positive`` is the share of the eroded model's
    harmful prompts the aligned probes still read as harmful, per layer."""
    a_rows = {r["layer"]: r for r in aligned["layers"]}
    e_rows = {r["layer"]: r for r in eroded["layers"]}
    layers = sorted(set(a_rows) & set(e_rows))
    out: dict[str, Any] = {"probe_positive": {str(l): e_rows[l]["probe"]["harmful"]["positive"] for l in layers}}
    if not layers or "lens" not in a_rows[layers[0]] or "lens" not in e_rows[layers[0]]:
        return {**out, "layer": None, "gap": {}, "final_gap": None}
    gap = {l: a_rows[l]["lens"]["harmful"] - e_rows[l]["lens"]["harmful"] for l in layers}
    final = gap[layers[-1]]
    layer = None
    if final >= min_gap:
        for i, l in enumerate(layers):
            if all(gap[m] >= share * final for m in layers[i:]):
                layer = l
                break
    return {**out, "layer": layer, "gap": {str(l): g for l, g in gap.items()}, "final_gap": final}
