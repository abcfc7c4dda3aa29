"""Output-distribution losses for end-to-end transform learning: OSTQuant's KL-top and AAQ's
contrastive alignment loss.

Both compare next-token distributions at every (unmasked) token position of a calibration batch,
restricted to a subset S of the vocabulary: with ``p^S`` the distribution restricted to S and
renormalised, ``KL_S(p || q) = sum_{i in S} p^S_i (log p^S_i - log q^S_i)``.

* KL-top (OSTQuant, Hu et al. 2025, "OSTQuant: Refining Large Language Model Quantization with
  Orthogonal and Scaling Transformations for Better Distribution Fitting"): S = the K most likely
  tokens of the full-precision model; only the head of the distribution carries signal, the long
  tail is noise at low bit widths.
* AAQ's contrastive alignment loss (Wee et al. 2025, arXiv 2511.07842; ../shared/methods/AAQ.md):
  ``L = KL_{S_top}(p_FT || p_Q) - alpha * KL_{S_diff}(p_PT || p_Q)``, where S_top are the FT model's
  top-K tokens and S_diff the K tokens where FT and the unaligned base PT differ most. The first
  term pulls the quantized model toward the safe model, the second pushes it away from the base.
  With ``alpha = 0`` it is exactly KL-top.

The code variants found in the authors' snapshot are options: S_diff from logits instead of
probabilities, no renormalisation (full-vocabulary probabilities gathered at S), a separate K
for the pull term, and pushing on the PT model's own top-K.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .base import QuantizerError

__all__ = ["subset_kl", "kl_top_loss", "contrastive_alignment_loss"]


def _masked_mean(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions ``[batch, seq]``; positions where the mask is 0 do not count."""
    if attention_mask is None:
        return values.mean()
    mask = attention_mask.to(values.dtype)
    if mask.shape != values.shape:
        raise QuantizerError(f"attention mask shape {tuple(mask.shape)} does not match logits positions {tuple(values.shape)}")
    total = mask.sum()
    if float(total) == 0:
        raise QuantizerError("every position of the calibration batch is masked out; give non-empty text")
    return (values * mask).sum() / total


def subset_kl(
    target_logits: torch.Tensor,
    q_logits: torch.Tensor,
    index: torch.Tensor,
    *,
    renormalize: bool = True,
) -> torch.Tensor:
    """Per-position ``KL(p_target^S || p_q^S)`` over the vocabulary subset ``index`` ``[..., K]``.

    With ``renormalize=False`` the full-vocabulary probabilities are gathered at S and used as
    they are (the authors' code variant; not a true KL, it can be negative).
    """
    target = target_logits.float()
    q = q_logits.float()
    if renormalize:
        log_p = F.log_softmax(target.gather(-1, index), dim=-1)
        log_q = F.log_softmax(q.gather(-1, index), dim=-1)
    else:
        log_p = F.log_softmax(target, dim=-1).gather(-1, index)
        log_q = F.log_softmax(q, dim=-1).gather(-1, index)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _check_logits(name: str, logits: torch.Tensor, like: torch.Tensor) -> None:
    if logits.shape != like.shape:
        raise QuantizerError(
            f"{name} logits have shape {tuple(logits.shape)} but the quantized model's are {tuple(like.shape)}: "
            "the models must share the tokenizer and vocabulary"
        )


def _check_k(k: int, vocab: int, what: str) -> int:
    if k < 1:
        raise QuantizerError(f"{what} must be >= 1, got {k}")
    return min(k, vocab)


def kl_top_loss(
    q_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    k: int = 500,
    renormalize: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OSTQuant's KL-top loss: ``KL(p_ref || p_q)`` on the reference model's top-``k`` tokens,
    averaged over unmasked positions. Returns ``(loss, {"kl_top": value})``."""
    _check_logits("reference", ref_logits, q_logits)
    k = _check_k(k, q_logits.shape[-1], "k")
    with torch.no_grad():
        top = ref_logits.topk(k, dim=-1).indices
    loss = _masked_mean(subset_kl(ref_logits.detach(), q_logits, top, renormalize=renormalize), attention_mask)
    return loss, {"kl_top": float(loss.detach())}


def contrastive_alignment_loss(
    q_logits: torch.Tensor,
    ft_logits: torch.Tensor,
    pt_logits: torch.Tensor,
    *,
    alpha: float = 0.75,
    k: int = 500,
    k_pull: int | None = None,
    diff_space: Literal["prob", "logit"] = "prob",
    renormalize: bool = True,
    push_set: Literal["diff", "pt_top"] = "diff",
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AAQ's pull-push loss ``L_pull - alpha * L_push`` (see the module docstring).

    ``k`` sizes S_diff (and S_top unless ``k_pull`` is given); ``diff_space`` ranks S_diff by
    ``|p_FT - p_PT|`` (``"prob"``, the default) or ``|logit_FT - logit_PT|``; ``push_set="pt_top"``
    pushes on the PT model's top-K instead. Returns ``(loss, {"pull": ..., "push": ...})``, both
    terms averaged over unmasked positions.
    """
    _check_logits("FT", ft_logits, q_logits)
    _check_logits("PT (base)", pt_logits, q_logits)
    if alpha < 0:
        raise QuantizerError(f"alpha must be >= 0, got {alpha}")
    if diff_space not in ("prob", "logit"):
        raise QuantizerError(f"diff_space must be 'prob' or 'logit', got {diff_space!r}")
    if push_set not in ("diff", "pt_top"):
        raise QuantizerError(f"push_set must be 'diff' or 'pt_top', got {push_set!r}")
    vocab = q_logits.shape[-1]
    k = _check_k(k, vocab, "k")
    k_pull = _check_k(k if k_pull is None else k_pull, vocab, "k_pull")
    ft, pt = ft_logits.detach().float(), pt_logits.detach().float()
    with torch.no_grad():
        s_top = ft.topk(k_pull, dim=-1).indices
        if push_set == "pt_top":
            s_push = pt.topk(k, dim=-1).indices
        elif diff_space == "prob":
            s_push = (ft.softmax(-1) - pt.softmax(-1)).abs().topk(k, dim=-1).indices
        else:
            s_push = (ft - pt).abs().topk(k, dim=-1).indices
    pull = _masked_mean(subset_kl(ft, q_logits, s_top, renormalize=renormalize), attention_mask)
    push = _masked_mean(subset_kl(pt, q_logits, s_push, renormalize=renormalize), attention_mask)
    loss = pull - alpha * push
    return loss, {"pull": float(pull.detach()), "push": float(push.detach())}
