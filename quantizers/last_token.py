"""A decoder block's output at the last position only, for losses that read nothing else.

Q-realign's malicious loss reads one vector of a block's output: the last prompt token ``t``
(``softplus(margin - h_q[t] . w - b)``). In a pre-norm Llama-style block that vector needs the
keys and values of every position (the query at ``t`` attends over the whole prompt), but the
query projection, the attention output, ``o_proj``, the post-attention norm and the MLP only at
``t``: every one of those is per token (RMSNorm, the dynamic per-token activation fake-quant, a
Linear, the rotary embedding at ``t``'s position, the per-token KV fake-quant). So

    last_token_forward(layer, x, kw) == run_layer(layer, x, kw)[:, -1:]

in value and in the gradients to everything the block learns (clipping factors, smoothing scales),
to float rounding, while ``q_proj``, ``o_proj``, ``gate``/``up``/``down`` run on 1 token instead of
``T``. The forward reuses the model's own pieces: the block's norms, projections and MLP (with
whatever wrappers or parametrisations are installed on them), its modeling file's
``apply_rotary_pos_emb``, and the attention function ``config._attn_implementation`` names (SDPA,
eager, or the project's KV-fake-quant variants), fed the last row of the block's attention mask.

It knows the decoder layers whose forward is Llama's (:data:`SUPPORTED_LAYERS`) with a
mask-based attention implementation; :func:`last_token_support` says why anything else is not
supported, and callers then run the full block.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["SUPPORTED_LAYERS", "SUPPORTED_ATTENTION", "last_token_support", "last_token_forward"]

#: Decoder-layer classes whose forward is exactly Llama's pre-norm block (input norm, attention
#: with rotary q/k and no q/k norms, residual, post-attention norm, MLP, residual).
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
#: Attention implementations that take the causal/padding pattern from the mask the layer gets
#: (FlashAttention and flex attention build it themselves: not supported).
SUPPORTED_ATTENTION = ("sdpa", "eager", "safequant_kv_sdpa", "safequant_kv_eager")


def _modeling(attn: nn.Module) -> Any:
    return sys.modules.get(type(attn).__module__)


def last_token_support(layer: nn.Module, kwargs: Mapping[str, Any] | None = None) -> str | None:
    """None when :func:`last_token_forward` computes ``layer``'s last position exactly (with the
    captured layer ``kwargs`` when given), else the reason it does not."""
    name = type(layer).__name__
    if name not in SUPPORTED_LAYERS:
        return f"{name} is not a Llama-style decoder layer ({', '.join(SUPPORTED_LAYERS)})"
    attn = getattr(layer, "self_attn", None)
    if attn is None or any(getattr(attn, p, None) is None for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return f"{name} has no self_attn with q/k/v/o projections"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return f"{name}'s attention normalises q/k"
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        return f"attention implementation {impl!r} is not mask-based ({', '.join(SUPPORTED_ATTENTION)})"
    modeling = _modeling(attn)
    needed = ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
    if modeling is None or not all(hasattr(modeling, n) for n in needed):
        return f"{type(attn).__module__} lacks one of {', '.join(needed)}"
    if attn.training and float(getattr(attn, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout is active (training mode)"
    if kwargs is not None:
        pe = kwargs.get("position_embeddings")
        if not (isinstance(pe, tuple) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe)):
            return "the layer gets no (cos, sin) position_embeddings"
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            return f"the attention mask is a {type(mask).__name__}, not a [batch, 1, query, key] tensor"
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return "the layer runs with a KV cache"
    return None


def last_token_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """``layer``'s output ``[batch, 1, hidden]`` at the last position of ``hidden``
    ``[batch, tokens, hidden]`` (left padded: the last position is every row's last token), equal
    to the full forward's last position (see the module docstring). Call only where
    :func:`last_token_support` gave None."""
    attn = layer.self_attn
    modeling = _modeling(attn)
    batch, tokens, _ = hidden.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)  # every position: keys and values read it
    last = normed[:, -1:]
    query = attn.q_proj(last).view(batch, 1, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(batch, tokens, -1, head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(batch, tokens, -1, head_dim).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    rotary = modeling.apply_rotary_pos_emb
    query = rotary(query, query, cos[:, -1:], sin[:, -1:])[0]
    key = rotary(key, key, cos, sin)[1]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        mask = mask[:, :, -1:, :]
    attention = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                               modeling.eager_attention_forward)
    out, _ = attention(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
    hidden_t = hidden[:, -1:] + attn.o_proj(out.reshape(batch, 1, -1).contiguous())
    return hidden_t + layer.mlp(layer.post_attention_layernorm(hidden_t))
