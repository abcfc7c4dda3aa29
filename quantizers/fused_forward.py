"""The training forward of a model whose weights are transformed by parameter chains, at about the
cost of a plain training step (``ost``, ``aaq``).

The parametrisation route (``transforms.attach_chains`` + ``parametrize.cached()``) evaluates the
chain of every weight of the whole model on each step, the vocabulary-sized embedding and
lm_head included, and keeps every transformed weight and its intermediates alive until the
backward pass. Here instead (the SpinQuant way, Liu et al. 2024, arXiv:2405.16406):

* each decoder layer transforms its own weights inside its forward, under
  ``torch.utils.checkpoint``: only the layer's inputs are kept, and its transformed weights are
  recomputed in the backward pass, so one layer's transformed weights are alive at a time;
* the embedding is not transformed: the rows the batch looks up are (its chain acts on the
  embedding dimension, so ``E[ids] R1 == (E R1)[ids]``);
* lm_head is not transformed: its input is, ``x (W M)^T == (x M^T) W^T`` with ``M`` the chain
  applied to the identity (tokens x d x d instead of vocab x d x d); a quantized-input lm_head
  (``noskip``) falls back to transforming the weight;
* lm_head is not even run: the forward returns :class:`~quantizers.losses.HeadLogits` (the final
  hidden state and the frozen head weight), and the loss evaluates the logits only at the K
  tokens per position its subset KL looks at (positions x K x d instead of positions x vocab x d,
  forward and backward; a full-vocabulary loss still gets them all);
* the activation fake-quant of an input that several Linears read (q/k/v, gate/up) runs once
  (``modules.shared_input_quant``);
* rotations are evaluated once per forward (one Cayley map each) and handed to every layer as
  checkpoint inputs, so the recomputation sees exactly the tensors the forward saw;
* optionally (``hold_weights``, :meth:`FusedTransformForward.step`) each layer's transformed
  weights are computed once per optimizer step, outside the checkpointed region, and held for
  every micro-batch's forward and recomputation; their gradients are collected and pushed through
  the transforms once per step, one layer at a time. A checkpointed step then transforms every
  weight twice per step instead of twice per micro-batch forward, at the memory of two copies of
  the decoder layers' weights (held values and their gradients);
* optionally the transformed weights are fake-quantized with a straight-through estimator
  (``weight_scheme``), so the transforms learn against weight quantization (weight-only schemes,
  as SpinQuant trains its rotations against RTN weights).

Chains on any other parameter (none in OST's recipe) are applied through the parametrisation
route. The result equals the parametrisation route's to float rounding (tested on the toy pair).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from .errors import QuantizerError
from .fake_quant import fake_quant_weight
from .fp_prefix import captured_prefix, restored_prefix
from .losses import HeadLogits, Logits
from .modules import QuantLinear, shared_input_quant
from .scheme import QuantScheme
from .transforms import (
    ModelParts,
    ParamChain,
    RotateOp,
    Rotation,
    attach_chains,
    detach_chains,
    fuse_chains,
    transformed,
)

__all__ = ["FusedTransformForward", "autocast_dtype", "available_memory_bytes", "checkpoint_needed",
           "UNCHECKPOINTED_VECTORS_PER_TOKEN_LAYER"]

#: Without checkpointing, what a fused step keeps per token per decoder layer until the backward
#: pass, in vectors of ``hidden + intermediate`` elements of the compute dtype. Measured: 20.5 on
#: SmolLM2-135M (fp32, W4A4KV4, 1,024 tokens per step: peak RSS 7.23 GiB uncheckpointed against
#: 2.27 GiB checkpointed, over 30 layers; bench/bench_ost_cost.py jobs ost and ost-ckpt).
UNCHECKPOINTED_VECTORS_PER_TOKEN_LAYER = 21.0

Swap = tuple[nn.Module, str, torch.Tensor]


def _cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU has bf16 matrix units (AMX-BF16), from the kernel's CPU flags. AVX512-BF16
    alone is not enough: on such a CPU (AMD Zen 4, one thread) a bf16 matmul of 1024x576x1536 ran
    2.5x faster than fp32, but a whole OST step on the toy pair ran 5x slower under bf16 autocast
    (3.55 s against 0.71 s, casts and non-matmul ops dominate), so it stays fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split(":", 1)[1].split()
    except OSError:
        return False
    return False


def autocast_dtype(device: torch.device | str, mode: str = "auto") -> torch.dtype | None:
    """The autocast dtype for the trained forward: ``bf16`` where the hardware multiplies bf16
    natively (a CUDA GPU reporting bf16 support; a CPU with AMX-BF16 tiles), else None (fp32).
    ``mode``: ``auto`` (detect), ``bf16`` (force), ``off``."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode != "auto":
        raise QuantizerError(f"autocast must be auto, bf16 or off, got {mode!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_bf16_matrix_units() else None
    return None


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Memory a step can still claim: free memory of a CUDA device, ``MemAvailable`` of the host
    for a CPU (``/proc/meminfo``); None where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def checkpoint_needed(parts: ModelParts, tokens: int, *, element_bytes: int, available: int | None,
                      share: float = 0.5) -> tuple[bool, int]:
    """Whether to checkpoint each decoder layer: only when the activations an uncheckpointed step
    keeps (:data:`UNCHECKPOINTED_VECTORS_PER_TOKEN_LAYER`, measured) would take more than ``share``
    of the ``available`` memory (unknown: checkpoint). Returns ``(decision, estimated bytes)``.
    Checkpointing recomputes every layer's forward (and its weight transforms) in the backward
    pass; it changes no result, only time and memory."""
    per_token_layer = UNCHECKPOINTED_VECTORS_PER_TOKEN_LAYER * (parts.hidden + parts.intermediate) * element_bytes
    estimate = int(per_token_layer * tokens * len(parts.layers))
    return available is None or estimate > share * available, estimate


@contextlib.contextmanager
def _swapped(swaps: Sequence[Swap]) -> Iterator[None]:
    """Let each module see ``tensor`` as its parameter ``name`` for the duration (restored after)."""
    saved = []
    try:
        for module, name, tensor in swaps:
            saved.append((module, name, module._parameters[name]))
            module._parameters[name] = tensor
        yield
    finally:
        for module, name, original in reversed(saved):
            module._parameters[name] = original


@contextlib.contextmanager
def _replaced(root: nn.Module, old: nn.Module, new: nn.Module, active: bool = True) -> Iterator[None]:
    """Put ``new`` where ``old`` sits in ``root``'s module tree for the duration (``active``)."""
    if not active:
        yield
        return
    found = [(parent, name) for parent in root.modules() for name, child in parent.named_children() if child is old]
    if not found:
        raise QuantizerError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")
    parent, name = found[0]
    setattr(parent, name, new)
    try:
        yield
    finally:
        setattr(parent, name, old)


@contextlib.contextmanager
def _pinned(rotations: Sequence[Rotation], matrices: Sequence[torch.Tensor]) -> Iterator[None]:
    try:
        for rot, mat in zip(rotations, matrices):
            rot.pin(mat)
        yield
    finally:
        for rot in rotations:
            rot.pin(None)


def _chain_rotations(chains: Sequence[ParamChain]) -> list[Rotation]:
    seen: dict[int, Rotation] = {}
    for chain in chains:
        for _, op, _ in chain.steps:
            if isinstance(op, RotateOp):
                seen.setdefault(id(op.rotation), op.rotation)
    return list(seen.values())


def _input_side_only(chain: ParamChain) -> bool:
    """Every step acts on the weight's last (input / embedding) dimension."""
    return all(axis == 1 for axis, _, _ in chain.steps)


def _apply_to_rows(chain: ParamChain, rows: torch.Tensor) -> torch.Tensor:
    """The chain applied to row vectors of the weight's last dimension (``rows [..., d]``)."""
    for _, op, consumer in chain.steps:
        rows = op(rows, consumer)
    return rows


class FusedTransformForward:
    """Runs ``parts.model`` with the transforms of ``chains`` applied layer by layer (see the
    module docstring). Use :meth:`installed` around the training loop and :meth:`logits` per step.

    ``weight_scheme``: fake-quantize (straight-through) the weights of the Linears it does not
    skip inside the decoder layers. ``use_checkpoint``: recompute each layer in the backward pass.
    ``autocast``: the dtype to autocast the forward to (None: as the model is).
    """

    def __init__(
        self,
        parts: ModelParts,
        chains: Sequence[ParamChain],
        *,
        weight_scheme: QuantScheme | None = None,
        use_checkpoint: bool = True,
        autocast: torch.dtype | None = None,
        hold_weights: bool = False,
    ) -> None:
        self.parts = parts
        self.hold_weights = hold_weights
        #: during :meth:`step` with ``hold_weights``: per layer, the held transformed weights
        self._held: list[list[Swap]] | None = None
        self.weight_scheme = weight_scheme if weight_scheme is not None and weight_scheme.quantizes_weights else None
        self.use_checkpoint = use_checkpoint
        self.autocast = autocast
        self.rotations = _chain_rotations(chains)
        #: id(module) -> (decoder layer index, qualified name), for every module inside a layer
        self._owner = {id(module): (li, f"{lp.prefix}.{name}" if name else lp.prefix)
                       for li, lp in enumerate(parts.layers)
                       for name, module in parts.blocks[li].named_modules()}
        self.layer_chains: list[list[ParamChain]] = [[] for _ in parts.layers]
        self.embed_chain: ParamChain | None = None
        self.head_chain: ParamChain | None = None
        self.other_chains: list[ParamChain] = []
        for chain in chains:
            self._route(chain)
        #: per layer: (Linear whose weight is fake-quantized, the chain of that weight or None)
        self.quantized_weights = [self._quantized_in(li) for li in range(len(parts.layers))]
        #: the head is left to the loss (HeadLogits): a plain Linear whose weight nothing transforms
        self.head_to_loss = (type(parts.lm_head) is nn.Linear
                             and not any(c.module is parts.lm_head for c in self.other_chains))
        self._matrices: list[torch.Tensor] = []

    def _route(self, chain: ParamChain) -> None:
        """File a chain under the mechanism that applies it (see the module docstring)."""
        parts = self.parts
        head_reads_quantized = isinstance(parts.lm_head, QuantLinear) and parts.lm_head.a_bits < 16
        if id(chain.module) in self._owner:
            self.layer_chains[self._owner[id(chain.module)][0]].append(chain)
        elif chain.module is parts.embed and chain.param == "weight" and _input_side_only(chain):
            self.embed_chain = chain
        elif (chain.module is parts.lm_head and chain.param == "weight" and _input_side_only(chain)
              and not head_reads_quantized):
            self.head_chain = chain
        else:
            self.other_chains.append(chain)

    def _quantized_in(self, li: int) -> list[tuple[nn.Module, ParamChain | None]]:
        if self.weight_scheme is None:
            return []
        weight_chains = {id(c.module): c for c in self.layer_chains[li] if c.param == "weight"}
        return [(module, weight_chains.get(id(module)))
                for module in self.parts.blocks[li].modules()
                if isinstance(module, (nn.Linear, QuantLinear))
                and not self.weight_scheme.skips(self._owner[id(module)][1])]

    # ------------------------------------------------------------------ per layer
    def _layer_swaps(self, li: int) -> list[Swap]:
        """Layer ``li``'s transformed (and fake-quantized) weights: the held ones inside a holding
        :meth:`step`, else computed now from the parameters."""
        return self._held[li] if self._held is not None else self._transformed_swaps(li)

    def _transformed_swaps(self, li: int) -> list[Swap]:
        quantized = {id(m): chain for m, chain in self.quantized_weights[li]}
        swaps: list[Swap] = []
        for chain in self.layer_chains[li]:
            value = transformed(chain, getattr(chain.module, chain.param))
            if chain.param == "weight" and id(chain.module) in quantized:
                value = self._fake_quant(value)
            swaps.append((chain.module, chain.param, value))
        for module, chain in self.quantized_weights[li]:
            if chain is None:  # a quantized Linear no transform touches
                swaps.append((module, "weight", self._fake_quant(module.weight)))
        return swaps

    def _fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.weight_scheme
        return fake_quant_weight(weight, s.w_bits, group_size=s.w_group_size, symmetric=s.w_symmetric).to(weight.dtype)

    def _layer_forward(self, li: int, layer: nn.Module):
        forward = type(layer).forward

        def run(prefix, hidden: torch.Tensor, *matrices_and_args: Any, **kwargs: Any):
            n = len(self.rotations)
            matrices, args = matrices_and_args[:n], matrices_and_args[n:]
            with (_pinned(self.rotations, matrices), _swapped(self._layer_swaps(li)), shared_input_quant(),
                  restored_prefix(prefix)):  # the recomputation runs after the model's forward has returned
                return forward(layer, hidden, *args, **kwargs)

        def patched(hidden: torch.Tensor, *args: Any, **kwargs: Any):
            prefix = captured_prefix()
            if self.use_checkpoint and torch.is_grad_enabled():
                return checkpoint(run, prefix, hidden, *self._matrices, *args, use_reentrant=False, **kwargs)
            return run(prefix, hidden, *self._matrices, *args, **kwargs)

        return patched

    # ------------------------------------------------------------------ embedding and head
    def _embed_hook(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        with _pinned(self.rotations, self._matrices):
            return _apply_to_rows(self.embed_chain, output)

    def _head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input times ``M^T``, so that the untransformed head computes ``x (W M)^T``."""
        weight = self.parts.lm_head.weight
        with _pinned(self.rotations, self._matrices):
            eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
            m = _apply_to_rows(self.head_chain, eye)  # W' = W M
        return x @ m.T.to(x.dtype)

    def _head_hook(self, _module: nn.Module, args: tuple) -> tuple:
        return (self._head_input(args[0]), *args[1:])

    @contextlib.contextmanager
    def installed(self) -> Iterator[FusedTransformForward]:
        """Patch the layers' forwards and the embedding/head hooks in; restore the model after."""
        layers = self.parts.blocks
        handles = []
        try:
            for li, layer in enumerate(layers):
                layer.forward = self._layer_forward(li, layer)
            if self.embed_chain is not None:
                handles.append(self.parts.embed.register_forward_hook(self._embed_hook))
            if self.head_chain is not None and not self.head_to_loss:
                handles.append(self.parts.lm_head.register_forward_pre_hook(self._head_hook))
            if self.other_chains:
                attach_chains(self.other_chains)
            yield self
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
            for h in handles:
                h.remove()
            if self.other_chains:
                detach_chains(self.other_chains)
            self._matrices = []

    def fuse(self) -> None:
        """Write the learned transforms into the weights (after :meth:`installed` has exited; the
        chains that went through the parametrisation route were fused when they were detached)."""
        fuse_chains([c for chains in self.layer_chains for c in chains])
        fuse_chains([c for c in (self.embed_chain, self.head_chain) if c is not None])

    def _autocast(self) -> contextlib.AbstractContextManager:
        device_type = self.parts.embed.weight.device.type
        return (torch.autocast(device_type, dtype=self.autocast) if self.autocast is not None
                else contextlib.nullcontext())

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One optimizer step's forward and backward passes (one or several micro-batches) run
        inside. With ``hold_weights`` the rotations are evaluated and every layer's weights
        transformed once on entry, without autograd, as leaves the micro-batches accumulate
        gradients into; on a normal exit those gradients are pushed through the transforms (each
        layer's recomputed with autograd, then the rotations' orthogonal maps), which leaves the
        parameters' gradients equal to those of the unheld path. Without it, a no-op."""
        if not self.hold_weights:
            yield
            return
        graph_matrices = [rot.weight for rot in self.rotations]  # small: d x d and head_dim x head_dim
        leaves = [m.detach().requires_grad_(m.requires_grad) for m in graph_matrices]
        with torch.no_grad(), self._autocast(), _pinned(self.rotations, leaves):
            held = [[(module, name, value.detach().requires_grad_(True)) for module, name, value in self._transformed_swaps(li)]
                    for li in range(len(self.parts.layers))]
        self._matrices, self._held = leaves, held
        try:
            yield
            self._held = None
            for li in range(len(held)):
                with self._autocast(), _pinned(self.rotations, leaves):
                    fresh = self._transformed_swaps(li)
                pairs = [(f, h.grad) for (_, _, f), (_, _, h) in zip(fresh, held[li])
                         if h.grad is not None and f.requires_grad]
                held[li] = []  # free the held weights and their gradients as we go
                if pairs:
                    torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
            pairs = [(m, leaf.grad) for m, leaf in zip(graph_matrices, leaves) if leaf.grad is not None and m.requires_grad]
            if pairs:
                torch.autograd.backward([m for m, _ in pairs], [g for _, g in pairs])
        finally:
            self._held = None
            self._matrices = []

    def logits(self, inputs: Mapping[str, Any]) -> Logits:
        """The transformed (and fake-quantized) model's logits on one batch, with autograd: a
        :class:`~quantizers.losses.HeadLogits` when the head is left to the loss, else a tensor."""
        if self._held is None:
            self._matrices = [rot.weight for rot in self.rotations]  # one orthogonal map per rotation
        head = self.parts.lm_head
        with self._autocast(), parametrize.cached(), _replaced(self.parts.model, head, nn.Identity(), self.head_to_loss):
            out = self.parts.model(**inputs, use_cache=False).logits
            if not self.head_to_loss:
                return out.float()
            hidden = self._head_input(out) if self.head_chain is not None else out
        return HeadLogits(hidden, head.weight, head.bias)

    __call__ = logits

