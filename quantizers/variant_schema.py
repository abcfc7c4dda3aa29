"""The declared schema of ``variant.json`` and the checks that its parts agree with each other.

:func:`quantizers.artifact.read_variant_info` validates every file against :class:`VariantInfo`
(through ``reports.validation.check_schema``, the one mechanism every loader uses), so a tampered
or truncated file (a missing ``structure``, ``source_model: null``, a bit width written as a
string) is refused with one line instead of failing deep inside model loading. A file whose
``scheme`` disagrees with its module structure (e.g. labelled w8a8 but holding 4-bit layers)
is refused too: the report would otherwise show it under the wrong label.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import QuantizerError
from .scheme import QuantScheme

FULL_PRECISION = 16
Bits = Field(ge=1, le=FULL_PRECISION)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class SourceModel(_Strict):
    spec: str | None = None
    #: The fingerprint of the model it was quantized from: an audit of another model refuses it.
    fingerprint: str = Field(min_length=1)


class LinearSpec(_Strict):
    in_features: int = Field(ge=1)
    out_features: int = Field(ge=1)
    bias: bool
    w_bits: int = Bits
    a_bits: int = Bits
    a_symmetric: bool
    a_clip_ratio: float = Field(gt=0, le=1)
    input_transform: dict[str, Any] | None = None


class KVSpec(_Strict):
    bits: int = Bits
    group_size: int | None = Field(default=None, ge=1)
    symmetric: bool
    clip_ratio: float = Field(gt=0, le=1)


class AttentionSpec(_Strict):
    kv: KVSpec | None = None
    qk_transform: dict[str, Any] | None = None


class Structure(_Strict):
    quant_linears: dict[str, LinearSpec]
    attention: dict[str, AttentionSpec]
    fp_prefix: int = Field(default=0, ge=0)
    attn_implementation: str | None = None


class CalibrationPrompts(_Strict):
    source: str | None = None
    ids: list[str] = []


class VariantInfo(_Strict):
    format_version: int
    method: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    options: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    source_model: SourceModel
    calibration: dict[str, Any] | None = None
    calibration_prompts: CalibrationPrompts | None = None
    structure: Structure


def check_consistent(info: VariantInfo, where: str) -> QuantScheme:
    """The parsed scheme, after checking the structure holds what the scheme says (QuantizerError).

    Every recorded width must be the scheme's or full precision (a layer left unquantized), and
    a scheme that quantizes weights, activations or the KV cache must have modules that do.
    """
    try:
        scheme = QuantScheme.parse(info.scheme)
    except QuantizerError as exc:
        raise QuantizerError(f"{where}: scheme: {exc}; re-run `safequant quantize`") from None
    linears = info.structure.quant_linears.values()
    kvs = [a.kv for a in info.structure.attention.values() if a.kv is not None]
    for part, want, found in (("weight", scheme.w_bits, {m.w_bits for m in linears}),
                              ("activation", scheme.a_bits, {m.a_bits for m in linears}),
                              ("KV-cache", scheme.kv_bits, {kv.bits for kv in kvs})):
        wrong = sorted(found - {want, FULL_PRECISION})
        missing = want < FULL_PRECISION and want not in found
        if wrong or missing:
            held = f"{part} widths {sorted(found)}" if found else f"no {part}-quantized module"
            raise QuantizerError(f"{where}: scheme {info.scheme!r} says {want}-bit {part}s but its structure holds "
                                 f"{held}: the file was edited or is damaged; re-run `safequant quantize`")
    if info.structure.fp_prefix != scheme.fp_prefix:
        raise QuantizerError(f"{where}: scheme {info.scheme!r} keeps {scheme.fp_prefix} prefix token(s) in full "
                             f"precision but its structure records {info.structure.fp_prefix}: the file was edited "
                             "or is damaged; re-run `safequant quantize`")
    return scheme
