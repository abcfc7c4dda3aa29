"""An unaligned reference built from the aligned model itself: refusal-direction ablation.

AAQ pushes the quantized model away from the unaligned base (PT) model of its family, but many
deployed chat models ship without their base checkpoint at hand. Arditi et al. (2024, "Refusal in
language models is mediated by a single direction", arXiv 2406.11717) show that refusal in chat
models is carried by one direction of the residual stream: the difference of mean activations on
harmful and on harmless instructions. Projecting that direction out of every weight that writes to
the residual stream (token embeddings, attention output and MLP down projections) leaves a model
that no longer refuses but otherwise behaves like the original: a usable stand-in for the base.

Recipe here (``--base ablated``):

1. capture the block output of every decoder layer at the last prompt token (the end of the chat
   template's assistant header) for harmful and benign calibration prompts (never evaluation
   prompts: :data:`harness.calibration_data.CALIBRATION_PROMPTS` by default);
2. candidate directions ``r_l = normalise(mean_harmful_l - mean_benign_l)`` for layers in the first
   80% of the stack (Arditi et al. discard the last 20%);
3. unless a layer is given, keep the candidate whose ablation leaves the least first-token refusal
   probability on the harmful prompts (their "bypass" selection, scored generation-free);
4. orthogonalise: ``W <- W - r r^T W`` for every matrix writing to the residual stream.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.calibration_data import load_calibration_prompts
from harness.errors import UserError
from harness.generation import chat_prompt

__all__ = ["AblationResult", "refusal_directions", "orthogonalize", "ablate_refusal"]

log = logging.getLogger(__name__)


@dataclass
class AblationResult:
    """The ablated copy plus how it was made (kept in the variant metadata)."""

    model: nn.Module
    layer: int
    direction: torch.Tensor
    scores: dict[int, float] = field(default_factory=dict)  # candidate layer -> harmful refusal prob after ablation
    baseline_refusal_prob: float | None = None
    n_harmful: int = 0
    n_benign: int = 0

    def describe(self) -> dict[str, Any]:
        return {"method": "refusal-direction ablation (Arditi et al. 2024)", "layer": self.layer,
                "candidate_scores": {str(k): round(v, 4) for k, v in self.scores.items()},
                "baseline_refusal_prob": None if self.baseline_refusal_prob is None else round(self.baseline_refusal_prob, 4),
                "n_harmful": self.n_harmful, "n_benign": self.n_benign}


def refusal_directions(model: nn.Module, tokenizer, harmful: list[str], benign: list[str], layers: list[int],
                       batch_size: int = 16, system_prompt: str | None = None) -> dict[int, torch.Tensor]:
    """Unit difference-of-means directions (harmful minus benign) of the given block outputs."""
    from probes.capture import capture

    prompts = [chat_prompt(tokenizer, p, system_prompt) for p in harmful + benign]
    acts = capture(model, tokenizer, prompts, layers=layers, batch_size=batch_size, desc="refusal direction")
    n = len(harmful)
    out = {}
    for layer in layers:
        x = np.asarray(acts.get(layer), dtype=np.float64)
        diff = x[:n].mean(0) - x[n:].mean(0)
        norm = np.linalg.norm(diff)
        if not np.isfinite(norm) or norm == 0:
            continue
        out[layer] = torch.from_numpy(diff / norm).float()
    return out


def _residual_writers(model: nn.Module) -> list[nn.Module]:
    """The embedding and every block's attention and MLP output projection (common.layout)."""
    from common.layout import LLAMA, get_part, layout_of
    from quantizers.calibration import decoder_layers

    layout = layout_of(model) or LLAMA
    writers: list[nn.Module] = [model.get_input_embeddings()]
    for layer in decoder_layers(model):
        attn_out, mlp_out = get_part(layer, layout.o), get_part(layer, layout.down)
        if attn_out is None or mlp_out is None:
            raise UserError(f"--base ablated: {type(layer).__name__} has no attention and MLP output projections "
                            f"({layout.o} / {layout.down}); only Llama-style models are supported, give a base model "
                            "instead")
        writers += [attn_out, mlp_out]
    return writers


@torch.no_grad()
def orthogonalize(model: nn.Module, direction: torch.Tensor) -> None:
    """Remove ``direction`` from everything ``model`` writes to its residual stream, in place.

    Ties between the input embedding and the output head are broken first (the head keeps the
    original matrix: ablation changes what the model writes, not how it reads out).
    """
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for module in _residual_writers(model):
        w = module.weight
        r = direction.to(device=w.device, dtype=torch.float32)
        if isinstance(module, nn.Embedding):  # rows are residual vectors
            wf = w.float()
            w.copy_(wf - torch.outer(wf @ r, r))
        else:  # Linear [d_model, k]: columns are residual vectors
            wf = w.float()
            w.copy_(wf - torch.outer(r, r @ wf))
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_(bias.float() - r * (bias.float() @ r))


def ablate_refusal(model: nn.Module, tokenizer, *, layer: int | None = None, prompts: str = "calibration",
                   n_prompts: int = 64, batch_size: int = 16, system_prompt: str | None = None) -> AblationResult:
    """A refusal-ablated copy of ``model`` (the original is left untouched); see the module docstring."""
    from harness.first_token import first_token_refusal_prob
    from quantizers.calibration import decoder_layers

    records = load_calibration_prompts(prompts)
    harmful = [r["prompt"] for r in records if r["label"] == "harmful"][:n_prompts]
    benign = [r["prompt"] for r in records if r["label"] == "benign"][:n_prompts]
    if len(harmful) < 2 or len(benign) < 2:
        raise UserError(f"--base ablated needs harmful and benign prompts; {prompts!r} has "
                        f"{len(harmful)} harmful and {len(benign)} benign")
    n_layers = len(decoder_layers(model))
    if layer is not None and not 0 <= layer < n_layers:
        raise UserError(f"ablation layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    candidates = [layer] if layer is not None else list(range(max(1, int(0.8 * n_layers))))
    directions = refusal_directions(model, tokenizer, harmful, benign, candidates, batch_size, system_prompt)
    if not directions:
        raise UserError("--base ablated: harmful and benign prompts give identical activations; no direction to remove")
    baseline = float(np.mean(first_token_refusal_prob(model, tokenizer, harmful, batch_size, system_prompt=system_prompt)))
    scores: dict[int, float] = {}
    best: tuple[float, int, nn.Module] | None = None
    for cand, r in directions.items():
        ablated = copy.deepcopy(model)
        orthogonalize(ablated, r)
        score = float(np.mean(first_token_refusal_prob(ablated, tokenizer, harmful, batch_size, system_prompt=system_prompt)))
        scores[cand] = score
        if best is None or score < best[0]:
            best = (score, cand, ablated)
        else:
            del ablated
    score, chosen, ablated = best
    log.info("refusal direction: layer %d, harmful first-token refusal prob %.3f -> %.3f", chosen, baseline, score)
    return AblationResult(ablated.eval(), chosen, directions[chosen], scores, baseline, len(harmful), len(benign))
