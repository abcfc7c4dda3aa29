"""Realignment terms for Q-realign's malicious calibration rows, beside the paper's probe loss.

Why they exist: on ``smol-chat-eroded`` the aligned parent's probes still read the eroded model's
harmful prompts as harmful at every layer (README, "Q-realign on the real eroded model"), so the
paper's ``softplus(-logit)`` has little gradient left, and the logit lens puts the refusal
decision in the last block, where a push along a probe direction at the earlier layers does not
reach it. Each term below uses what the aligned parent itself does on the same malicious
calibration prompt, measured once before calibration (:func:`parent_targets`); all act on the
quantized block output at the last prompt token ``t`` only (so they fit a last-token-only forward
of malicious rows). Selected by ``QRealignOptions.loss``, a ``+``-joined list:

* ``probe`` (``paper`` is an alias): the paper's ``softplus(probe_margin - logit_i)``, ``logit_i``
  the aligned SLR probe's logit of the block output;
* ``parent_probe``: ``softplus(logit_parent_i - logit_i)``: a margin per prompt, the parent's own
  probe logit for it, so the eroded logit is moved up to the parent's level, not just past 0;
* ``direction``: the refusal direction of layer ``i`` (difference of the parent's mean last-token
  states on harmful and benign calibration prompts; Arditi et al., "Refusal in Language Models Is
  Mediated by a Single Direction", NeurIPS 2024), the projection scaled so that the parent's benign
  mean is 0 and its harmful mean 1; loss ``relu(d_parent - d)^2`` with ``d_parent`` the parent's own
  scaled projection of the prompt;
* ``output``: at the last ``output_blocks`` blocks, ``output_weight x KL(p_parent || p_q)`` of the
  next-token distributions read through the final norm and the LM head at ``t`` (the model's real
  output at the last block, a logit lens (nostalgebraist 2020) at the blocks before; the parent's
  distribution is read through its own norm and head at the same layer).

A malicious row for which no selected term acts at a block (``output`` alone, before its blocks;
a representation term outside ``probe_blocks``) is kept close to the FP model instead: MSE of its block output at ``t``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantizerError

__all__ = ["LOSS_TERMS", "REPRESENTATION_TERMS", "parse_loss", "uses_parent", "ParentTargets", "parent_targets", "BlockRealign"]

#: The malicious-row terms, by name; ``paper`` means ``probe``.
LOSS_TERMS = ("probe", "parent_probe", "direction", "output")
#: The terms on a layer's representation (``QRealignOptions.probe_blocks`` says at which blocks).
REPRESENTATION_TERMS = ("probe", "parent_probe", "direction")
_ALIASES = {"paper": "probe"}


def parse_loss(spec: str) -> tuple[str, ...]:
    """The terms of a ``loss`` option (``"paper"``, ``"probe+output"``, ...), in the given order,
    without repeats. Raises :class:`QuantizerError` naming the allowed terms."""
    names = [_ALIASES.get(p.strip().lower(), p.strip().lower()) for p in str(spec).split("+")]
    bad = [n for n in names if n not in LOSS_TERMS]
    if not names or bad or "" in names:
        raise QuantizerError(
            f"qrealign option loss={spec!r}: unknown term {(bad or [''])[0]!r}; use 'paper' or terms of "
            f"{', '.join(LOSS_TERMS)} joined by '+', e.g. loss=probe+output"
        )
    return tuple(dict.fromkeys(names))


def uses_parent(terms: Sequence[str]) -> bool:
    """Whether the terms need the aligned parent's own targets (everything but the paper's)."""
    return any(t != "probe" for t in terms)


@dataclass
class ParentTargets:
    """What the aligned parent does on each calibration sample (rows in calibration order).

    ``hidden``: its last-token block outputs ``[n, L, H]`` (float32); ``directions``: per layer
    ``(unit refusal direction, benign mean projection, harmful mean projection)``; ``log_probs``: per
    output layer its next-token log-probabilities ``[n, V]`` read through its final norm and head
    (only for the ``output`` term's layers); ``source``: which model they come from."""

    hidden: torch.Tensor
    directions: dict[int, tuple[torch.Tensor, float, float]] = field(default_factory=dict)
    log_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n": int(self.hidden.shape[0]), "seconds": round(self.seconds, 2),
                "output_layers": sorted(self.log_probs)}


def _final_readout(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """The model's final norm (None when it has none) and LM head, frozen."""
    from common.layout import final_readout

    norm, head = final_readout(model)
    if head is None:
        raise QuantizerError(
            f"qrealign loss term 'output' reads the LM head, but {type(model).__name__} has none; use loss=paper"
        )
    for p in [*(norm.parameters() if norm is not None else ()), *head.parameters()]:
        p.requires_grad_(False)
    return norm, head


def _readout_log_probs(norm: nn.Module | None, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``log_softmax(head(norm(h)))`` in float32 for last-token states ``h`` ``[m, H]``."""
    from common.layout import read_out

    return torch.log_softmax(read_out(norm, head, h), dim=-1)


@torch.no_grad()
def parent_targets(parent: nn.Module, tokenizer: Any, texts: Sequence[str], harmful: Sequence[bool],
                   terms: Sequence[str], output_blocks: int, max_tokens: int, source: str) -> ParentTargets:
    """The aligned parent's targets for chat-formatted calibration ``texts`` (``harmful`` per text):
    one forward of each (last ``max_tokens`` tokens, the calibration's truncation), before any
    block is changed, so the parent can be dropped afterwards."""
    from probes.capture import capture
    from probes.errors import ProbeError

    t0 = time.perf_counter()
    try:
        acts = capture(parent, tokenizer, list(texts), layers=None, position="last", max_tokens=max_tokens,
                       progress=False, desc="qrealign parent targets")
    except ProbeError as exc:
        raise QuantizerError(f"qrealign could not read the aligned parent's targets: {exc}") from None
    hidden = torch.stack([torch.as_tensor(acts.get(layer), dtype=torch.float32) for layer in acts.layers], dim=1)
    targets = ParentTargets(hidden=hidden, source=source)
    if "direction" in terms:
        mask = torch.as_tensor(list(harmful), dtype=torch.bool)
        for layer in range(hidden.shape[1]):
            h = hidden[:, layer]
            diff = h[mask].mean(0) - h[~mask].mean(0)
            unit = diff / diff.norm().clamp(min=1e-12)
            targets.directions[layer] = (unit, float((h[~mask] @ unit).mean()), float((h[mask] @ unit).mean()))
    if "output" in terms:
        norm, head = _final_readout(parent)
        n_layers = hidden.shape[1]
        for layer in range(max(0, n_layers - output_blocks), n_layers):
            device = next(head.parameters()).device
            targets.log_probs[layer] = _readout_log_probs(norm, head, hidden[:, layer].to(device)).cpu()
    targets.seconds = time.perf_counter() - t0
    return targets


class BlockRealign:
    """The malicious rows' loss at block ``index``: ``self(h_q, h_fp, rows)`` with the quantized and
    FP block outputs at ``t`` (``[m, H]``) and each row's calibration sample index, returns the
    per-row loss ``[m]`` and the logged terms (means over the rows)."""

    def __init__(self, terms: Sequence[str], index: int, n_layers: int, probe: tuple[torch.Tensor, float],
                 margin: float, targets: ParentTargets | None, model: nn.Module, output_blocks: int,
                 output_weight: float) -> None:
        self.index = index
        self.w, self.b = probe
        self.margin = margin
        self.targets = targets
        self.output_weight = output_weight
        self.active = [t for t in terms if t != "output" or index >= n_layers - output_blocks]
        if uses_parent(self.active) and targets is None:
            raise QuantizerError("qrealign loss terms other than 'probe' need the aligned parent's targets")
        self.readout = _final_readout(model) if "output" in self.active else None

    def __call__(self, h_q: torch.Tensor, h_fp: torch.Tensor,
                 rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        hq = h_q.float()
        w = self.w.to(hq.device, hq.dtype)
        logit = hq @ w + self.b
        terms: dict[str, float] = {"logit": float(logit.detach().mean())}
        parent = self.targets.hidden[rows.cpu(), self.index].to(hq.device) if self.targets is not None else None
        loss = hq.new_zeros(hq.shape[0])
        for name in self.active:
            part = getattr(self, f"_{name}")(hq, logit, parent, rows)
            terms[name] = float(part.detach().mean())
            loss = loss + part
        if not self.active:
            loss = (hq - h_fp.float()).pow(2).mean(dim=-1)
            terms["mse_t"] = float(loss.detach().mean())
        return loss, terms

    def _probe(self, hq, logit, parent, rows) -> torch.Tensor:
        """The paper's: past the probe's boundary (plus ``probe_margin``)."""
        return F.softplus(self.margin - logit)

    def _parent_probe(self, hq, logit, parent, rows) -> torch.Tensor:
        """Up to the parent's own probe logit for the prompt."""
        return F.softplus(parent @ self.w.to(parent.device) + self.b - logit)

    def _direction(self, hq, logit, parent, rows) -> torch.Tensor:
        """Up to the parent's own (scaled) projection on the layer's refusal direction."""
        unit, benign, harmful = self.targets.directions[self.index]
        unit = unit.to(hq.device)
        span = max(harmful - benign, 1e-6)
        d_q, d_parent = (hq @ unit - benign) / span, (parent @ unit - benign) / span
        return F.relu(d_parent - d_q).pow(2)

    def _output(self, hq, logit, parent, rows) -> torch.Tensor:
        """Toward the parent's next-token distribution read out at this layer."""
        norm, head = self.readout
        log_q = _readout_log_probs(norm, head, hq)
        log_p = self.targets.log_probs[self.index][rows.cpu()].to(log_q.device)
        return self.output_weight * (log_p.exp() * (log_p - log_q)).sum(dim=-1)

