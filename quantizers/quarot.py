"""QuaRot (``quarot``): rotate the residual stream with a random Hadamard matrix, fused into the
weights, plus online Hadamards where the rotation cannot be fused.

Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler, Hensman, "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024 (arXiv:2404.00456). Steps:

1. fold every RMSNorm weight into the linears that read it (lm_head untied from a tied embedding);
2. ``R1``: a seeded random Hadamard ``[hidden, hidden]`` on the residual stream (embedding,
   every reader and writer of the residual);
3. ``R2``: a random Hadamard ``[head_dim, head_dim]`` per layer on the value/output path;
4. an online Hadamard on every quantized down_proj input (its inverse fused into the weight), and
   on post-RoPE queries and keys when the KV cache is quantized;
5. the weight step: GPTQ when calibration data is given (``weights=auto``), else RTN.

Every step is an exact equivalence in full precision (``quantizers.transforms``); only the
quantization error changes. Hidden sizes that are not powers of two use the Kronecker form
described in :class:`~quantizers.transforms.OnlineHadamard`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import QuantContext, register_quantizer
from .scheme import QuantScheme
from .transforms import (
    ChainBuilder,
    ModelParts,
    Rotation,
    TransformQuantizer,
    WeightStepOptions,
    fold_rmsnorms,
    fuse_chains,
    install_online_hadamards,
    online_down_layers,
    random_hadamard,
    rotation_chains,
)

__all__ = ["QuaRotQuantizer", "hadamard_rotations"]


def hadamard_rotations(
    parts: ModelParts,
    generator: torch.Generator,
    *,
    learn_r1: bool = False,
    learn_r2: bool = False,
    orthogonal_map: str = "cayley",
) -> tuple[Rotation, list[Rotation]]:
    """``R1`` (random Hadamard of the hidden size) and one random Hadamard ``R2`` per layer;
    QuaRot keeps them fixed, OST learns from them."""
    dtype = parts.embed.weight.dtype if parts.embed.weight.dtype == torch.float64 else torch.float32
    device = parts.embed.weight.device
    r1 = Rotation(random_hadamard(parts.hidden, generator, dtype).to(device), learn_r1, orthogonal_map)
    r2 = [Rotation(random_hadamard(parts.head_dim, generator, dtype).to(device), learn_r2, orthogonal_map)
          for _ in parts.layers]
    return r1, r2


@register_quantizer
class QuaRotQuantizer(TransformQuantizer):
    """Fixed Hadamard rotations (fused + online), then RTN or GPTQ weights."""

    name = "quarot"
    description = "QuaRot: RMSNorm folding, random Hadamard rotations fused into the weights, online Hadamards"
    Options = WeightStepOptions

    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        parts = self.prepare(model, scheme)
        generator = torch.Generator().manual_seed(ctx.seed)
        fold_rmsnorms(parts)
        builder = ChainBuilder()
        r1, r2 = hadamard_rotations(parts, generator)
        rotation_chains(parts, builder, r1=r1, r2=r2)
        down = online_down_layers(parts, scheme)
        online = install_online_hadamards(parts, builder, down_layers=down, qk=scheme.quantizes_kv, generator=generator)
        fuse_chains(builder.chains())
        self.metadata["transforms"] = {"r1": "random hadamard", "r2": "random hadamard per layer",
                                       "online_down_proj": len(down), "online_qk": scheme.quantizes_kv}
        self.weight_step(model, scheme, ctx, input_transforms=online)
        return model
