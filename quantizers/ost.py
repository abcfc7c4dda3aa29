"""OSTQuant-style learned transforms (``ost``): orthogonal rotations and diagonal scales trained end
to end on the model's output distribution, then fused into the weights and the weights quantized.

Hu, Cheng, Wang, Chen, Li, Zhang, Xu, Yang, Sun, Zhou, Yan, Feng, "OSTQuant: Refining Large
Language Model Quantization with Orthogonal and Scaling Transformations for Better Distribution
Fitting", ICLR 2025 (arXiv:2501.13987); recipe and learning rates from ../shared/methods/AAQ.md.

What is learned (all function-preserving in full precision, ``quantizers.transforms``):

* ``R1``: the residual-stream rotation, initialised at QuaRot's random Hadamard (RMSNorm weights
  folded into the following linears first);
* ``R2``: one value/output rotation per layer, initialised at a random Hadamard;
* diagonal scales, initialised at 1: norm -> q/k/v, norm -> gate/up, v -> o, q <-> k (equal on each
  rotary pair), up -> down.

Fixed online Hadamards sit on the down_proj input and, when the KV cache is quantized, on
post-RoPE queries and keys. Rotations stay orthogonal through
``torch.nn.utils.parametrizations.orthogonal`` (Cayley map) instead of OSTQuant's Riemannian
optimiser. The transforms are attached as ``torch.nn.utils.parametrize`` parametrisations, so
training runs the ordinary model forward with activation and KV-cache fake-quant on and weights
in full precision (as in the recipe); the loss is KL-top against the frozen full-precision model
(``quantizers.losses.kl_top_loss``), minimised by the shared ``calibration.run_calibration`` loop.
Afterwards the parametrisations are removed with their values kept (fusing) and the weights
quantized (GPTQ by default).

Subclasses change only the loss: :meth:`OSTQuantizer.frozen_models` and
:meth:`OSTQuantizer.loss` (AAQ adds the base model and the contrastive loss).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import QuantContext, QuantizerError, register_quantizer
from .calibration import DivergenceGuard, model_inputs, run_calibration
from .losses import kl_top_loss
from .modules import quantize_linear_layers
from .quarot import hadamard_rotations
from .scheme import QuantScheme
from .transforms import (
    ChainBuilder,
    OnlineOp,
    Scale,
    TransformQuantizer,
    WeightStepOptions,
    attach_chains,
    detach_chains,
    fold_rmsnorms,
    fuse_chains,
    install_online_hadamards,
    model_parts,
    online_down_layers,
    rotation_chains,
    scale_sites,
    site_chains,
)

__all__ = ["OSTOptions", "OSTQuantizer", "LEARNED_SITES"]

log = logging.getLogger(__name__)

#: Scale sites OST learns (see ``quantizers.transforms.scale_sites``).
LEARNED_SITES = ("norm_qkv", "norm_mlp", "vo", "qk", "updown")


@dataclass(frozen=True)
class OSTOptions(WeightStepOptions):
    """Transform learning settings.

    ``steps``: optimiser steps (100, the recipe's; each step is one calibration batch, cycling).
    ``lr_rotation`` / ``lr_scale``: AdamW learning rates of the rotation and scale parameters
    (0.0169 / 0.00179, the authors'). ``k``: tokens in the top-K subset of the loss (500).
    ``learn_r1``, ``learn_r2``, ``learn_scales``: what is trained (all True; a rotation not learned
    stays at its random Hadamard, scales not learned stay 1). ``orthogonal_map``: ``cayley`` or
    ``matrix_exp`` parametrisation of the rotations. ``max_batches``: use only the first N
    calibration batches (None: all). ``guard_factor`` / ``guard_action``: stop (restoring the last
    good step) or fail when a guarded loss term exceeds ``guard_factor`` times its first value
    (3, stop; on the toy pair every healthy OST/AAQ run stayed below 1.6x, while AAQ at alpha 1.5
    reached 20x on its pull term). Plus the weight step's ``weights`` (auto: GPTQ) and ``mse_clip``.
    """

    steps: int = 100
    lr_rotation: float = 0.0169
    lr_scale: float = 0.00179
    k: int = 500
    learn_r1: bool = True
    learn_r2: bool = True
    learn_scales: bool = True
    orthogonal_map: Literal["cayley", "matrix_exp"] = "cayley"
    max_batches: int | None = None
    guard_factor: float = 3.0
    guard_action: Literal["stop", "error"] = "stop"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise QuantizerError(f"steps={self.steps} must be >= 1")
        if self.lr_rotation < 0 or self.lr_scale < 0:
            raise QuantizerError("learning rates must be >= 0")
        if self.k < 1:
            raise QuantizerError(f"k={self.k} must be >= 1")
        if self.max_batches is not None and self.max_batches < 1:
            raise QuantizerError(f"max_batches={self.max_batches} must be >= 1 (or none)")
        if self.guard_factor <= 1:
            raise QuantizerError(f"guard_factor={self.guard_factor} must be > 1")
        if not (self.learn_r1 or self.learn_r2 or self.learn_scales):
            raise QuantizerError("nothing to learn: set one of learn_r1, learn_r2, learn_scales (or use quarot)")


def _orthogonality_error(r: torch.Tensor) -> float:
    """``max |R R^T - I|``: how far a fused rotation drifted from orthogonal (float rounding only)."""
    return float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).abs().max())


def _logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


@register_quantizer
class OSTQuantizer(TransformQuantizer):
    """Learned rotations + scales (KL-top end to end), fused, then RTN/GPTQ weights."""

    name = "ost"
    description = "OSTQuant: learned orthogonal rotations + diagonal scales (KL-top loss), fused, then GPTQ/RTN"
    Options = OSTOptions
    requires_calibration = True
    #: The logged loss terms the divergence guards watch (each against ``guard_factor``).
    guard_terms: ClassVar[tuple[str, ...]] = ("kl_top",)

    def check(self, scheme: QuantScheme) -> None:
        super().check(scheme)
        if not (scheme.quantizes_activations or scheme.quantizes_kv):
            raise QuantizerError(
                f"{self.name} learns transforms against activation/KV-cache quantization error, and scheme "
                f"{scheme.label!r} quantizes neither (the transforms would not change the training output): "
                "use quarot or gptq for weight-only schemes"
            )

    # ------------------------------------------------------------------ the loss (subclass hooks)
    def frozen_models(self, model: nn.Module, ctx: QuantContext) -> dict[str, nn.Module]:
        """The frozen full-precision models the loss compares against: ``{"ref": FP model}``."""
        ref = ctx.reference_model
        if ref is None or ref is model:
            log.info("%s: no separate reference model given; keeping a full-precision copy", self.name)
            ref = copy.deepcopy(model)
        return {"ref": ref}

    def loss(
        self, q_logits: torch.Tensor, frozen: Mapping[str, torch.Tensor], attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Mapping[str, float]]:
        """KL-top between the frozen reference and the transformed, fake-quantized model."""
        return kl_top_loss(q_logits, frozen["ref"], k=self.options.k, attention_mask=attention_mask)

    # ------------------------------------------------------------------ pipeline
    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        opts: OSTOptions = self.options
        frozen = self.frozen_models(model, ctx)  # before any change: a copied reference stays full precision
        parts = self.prepare(model, scheme)
        for m in frozen.values():
            m.eval()
        generator = torch.Generator().manual_seed(ctx.seed)
        device = parts.embed.weight.device

        fold_rmsnorms(parts)
        for p in model.parameters():
            p.requires_grad_(False)
        # Activation fake-quant on, weights full precision while learning (the recipe).
        down = online_down_layers(parts, scheme)
        train_acts = scheme.quantizes_activations
        online = install_online_hadamards(parts, None, down_layers=down, qk=scheme.quantizes_kv, generator=generator)
        if train_acts:
            quantize_linear_layers(model, scheme.replace(w_bits=16), input_transforms=online)
        parts = model_parts(model)  # the Linears may have been replaced

        r1, r2 = hadamard_rotations(parts, generator, learn_r1=opts.learn_r1, learn_r2=opts.learn_r2,
                                    orthogonal_map=opts.orthogonal_map)
        builder = ChainBuilder()
        rotation_chains(parts, builder, r1=r1, r2=r2)
        scales: dict[str, Scale] = {}
        if opts.learn_scales:
            sites = scale_sites(parts, LEARNED_SITES)
            scales = {s.name: Scale(s.size, learnable=True).to(device) for s in sites}
            site_chains(sites, scales, builder)
        layer_of = {f"{lp.prefix}.mlp.down_proj": lp for lp in parts.layers}
        online_ops = ChainBuilder()  # fused after training when no activation quant runs during it
        for name, h in online.items():
            (builder if train_acts else online_ops).consume(layer_of[name].down, OnlineOp(h))
        chains = builder.chains()

        groups = []
        rot_params = [p for r in ([r1] if opts.learn_r1 else []) + (r2 if opts.learn_r2 else []) for p in r.parameters()]
        if rot_params:
            groups.append({"params": rot_params, "lr": opts.lr_rotation})
        if scales:
            groups.append({"params": [s.value for s in scales.values()], "lr": opts.lr_scale})

        batches = list(ctx.calibration_batches)[: opts.max_batches] if opts.max_batches else list(ctx.calibration_batches)

        def loss_fn(batch: Any, step: int) -> tuple[torch.Tensor, Mapping[str, float]]:
            inputs = model_inputs(batch, device)
            with torch.no_grad():
                targets = {key: _logits(m, inputs) for key, m in frozen.items()}
            with parametrize.cached():
                q_logits = _logits(model, inputs)
            return self.loss(q_logits, targets, inputs.get("attention_mask"))

        attach_chains(chains)
        try:
            log_ = run_calibration(
                loss_fn, groups, batches, opts.steps,
                guard=[DivergenceGuard(t, factor=opts.guard_factor, action=opts.guard_action) for t in self.guard_terms],
                stage=self.name, progress=ctx.progress, device=device,
            )
        finally:
            detach_chains(chains)  # fuse what was learned (also on error: no half-parametrized model)
        fuse_chains(online_ops.chains())
        self.metadata["calibration"] = log_.to_dict()
        if log_.stopped_early:
            self.metadata["stopped_early"] = log_.stopped_early
            log.warning("%s: %s; kept the transforms of the last good step", self.name, log_.stopped_early)
        self.metadata["transforms"] = {
            "r1": "learned" if opts.learn_r1 else "random hadamard",
            "r2": "learned" if opts.learn_r2 else "random hadamard",
            "scales": list(LEARNED_SITES) if opts.learn_scales else [],
            "online_down_proj": len(down), "online_qk": scheme.quantizes_kv,
            "orthogonality_error": _orthogonality_error(r1.matrix().detach()),
        }
        self.weight_step(model, scheme, ctx, input_transforms=None if train_acts else online)
        return model
