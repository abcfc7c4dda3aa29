"""Function-preserving transforms of Llama-style models: the machinery shared by ``smoothquant``,
``quarot``, ``ost`` and ``aaq`` (and usable by any method that learns smoothing scales).

Every transform here changes the weights without changing what the full-precision model computes;
it only changes *where* the numbers are large, so that 4-bit activations, KV cache and weights
lose less. The pieces (``../shared/methods/W4A4.md``):

* **RMSNorm folding** (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456): ``norm(x) = x/rms(x) * g``;
  ``g`` moves into the columns of the linears that read the norm (input_layernorm -> q/k/v,
  post_attention_layernorm -> gate/up, the final norm -> lm_head) and the norm weight becomes 1,
  after which the normalisation commutes with any orthogonal rotation of the residual stream.
* **Residual rotation R1** ``[d, d]``: the residual stream becomes ``x R1``: the embedding
  ``E -> E R1``, every linear reading the residual ``W -> W R1``, every linear writing it
  (o_proj, down_proj) ``W -> R1^T W`` (bias ``b -> b R1``).
* **Per-head rotation R2** ``[head_dim, head_dim]`` per layer on the value/output path: each KV
  head's values become ``v R2`` (v_proj rows), each attention head's o_proj columns ``W R2``;
  one matrix per layer, so GQA grouping is respected automatically.
* **Diagonal scale sites** (SmoothQuant, Xiao et al. 2023, arXiv:2211.10438; OmniQuant/OS+;
  OSTQuant, Hu et al. 2025, arXiv:2501.13987): an activation is divided by ``s`` where it is
  produced and the weights that consume it are multiplied by ``s``. Sites: norm -> q/k/v,
  norm -> gate/up, v -> o, q <-> k (equal scales on each RoPE pair, so the scale commutes with the
  rotary embedding), up -> down, and final norm -> lm_head (used for folding only).
* **Online Hadamard transforms** (:class:`OnlineHadamard`): applied to activations at run time
  (down_proj input, post-RoPE queries/keys), with their inverse fused into the consuming weights.

How it fits together: every transform acts on a *channel space* (the residual stream, the values of
a layer, ...). A space has producers (the weights, biases, norm weights or embedding rows whose
output lives in it) and consumers (the weights that read it). A transform ``T`` of the space maps
a producer ``P -> P T`` and a consumer ``W -> W T^-T`` (``T`` orthogonal: ``W T``; ``T = diag(1/s)``:
``W diag(s)``). :class:`ParamChain` collects, per parameter, the ordered transforms acting on its
output axis (as producer) and input axis (as consumer); :func:`transformed` evaluates a chain
differentiably. Chains are used two ways:

* :func:`fuse_chains`: compute once and write the result into the parameters (QuaRot, SmoothQuant,
  norm folding);
* :func:`attach_chains` / :func:`detach_chains`: ``torch.nn.utils.parametrize`` parametrisations,
  so the ordinary model forward sees the transformed weights and gradients reach the learnable
  rotations (:class:`Rotation`, kept orthogonal by ``torch.nn.utils.parametrizations.orthogonal``)
  and scales (:class:`Scale`); detaching with ``leave_parametrized=True`` fuses them (OST, AAQ).

Block-wise methods can use the scale sites alone: ``sites = scale_sites(model, layers=[i])``,
``chains = site_chains(sites, {site.name: Scale(...)})``, ``attach_chains(chains)``, train,
``detach_chains(chains)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from common.layout import LAYOUTS, get_part

from .base import QuantContext, Quantizer, QuantizerError
from .gptq import GPTQOptions, quantize_weights
from .modules import OnlineTransform, enable_kv_quant, register_online_transform, set_qk_transform
from .rtn import RTNOptions
from .scheme import QuantScheme

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LayerParts",
    "ModelParts",
    "model_parts",
    "random_orthogonal",
    "random_hadamard",
    "OnlineHadamard",
    "Rotation",
    "Scale",
    "RotateOp",
    "ScaleOp",
    "OnlineOp",
    "ParamChain",
    "ChainBuilder",
    "transformed",
    "fuse_chains",
    "attach_chains",
    "detach_chains",
    "untie_embeddings",
    "SiteKind",
    "SITE_KINDS",
    "ScaleSite",
    "scale_sites",
    "site_chains",
    "fold_rmsnorms",
    "rotation_chains",
    "install_online_hadamards",
    "WeightStepOptions",
    "TransformQuantizer",
    "online_down_layers",
]

log = logging.getLogger(__name__)

#: ``config.model_type`` values whose blocks have exactly the Llama layout these transforms assume
#: (pre-norm RMSNorm with a plain weight, no Q/K norms, rotate-half RoPE over the whole head).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------------- model layout
@dataclass(frozen=True)
class LayerParts:
    """The modules of one Llama-style decoder layer (``prefix`` is its qualified name)."""

    prefix: str
    attn: nn.Module
    input_norm: nn.Module
    post_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


@dataclass(frozen=True)
class ModelParts:
    """Named handles on a Llama-style causal LM plus the head geometry the transforms need."""

    model: nn.Module
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear
    layers: tuple[LayerParts, ...]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.heads // self.kv_heads

    @property
    def blocks(self) -> list[nn.Module]:
        """The decoder blocks themselves, in order (each ``LayerParts.prefix`` names one)."""
        return [self.model.get_submodule(lp.prefix) for lp in self.layers]


def _linear_like(module: object) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor) and getattr(module, "weight").dim() == 2


def model_parts(model: nn.Module) -> ModelParts:
    """Locate the embedding, norms, projections and head of a Llama-style model (through
    :mod:`common.layout`) and check that the transforms are exact for it.

    Raises :class:`QuantizerError` naming the model type when the architecture is not one whose
    layout the transforms are exact for (see :data:`SUPPORTED_MODEL_TYPES`).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QuantizerError(
            f"transform-based quantization supports Llama-style models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"{name} has model_type {model_type!r}: use rtn or gptq for this model"
        )
    layout = LAYOUTS[model_type]  # where the parts are: common.layout, the one adapter
    embed, norm = get_part(model, layout.embed), get_part(model, layout.final_norm)
    head, blocks = get_part(model, layout.lm_head), get_part(model, layout.layers)
    if not isinstance(embed, nn.Embedding) or norm is None or not _linear_like(head) or not blocks:
        raise QuantizerError(f"{name} lacks {layout.embed}/{layout.final_norm}/{layout.lm_head}/{layout.layers}; "
                             "use rtn or gptq")
    layers = []
    fields = ("attn", "input_norm", "post_norm", "q", "k", "v", "o", "gate", "up", "down")
    for i, block in enumerate(blocks):
        found = {f: get_part(block, getattr(layout, f)) for f in fields}
        missing = [getattr(layout, f) or f for f, m in found.items() if m is None]
        if missing:
            raise QuantizerError(f"{name} layer {i} is not Llama-style (no {', '.join(missing)}); use rtn or gptq")
        parts = LayerParts(prefix=f"{layout.layers}.{i}", **found)
        attn = found["attn"]
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise QuantizerError(f"{name} has Q/K norms, which the rotations do not commute with; use rtn or gptq")
        layers.append(parts)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if head_dim % 2:
        raise QuantizerError(f"{name} has an odd head_dim {head_dim}; rotary pairs need an even one")
    return ModelParts(
        model=model, embed=embed, final_norm=norm, lm_head=head, layers=tuple(layers),
        hidden=int(config.hidden_size), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=int(config.intermediate_size),
    )


# ---------------------------------------------------------------------- orthogonal matrices
def _pow2_factor(n: int) -> tuple[int, int]:
    """``n = m * p`` with ``p`` the largest power of two dividing ``n``."""
    if n < 1:
        raise QuantizerError(f"Hadamard size must be positive, got {n}")
    p = n & (-n)
    return n // p, p


def random_orthogonal(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random ``[n, n]`` orthogonal matrix (QR of a Gaussian with the sign fix)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype)


def _hadamard(p: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of a power-of-two size (scipy.linalg.hadamard)."""
    from scipy.linalg import hadamard

    return torch.tensor(hadamard(p), dtype=torch.float64).div_(math.sqrt(p)).to(dtype)


@register_online_transform
class OnlineHadamard(OnlineTransform):
    """``x -> x M`` on the last dimension, ``M = diag(signs) (Q ⊗ H_p)``: a randomised Hadamard.

    ``H_p`` is the normalised Sylvester Hadamard (``scipy.linalg.hadamard``) of the largest power of
    two ``p`` dividing ``size``; ``Q`` is a random ``[m, m]`` orthogonal matrix for the remaining
    odd factor ``m = size / p`` (identity ``[1, 1]`` when ``size`` is a power of two). Hidden sizes
    such as SmolLM2's 576 = 9 x 64 or 1536 = 3 x 512 have no Sylvester Hadamard; QuaRot stores
    special Hadamard matrices of orders 12, 20, 28, ... instead, which scipy does not provide, so
    the odd factor gets a random orthogonal block. Every output channel still mixes all ``size``
    inputs with magnitude about ``1/sqrt(size)``, which is what spreads outliers.

    The state (``signs``, ``small``) lives in buffers, so a saved variant rebuilds it from
    :meth:`spec` plus its state dict; ``H_p`` is recomputed (non-persistent buffer). Cost:
    ``O(size * (p + m))`` per vector instead of ``O(size^2)``.
    """

    kind = "hadamard"

    def __init__(self, size: int) -> None:
        super().__init__()
        m, p = _pow2_factor(int(size))
        self.size = int(size)
        self.register_buffer("signs", torch.ones(self.size))
        self.register_buffer("small", torch.eye(m))
        self.register_buffer("hadamard", _hadamard(p), persistent=False)

    @classmethod
    def random(cls, size: int, generator: torch.Generator | None = None) -> OnlineHadamard:
        """Random signs and a random odd-factor block, drawn from ``generator``."""
        module = cls(size)
        with torch.no_grad():
            module.signs.copy_(torch.randint(0, 2, (module.size,), generator=generator).mul(2).sub(1).float())
            module.small.copy_(random_orthogonal(module.small.shape[0], generator))
        return module

    def spec(self) -> dict:
        return {"kind": self.kind, "size": self.size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise QuantizerError(f"online Hadamard of size {self.size} got an input with last dimension {x.shape[-1]}")
        m, p = self.small.shape[0], self.hadamard.shape[0]
        # contiguous: a transposed input (a weight moved by an earlier chain step) would otherwise
        # reshape to a strided view that matmul cannot fold into one mm, and it runs as a bmm over a
        # broadcast copy of the Hadamard instead (3x the CPU time of the copy and one mm, measured)
        y = (x * self.signs.to(x.dtype)).reshape(*x.shape[:-1], m, p).contiguous()
        y = y @ self.hadamard.to(x.dtype)
        if m > 1:
            y = self.small.to(x.dtype).transpose(0, 1) @ y
        return y.reshape(x.shape)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[size, size]`` orthogonal matrix ``M`` (``forward(x) == x @ M``)."""
        return self.forward(torch.eye(self.size, dtype=dtype, device=self.signs.device))

    def extra_repr(self) -> str:
        return f"size={self.size}, odd_factor={self.small.shape[0]}"


def random_hadamard(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dense randomised Hadamard matrix ``[n, n]`` (see :class:`OnlineHadamard` for non-powers of two)."""
    return OnlineHadamard.random(n, generator).matrix(dtype)


# ---------------------------------------------------------------------- transform sources
class Rotation(nn.Module):
    """An ``[n, n]`` orthogonal matrix, fixed (a buffer) or learnable.

    Learnable rotations use ``torch.nn.utils.parametrizations.orthogonal`` (``orthogonal_map``
    ``"cayley"`` or ``"matrix_exp"``), initialised at ``init``: the optimiser moves an unconstrained
    parameter and the matrix stays orthogonal to float precision at every step, the Cayley
    alternative to OSTQuant's Riemannian optimiser.
    """

    def __init__(self, init: torch.Tensor, learnable: bool = False, orthogonal_map: str = "cayley") -> None:
        super().__init__()
        n = init.shape[0]
        if init.dim() != 2 or init.shape[1] != n:
            raise QuantizerError(f"a rotation must be a square matrix, got shape {tuple(init.shape)}")
        self.learnable = learnable
        if learnable:
            from torch.nn.utils.parametrizations import orthogonal

            self.weight = nn.Parameter(torch.empty_like(init))
            orthogonal(self, "weight", orthogonal_map=orthogonal_map)
            self.weight = init
        else:
            self.register_buffer("weight", init.clone())
        self._pinned: torch.Tensor | None = None

    def pin(self, value: torch.Tensor | None) -> None:
        """Make :meth:`matrix` return ``value`` (None: evaluate ``weight`` again). The fused training
        forward evaluates each orthogonal map once per step and pins the result, so that every
        layer, and its recomputation under gradient checkpointing, uses the same tensor."""
        self._pinned = value

    def matrix(self) -> torch.Tensor:
        return self.weight if self._pinned is None else self._pinned


class Scale(nn.Module):
    """A positive diagonal scale vector ``s`` of one site, fixed or learnable (initialised at 1)."""

    def __init__(self, size: int | None = None, *, init: torch.Tensor | None = None, learnable: bool = False) -> None:
        super().__init__()
        if init is None:
            if size is None:
                raise QuantizerError("a scale needs a size or an initial value")
            init = torch.ones(size)
        init = init.detach().clone()
        init = init if init.dtype == torch.float64 else init.float()
        if learnable:
            self.value = nn.Parameter(init)
        else:
            self.register_buffer("value", init)

    def vector(self) -> torch.Tensor:
        return self.value


# ---------------------------------------------------------------------- ops on a channel space
class RotateOp:
    """``x -> x (I ⊗ R)``: an orthogonal transform of consecutive blocks of ``R``'s size.
    Orthogonal, so producers and consumers apply the same matrix."""

    def __init__(self, rotation: Rotation, block: int | None = None) -> None:
        self.rotation = rotation
        self.block = block

    def __call__(self, x: torch.Tensor, consumer: bool) -> torch.Tensor:
        r = self.rotation.matrix().to(x.dtype)
        b = r.shape[0]
        if x.shape[-1] % b:
            raise QuantizerError(f"rotation of size {b} does not tile a dimension of {x.shape[-1]}")
        return (x.reshape(*x.shape[:-1], -1, b) @ r).reshape(x.shape)


class ScaleOp:
    """The activation is divided by ``s[index]`` (``invert``: multiplied): producers ``x / s``,
    consumers ``x * s`` (``T = diag(1/s)``, ``T^-T = diag(s)``). ``index`` maps every channel of
    the space to an element of ``s`` (GQA groups, RoPE pairs)."""

    def __init__(self, scale: Scale, index: torch.Tensor, invert: bool = False) -> None:
        self.scale = scale
        self.index = index
        self.invert = invert

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """``s[index]``: one element of ``s`` per channel of the space (differentiable in ``s``)."""
        vec = self.scale.vector()
        return vec.to(dtype)[self.index.to(vec.device)]

    def multiplies(self, consumer: bool) -> bool:
        """Whether this side multiplies by :meth:`factor` (else it divides)."""
        return consumer != self.invert

    def __call__(self, x: torch.Tensor, consumer: bool) -> torch.Tensor:
        s = self.factor(x.dtype)
        return x * s if self.multiplies(consumer) else x / s


class OnlineOp:
    """The consumer side of an online orthogonal transform ``T`` applied to the activation at run
    time: ``W -> W T`` (``T^-T = T`` for orthogonal ``T``). Producers are untouched."""

    def __init__(self, transform: nn.Module) -> None:
        self.transform = transform

    def __call__(self, x: torch.Tensor, consumer: bool) -> torch.Tensor:
        if not consumer:
            raise QuantizerError("an online transform has no producer side")
        return self.transform(x)


Op = RotateOp | ScaleOp | OnlineOp


@dataclass
class ParamChain:
    """The transforms acting on one parameter, in order: ``steps`` of ``(axis, op, consumer)``.

    ``axis`` is the dimension whose vectors live in the op's channel space: for a Linear weight
    ``[out, in]`` the producer axis is 0 and the consumer axis 1; a bias or a norm weight has
    axis 0; an embedding ``[vocab, d]`` produces along axis 1.
    """

    module: nn.Module
    param: str
    steps: list[tuple[int, Op, bool]] = field(default_factory=list)
    label: str = ""


def transformed(chain: ParamChain, value: torch.Tensor) -> torch.Tensor:
    """The parameter value after every step of ``chain`` (differentiable in the ops' sources)."""
    out = value
    for axis, op, consumer in chain.steps:
        moved = out.movedim(axis, -1)
        out = op(moved, consumer).movedim(-1, axis)
    return out


class ChainBuilder:
    """Collects steps per ``(module, parameter)`` in the order they are added."""

    def __init__(self) -> None:
        self._chains: dict[tuple[int, str], ParamChain] = {}

    def add(self, module: nn.Module, param: str, axis: int, op: Op, consumer: bool, label: str = "") -> None:
        if getattr(module, param, None) is None:
            return  # e.g. a Linear without bias
        key = (id(module), param)
        chain = self._chains.setdefault(key, ParamChain(module, param, label=label))
        chain.steps.append((axis, op, consumer))

    def produce(self, module: nn.Module, op: Op, *, with_bias: bool = True, axis: int = 0) -> None:
        """``module``'s output channels live in the op's space (weight rows and bias)."""
        self.add(module, "weight", axis, op, False)
        if with_bias:
            self.add(module, "bias", 0, op, False)

    def consume(self, module: nn.Module, op: Op) -> None:
        """``module`` reads the op's space (weight columns)."""
        self.add(module, "weight", 1, op, True)

    def chains(self) -> list[ParamChain]:
        return list(self._chains.values())


@torch.no_grad()
def fuse_chains(chains: Iterable[ParamChain]) -> None:
    """Write every chain's result into its parameter, in place (fixed transforms)."""
    for chain in chains:
        param = getattr(chain.module, chain.param)
        new = transformed(chain, param.detach().to(torch.float64 if param.dtype == torch.float64 else torch.float32))
        param.copy_(new.to(param.dtype))


class _ChainParametrization(nn.Module):
    """``torch.nn.utils.parametrize`` wrapper: the weight the module sees is ``transformed(chain, W)``.
    The chain's sources are held outside the module tree (they are shared by many weights)."""

    def __init__(self, chain: ParamChain) -> None:
        super().__init__()
        self._chain = [chain]

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return transformed(self._chain[0], value)


def column_factor(module: nn.Module, param: str = "weight") -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(original, s)`` such that the value ``module.<param>`` takes is exactly ``original * s``
    (``s`` ``[in]``, differentiable in its scale; one multiplying scale on a Linear weight's input
    columns, e.g. a smoothing scale); ``(value, None)`` for a parameter without parametrisation;
    None for any other chain (a rotation, a producer scale, several steps), whose value only
    :func:`transformed` gives. For computations that fuse the chain with what reads the weight
    (:mod:`quantizers.few_token_linear`)."""
    if not parametrize.is_parametrized(module, param):
        return getattr(module, param), None
    plist = module.parametrizations[param]
    if len(plist) != 1 or not isinstance(plist[0], _ChainParametrization):
        return None
    original = plist.original
    steps = plist[0]._chain[0].steps
    if original.dim() != 2 or len(steps) != 1:
        return None
    axis, op, consumer = steps[0]
    if axis != 1 or not isinstance(op, ScaleOp) or not op.multiplies(consumer):
        return None
    return original, op.factor(original.dtype)


def attach_chains(chains: Iterable[ParamChain]) -> None:
    """Register each chain as a parametrisation of its parameter (the original value is frozen)."""
    for chain in chains:
        getattr(chain.module, chain.param).requires_grad_(False)
        parametrize.register_parametrization(chain.module, chain.param, _ChainParametrization(chain))


def detach_chains(chains: Iterable[ParamChain]) -> None:
    """Remove the parametrisations, keeping the transformed values (this fuses learned transforms)."""
    with torch.no_grad():
        for chain in chains:
            if parametrize.is_parametrized(chain.module, chain.param):
                parametrize.remove_parametrizations(chain.module, chain.param, leave_parametrized=True)
                getattr(chain.module, chain.param).requires_grad_(False)


def untie_embeddings(parts: ModelParts) -> bool:
    """Give lm_head its own copy of a tied embedding matrix (and mark the config untied, so a
    reloaded variant keeps them apart). Returns True when they were tied."""
    head, embed = parts.lm_head, parts.embed
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    config = parts.model.config
    config.tie_word_embeddings = False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text_config is not None and text_config is not config:
        text_config.tie_word_embeddings = False
    log.info("untied lm_head from the input embedding (the transforms make them differ)")
    return True


# ---------------------------------------------------------------------- scale sites
SiteKind = Literal["norm_qkv", "norm_mlp", "vo", "qk", "updown", "norm_head"]
#: Every site kind, in the order :func:`scale_sites` lists them per layer.
SITE_KINDS: tuple[str, ...] = ("norm_qkv", "norm_mlp", "vo", "qk", "updown", "norm_head")


@dataclass(frozen=True)
class ScaleSite:
    """One diagonal equivalence: the activation of a channel space is divided by ``s`` where it is
    produced and multiplied back in every consumer (or, for ``qk``, in the partner producer).

    ``producers``: ``(module, index, invert)`` — the module's output channels (weight rows, bias,
    or a norm's weight) are divided by ``s[index]`` (multiplied when ``invert``). ``consumers``:
    ``(qualified name, Linear, index)`` — weight columns multiplied by ``s[index]``; their inputs
    are the activations whose statistics set SmoothQuant's ``s``.
    """

    name: str
    kind: str
    layer: int | None
    size: int
    producers: tuple[tuple[nn.Module, torch.Tensor, bool], ...]
    consumers: tuple[tuple[str, nn.Linear, torch.Tensor], ...]

    def ops(self, scale: Scale) -> list[tuple[nn.Module, Op, bool]]:
        """``(module, op, consumer)`` for every parameter this site touches."""
        out: list[tuple[nn.Module, Op, bool]] = [(m, ScaleOp(scale, idx, inv), False) for m, idx, inv in self.producers]
        out += [(m, ScaleOp(scale, idx), True) for _, m, idx in self.consumers]
        return out


def _heads_index(heads: int, head_dim: int, groups: int, width: int) -> torch.Tensor:
    """For every channel of ``heads`` heads of ``head_dim``: the element of a per-KV-head vector
    of ``width`` entries per head (``width == head_dim``: channel-wise; ``head_dim // 2``: one per
    rotary pair, channels ``i`` and ``i + head_dim/2`` share it)."""
    c = torch.arange(heads * head_dim)
    kv_head = (c // head_dim) // groups
    return kv_head * width + (c % head_dim) % width


def scale_sites(
    model: nn.Module | ModelParts,
    kinds: Sequence[str] = ("norm_qkv", "norm_mlp", "vo", "qk", "updown"),
    layers: Sequence[int] | None = None,
) -> list[ScaleSite]:
    """The diagonal scale sites of a Llama-style model (per layer, in :data:`SITE_KINDS` order).

    ``layers`` restricts to some decoder layers; ``norm_head`` (final norm -> lm_head) is not tied
    to a layer and is listed last when asked for.
    """
    parts = model if isinstance(model, ModelParts) else model_parts(model)
    unknown = sorted(set(kinds) - set(SITE_KINDS))
    if unknown:
        raise QuantizerError(f"unknown scale site kind(s) {', '.join(unknown)}; valid: {', '.join(SITE_KINDS)}")
    hd, g = parts.head_dim, parts.groups
    kv_dim = parts.kv_heads * hd
    sites: list[ScaleSite] = []
    chosen = range(len(parts.layers)) if layers is None else layers
    for i in chosen:
        lp = parts.layers[i]
        p = lp.prefix
        d = torch.arange(parts.hidden)
        for kind in kinds:
            if kind == "norm_qkv":
                consumers = tuple((f"{p}.self_attn.{n}_proj", m, d) for n, m in (("q", lp.q), ("k", lp.k), ("v", lp.v)))
                sites.append(ScaleSite(f"{p}.norm_qkv", kind, i, parts.hidden, ((lp.input_norm, d, False),), consumers))
            elif kind == "norm_mlp":
                consumers = tuple((f"{p}.mlp.{n}_proj", m, d) for n, m in (("gate", lp.gate), ("up", lp.up)))
                sites.append(ScaleSite(f"{p}.norm_mlp", kind, i, parts.hidden, ((lp.post_norm, d, False),), consumers))
            elif kind == "vo":
                o_index = _heads_index(parts.heads, hd, g, hd)
                sites.append(ScaleSite(f"{p}.vo", kind, i, kv_dim, ((lp.v, torch.arange(kv_dim), False),),
                                       ((f"{p}.self_attn.o_proj", lp.o, o_index),)))
            elif kind == "qk":
                half = hd // 2
                producers = ((lp.k, _heads_index(parts.kv_heads, hd, 1, half), False),
                             (lp.q, _heads_index(parts.heads, hd, g, half), True))
                sites.append(ScaleSite(f"{p}.qk", kind, i, parts.kv_heads * half, producers, ()))
            elif kind == "updown":
                r = torch.arange(parts.intermediate)
                sites.append(ScaleSite(f"{p}.updown", kind, i, parts.intermediate, ((lp.up, r, False),),
                                       ((f"{p}.mlp.down_proj", lp.down, r),)))
    if "norm_head" in kinds:
        d = torch.arange(parts.hidden)
        sites.append(ScaleSite("model.norm_head", "norm_head", None, parts.hidden,
                               ((parts.final_norm, d, False),), (("lm_head", parts.lm_head, d),)))
    return sites


def _add_site(builder: ChainBuilder, site: ScaleSite, scale: Scale) -> None:
    if scale.vector().numel() != site.size:
        raise QuantizerError(f"scale for site {site.name} has {scale.vector().numel()} entries, expected {site.size}")
    for module, op, consumer in site.ops(scale):
        if consumer:
            builder.consume(module, op)
        else:
            builder.produce(module, op)


def site_chains(sites: Iterable[ScaleSite], scales: Mapping[str, Scale], builder: ChainBuilder | None = None) -> list[ParamChain]:
    """Chains applying ``scales[site.name]`` at every site (sites without a scale are skipped)."""
    builder = builder or ChainBuilder()
    for site in sites:
        if site.name in scales:
            _add_site(builder, site, scales[site.name])
    return builder.chains()


def fold_rmsnorms(parts: ModelParts) -> None:
    """Fold every RMSNorm weight into the linears that read the norm; the norm weights become 1.

    This is the norm sites with ``s = g`` (the norm output is divided by its own weight), so it
    unties a tied lm_head first (the final norm folds into lm_head, not into the embedding).
    """
    untie_embeddings(parts)
    sites = scale_sites(parts, ("norm_qkv", "norm_mlp", "norm_head"))
    scales = {}
    for site in sites:
        norm = site.producers[0][0]
        scales[site.name] = Scale(init=norm.weight.detach().float().clone())
    fuse_chains(site_chains(sites, scales))
    with torch.no_grad():  # exact ones (the division g / g may leave 1 +- ulp)
        for site in sites:
            site.producers[0][0].weight.fill_(1.0)


# ---------------------------------------------------------------------- rotations and online transforms
def rotation_chains(
    parts: ModelParts,
    builder: ChainBuilder,
    *,
    r1: Rotation | None = None,
    r2: Sequence[Rotation] | None = None,
) -> None:
    """Add the residual rotation ``r1`` and the per-layer value/output rotations ``r2`` to ``builder``.

    Needs folded norms (:func:`fold_rmsnorms`) and an untied lm_head when ``r1`` is given; add
    these before the scale sites so that scales act on the rotated channels.
    """
    if r1 is not None:
        op = RotateOp(r1)
        builder.produce(parts.embed, op, with_bias=False, axis=1)
        for lp in parts.layers:
            for m in (lp.q, lp.k, lp.v, lp.gate, lp.up):
                builder.consume(m, op)
            for m in (lp.o, lp.down):
                builder.produce(m, op)
        builder.consume(parts.lm_head, op)
    if r2 is not None:
        if len(r2) != len(parts.layers):
            raise QuantizerError(f"got {len(r2)} per-head rotations for {len(parts.layers)} layers")
        for lp, rot in zip(parts.layers, r2):
            op = RotateOp(rot)
            builder.produce(lp.v, op)
            builder.consume(lp.o, op)


def install_online_hadamards(
    parts: ModelParts,
    builder: ChainBuilder | None,
    *,
    down_layers: Sequence[int] = (),
    qk: bool = False,
    generator: torch.Generator | None = None,
    o_layers: Sequence[int] = (),
) -> dict[str, OnlineHadamard]:
    """Online Hadamards (QuaRot) on the down_proj inputs of ``down_layers``, on the o_proj inputs
    of ``o_layers`` (QuaRot mixes the attention output across heads online; the per-head part is
    ``R2``, fused) and, with ``qk``, on post-RoPE queries and keys.

    The down_proj and o_proj ones are returned as ``{qualified name: module}`` for the ``input_transforms`` of
    :func:`~quantizers.modules.quantize_linear_layers` / ``quantize_weights``; their inverse is added
    to ``builder`` (if given) as the down_proj weight's last consumer step, so add them after the
    up -> down scale site. The Q/K ones are installed on each attention module with
    :func:`~quantizers.modules.set_qk_transform` (applied to both, so q.k and the weights are unchanged).
    """
    transforms: dict[str, OnlineHadamard] = {}
    device = parts.embed.weight.device
    for i in down_layers:
        lp = parts.layers[i]
        h = OnlineHadamard.random(parts.intermediate, generator).to(device)
        transforms[f"{lp.prefix}.mlp.down_proj"] = h
        if builder is not None:
            builder.consume(lp.down, OnlineOp(h))
    for i in o_layers:
        lp = parts.layers[i]
        h = OnlineHadamard.random(lp.o.weight.shape[1], generator).to(device)
        transforms[f"{lp.prefix}.self_attn.o_proj"] = h
        if builder is not None:
            builder.consume(lp.o, OnlineOp(h))
    if qk:
        for lp in parts.layers:
            set_qk_transform(lp.attn, OnlineHadamard.random(parts.head_dim, generator).to(device))
    return transforms


# ---------------------------------------------------------------------- shared method glue
@dataclass(frozen=True)
class WeightStepOptions:
    """The weight step every transform method ends with (``quantizers.gptq.quantize_weights``).

    ``weights``: ``"gptq"`` (calibration data is then loaded for it), ``"rtn"``, or ``"auto"`` (the
    default: GPTQ when calibration batches are given, else RTN: GPTQ for the methods that calibrate
    anyway, OST and AAQ; RTN for QuaRot, which needs no data, unless ``weights=gptq``; the published
    QuaRot/OSTQuant/AAQ numbers use GPTQ). ``mse_clip``: per-channel MSE search of the weight clip ratio (1.0 down to 0.2), as in
    W4A4.md's recipe (default True; the scheme's ``-wmse`` turns it on regardless).
    """

    weights: Literal["auto", "rtn", "gptq"] = "auto"
    mse_clip: bool = True


class TransformQuantizer(Quantizer):
    """Base of the transform methods: scheme checks, the KV-cache switch and the weight step."""

    Options = WeightStepOptions

    def check(self, scheme: QuantScheme) -> None:
        if scheme.is_fp:
            raise QuantizerError(
                f"{self.name} transforms a model for quantization; scheme {scheme.label!r} quantizes nothing "
                "(use fp, or a scheme such as w4a4kv4)"
            )

    def prepare(self, model: nn.Module, scheme: QuantScheme) -> ModelParts:
        """Check the architecture and switch on KV-cache fake-quant before touching any weight."""
        parts = model_parts(model)
        if scheme.quantizes_kv:
            enable_kv_quant(model, scheme)
        return parts

    def needs_calibration_text(self) -> bool:
        """``weights=gptq`` calibrates the weight step even where the transforms need no data (QuaRot)."""
        return super().needs_calibration_text() or self.options.weights == "gptq"

    def weight_method(self, ctx: QuantContext) -> str:
        opts: WeightStepOptions = self.options
        if opts.weights == "auto":
            return "gptq" if ctx.calibration_batches else "rtn"
        if opts.weights == "gptq" and not ctx.calibration_batches:
            raise QuantizerError(f"{self.name} with weights=gptq needs calibration data; give some or set weights=rtn")
        return opts.weights

    def weight_step(
        self,
        model: nn.Module,
        scheme: QuantScheme,
        ctx: QuantContext,
        input_transforms: Mapping[str, nn.Module] | None = None,
    ) -> None:
        """Quantize the (transformed) weights with RTN or GPTQ and record what was done."""
        opts: WeightStepOptions = self.options
        method = self.weight_method(ctx)
        step_scheme = scheme.replace(w_clip_search=True) if opts.mse_clip and scheme.quantizes_weights else scheme
        options = GPTQOptions(mse_clip=step_scheme.w_clip_search) if method == "gptq" else RTNOptions()
        stats: dict = {}
        quantize_weights(
            model, step_scheme, method=method, batches=ctx.calibration_batches if method == "gptq" else None,
            options=options, input_transforms=input_transforms, progress=ctx.progress, stats=stats,
        )
        self.metadata["weights"] = {**stats, "mse_clip": step_scheme.w_clip_search}


def online_down_layers(parts: ModelParts, scheme: QuantScheme, proj: str = "mlp.down_proj") -> list[int]:
    """Layers whose ``proj`` (down_proj by default) is quantized by ``scheme`` (those get an
    online Hadamard input)."""
    if not scheme.quantizes_linears:
        return []
    return [i for i, lp in enumerate(parts.layers) if not scheme.skips(f"{lp.prefix}.{proj}")]
