"""Saved quantized variants: a folder with safetensors weights and ``variant.json``.

A variant folder holds

* ``model.safetensors``: the whole state dict of the quantized model (weights already
  fake-quantized and transformed, online-transform buffers included; tied tensors stored once);
* ``config.json`` and the tokenizer files, so the folder is self-contained;
* ``variant.json``: the method, scheme, options and metadata (loss curves, early stops), the
  calibration data fingerprint, the source model's fingerprint, the time taken, and the
  *structure* needed to rebuild the fake-quant modules: every :class:`QuantLinear` with its
  activation settings and online input transform, every attention module's KV-cache spec and
  post-RoPE Q/K transform.

:func:`load_variant` rebuilds the architecture from ``config.json``, swaps in the recorded
modules and loads the state dict strictly, so the loaded model computes exactly what the
in-memory variant computed, without re-calibrating. Folders are written to a temporary sibling
and renamed into place: an interrupted save leaves no partial variant.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from common.files import atomic_folder
from reports.validation import check_schema
from torch import nn

from .errors import QuantizerError
from .fp_prefix import enable_fp_prefix, fp_prefix_of
from .modules import (
    KV_SPEC_ATTR,
    KVQuantSpec,
    OnlineTransform,
    QuantLinear,
    _set_submodule,
    enable_kv_quant,
    find_attention_modules,
    iter_quant_linears,
    kv_spec_of,
    online_transform_from_spec,
    qk_transform_of,
    set_qk_transform,
)
from .scheme import QuantScheme
from .variant_schema import VariantInfo, check_consistent

__all__ = ["VARIANT_FILE", "FORMAT_VERSION", "is_variant_dir", "read_variant_info", "verify_variant", "save_variant",
           "load_variant"]

log = logging.getLogger(__name__)

VARIANT_FILE = "variant.json"
WEIGHTS_FILE = "model.safetensors"
#: Bumped when the folder layout or the structure record changes incompatibly.
FORMAT_VERSION = 1


def is_variant_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by :func:`save_variant`."""
    return (Path(path) / VARIANT_FILE).is_file()


def read_variant_info(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``variant.json`` of a variant folder (format version checked)."""
    file = Path(path) / VARIANT_FILE
    if not file.is_file():
        raise QuantizerError(f"{path} is not a saved variant (no {VARIANT_FILE}): pass a folder written by `safequant quantize`")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantizerError(f"{file} is not valid JSON ({exc}); re-run `safequant quantize`") from None
    if not isinstance(info, dict):
        raise QuantizerError(f"{file}: expected a JSON object at the top level, got {type(info).__name__}; "
                             "re-run `safequant quantize`")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantizerError(
            f"{file} has format version {version!r}; this safequant reads version {FORMAT_VERSION}: "
            "re-run `safequant quantize` with this version"
        )
    checked = check_schema(VariantInfo, info, str(file), "re-run `safequant quantize`", QuantizerError)
    check_consistent(checked, str(file))
    return info


def verify_variant(path: str | os.PathLike) -> dict[str, Any]:
    """``variant.json`` checked (:func:`read_variant_info`) and the weights file's header read, without
    loading any tensor: a truncated or corrupt ``model.safetensors``, or weights whose shapes are not
    the recorded structure's, are refused before any model loads (QuantizerError)."""
    from safetensors import SafetensorError, safe_open

    info = read_variant_info(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise QuantizerError(f"saved variant {path} has no {WEIGHTS_FILE}: re-run `safequant quantize`")
    try:
        with safe_open(str(weights), "pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise QuantizerError(f"saved variant {path}: {WEIGHTS_FILE} is damaged ({_first_line(exc)}); "
                             "re-run `safequant quantize`") from None
    for name, spec in info["structure"]["quant_linears"].items():
        found = shapes.get(f"{name}.weight")
        if found is not None and found != (spec["out_features"], spec["in_features"]):
            raise QuantizerError(f"saved variant {path}: {name}.weight has shape {list(found)} but variant.json "
                                 f"records {[spec['out_features'], spec['in_features']]}: the files do not belong "
                                 "together; re-run `safequant quantize`")
    return info


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


def _transform_spec(module: nn.Module | None) -> dict | None:
    if module is None:
        return None
    if not isinstance(module, OnlineTransform):
        raise QuantizerError(
            f"online transform {type(module).__name__} cannot be saved: derive it from quantizers.modules.OnlineTransform"
        )
    return module.spec()


def model_structure(model: nn.Module) -> dict[str, Any]:
    """What :func:`load_variant` needs to rebuild the fake-quant modules of ``model``."""
    linears = {
        name: {
            "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "w_bits": m.w_bits, "a_bits": m.a_bits, "a_symmetric": m.a_symmetric, "a_clip_ratio": m.a_clip_ratio,
            "input_transform": _transform_spec(m.input_transform),
        }
        for name, m in iter_quant_linears(model)
    }
    attention = {}
    for name, attn in find_attention_modules(model):
        kv, qk = kv_spec_of(attn), qk_transform_of(attn)
        if kv is not None or qk is not None:
            attention[name] = {"kv": asdict(kv) if kv is not None else None, "qk_transform": _transform_spec(qk)}
    return {"quant_linears": linears, "attention": attention, "fp_prefix": fp_prefix_of(model),
            "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None)}


def save_variant(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any,
    method: str,
    scheme: QuantScheme,
    options: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    seconds: float | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the variant folder atomically (temporary sibling, then rename); returns its path."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise QuantizerError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if out.exists() and not is_variant_dir(out):
        raise QuantizerError(f"output folder {out} is not a saved variant (no {VARIANT_FILE}): --overwrite replaces "
                             "only a variant folder; choose another --out")
    info = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "scheme": scheme.label,
        "scheme_fields": scheme.to_dict(),
        "options": options,
        "metadata": metadata or {},
        "source_model": source or {},
        "calibration": calibration,
        "seconds": None if seconds is None else round(seconds, 3),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "structure": model_structure(model),
        **(extra or {}),
    }
    text = json.dumps(info, indent=2, default=str) + "\n"
    # Never write what load_variant would refuse (e.g. no source fingerprint).
    check_consistent(check_schema(VariantInfo, json.loads(text), f"variant for {out}",
                                  "pass source={'spec': ..., 'fingerprint': ...}", QuantizerError), f"variant for {out}")
    with atomic_folder(out) as tmp:
        save_model(model, str(tmp / WEIGHTS_FILE))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / VARIANT_FILE).write_text(text, encoding="utf-8")
    return out


def load_variant(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild a saved variant: ``(model, tokenizer, variant.json contents)``, ready to evaluate."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(path)
    info = read_variant_info(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise QuantizerError(f"saved variant {folder} has no {WEIGHTS_FILE}: re-run `safequant quantize`")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise QuantizerError(f"saved variant {folder}: config.json cannot be read ({_first_line(exc)}); "
                             "re-run `safequant quantize`") from None
    structure = info["structure"]
    attn_impl = structure.get("attn_implementation")
    if attn_impl and not attn_impl.startswith("safequant_kv"):
        config._attn_implementation = attn_impl
    try:
        model = _rebuild(config, structure, dtype or torch.float32)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, QuantizerError):
            raise
        raise QuantizerError(f"saved variant {folder}: its structure does not fit config.json's model "
                             f"({type(exc).__name__}: {_first_line(exc)}); re-run `safequant quantize`") from None
    try:
        missing, unexpected = load_safetensors(model, str(folder / WEIGHTS_FILE), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:  # truncated, corrupt, or shapes not the structure's
        raise QuantizerError(f"saved variant {folder}: {WEIGHTS_FILE} does not load ({_first_line(exc)}); "
                             "re-run `safequant quantize`") from None
    # Tied weights are stored once; their second name comes back as "missing" and is fine.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise QuantizerError(
            f"saved variant {folder} does not match its structure (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "re-run `safequant quantize`"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.to(device).eval()
    return model, tokenizer, info


def _rebuild(config: Any, structure: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The architecture of ``config`` with the recorded fake-quant modules swapped in (no weights yet)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in structure["quant_linears"].items():
        transform = online_transform_from_spec(spec["input_transform"]) if spec["input_transform"] else None
        module = QuantLinear(
            spec["in_features"], spec["out_features"], bias=spec["bias"], w_bits=spec["w_bits"], a_bits=spec["a_bits"],
            a_symmetric=spec["a_symmetric"], a_clip_ratio=spec["a_clip_ratio"], input_transform=transform,
            dtype=dtype,
        )
        _set_submodule(model, name, module)
    kv_specs = {}
    for name, spec in structure["attention"].items():
        attn = model.get_submodule(name)
        if spec.get("qk_transform"):
            set_qk_transform(attn, online_transform_from_spec(spec["qk_transform"]))
        if spec.get("kv"):
            kv_specs[name] = KVQuantSpec(**spec["kv"])
    if kv_specs or any(s.get("qk_transform") for s in structure["attention"].values()):
        enable_kv_quant(model, KVQuantSpec())  # switch the attention implementation, then set each spec
        for name, attn in find_attention_modules(model):
            setattr(attn, KV_SPEC_ATTR, kv_specs.get(name, KVQuantSpec()))
    enable_fp_prefix(model, int(structure.get("fp_prefix", 0)))
    return model
