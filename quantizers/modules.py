"""Fake-quantized modules: :class:`QuantLinear`, Linear replacement, and KV-cache quantization.

KV cache (transformers 5.x, Llama-style models): this module registers two attention
implementations, ``safequant_kv_sdpa`` and ``safequant_kv_eager``, with
``transformers.AttentionInterface`` (and the matching mask functions with
``AttentionMaskInterface``). They receive ``key``/``value`` *after* RoPE and after the cache
update, fake-quantize both per token and per group using the :class:`KVQuantSpec` stored on the
attention module (:data:`KV_SPEC_ATTR`), and then call the stock attention function.
:func:`enable_kv_quant` switches a model to them with ``model.set_attn_implementation``.
Attention modules without a spec (another model in the same process, or ``bits == 16``) pass
through unchanged.

Note on the cache: ``past_key_values.update`` runs *before* the attention function, so the cache
keeps full-precision states and every forward quantizes the whole key/value sequence. Because
the quantization of a token depends only on that token, this is numerically the same as a cache
that stores quantized entries (and it stays correct for ``kv_clip_ratio < 1``, where
re-quantizing already-quantized states would not be idempotent).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantizerError
from .fake_quant import fake_quant_activation, fake_quant_kv, fake_quant_weight, mse_clip_search
from .fp_prefix import keep_prefix_keys, keep_prefix_tokens
from .scheme import QuantScheme

__all__ = [
    "QuantLinear",
    "shared_input_quant",
    "WeightFn",
    "default_weight_fn",
    "quantize_linear_layers",
    "iter_quant_linears",
    "KVQuantSpec",
    "KV_ATTN_SDPA",
    "KV_ATTN_EAGER",
    "KV_SPEC_ATTR",
    "QK_TRANSFORM_ATTR",
    "kv_spec_of",
    "qk_transform_of",
    "set_qk_transform",
    "find_attention_modules",
    "enable_kv_quant",
    "disable_kv_quant",
    "OnlineTransform",
    "register_online_transform",
    "online_transform_from_spec",
]

log = logging.getLogger(__name__)

#: ``weight_fn(name, linear, scheme) -> fake-quantized weight`` (same shape as ``linear.weight``).
WeightFn = Callable[[str, nn.Linear, QuantScheme], torch.Tensor]


class OnlineTransform(nn.Module):
    """Base class of transforms applied to activations at run time (e.g. QuaRot's online Hadamard
    on the down_proj input, or on post-RoPE queries and keys).

    Saved variants must rebuild them without re-calibrating, so each subclass has a unique
    ``kind``, describes its constructor arguments with :meth:`spec` (JSON-ready), and keeps any
    tensor state (random signs, matrices) in buffers, which travel in the variant's safetensors.
    :func:`online_transform_from_spec` rebuilds an empty module of the right shape; loading the
    state dict then fills its buffers.
    """

    kind: str = ""

    def spec(self) -> dict:
        """Constructor keyword arguments plus ``kind``: ``type(self)(**spec without kind)`` rebuilds it."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict) -> OnlineTransform:
        args = {k: v for k, v in spec.items() if k != "kind"}
        return cls(**args)


_ONLINE_TRANSFORMS: dict[str, type[OnlineTransform]] = {}


#: Modules whose import registers the built-in online transform kinds.
BUILTIN_TRANSFORM_MODULES = ("quantizers.transforms",)


def register_online_transform(cls: type[OnlineTransform]) -> type[OnlineTransform]:
    """Class decorator: make an :class:`OnlineTransform` subclass loadable by its ``kind``."""
    if not cls.kind:
        raise QuantizerError(f"online transform {cls.__qualname__} needs a non-empty kind")
    _ONLINE_TRANSFORMS[cls.kind] = cls
    return cls


def online_transform_from_spec(spec: dict) -> OnlineTransform:
    """Rebuild an online transform from its :meth:`OnlineTransform.spec` (buffers still empty)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _ONLINE_TRANSFORMS:
        # The built-in kinds register when their module is imported; a process that only loads a
        # saved variant (quantizers.artifact.load_variant) may not have imported it yet.
        for module in BUILTIN_TRANSFORM_MODULES:
            importlib.import_module(module)
    if kind not in _ONLINE_TRANSFORMS:
        known = ", ".join(sorted(_ONLINE_TRANSFORMS)) or "none"
        raise QuantizerError(
            f"unknown online transform kind {kind!r} in a saved variant (known: {known}); "
            "install the safequant version that wrote it"
        )
    return _ONLINE_TRANSFORMS[kind].from_spec(spec)


#: The last input quantized inside :func:`shared_input_quant` (None outside it): one slot, so no
#: more than one layer input and its quantized copy are kept alive by the memo.
_SHARED_INPUT: ContextVar[list | None] = ContextVar("safequant_shared_input", default=None)


@contextlib.contextmanager
def shared_input_quant() -> Iterator[None]:
    """Inside, :class:`QuantLinear` layers that read the very same input tensor (q/k/v read one
    normed hidden state, gate/up another) with equal activation settings and input transform
    quantize it once and share the result (also in autograd): the same values, computed once
    instead of three or two times. The memo holds only the latest input and is dropped on exit."""
    token = _SHARED_INPUT.set([None])
    try:
        yield
    finally:
        _SHARED_INPUT.reset(token)


class QuantLinear(nn.Module):
    """A Linear layer with a fake-quantized weight and per-token fake-quantized inputs.

    ``forward(x) = F.linear(Q_a(T(x)), W_q, b)`` where ``T`` is the optional ``input_transform``
    (an ``nn.Module``, e.g. an online Hadamard; identity when ``None``), ``Q_a`` the dynamic
    per-token activation fake-quant (skipped when ``a_bits == 16``) and ``W_q`` the weight,
    already fake-quantized when the module is built (never re-quantized in ``forward``).

    Parameter names match ``nn.Linear`` (``weight``, ``bias``), so state dicts stay compatible.
    Build one from an existing layer with :meth:`from_linear`, or with the constructor (then load
    a state dict) when restoring a saved variant.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: int = 16,
        a_bits: int = 16,
        a_symmetric: bool = True,
        a_clip_ratio: float = 1.0,
        input_transform: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.w_bits = w_bits  # informational: the weight is stored already fake-quantized
        self.a_bits = a_bits
        self.a_symmetric = a_symmetric
        self.a_clip_ratio = a_clip_ratio
        self.input_transform = input_transform

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: QuantScheme,
        *,
        weight: torch.Tensor | None = None,
        input_transform: nn.Module | None = None,
    ) -> QuantLinear:
        """Wrap ``linear``: its weight is replaced by ``weight`` if given, else fake-quantized with
        the scheme's weight settings (a new tensor: ``linear.weight`` itself is never modified)."""
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            w_bits=scheme.w_bits,
            a_bits=scheme.a_bits,
            a_symmetric=scheme.a_symmetric,
            a_clip_ratio=scheme.a_clip_ratio,
            input_transform=input_transform,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            if weight is None:
                weight = default_weight_fn("", linear, scheme)
            if tuple(weight.shape) != tuple(w.shape):
                raise QuantizerError(
                    f"quantized weight has shape {tuple(weight.shape)}, expected {tuple(w.shape)}"
                )
            module.weight.copy_(weight.to(dtype=w.dtype, device=w.device))
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        module.weight.requires_grad_(w.requires_grad)
        module.train(linear.training)
        return module

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as the matmul sees it: transformed, then per-token fake-quantized."""
        memo = _SHARED_INPUT.get()
        if memo is not None:
            key = (x._version, id(self.input_transform), self.a_bits, self.a_symmetric, self.a_clip_ratio)
            if memo[0] is not None and memo[0][0] is x and memo[0][1] == key:
                return memo[0][2]
        original = x
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.a_bits < 16:
            quantized = fake_quant_activation(x, self.a_bits, symmetric=self.a_symmetric, clip_ratio=self.a_clip_ratio)
            x = keep_prefix_tokens(x, quantized)
        if memo is not None:
            memo[0] = (original, key, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        act = f"a_bits={self.a_bits}"
        if self.a_bits < 16:
            act += f", a_symmetric={self.a_symmetric}, a_clip_ratio={self.a_clip_ratio}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, w_bits={self.w_bits}, {act}"
        )


def default_weight_fn(name: str, linear: nn.Linear, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest weight fake-quant with the scheme's settings (MSE clip search if asked)."""
    w = linear.weight.detach()
    if scheme.w_bits >= 16:
        return w.clone()
    clip: float | torch.Tensor = 1.0
    if scheme.w_clip_search:
        clip = mse_clip_search(w, scheme.w_bits, group_size=scheme.w_group_size, symmetric=scheme.w_symmetric)
    return fake_quant_weight(
        w, scheme.w_bits, group_size=scheme.w_group_size, symmetric=scheme.w_symmetric, clip_ratio=clip
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def iter_quant_linears(model: nn.Module):
    """``(name, module)`` for every :class:`QuantLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def quantize_linear_layers(
    model: nn.Module,
    scheme: QuantScheme | str,
    weight_fn: WeightFn | None = None,
    *,
    input_transforms: Mapping[str, nn.Module] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    wrap_all: bool = False,
) -> list[str]:
    """Replace every ``nn.Linear`` not skipped by ``scheme`` with a :class:`QuantLinear`, in place.

    ``input_transforms`` maps module names to online transforms (:class:`OnlineTransform`, e.g. a
    Hadamard on the down_proj input) installed as the new layer's ``input_transform``; the
    ``weight_fn`` then sees weights that already expect the transformed input.

    ``weight_fn(name, linear, scheme)`` supplies each fake-quantized weight (default:
    :func:`default_weight_fn`, round to nearest). Skipped modules (``scheme.skip``, by default
    ``lm_head``) are left untouched, and embedding weights are never modified, also when the
    output head shares (ties) them. Returns the names of the replaced modules. Does nothing when
    the scheme quantizes neither weights nor activations, unless ``wrap_all`` (a transform method
    training against weight-only quantization still needs the online input transforms in place).
    """
    scheme = QuantScheme.coerce(scheme)
    if not (scheme.quantizes_linears or wrap_all):
        return []
    if any(True for _ in iter_quant_linears(model)):
        raise QuantizerError("model already contains QuantLinear layers; quantize a fresh full-precision copy")
    weight_fn = weight_fn or default_weight_fn
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    # Names only: each replaced Linear is released as soon as its QuantLinear is in place, so the
    # peak is the model plus one layer, not two copies of every weight.
    targets = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not scheme.skips(name)
    ]
    replaced = []
    for i, name in enumerate(targets):
        linear = model.get_submodule(name)
        if linear.weight.data_ptr() in embedding_ptrs:
            log.warning(
                "%s shares its weight with an input embedding; the quantized copy unties them "
                "(the embedding stays full precision)", name,
            )
        with torch.no_grad():
            weight = weight_fn(name, linear, scheme)
        transform = (input_transforms or {}).get(name)
        _set_submodule(model, name, QuantLinear.from_linear(linear, scheme, weight=weight, input_transform=transform))
        replaced.append(name)
        if progress is not None:
            progress("quantize linear layers", i + 1, len(targets))
    log.info("replaced %d Linear layers with QuantLinear (%s)", len(replaced), scheme.label)
    return replaced


# ---------------------------------------------------------------------- KV cache
KV_ATTN_SDPA = "safequant_kv_sdpa"
KV_ATTN_EAGER = "safequant_kv_eager"

# The per-attention-module state the two implementations above read. Whoever sets it
# (enable_kv_quant, transforms.install_online_hadamards, artifact loading) and whoever reads it
# (_quantize_kv, artifact saving) goes through these two names, so the contract lives here.
#: Attribute holding the module's :class:`KVQuantSpec` (absent or ``bits == 16``: no KV fake-quant).
KV_SPEC_ATTR = "safequant_kv"
#: Attribute holding the module's online rotation of post-RoPE queries and keys (a callable on
#: ``[batch, heads, seq, head_dim]``, applied to both; it must be orthogonal so q.k is kept).
QK_TRANSFORM_ATTR = "safequant_qk_transform"


def qk_transform_of(attention: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The online Q/K rotation installed on an attention module, or None."""
    return getattr(attention, QK_TRANSFORM_ATTR, None)


def set_qk_transform(attention: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Install an online Q/K rotation on an attention module (read by the KV attention functions)."""
    setattr(attention, QK_TRANSFORM_ATTR, transform)


def kv_spec_of(attention: nn.Module) -> KVQuantSpec | None:
    """The KV-cache fake-quant spec set on an attention module, or None."""
    return getattr(attention, KV_SPEC_ATTR, None)


@dataclass(frozen=True)
class KVQuantSpec:
    """KV-cache fake-quant settings of one attention module (its :data:`KV_SPEC_ATTR`)."""

    bits: int = 16
    group_size: int | None = None  # None = head_dim
    symmetric: bool = False
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise QuantizerError(f"KV bits must be an integer in 2..16, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise QuantizerError(f"KV group size must be a positive integer or None, got {self.group_size!r}")
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise QuantizerError(f"KV clip ratio must be in (0, 1], got {self.clip_ratio!r}")

    @classmethod
    def from_scheme(cls, scheme: QuantScheme) -> KVQuantSpec:
        return cls(scheme.kv_bits, scheme.kv_group_size, scheme.kv_symmetric, scheme.kv_clip_ratio)


def _quantize_kv(module: nn.Module, query, key, value):
    """Apply the module's optional Q/K rotation (:data:`QK_TRANSFORM_ATTR`) and KV fake-quant
    (:data:`KV_SPEC_ATTR`)."""
    qk_transform = qk_transform_of(module)
    if qk_transform is not None:
        query, key = qk_transform(query), qk_transform(key)
    spec = kv_spec_of(module)
    if spec is not None and spec.bits < 16:
        kw = dict(group_size=spec.group_size, symmetric=spec.symmetric, clip_ratio=spec.clip_ratio)
        key = keep_prefix_keys(key, fake_quant_kv(key, spec.bits, **kw))
        value = keep_prefix_keys(value, fake_quant_kv(value, spec.bits, **kw))
    return query, key, value


def _kv_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = _quantize_kv(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_fn(module: nn.Module):
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _kv_eager_attention(module, query, key, value, attention_mask, **kwargs):
    query, key, value = _quantize_kv(module, query, key, value)
    return _eager_fn(module)(module, query, key, value, attention_mask, **kwargs)


_registered = False


def _register_attention() -> None:
    global _registered
    if _registered:
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    except ImportError as exc:  # pragma: no cover - transformers too old
        raise QuantizerError(
            f"KV-cache quantization needs transformers >= 5 with AttentionInterface ({exc})"
        ) from None
    AttentionInterface.register(KV_ATTN_SDPA, _kv_sdpa_attention)
    AttentionInterface.register(KV_ATTN_EAGER, _kv_eager_attention)
    AttentionMaskInterface.register(KV_ATTN_SDPA, sdpa_mask)
    AttentionMaskInterface.register(KV_ATTN_EAGER, eager_mask)
    _registered = True


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self-attention modules that dispatch through ``AttentionInterface`` (Llama-style:
    a ``*Attention`` class with ``head_dim`` and ``layer_idx`` whose modeling file calls
    ``ALL_ATTENTION_FUNCTIONS.get_interface``)."""
    found = []
    for name, module in model.named_modules():
        cls = type(module)
        if "Attention" not in cls.__name__ or not hasattr(module, "head_dim") or not hasattr(module, "layer_idx"):
            continue
        mod = sys.modules.get(cls.__module__)
        if mod is None or not hasattr(mod, "ALL_ATTENTION_FUNCTIONS"):
            continue
        found.append((name, module))
    return found


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def enable_kv_quant(model: nn.Module, spec: KVQuantSpec | QuantScheme | str) -> list[str]:
    """Fake-quantize keys (after RoPE) and values of every attention module of ``model``.

    Stores the spec on each attention module and switches the model to the matching
    ``safequant_kv_*`` attention implementation (eager-based if the model ran eager attention,
    otherwise SDPA-based). Returns the attention module names. Raises :class:`QuantizerError` if
    the architecture has no ``AttentionInterface`` attention path or the group size does not
    divide the head dimension.
    """
    if isinstance(spec, (QuantScheme, str)):
        spec = KVQuantSpec.from_scheme(QuantScheme.coerce(spec))
    name = _model_name(model)
    if not hasattr(model, "set_attn_implementation") or getattr(model, "config", None) is None:
        raise QuantizerError(
            f"KV-cache quantization needs a transformers PreTrainedModel; {name} is not one (use kv16)"
        )
    attns = find_attention_modules(model)
    if not attns:
        raise QuantizerError(
            f"KV-cache quantization: {name} has no attention modules using transformers' AttentionInterface "
            "(Llama-style); use a scheme without kv bits"
        )
    for attn_name, attn in attns:
        head_dim = int(attn.head_dim)
        if spec.group_size is not None and head_dim % spec.group_size != 0:
            raise QuantizerError(
                f"KV group size {spec.group_size} does not divide head_dim {head_dim} of {attn_name}; "
                f"use a divisor of {head_dim} (or omit kvg)"
            )
    _register_attention()
    current = model.config._attn_implementation
    if current in (KV_ATTN_SDPA, KV_ATTN_EAGER):
        target = current
    else:
        target = KV_ATTN_EAGER if current == "eager" else KV_ATTN_SDPA
    if target == KV_ATTN_EAGER:
        missing = [n for n, a in attns if _eager_fn(a) is None]
        if missing:
            raise QuantizerError(
                f"KV-cache quantization: no eager_attention_forward for {missing[0]} in {name}; "
                "load the model with attn_implementation='sdpa'"
            )
    try:
        model.set_attn_implementation(target)
    except (ValueError, ImportError) as exc:
        raise QuantizerError(f"KV-cache quantization: {name} cannot switch attention implementation: {exc}") from None
    if current != target:
        model._safequant_orig_attn = current
    for attn_name, attn in attns:
        cfg = getattr(attn, "config", model.config)
        if getattr(cfg, "_attn_implementation", None) != target:
            raise QuantizerError(
                f"KV-cache quantization: {name} does not support setting its attention implementation "
                f"(module {attn_name} still uses {cfg._attn_implementation!r}); use a scheme without kv bits"
            )
        setattr(attn, KV_SPEC_ATTR, spec)
    return [n for n, _ in attns]


def disable_kv_quant(model: nn.Module) -> None:
    """Undo :func:`enable_kv_quant`: drop the specs and restore the original attention implementation."""
    for _, attn in find_attention_modules(model):
        if hasattr(attn, KV_SPEC_ATTR):
            delattr(attn, KV_SPEC_ATTR)
    orig = getattr(model, "_safequant_orig_attn", None)
    if orig is not None:
        model.set_attn_implementation(orig)
        del model._safequant_orig_attn
