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

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import QuantContext, QuantizerError, register_quantizer
from .calibration import DivergenceGuard, model_inputs, run_calibration
from .fused_forward import FusedTransformForward, autocast_dtype, available_memory_bytes, checkpoint_needed
from .losses import Logits, SubsetTarget, kl_top_from_targets, kl_top_targets
from .modules import quantize_linear_layers
from .quarot import hadamard_rotations
from .scheme import QuantScheme
from .transforms import (
    ChainBuilder,
    ModelParts,
    OnlineOp,
    Scale,
    TransformQuantizer,
    WeightStepOptions,
    attach_chains,
    detach_chains,
    fold_rmsnorms,
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
    reached 20x on its pull term). ``engine``: ``fused`` (each layer transforms its own weights
    inside its forward, ``quantizers.fused_forward``; the default) or ``parametrize`` (every
    weight of the model through ``torch.nn.utils.parametrize`` on every step: the pre-rework path,
    kept as the reference the fused one is tested against). ``checkpoint``: gradient checkpointing
    per decoder layer (fused engine): ``auto`` (only when an uncheckpointed step's activations would
    take more than half the free memory, ``fused_forward.checkpoint_needed``), true, false. ``autocast``: ``auto`` (bf16 where the hardware multiplies
    bf16 natively, else fp32), ``bf16``, ``off``. ``ste_weights``: train against fake-quantized
    weights with a straight-through estimator (``auto``: on for schemes that quantize weights but
    not activations, where nothing else would give the transforms a training signal; off
    otherwise, as in the recipe). ``micro_batches``: gradient accumulation (fused engine): each
    calibration batch (one step) runs as N micro-batches of batch / N sequences, each forward and
    backward at once, then one optimizer step: the same tokens and gradient per step at the
    activation memory of one micro-batch (the recipe's 4 x 2,048 tokens where they do not fit at
    once). ``hold_weights``: transform each layer's weights once per step, outside the
    checkpointed region, and hold them for every micro-batch (``fused_forward``; ``auto``: when
    the step checkpoints or accumulates, where it saves a weight transform per micro-batch
    forward; true; false). ``schedule`` / ``warmup``: the learning rates' schedule after
    ``warmup`` steps of linear warm-up (``constant``, the default, or ``cosine`` decay to 0;
    ``quantizers.calibration.learning_rate_schedule``). Plus the weight step's ``weights`` (auto: GPTQ) and ``mse_clip``.
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
    engine: Literal["fused", "parametrize"] = "fused"
    checkpoint: bool | Literal["auto"] = "auto"
    autocast: Literal["auto", "bf16", "off"] = "auto"
    ste_weights: Literal["auto", "on", "off"] = "auto"
    micro_batches: int = 1
    hold_weights: bool | Literal["auto"] = "auto"
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = 0

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
        if self.micro_batches < 1:
            raise QuantizerError(f"micro_batches={self.micro_batches} must be >= 1")
        if self.engine == "parametrize" and (self.micro_batches > 1 or self.hold_weights is True):
            raise QuantizerError("micro_batches and hold_weights need engine=fused")
        if self.engine == "parametrize" and self.ste_weights == "on":
            raise QuantizerError("ste_weights=on needs engine=fused (the parametrize engine trains full-precision weights)")
        if not 0 <= self.warmup < self.steps:
            raise QuantizerError(f"warmup={self.warmup} must be >= 0 and below steps={self.steps}")


def _orthogonality_error(r: torch.Tensor) -> float:
    """``max |R R^T - I|``: how far a fused rotation drifted from orthogonal (float rounding only)."""
    return float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).abs().max())


def _logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


def _micro_batches(inputs: Mapping[str, Any], micro: int
                   ) -> list[tuple[tuple[int, int], dict[str, Any], float]]:
    """``((start, stop), inputs of those rows, unmasked positions)`` for each of ``micro`` equal
    row slices of a batch (gradient accumulation and the target cache share the split)."""
    rows = int(inputs["input_ids"].shape[0])
    if rows % micro:
        raise QuantizerError(f"micro_batches={micro} must divide the calibration batch of {rows} sequences "
                             "(--calib-batch)")
    size = rows // micro
    mask = inputs.get("attention_mask")
    parts = []
    for a, b in ((i * size, (i + 1) * size) for i in range(micro)):
        part = {k: v[a:b] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        parts.append(((a, b), part, float(mask[a:b].sum()) if mask is not None else float(b - a)))
    return parts


@register_quantizer
class OSTQuantizer(TransformQuantizer):
    """Learned rotations + scales (KL-top end to end), fused, then RTN/GPTQ weights."""

    name = "ost"
    online_transforms = True
    description = "OSTQuant: learned orthogonal rotations + diagonal scales (KL-top loss), fused, then GPTQ/RTN"
    Options = OSTOptions
    requires_calibration = True
    # The FP teacher's targets are cached before any change (the model itself when no reference is
    # given), so `safequant quantize` trains the subject in place: no second full model.
    uses_reference_model = False
    #: The logged loss terms the divergence guards watch (each against ``guard_factor``).
    guard_terms: ClassVar[tuple[str, ...]] = ("kl_top",)
    #: Keys of :meth:`batch_targets`' diagnostics logged with the loss terms at every step.
    step_diagnostics: ClassVar[tuple[str, ...]] = ()

    def check(self, scheme: QuantScheme) -> None:
        super().check(scheme)
        opts: OSTOptions = self.options
        if opts.engine == "parametrize" and not (scheme.quantizes_activations or scheme.quantizes_kv):
            raise QuantizerError(
                f"{self.name} with engine=parametrize learns against activation/KV-cache quantization only, and "
                f"scheme {scheme.label!r} quantizes neither: use engine=fused (straight-through weight quantization)"
            )

    def trains_against_weights(self, scheme: QuantScheme) -> bool:
        """Whether the transforms learn against fake-quantized weights (straight-through estimator)."""
        mode = self.options.ste_weights
        if mode == "auto":
            return scheme.quantizes_weights and not scheme.quantizes_activations
        return mode == "on" and scheme.quantizes_weights

    # ------------------------------------------------------------------ the loss (subclass hooks)
    def frozen_models(self, model: nn.Module, ctx: QuantContext) -> dict[str, nn.Module]:
        """The frozen full-precision models the targets come from: ``{"ref": FP model}``. Without a
        separate reference that is the subject itself, before any transform (no copy is made)."""
        ref = ctx.reference_model
        return {"ref": model if ref is None else ref}

    def batch_targets(
        self, logits: Mapping[str, torch.Tensor], attention_mask: torch.Tensor | None
    ) -> tuple[dict[str, SubsetTarget], dict[str, float]]:
        """What the loss keeps of the frozen models' logits on one batch, plus diagnostics to log."""
        return kl_top_targets(logits["ref"], k=self.options.k), {}

    def loss(
        self, q_logits: Logits, targets: Mapping[str, SubsetTarget], attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Mapping[str, float]]:
        """KL-top between the frozen reference and the transformed, fake-quantized model."""
        return kl_top_from_targets(q_logits, targets, attention_mask)

    def summarize_targets(self, diagnostics: list[dict[str, float]]) -> None:
        """Hook for subclasses: record what the targets say before training (AAQ: the contrast)."""

    @torch.no_grad()
    def cache_targets(self, frozen: Mapping[str, nn.Module], batches: list[Any], device: torch.device
                      ) -> tuple[list[dict[str, SubsetTarget]], list[dict[str, float]]]:
        """Run the frozen models once per calibration batch and keep only what the loss needs.

        Each batch runs one micro-batch (``micro_batches``) at a time: the frozen models'
        vocabulary-wide logits and the softmaxes the targets come from are the largest tensors of
        the run (AAQ on SmolLM2 at 4 x 2,048 tokens at once went past 9 GB and was killed), and a
        micro-batch holds 1/N of them. Diagnostics are the micro-batches' means weighted by their
        unmasked positions."""
        targets, diagnostics = [], []
        for batch in batches:
            parts = _micro_batches(model_inputs(batch, device), self.options.micro_batches)
            done = [self.batch_targets({key: _logits(m, part) for key, m in frozen.items()},
                                       part.get("attention_mask")) for _, part, _ in parts]
            targets.append({key: SubsetTarget.cat([t[key] for t, _ in done]) for key in done[0][0]})
            if len(done) == 1:
                diagnostics.append(done[0][1])
                continue
            total = sum(weight for *_, weight in parts)
            diagnostics.append({key: sum(d[key] * weight for (_, d), (*_, weight) in zip(done, parts)) / total
                                for key in done[0][1]})
        return targets, diagnostics

    # ------------------------------------------------------------------ pipeline
    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        opts: OSTOptions = self.options
        model_parts(model)  # fail on an unsupported architecture before any work
        device = next(model.parameters()).device
        all_batches = list(ctx.calibration_batches)
        batches = all_batches[: opts.max_batches] if opts.max_batches else all_batches
        batches = batches[: opts.steps]  # steps cycle through the batches; the rest never run
        frozen = self.frozen_models(model, ctx)  # before any change: the subject is still full precision
        for frozen_model in frozen.values():
            frozen_model.eval()
        targets, diagnostics = self.cache_targets(frozen, batches, device)
        # Only the cached targets are needed from here on: drop every reference to the frozen
        # models (AAQ's base, a separate FP copy) so that one model is in memory while training.
        del frozen, frozen_model
        ctx.release("reference_model", "base_model")
        self.summarize_targets(diagnostics)

        parts = self.prepare(model, scheme)
        generator = torch.Generator().manual_seed(ctx.seed)
        fold_rmsnorms(parts)
        for p in model.parameters():
            p.requires_grad_(False)
        # Activation fake-quant on (and online transforms in place), weights full precision while
        # learning (the recipe), or straight-through fake-quantized for weight-only schemes.
        down = online_down_layers(parts, scheme)
        online = install_online_hadamards(parts, None, down_layers=down, qk=scheme.quantizes_kv, generator=generator)
        if scheme.quantizes_linears:
            quantize_linear_layers(model, scheme.replace(w_bits=16), input_transforms=online, wrap_all=True)
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
        for name, h in online.items():
            builder.consume(layer_of[name].down, OnlineOp(h))
        chains = builder.chains()

        groups = []
        rot_params = [p for r in ([r1] if opts.learn_r1 else []) + (r2 if opts.learn_r2 else []) for p in r.parameters()]
        if rot_params:
            groups.append({"params": rot_params, "lr": opts.lr_rotation})
        if scales:
            groups.append({"params": [s.value for s in scales.values()], "lr": opts.lr_scale})

        ste = self.trains_against_weights(scheme)
        autocast = autocast_dtype(device, opts.autocast)
        use_checkpoint = self._checkpoint(parts, batches, device, autocast)
        engine = self._engine(parts, chains, scheme if ste else None, autocast, use_checkpoint)
        accumulate = isinstance(engine, FusedTransformForward) and (opts.micro_batches > 1 or engine.hold_weights)

        def loss_fn(batch: Any, step: int) -> tuple[torch.Tensor, Mapping[str, float]]:
            inputs = model_inputs(batch, device)
            target = targets[step % len(batches)]
            if accumulate:
                loss, terms = self._accumulated_step(engine, inputs, target)
            else:
                loss, terms = self.loss(engine(inputs), target, inputs.get("attention_mask"))
            shown = diagnostics[step % len(batches)]
            return loss, {**terms, **{key: shown[key] for key in self.step_diagnostics}}

        with self._installed(engine, chains):
            log_ = run_calibration(
                loss_fn, groups, batches, opts.steps, schedule=opts.schedule, warmup_steps=opts.warmup,
                guard=[DivergenceGuard(t, factor=opts.guard_factor, action=opts.guard_action) for t in self.guard_terms],
                stage=self.name, progress=ctx.progress, device=device, loss_fn_backpropagates=accumulate,
            )
        self.metadata["calibration"] = log_.to_dict()
        self.metadata["training"] = {
            "engine": opts.engine, "checkpoint": use_checkpoint, "micro_batches": opts.micro_batches,
            "hold_weights": isinstance(engine, FusedTransformForward) and engine.hold_weights,
            "autocast": "bf16" if autocast is not None else "off (fp32)", "ste_weights": ste,
            "target_cache_bytes": sum(t.nbytes for batch in targets for t in batch.values()),
        }
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
        self.weight_step(model, scheme, ctx)
        return model

    def _accumulated_step(self, engine: FusedTransformForward, inputs: Mapping[str, Any],
                          targets: Mapping[str, SubsetTarget]) -> tuple[torch.Tensor, dict[str, float]]:
        """One step as ``micro_batches`` micro-batches, each back-propagated at once (the gradients
        accumulate; ``engine.step`` holds the transformed weights across them). The loss and terms
        returned (detached: already back-propagated) are the micro-batches' means weighted by
        their unmasked positions, which is the whole batch's loss when they hold equally many."""
        parts = _micro_batches(inputs, self.options.micro_batches)
        total = sum(weight for *_, weight in parts)
        loss_value, terms_value = 0.0, {}
        with engine.step():
            for (a, b), part, weight in parts:
                loss, terms = self.loss(engine(part), {k: t.rows(a, b) for k, t in targets.items()},
                                        part.get("attention_mask"))
                (loss * (weight / total)).backward()
                loss_value += float(loss.detach()) * weight / total
                for key, value in terms.items():
                    terms_value[key] = terms_value.get(key, 0.0) + float(value) * weight / total
        return torch.tensor(loss_value), terms_value

    def _checkpoint(self, parts: ModelParts, batches: list[Any], device: torch.device,
                    autocast: torch.dtype | None) -> bool:
        """Whether the fused engine checkpoints its layers (``checkpoint=auto``: when memory needs it)."""
        mode = self.options.checkpoint
        if self.options.engine != "fused":
            return False
        if mode != "auto":
            return bool(mode)
        tokens = max(int((b if isinstance(b, torch.Tensor) else b["input_ids"]).numel()) for b in batches)
        tokens //= self.options.micro_batches  # what one forward holds
        element_bytes = (autocast or parts.embed.weight.dtype).itemsize
        needed, estimate = checkpoint_needed(parts, tokens, element_bytes=element_bytes,
                                             available=available_memory_bytes(device))
        log.info("%s: %s gradient checkpointing (an uncheckpointed step keeps about %.2f GiB of activations)",
                 self.name, "using" if needed else "no", estimate / 2**30)
        return needed

    def _engine(self, parts: ModelParts, chains: list, weight_scheme: QuantScheme | None,
                autocast: torch.dtype | None, use_checkpoint: bool):
        """``inputs -> logits`` of the transformed model, for the chosen engine."""
        if self.options.engine == "parametrize":
            def forward(inputs: Mapping[str, Any]) -> torch.Tensor:
                with parametrize.cached():
                    return _logits(parts.model, inputs)
            return forward
        hold = self.options.hold_weights
        if hold == "auto":
            hold = use_checkpoint or self.options.micro_batches > 1
        return FusedTransformForward(parts, chains, weight_scheme=weight_scheme,
                                     use_checkpoint=use_checkpoint, autocast=autocast, hold_weights=bool(hold))

    @contextlib.contextmanager
    def _installed(self, engine, chains):
        """Transforms active for training; afterwards fused into the weights (also on error: no
        half-parametrized model is left behind)."""
        if isinstance(engine, FusedTransformForward):
            with engine.installed():
                yield
            engine.fuse()
            return
        attach_chains(chains)
        try:
            yield
        finally:
            detach_chains(chains)
