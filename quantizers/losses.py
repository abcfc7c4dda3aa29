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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import QuantizerError

__all__ = [
    "HeadLogits",
    "Logits",
    "subset_log_probs",
    "subset_kl_from_log_probs",
    "subset_kl",
    "SubsetTarget",
    "kl_top_targets",
    "kl_top_from_targets",
    "kl_top_loss",
    "contrastive_targets",
    "contrastive_from_targets",
    "contrastive_alignment_loss",
    "contrast_diagnostic",
]


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


class _HeadRows(torch.autograd.Function):
    """``out[n, k] = hidden[n] . weight[index[n, k]]`` for a frozen ``weight`` ``[vocab, d]``: the
    logits at K vocabulary entries per position, without the whole-vocabulary matmul. The forward
    gathers the K weight rows of a few positions at a time (bounded memory); the backward is one
    ``embedding_bag`` (``sum_k g[n, k] weight[index[n, k]]``), so nothing of size positions x K x d
    is kept."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        n, k = index.shape
        out = hidden.new_empty(n, k)
        chunk = max(1, (1 << 24) // max(1, k * weight.shape[1]))  # ~64 MiB of gathered fp32 rows
        for start in range(0, n, chunk):
            rows = weight[index[start:start + chunk]]  # [chunk, K, d]
            out[start:start + chunk] = torch.bmm(rows, hidden[start:start + chunk, :, None]).squeeze(-1)
        ctx.save_for_backward(weight, index)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        weight, index = ctx.saved_tensors
        grad = F.embedding_bag(index, weight, per_sample_weights=g.contiguous(), mode="sum")
        return grad, None, None


class HeadLogits:
    """The trained model's logits as ``hidden @ weight.T (+ bias)``, evaluated only where a loss
    looks: :meth:`at` gives the logits at a vocabulary subset per position (all a renormalised
    subset KL needs), :meth:`full` all of them. For a frozen lm_head this replaces a
    positions x vocabulary x d matmul (and its backward) by positions x K x d."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.requires_grad:
            raise QuantizerError("HeadLogits needs a frozen lm_head weight (its gradient is not computed)")
        self.hidden = hidden.float()
        self.weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """Logits at ``index`` ``[..., K]`` (the positions' leading shape), float32."""
        lead, d = self.hidden.shape[:-1], self.hidden.shape[-1]
        flat = index.reshape(-1, index.shape[-1]).long()
        out = _HeadRows.apply(self.hidden.reshape(-1, d), self.weight, flat).reshape(*lead, index.shape[-1])
        return out if self.bias is None else out + self.bias[index.long()]

    def full(self) -> torch.Tensor:
        return F.linear(self.hidden, self.weight, self.bias)


Logits = torch.Tensor | HeadLogits


def subset_log_probs(logits: Logits, index: torch.Tensor, *, renormalize: bool = True) -> torch.Tensor:
    """``log p^S`` at the vocabulary subset ``index`` ``[..., K]``: the log-softmax of the gathered
    logits (``renormalize``), or the full-vocabulary log-softmax gathered at S."""
    if isinstance(logits, HeadLogits):
        if renormalize:
            return F.log_softmax(logits.at(index), dim=-1)
        logits = logits.full()
    logits = logits.float()
    if renormalize:
        return F.log_softmax(logits.gather(-1, index), dim=-1)
    return F.log_softmax(logits, dim=-1).gather(-1, index)


def subset_kl_from_log_probs(
    log_p: torch.Tensor, q_logits: Logits, index: torch.Tensor, *, renormalize: bool = True
) -> torch.Tensor:
    """Per-position ``KL(p^S || p_q^S)`` from the target's cached subset log-probabilities ``log_p``
    (:func:`subset_log_probs`): all a frozen model has to leave behind for the loss."""
    log_q = subset_log_probs(q_logits, index.long(), renormalize=renormalize)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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
    log_p = subset_log_probs(target_logits, index, renormalize=renormalize)
    return subset_kl_from_log_probs(log_p, q_logits, index, renormalize=renormalize)


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


@dataclass(frozen=True)
class SubsetTarget:
    """What a frozen model leaves behind for one subset-KL term of one calibration batch: the
    subset ``index`` ``[batch, seq, K]`` (int32: half of int64's memory) and the frozen model's
    subset log-probabilities ``log_p`` there (:func:`subset_log_probs`). Computed once per batch,
    so the frozen models need not stay in memory or run again while the transforms train."""

    index: torch.Tensor
    log_p: torch.Tensor
    renormalize: bool = True

    @classmethod
    def of(cls, logits: torch.Tensor, index: torch.Tensor, renormalize: bool) -> SubsetTarget:
        return cls(index.to(torch.int32), subset_log_probs(logits, index, renormalize=renormalize), renormalize)

    def kl(self, q_logits: Logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``KL(p^S || p_q^S)`` averaged over the unmasked positions."""
        if tuple(self.index.shape[:-1]) != tuple(q_logits.shape[:-1]):
            raise QuantizerError(
                f"cached targets cover positions {tuple(self.index.shape[:-1])} but the quantized model's logits "
                f"{tuple(q_logits.shape[:-1])}: targets and batches are out of step"
            )
        per_position = subset_kl_from_log_probs(self.log_p, q_logits, self.index, renormalize=self.renormalize)
        return _masked_mean(per_position, attention_mask)

    def rows(self, start: int, stop: int) -> SubsetTarget:
        """The target of sequences ``start:stop`` of its batch (one micro-batch)."""
        return SubsetTarget(self.index[start:stop], self.log_p[start:stop], self.renormalize)

    @classmethod
    def cat(cls, parts: Sequence[SubsetTarget]) -> SubsetTarget:
        """One batch's target from its micro-batches' (in order): the inverse of :meth:`rows`."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([t.index for t in parts]), torch.cat([t.log_p for t in parts]), parts[0].renormalize)

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.log_p.numel() * self.log_p.element_size()


@torch.no_grad()
def kl_top_targets(ref_logits: torch.Tensor, *, k: int = 500, renormalize: bool = True) -> dict[str, SubsetTarget]:
    """KL-top's cached targets of one batch: the reference's top-``k`` tokens and log-probabilities."""
    k = _check_k(k, ref_logits.shape[-1], "k")
    top = ref_logits.topk(k, dim=-1).indices
    return {"top": SubsetTarget.of(ref_logits, top, renormalize)}


def kl_top_from_targets(
    q_logits: Logits, targets: Mapping[str, SubsetTarget], attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-top from cached targets (:func:`kl_top_targets`): ``(loss, {"kl_top": value})``."""
    loss = targets["top"].kl(q_logits, attention_mask)
    return loss, {"kl_top": float(loss.detach())}


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
    targets = kl_top_targets(ref_logits.detach(), k=k, renormalize=renormalize)
    return kl_top_from_targets(q_logits, targets, attention_mask)


@torch.no_grad()
def contrastive_targets(
    ft_logits: torch.Tensor,
    pt_logits: torch.Tensor,
    *,
    k: int = 500,
    k_pull: int | None = None,
    diff_space: Literal["prob", "logit"] = "prob",
    renormalize: bool = True,
    push_set: Literal["diff", "pt_top"] = "diff",
) -> dict[str, SubsetTarget]:
    """AAQ's cached targets of one batch: FT's top-K with FT's log-probabilities (``pull``) and the
    push set (S_diff, or PT's top-K) with PT's log-probabilities (``push``)."""
    _check_logits("PT (base)", pt_logits, ft_logits)
    if diff_space not in ("prob", "logit"):
        raise QuantizerError(f"diff_space must be 'prob' or 'logit', got {diff_space!r}")
    if push_set not in ("diff", "pt_top"):
        raise QuantizerError(f"push_set must be 'diff' or 'pt_top', got {push_set!r}")
    vocab = ft_logits.shape[-1]
    k = _check_k(k, vocab, "k")
    k_pull = _check_k(k if k_pull is None else k_pull, vocab, "k_pull")
    ft, pt = ft_logits.float(), pt_logits.float()
    s_top = ft.topk(k_pull, dim=-1).indices
    if push_set == "pt_top":
        s_push = pt.topk(k, dim=-1).indices
    elif diff_space == "prob":
        s_push = (ft.softmax(-1) - pt.softmax(-1)).abs().topk(k, dim=-1).indices
    else:
        s_push = (ft - pt).abs().topk(k, dim=-1).indices
    return {"pull": SubsetTarget.of(ft, s_top, renormalize), "push": SubsetTarget.of(pt, s_push, renormalize)}


def contrastive_from_targets(
    q_logits: Logits,
    targets: Mapping[str, SubsetTarget],
    *,
    alpha: float = 0.75,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AAQ's loss from cached targets (:func:`contrastive_targets`): ``(loss, {"pull", "push",
    "push_pull"})``. ``push_pull`` (push / pull) close to 1 at every step is the sign of a weak
    contrast: the push term then only rescales the pull term (:func:`contrast_diagnostic`)."""
    if alpha < 0:
        raise QuantizerError(f"alpha must be >= 0, got {alpha}")
    pull = targets["pull"].kl(q_logits, attention_mask)
    push = targets["push"].kl(q_logits, attention_mask)
    loss = pull - alpha * push
    pull_v, push_v = float(pull.detach()), float(push.detach())
    return loss, {"pull": pull_v, "push": push_v, "push_pull": push_v / pull_v if pull_v > 0 else math.inf}


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
    pushes on the PT model's top-K instead. Returns ``(loss, {"pull", "push", "push_pull"})``,
    the terms averaged over unmasked positions.
    """
    _check_logits("FT", ft_logits, q_logits)
    _check_logits("PT (base)", pt_logits, q_logits)
    if alpha < 0:
        raise QuantizerError(f"alpha must be >= 0, got {alpha}")
    targets = contrastive_targets(ft_logits.detach(), pt_logits.detach(), k=k, k_pull=k_pull, diff_space=diff_space,
                                  renormalize=renormalize, push_set=push_set)
    return contrastive_from_targets(q_logits, targets, alpha=alpha, attention_mask=attention_mask)


@torch.no_grad()
def contrast_diagnostic(
    ft_logits: torch.Tensor,
    pt_logits: torch.Tensor,
    s_diff: torch.Tensor,
    *,
    k: int = 500,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """How much FT and PT disagree on one batch, i.e. how much the push term can steer:

    * ``top1_differs``: share of positions where FT's and PT's most likely tokens differ;
    * ``topk_differs``: mean share of FT's top-``k`` tokens missing from PT's top-``k``;
    * ``sdiff_abs_diff``: mean ``|p_FT - p_PT|`` over the S_diff entries ``s_diff``;
    * ``tv``: mean total-variation distance ``0.5 * sum_v |p_FT - p_PT|`` (0: the same
      distribution, 1: disjoint ones): the share of next-token probability the models place differently.

    Means over unmasked positions, as plain floats (progress log and variant.json).
    """
    k = _check_k(k, ft_logits.shape[-1], "k")
    p_ft, p_pt = ft_logits.float().softmax(-1), pt_logits.float().softmax(-1)
    diff = (p_ft - p_pt).abs()
    ft_top, pt_top = ft_logits.topk(k, dim=-1).indices, pt_logits.topk(k, dim=-1).indices
    in_pt_top = torch.zeros_like(p_pt, dtype=torch.bool).scatter_(-1, pt_top, True)
    per_position = {
        "top1_differs": (ft_top[..., 0] != pt_top[..., 0]).float(),
        "topk_differs": 1.0 - in_pt_top.gather(-1, ft_top).float().mean(-1),
        "sdiff_abs_diff": diff.gather(-1, s_diff.long()).mean(-1),
        "tv": 0.5 * diff.sum(-1),
    }
    return {key: float(_masked_mean(v, attention_mask)) for key, v in per_position.items()}
