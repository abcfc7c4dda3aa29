"""Where a model keeps its parts: the one model-layout adapter.

Every piece of code that walks a model's blocks (the transforms, GPTQ and Q-realign's block
pipeline, calibration, the refusal-direction ablation, probe capture) asks this module where the
decoder layers, norms, attention and MLP projections, embedding and head are, in the spirit of
llm-compressor's architecture mappings. A :class:`Layout` names the attribute paths of one
architecture family; :data:`LAYOUTS` maps ``config.model_type`` to it, so adding an architecture
is one entry. Which layouts a method can *transform* exactly is the method's own rule
(``quantizers.transforms.SUPPORTED_MODEL_TYPES``); this module only finds the parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["LAYOUTS", "LLAMA", "Layout", "decoder_layers", "final_readout", "get_part", "layout_of", "read_out"]


@dataclass(frozen=True)
class Layout:
    """Attribute paths of one architecture: ``layers``, ``embed``, ``final_norm``, ``lm_head`` from
    the causal LM; the rest from one decoder block. ``None``: the architecture has no such part
    (GPT-2 fuses q/k/v into one projection)."""

    layers: str
    embed: str | None = None
    final_norm: str | None = None
    lm_head: str | None = "lm_head"
    input_norm: str | None = None
    post_norm: str | None = None
    attn: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    mlp: str | None = None
    gate: str | None = None
    up: str | None = None
    down: str | None = None


#: Llama and the families that copy its block (pre-norm, separate q/k/v, gated MLP).
LLAMA = Layout(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    input_norm="input_layernorm", post_norm="post_attention_layernorm", attn="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp="mlp", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
)

#: ``config.model_type`` -> layout. Families outside it are found by their layer list alone
#: (:func:`decoder_layers` tries every known path), enough for probe capture.
LAYOUTS: dict[str, Layout] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "gpt2": Layout(layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
                   input_norm="ln_1", post_norm="ln_2", attn="attn", o="attn.c_proj", mlp="mlp",
                   down="mlp.c_proj"),
    "gpt_neox": Layout(layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
                       lm_head="embed_out", input_norm="input_layernorm", post_norm="post_attention_layernorm",
                       attn="attention", o="attention.dense", mlp="mlp", down="mlp.dense_4h_to_h"),
    "opt": Layout(layers="model.decoder.layers", embed="model.decoder.embed_tokens",
                  final_norm="model.decoder.final_layer_norm", input_norm="self_attn_layer_norm",
                  post_norm="final_layer_norm", attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
                  v="self_attn.v_proj", o="self_attn.out_proj", down="fc2"),
}

#: Where wrappers put a language model's layer list (multimodal models, a model inside a wrapper).
_WRAPPED_LAYER_PATHS = ("model.model.layers", "model.language_model.layers", "language_model.model.layers")


def get_part(root: Any, path: str | None) -> Any:
    """The module at dotted ``path`` below ``root``, or None (no such path, or ``path`` is None)."""
    if path is None:
        return None
    obj = root
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
        if obj is None:
            return None
    return obj


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def layout_of(model: nn.Module) -> Layout | None:
    """The layout registered for ``model``'s ``config.model_type``, or None."""
    return LAYOUTS.get(_model_type(model) or "")


def decoder_layers(model: nn.Module, n_layers: int | None = None) -> nn.ModuleList | None:
    """The model's list of decoder blocks, or None if not found.

    The registered layout's path first, then every known layer path (other families, wrappers);
    with ``n_layers`` a list must have that length, and as a last resort the one ``ModuleList`` of
    that length anywhere in the model is taken.
    """
    own = layout_of(model)
    paths = [own.layers] if own is not None else []
    for path in [*(lay.layers for lay in LAYOUTS.values()), *_WRAPPED_LAYER_PATHS]:
        if path not in paths:
            paths.append(path)
    for path in paths:
        obj = get_part(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0 and (n_layers is None or len(obj) == n_layers):
            return obj
    if n_layers is None:
        return None
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    return candidates[0] if len(candidates) == 1 else None


def final_readout(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's final norm and LM head (None where the layout has none): what a logit lens
    reads an intermediate hidden state through."""
    layout = layout_of(model) or LLAMA
    return get_part(model, layout.final_norm), get_part(model, layout.lm_head)


def read_out(norm: nn.Module | None, head: nn.Module, hidden: Any) -> Any:
    """float32 logits of ``hidden`` ``[..., H]`` through ``norm`` (if any) and ``head``, in the
    head's dtype and on its device (a logit lens at any layer; the real output at the last)."""
    param = next(head.parameters())
    x = hidden.to(device=param.device, dtype=param.dtype)
    if norm is not None:
        x = norm(x)
    return head(x).float()
