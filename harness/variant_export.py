"""`safequant export`: a saved variant in a format that deploys, or the reason it cannot be.

* ``hf``: a plain Hugging Face folder (config, safetensors, tokenizer) holding the variant's
  de-quantized weights: any runtime that loads the FP model loads it and computes what the
  simulation computed, for weight-only schemes.
* ``gguf``: one llama-architecture GGUF file whose weights are the variant's integer grid packed
  into Q4_0 (at most 4 bits) or Q8_0 (5 to 8 bits) blocks of 32, the per-group scale recovered
  from the weights (:func:`harness.grid.grid_scales`); exact up to the float16 block scale
  GGUF stores (the largest relative error is measured and recorded). Norms and unquantized
  layers stay float32.

Neither format holds activation or KV-cache fake quantization nor an online transform applied at
inference time (QuaRot's Hadamards, learned rotations): such variants are refused with the reason,
so an export never silently ships another scheme than the one audited. Every export is written to
a temporary sibling folder and renamed into place, with ``safequant_export.json`` recording what
was exported from where.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.files import atomic_folder
from harness.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf", "compressed-tensors")
EXPORT_FILE = "safequant_export.json"
GGUF_FILE = "model.gguf"
ACTIVATIONS_CLAUSE = "it quantizes activations"


def inference_time_parts(structure: dict[str, Any]) -> str | None:
    """What of a variant is computed at inference time rather than stored in its weights
    (``variant.json``'s ``structure``), as a clause ("it quantizes the KV cache"), or None.

    A runtime that only loads weights (an export, vLLM on the de-quantized weights) runs such a
    variant as another scheme than the one audited; exports and ``--backend vllm`` refuse it.
    """
    linears = structure["quant_linears"]
    acts = sorted(n for n, s in linears.items() if s["a_bits"] < 16)
    if acts:
        return f"{ACTIVATIONS_CLAUSE} (a{linears[acts[0]]['a_bits']} on {acts[0]} and {len(acts) - 1} more)"
    transformed = sorted(n for n, s in linears.items() if s["input_transform"])
    if transformed:
        kind = linears[transformed[0]]["input_transform"].get("kind", "online transform")
        return f"it applies an online input transform ({kind} on {transformed[0]}) at inference time"
    attention = structure["attention"]
    if any(a.get("kv") for a in attention.values()):
        return "it quantizes the KV cache"
    if any(a.get("qk_transform") for a in attention.values()):
        return "it rotates queries and keys after RoPE at inference time"
    return None


def representable(info: dict[str, Any], fmt: str) -> str | None:
    """Why ``fmt`` cannot hold the variant described by ``info`` (variant.json), or None."""
    structure = info["structure"]
    linears = structure["quant_linears"]
    online = inference_time_parts(structure)
    if online and fmt == "compressed-tensors" and online.startswith(ACTIVATIONS_CLAUSE):
        return (f"{online} with scale absmax / (2^(b-1) - 1), and compressed-tensors' dynamic activation scale is "
                "absmax / (2^b - 1) * 2: the runtime would round activations differently from the audited simulation")
    if online:
        return f"{online}, which a {fmt} export does not carry: only weight-only schemes without online transforms export there"
    scheme = info.get("scheme_fields") or {}
    group = scheme.get("w_group_size")
    if fmt == "compressed-tensors":
        if not scheme.get("w_symmetric", True):
            return "its weights are asymmetric (wasym): the exact compressed-tensors export packs symmetric grids only"
        uneven = sorted(n for n, s in linears.items() if s["w_bits"] < 16 and group and s["in_features"] % group)
        if uneven:
            return f"{uneven[0]} has {linears[uneven[0]]['in_features']} inputs, not whole groups of {group}"
    if fmt == "gguf":
        if not scheme.get("w_symmetric", True):
            return "its weights are asymmetric (wasym): the exact GGUF export packs symmetric grids (Q4_0, Q8_0) only"
        if group is not None and group % 32:
            return f"its weight groups of {group} do not fill GGUF's blocks of 32 weights"
        odd = sorted(n for n, s in linears.items() if s["w_bits"] < 16 and s["in_features"] % 32)
        if odd:
            return f"{odd[0]} has {linears[odd[0]]['in_features']} inputs, not a multiple of GGUF's 32-weight blocks"
    return None


def export_variant(variant_dir: str, fmt: str, out: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Export the saved variant at ``variant_dir`` as ``fmt`` into the new folder ``out``; returns
    the export record (also written to ``out/safequant_export.json``)."""
    from harness.store import check_writable
    from quantizers import QuantizerError
    from quantizers.artifact import verify_variant

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not a known export format: use one of {', '.join(FORMATS)}")
    try:
        info = verify_variant(variant_dir)
    except QuantizerError as exc:
        raise UserError(f"{variant_dir}: {exc}") from None
    reason = representable(info, fmt)
    if reason:
        raise UserError(f"variant {variant_dir} ({info['method']} {info['scheme']}) cannot be exported as {fmt}: "
                        f"{reason}; audit the simulation itself (--backend hf)")
    target = Path(out)
    if target.exists() and not overwrite:
        raise UserError(f"output folder {target} already exists: choose another --out or pass --overwrite")
    if target.exists() and not (target / EXPORT_FILE).is_file():
        raise UserError(f"output folder {target} is not a safequant export (no {EXPORT_FILE}): --overwrite replaces "
                        "only an export; choose another --out")
    check_writable(target)
    model, tokenizer = _load(variant_dir)
    if fmt == "gguf":
        from harness.gguf_writer import check_writable_architecture

        check_writable_architecture(model)
    if fmt == "compressed-tensors":
        from harness.artifacts import check_library

        check_library("compressed-tensors", variant_dir)
    record = {"format": fmt, "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "variant": {"path": str(Path(variant_dir).resolve()), "method": info["method"], "scheme": info["scheme"],
                          "source_model": info["source_model"]}}
    with atomic_folder(target) as tmp:
        writer = {"hf": _write_hf, "gguf": _write_gguf, "compressed-tensors": _write_compressed_tensors}[fmt]
        record.update(writer(model, tokenizer, info, tmp))
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _load(variant_dir: str):
    from quantizers import QuantizerError
    from quantizers.artifact import load_variant

    try:
        model, tokenizer, _ = load_variant(variant_dir, device="cpu")
    except QuantizerError as exc:
        raise UserError(f"{variant_dir}: {exc}") from None
    return model, tokenizer


def plain_linears(model):
    """Replace every QuantLinear (weight already on the grid, no activation quantization) by an
    ``nn.Linear`` holding the same tensors, so the model is a stock transformers model."""
    from torch import nn

    from quantizers.modules import _set_submodule, iter_quant_linears

    for name, module in list(iter_quant_linears(model)):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           dtype=module.weight.dtype)
        linear.weight = module.weight
        if module.bias is not None:
            linear.bias = module.bias
        _set_submodule(model, name, linear)
    return model


@contextmanager
def plain_view(model):
    """``model`` with every QuantLinear shown as the ``nn.Linear`` of :func:`plain_linears`, put
    back when the block ends: a stock copy of its weights can be written without changing the
    model the audit goes on using."""
    from quantizers.modules import _set_submodule, iter_quant_linears

    originals = list(iter_quant_linears(model))
    plain_linears(model)
    try:
        yield model
    finally:
        for name, module in originals:
            _set_submodule(model, name, module)


def _write_hf(model, tokenizer, info: dict[str, Any], folder: Path) -> dict[str, Any]:
    plain_linears(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"files": sorted(p.name for p in folder.iterdir()), "exact": True}


def _write_gguf(model, tokenizer, info: dict[str, Any], folder: Path) -> dict[str, Any]:
    import torch

    from harness.gguf_writer import encode_exact, float_tensor, write_llama_gguf

    linears = info["structure"]["quant_linears"]
    group = (info.get("scheme_fields") or {}).get("w_group_size")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and linears.get("lm_head", {}).get("w_bits", 16) < 16:
        raise UserError("the variant quantizes lm_head of a model with tied embeddings: GGUF stores one tensor for "
                        "both; export with --format hf")
    errors: dict[str, float] = {}

    def encode(hf_name: str, tensor: torch.Tensor):
        module = hf_name.removesuffix(".weight")
        spec = linears.get(module)
        if spec is None or spec["w_bits"] >= 16 or not hf_name.endswith(".weight"):
            return float_tensor(tensor)
        try:
            encoded, error = encode_exact(tensor.detach().float().cpu().numpy(), spec["w_bits"], group)
        except ValueError as exc:
            raise UserError(f"{module}: {exc}, so it has no exact GGUF form (the method moved weights off its "
                            "grid): export with --format hf") from None
        errors[module] = error
        return encoded

    types = write_llama_gguf(plain_linears(model), tokenizer, folder / GGUF_FILE, encode,
                             name=f"safequant {info['method']} {info['scheme']}")
    counts: dict[str, int] = {}
    for name in types.values():
        counts[name] = counts.get(name, 0) + 1
    return {"files": [GGUF_FILE], "tensor_types": counts, "exact": "up to the float16 block scale",
            "max_relative_error": max(errors.values(), default=0.0)}


def _write_compressed_tensors(model, tokenizer, info: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A pack-quantized compressed-tensors folder (vLLM and transformers load it): the library's
    own compressor packs the integers, with the scales recovered from the variant's grid, so it
    stores exactly the variant's weights (float32 scales: no rounding at all)."""
    import numpy as np
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    from harness.grid import grid_scales

    linears = {n: s for n, s in info["structure"]["quant_linears"].items() if s["w_bits"] < 16}
    bits = {s["w_bits"] for s in linears.values()}
    if len(bits) != 1:
        raise UserError(f"the variant mixes weight widths {sorted(bits)}: the compressed-tensors export writes one "
                        "width per model; export with --format hf")
    (width,) = bits
    group = (info.get("scheme_fields") or {}).get("w_group_size")
    model = plain_linears(model)
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in linears]
    weights = QuantizationArgs(num_bits=width, type="int", symmetric=True,
                               strategy="group" if group else "channel", group_size=group)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=ignore, quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    for name in linears:
        module = model.get_submodule(name)
        w = module.weight.detach().float().cpu().numpy()
        try:
            scales = grid_scales(w, group or w.shape[1], width)
        except ValueError as exc:
            raise UserError(f"{name}: {exc}, so it has no exact compressed-tensors form: export with --format hf") from None
        with torch.no_grad():
            module.weight_scale.copy_(torch.from_numpy(scales.astype(np.float32)).reshape(module.weight_scale.shape))
            module.weight_zero_point.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    tokenizer.save_pretrained(folder)
    return {"files": sorted(p.name for p in folder.iterdir()), "exact": True, "quantization_format": "pack-quantized",
            "weights": {"num_bits": width, "group_size": group, "symmetric": True}, "ignore": ignore}
