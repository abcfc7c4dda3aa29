"""AAQ, Alignment-Aware Quantization (``aaq``; later named CAQ): OST's learned transforms trained
with a contrastive alignment loss that keeps the quantized model close to the safe instruction-
tuned model (FT) and away from its unaligned pre-trained base (PT).

Wee, Kim, Kim, Hwang, Kwak, "Alignment-Aware Quantization for LLM Safety" (arXiv:2511.07842; v4/v5
"Safety-Preserving PTQ via Contrastive Alignment Loss"); method as reconstructed in
../shared/methods/AAQ.md. Per token, with ``p_FT``, ``p_PT`` frozen and ``p_Q`` the transformed,
fake-quantized FT model::

    L = KL(p_FT^S_top || p_Q^S_top) - alpha * KL(p_PT^S_diff || p_Q^S_diff)

``S_top``: FT's top-K tokens; ``S_diff``: the K tokens where FT and PT differ most; both subsets
renormalised. Defaults alpha = 0.75, K = 500. The loss is ``quantizers.losses.
contrastive_alignment_loss``; everything else (transforms, calibration loop, fusing, weight step)
is :class:`~quantizers.ost.OSTQuantizer`'s. The push term is maximised and unbounded, so the
shared loop's divergence guards watch it and the pull term (which explodes when push wins): by default it stops early and keeps the last good step
(recorded in the metadata), or, with ``guard_action=error``, fails with no variant written.
The two frozen full-precision models (FT reference, PT base) are run once per calibration batch
before training and released (``QuantContext.release``): only their cached targets stay.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from .base import QuantContext, QuantizerError, register_quantizer
from .losses import Logits, SubsetTarget, contrast_diagnostic, contrastive_from_targets, contrastive_targets
from .ost import OSTOptions, OSTQuantizer
from .scheme import QuantScheme

__all__ = ["AAQOptions", "AAQQuantizer", "check_model_pair", "WEAK_CONTRAST_TV"]

log = logging.getLogger(__name__)

#: Mean total-variation distance between FT's and PT's next-token distributions on the
#: calibration data below which AAQ warns that the push term has nothing to push on. Measured
#: (bench/bench_contrast.py, 2,048 tokens each): toy-chat/toy-base 0.33 on toy-pretrain and 0.73
#: on chat:calibration; smollm2-135m-instruct/its refusal-ablated copy 0.17 on WikiText-2 and
#: 0.16 on chat:calibration; FT against its own copy 0. The floor sits well below the weakest
#: real pair measured and well above the no-contrast control (docs/quantizers.md).
WEAK_CONTRAST_TV = 0.05


@dataclass(frozen=True)
class AAQOptions(OSTOptions):
    """OST's options plus the loss: ``alpha`` (0.75): weight of the push term (0 gives OST's
    KL-top); ``k`` (500): size of S_diff and, unless ``k_pull`` is set, of S_top; the authors'
    code variants as ablations: ``k_pull`` (None = k; their code uses 1000), ``diff_space``
    (``prob``: S_diff ranks |p_FT - p_PT|; ``logit``: |logit_FT - logit_PT|), ``renormalize``
    (True; False gathers full-vocabulary probabilities at S), ``push_set`` (``diff``; ``pt_top``:
    push on PT's own top-K). The guards watch the push and the pull term (stop at ``guard_factor``,
    3x, the first value of either)."""

    alpha: float = 0.75
    k_pull: int | None = None
    diff_space: Literal["prob", "logit"] = "prob"
    renormalize: bool = True
    push_set: Literal["diff", "pt_top"] = "diff"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0:
            raise QuantizerError(f"alpha={self.alpha} must be >= 0 (0 is OST's KL-top; the paper uses 0.75)")
        if self.k_pull is not None and self.k_pull < 1:
            raise QuantizerError(f"k_pull={self.k_pull} must be >= 1 (or none)")


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    path = getattr(cfg, "_name_or_path", "") or type(model).__name__
    return f"{path} ({getattr(cfg, 'model_type', '?')}, vocab {getattr(cfg, 'vocab_size', '?')})"


def check_model_pair(ft: nn.Module, pt: nn.Module) -> None:
    """The FT and PT models must share the architecture type and the vocabulary (same tokenizer):
    the loss compares their next-token distributions index by index."""
    ft_cfg, pt_cfg = getattr(ft, "config", None), getattr(pt, "config", None)
    same_type = getattr(ft_cfg, "model_type", None) == getattr(pt_cfg, "model_type", None)
    ft_vocab = ft.get_output_embeddings().weight.shape[0] if hasattr(ft, "get_output_embeddings") else None
    pt_vocab = pt.get_output_embeddings().weight.shape[0] if hasattr(pt, "get_output_embeddings") else None
    if not same_type or ft_vocab is None or ft_vocab != pt_vocab:
        what = "architecture" if not same_type else "vocabulary"
        raise QuantizerError(
            f"aaq needs a base model of the same family as the subject: {what} differs between the subject "
            f"{_describe(ft)} and the base {_describe(pt)}; pass the subject's own pre-trained base model "
            "(same tokenizer), or use ost"
        )


@register_quantizer
class AAQQuantizer(OSTQuantizer):
    """OST with AAQ's pull (toward FT) / push (away from PT) loss."""

    name = "aaq"
    description = "AAQ: OST transforms trained with the contrastive alignment loss (pull to FT, push from base PT)"
    Options = AAQOptions
    needs_base_model = True
    #: The push term is unbounded; when it wins, the pull term (distance from FT) explodes first:
    #: at alpha 1.5 on the toy pair pull grew 20x while push grew 4.8x and perplexity 7.6x.
    guard_terms: ClassVar[tuple[str, ...]] = ("push", "pull")
    #: Per-batch contrast shown with the loss terms on the progress bar (and in the curves).
    step_diagnostics: ClassVar[tuple[str, ...]] = ("tv",)

    def frozen_models(self, model: nn.Module, ctx: QuantContext) -> dict[str, nn.Module]:
        check_model_pair(model, ctx.base_model)
        frozen = super().frozen_models(model, ctx)
        if ctx.base_model is model or ctx.base_model is frozen["ref"]:
            raise QuantizerError("aaq's base model is the subject itself; pass the unaligned pre-trained base model")
        return {**frozen, "base": ctx.base_model}

    def batch_targets(
        self, logits: Mapping[str, torch.Tensor], attention_mask: torch.Tensor | None
    ) -> tuple[dict[str, SubsetTarget], dict[str, float]]:
        opts: AAQOptions = self.options
        targets = contrastive_targets(logits["ref"], logits["base"], k=opts.k, k_pull=opts.k_pull,
                                      diff_space=opts.diff_space, renormalize=opts.renormalize, push_set=opts.push_set)
        diagnostic = contrast_diagnostic(logits["ref"], logits["base"], targets["push"].index, k=opts.k,
                                         attention_mask=attention_mask)
        return targets, diagnostic

    def loss(
        self, q_logits: Logits, targets: Mapping[str, SubsetTarget], attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Mapping[str, float]]:
        return contrastive_from_targets(q_logits, targets, alpha=self.options.alpha, attention_mask=attention_mask)

    def summarize_targets(self, diagnostics: list[dict[str, float]]) -> None:
        """Record the FT/PT contrast of the calibration data and warn (once) when it is too weak."""
        contrast = {key: round(sum(d[key] for d in diagnostics) / len(diagnostics), 6) for key in diagnostics[0]}
        contrast["weak_below_tv"] = WEAK_CONTRAST_TV
        contrast["weak"] = contrast["tv"] < WEAK_CONTRAST_TV
        self.metadata["contrast"] = contrast
        if contrast["weak"]:
            log.warning(
                "aaq: FT and PT barely differ on this calibration data (mean total variation %.3f < %.2f; top-1 "
                "differs at %.1f%% of tokens): the push term can hardly steer anything. Calibrate on text where "
                "they differ, e.g. --calib-text chat:calibration", contrast["tv"], WEAK_CONTRAST_TV,
                100 * contrast["top1_differs"],
            )

    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        model = super().quantize(model, scheme, ctx)
        ratios = self.metadata["calibration"]["curves"].get("push_pull", [])
        if ratios:
            self.metadata["contrast"]["push_pull_mean"] = round(sum(ratios) / len(ratios), 6)
        return model
