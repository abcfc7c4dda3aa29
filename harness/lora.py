"""Merging a LoRA adapter (PEFT's safetensors layout) into a loaded model, without PEFT at run time.

The bundled SmolLM2 family ships as small adapters over the packaged GGUF model. Merging is the
LoRA update itself (Hu et al. 2021): ``W <- W + (alpha / r) * B @ A`` for every adapted linear
layer, computed in float32 and cast once to the model's dtype, so merged weights equal PEFT's
``merge_and_unload`` to float32 rounding. Only the plain LoRA variant is accepted (no DoRA, no
bias training, no fan-in/fan-out flip); anything else is refused rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from harness.errors import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


def _read_config(folder: Path, name: str) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except FileNotFoundError:
        raise UserError(f"adapter of {name!r} is missing {path}: rebuild it with `python scripts/build_smol_family.py`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"adapter config {path} of {name!r} is unreadable ({type(exc).__name__}: {exc}): "
                        "rebuild it with `python scripts/build_smol_family.py`") from None
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported or rank <= 0:
        raise UserError(f"adapter config {path} of {name!r} uses {', '.join(unsupported) or 'r <= 0'}: only plain "
                        "LoRA adapters can be merged")
    config["scale"] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return config


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"adapter of {name!r} is missing {path}: rebuild it with `python scripts/build_smol_family.py`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"adapter weights {path} of {name!r} are corrupt ({first}): reinstall safequant or rebuild "
                        "them with `python scripts/build_smol_family.py`") from None


def lora_pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path (as in ``model.named_modules()``) -> (A, B) from PEFT's key names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix(_PEFT_PREFIX)
                pairs.setdefault(module, {})[part] = tensor
    incomplete = [m for m, p in pairs.items() if len(p) != 2]
    if incomplete or not pairs:
        raise ValueError(f"no complete lora_A/lora_B pairs (incomplete: {incomplete[:3]})")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in sorted(pairs.items())}


@torch.no_grad()
def merge_lora(model: nn.Module, folder: str | Path, name: str) -> int:
    """Add the adapter in ``folder`` to ``model``'s weights in place; returns the number of layers merged.

    ``name`` is the model name used in error messages. A missing, unreadable or mismatched adapter
    raises a one-line UserError; nothing is changed unless every layer matches.
    """
    folder = Path(folder)
    config = _read_config(folder, name)
    try:
        pairs = lora_pairs(_read_weights(folder, name))
    except ValueError as exc:
        raise UserError(f"adapter weights in {folder} of {name!r} are not a LoRA adapter ({exc}): rebuild them "
                        "with `python scripts/build_smol_family.py`") from None
    modules = dict(model.named_modules())
    updates = []
    for path, (a, b) in pairs.items():
        layer = modules.get(path)
        if not isinstance(layer, nn.Linear) or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features \
                or a.shape[0] != b.shape[1]:
            raise UserError(f"adapter in {folder} of {name!r} does not fit the model at {path!r}: it was built for "
                            "another model; rebuild it with `python scripts/build_smol_family.py`")
        updates.append((layer, b.float() @ a.float()))
    for layer, delta in updates:
        merged = layer.weight.float() + config["scale"] * delta.to(layer.weight.device)
        layer.weight.copy_(merged.to(layer.weight.dtype))
    return len(updates)
