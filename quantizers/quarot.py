"""QuaRot (``quarot``): rotate the residual stream with a random Hadamard matrix, fused into the
weights, plus online Hadamards where the rotation cannot be fused.

Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler, Hensman, "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024 (arXiv:2404.00456). Steps:

1. fold every RMSNorm weight into the linears that read it (lm_head untied from a tied embedding);
2. ``R1``: a seeded random Hadamard ``[hidden, hidden]`` on the residual stream (embedding,
   every reader and writer of the residual);
3. ``R2``: a random Hadamard ``[head_dim, head_dim]`` per layer on the value/output path;
4. an online Hadamard on every quantized down_proj input (its inverse fused into the weight), optionally
   on every o_proj input (mixing the attention output across heads; ``online_o_proj``), and
   on post-RoPE queries and keys when the KV cache is quantized;
5. the weight step: GPTQ when calibration data is given (``weights=auto``), else RTN.

Every step is an exact equivalence in full precision (``quantizers.transforms``); only the
quantization error changes. Hidden sizes that are not powers of two use the Kronecker form
described in :class:`~quantizers.transforms.OnlineHadamard`.
"""

from __future__ import annotations

from dataclasses import dataclass

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

__all__ = ["QuaRotOptions", "QuaRotQuantizer", "hadamard_rotations"]


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


@dataclass(frozen=True)
class QuaRotOptions(WeightStepOptions):
    """The weight step's options plus ``online_o_proj``: an online Hadamard on the o_proj input
    mixing heads, as QuaRot does. Off by default: on SmolLM2-135M-Instruct (w4a4kv4-aasym-aclip0.9,
    RTN weights, 4096 WikiText-2 tokens) it measured 193.5 against 185.7 without (its 9 heads give
    no Sylvester Hadamard, so the odd factor is a random orthogonal block), at extra cost."""

    online_o_proj: bool = False


@register_quantizer
class QuaRotQuantizer(TransformQuantizer):
    """Fixed Hadamard rotations (fused + online), then RTN or GPTQ weights."""

    name = "quarot"
    online_transforms = True
    description = "QuaRot: RMSNorm folding, random Hadamard rotations fused into the weights, online Hadamards"
    Options = QuaRotOptions

    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        parts = self.prepare(model, scheme)
        generator = torch.Generator().manual_seed(ctx.seed)
        fold_rmsnorms(parts)
        builder = ChainBuilder()
        r1, r2 = hadamard_rotations(parts, generator)
        rotation_chains(parts, builder, r1=r1, r2=r2)
        down = online_down_layers(parts, scheme)
        o_layers = online_down_layers(parts, scheme, "self_attn.o_proj") if self.options.online_o_proj else []
        online = install_online_hadamards(parts, builder, down_layers=down, qk=scheme.quantizes_kv, generator=generator,
                                          o_layers=o_layers)
        fuse_chains(builder.chains())
        self.metadata["transforms"] = {"r1": "random hadamard", "r2": "random hadamard per layer",
                                       "online_down_proj": len(down), "online_o_proj": len(o_layers),
                                       "online_qk": scheme.quantizes_kv}
        self.weight_step(model, scheme, ctx, input_transforms=online)
        return model
