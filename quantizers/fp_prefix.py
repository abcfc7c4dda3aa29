"""Full-precision prefix tokens in fake-quantized models: the ``fpprefix<N>`` scheme modifier.

Why: in SmolLM2 the first token of every sequence is an attention sink whose activations are
outliers no rotation flattens; at W4A4KV4 a third of the perplexity loss sits there (README, "The
attention sink carries a third of it"). PrefixQuant (Chen et al. 2024, arXiv:2410.05265) keeps
such prefix tokens' KV cache in full precision. It deploys exactly for chat prompts: the chat
template's first token (``<|im_start|>``) is always the same, and under causal attention its keys
and values in every layer depend on nothing else, so a runtime computes them once, offline, keeps
them in full precision and never runs that token through the quantized matmuls. No export format
or vLLM kernel carries that yet; those refuse every scheme with quantized activations or KV anyway.

Which tokens: the first N *attended* tokens of each row. With a 2-D ``attention_mask`` those are
the first N positions where it is 1 (left padding is skipped, so a left-padded batch keeps the
same tokens as each prompt alone); without one, the first N positions of the sequence counted
from the start of the KV cache. Decoding steps after the prefill quantize every new token, while
the prefix's cached keys and values stay as they were.

How: :func:`enable_fp_prefix` puts a forward pre-hook on the decoder stack (``model.base_model``)
that derives both masks from the call's arguments and publishes them in a context variable for the
duration of that forward; :func:`keep_prefix_tokens` (activations, ``[batch, tokens, features]``)
and :func:`keep_prefix_keys` (KV, ``[batch, heads, keys, head_dim]``) put the original values
back at those positions. Outside such a forward (GPTQ's layer-by-layer passes) every token is
quantized; a layer whose forward is recomputed later (gradient checkpointing) takes the masks
along with :func:`captured_prefix` and :func:`restored_prefix`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import QuantizerError

__all__ = ["captured_prefix", "enable_fp_prefix", "fp_prefix_of", "keep_prefix_keys", "keep_prefix_tokens",
           "restored_prefix"]

#: Attribute on the decoder stack holding N (0 or missing: off). Read by the hooks at each call, so a
#: deep copy of the model carries the setting with it.
FP_PREFIX_ATTR = "_safequant_fp_prefix"
_HOOKED_ATTR = "_safequant_fp_prefix_hooked"


@dataclass(frozen=True)
class _PrefixMasks:
    new_tokens: torch.Tensor | None  # [batch, tokens]: this call's tokens in the prefix (None: off)
    all_keys: torch.Tensor | None  # [batch, cache + tokens]: every key position in the prefix
    outer: _PrefixMasks | None  # the enclosing forward's masks (restored on exit)


_CURRENT: ContextVar[_PrefixMasks | None] = ContextVar("safequant_fp_prefix", default=None)


def _decoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def fp_prefix_of(model: nn.Module) -> int:
    """N of the model's ``fpprefix<N>`` (0: every token is quantized)."""
    return int(getattr(_decoder(model), FP_PREFIX_ATTR, 0) or 0)


def enable_fp_prefix(model: nn.Module, n: int) -> None:
    """Keep the first ``n`` attended tokens of every sequence in full precision (activations and
    KV) in every whole-model forward of ``model``; ``n = 0`` turns it off. Idempotent."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise QuantizerError(f"fp prefix must be a non-negative integer, got {n!r}")
    decoder = _decoder(model)
    setattr(decoder, FP_PREFIX_ATTR, n)
    if n and not getattr(decoder, _HOOKED_ATTR, False):
        decoder.register_forward_pre_hook(_enter, with_kwargs=True)
        decoder.register_forward_hook(_leave, always_call=True)
        setattr(decoder, _HOOKED_ATTR, True)


def _batch_and_tokens(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, torch.device]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    source = ids if ids is not None else kwargs.get("inputs_embeds")
    if source is None:
        raise QuantizerError("fpprefix: the decoder was called without input_ids or inputs_embeds")
    return int(source.shape[0]), int(source.shape[1]), source.device


def _cache_length(kwargs: dict[str, Any]) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 spells it either way
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def prefix_masks(n: int, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new_tokens, all_keys)`` boolean masks of the prefix for one decoder call (module docstring)."""
    batch, tokens, device = _batch_and_tokens(args, kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= tokens:
        attended = mask.to(device) != 0
        all_keys = attended & (attended.long().cumsum(dim=1) <= n)
    else:
        total = _cache_length(kwargs) + tokens
        all_keys = (torch.arange(total, device=device) < n).expand(batch, total)
    return all_keys[:, -tokens:], all_keys


def _enter(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    n = int(getattr(module, FP_PREFIX_ATTR, 0) or 0)
    outer = _CURRENT.get()
    new_tokens, all_keys = prefix_masks(n, args, kwargs) if n > 0 else (None, None)
    _CURRENT.set(_PrefixMasks(new_tokens, all_keys, outer))


def _leave(module: nn.Module, args: tuple, output: Any) -> None:
    current = _CURRENT.get()
    _CURRENT.set(current.outer if current is not None else None)


def captured_prefix() -> _PrefixMasks | None:
    """The prefix masks in effect now: hand them to :func:`restored_prefix` in code that runs
    again after the forward has returned (a checkpointed layer's recomputation in the backward)."""
    return _CURRENT.get()


@contextlib.contextmanager
def restored_prefix(masks: _PrefixMasks | None) -> Iterator[None]:
    """Inside, the prefix masks are ``masks`` (from :func:`captured_prefix`)."""
    token = _CURRENT.set(masks)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _restore(original: torch.Tensor, quantized: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``quantized`` with ``original`` put back where ``keep`` ([batch, positions], the positions on
    dimension ``dim`` of both tensors) is True."""
    shape = [1] * original.dim()
    shape[0], shape[dim] = keep.shape
    return torch.where(keep.reshape(shape), original, quantized)


def keep_prefix_tokens(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """A Linear's fake-quantized input with the prefix tokens of the current forward put back in
    full precision (``[batch, tokens, features]``; a head that sees only the last tokens, e.g.
    ``logits_to_keep``, is matched from the end)."""
    current = _CURRENT.get()
    if current is None or current.new_tokens is None or not current.new_tokens.any():
        return quantized
    keep = current.new_tokens
    if original.dim() == 3 and original.shape[0] == keep.shape[0] and original.shape[1] <= keep.shape[1]:
        return _restore(original, quantized, keep[:, keep.shape[1] - original.shape[1]:], 1)
    if original.dim() == 2 and original.shape[0] == keep.numel():
        return torch.where(keep.reshape(-1, 1), original, quantized)  # tokens flattened
    raise QuantizerError(f"fpprefix: a quantized Linear got an input of shape {tuple(original.shape)} that does not "
                         f"line up with the batch's {tuple(keep.shape)} tokens; drop fpprefix for this model")


def keep_prefix_keys(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Fake-quantized keys or values (``[batch, heads, keys, head_dim]``, the cache included) with
    the prefix's entries put back in full precision."""
    current = _CURRENT.get()
    if current is None or current.all_keys is None or not current.all_keys.any():
        return quantized
    keep = current.all_keys
    if original.dim() != 4 or original.shape[0] != keep.shape[0] or original.shape[2] > keep.shape[1]:
        raise QuantizerError(f"fpprefix: keys of shape {tuple(original.shape)} do not line up with the batch's "
                             f"{tuple(keep.shape)} key positions; drop fpprefix for this model")
    return _restore(original, quantized, keep[:, keep.shape[1] - original.shape[2]:], 2)
