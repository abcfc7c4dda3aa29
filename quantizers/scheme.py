"""`QuantScheme`: what gets quantized, to how many bits, and how.

A scheme is written as a short string and parsed with :meth:`QuantScheme.parse`; its
:attr:`QuantScheme.label` is the canonical spelling of the same string (``parse(label)`` gives
back an equal scheme).

Grammar (case-insensitive except module names after ``skip=``)::

    scheme    := "fp" [modifiers]  |  core [modifiers]
    core      := "w" BITS ["g" INT] "a" BITS ["g" INT] ["kv" BITS] ["g" INT]
    modifiers := ("-" modifier)*
    BITS      := 2..8 or 16            (16 means "left in floating point")

``g<N>`` in the core is the *weight* group size (N input columns share one scale); it may follow
the weight, the activation or the KV bits (``w4g128a16`` == ``w4a16g128``), at most once; when N
does not divide a layer's input size the last group of each row is shorter. Without it weights
get one scale per output channel. A missing ``kv`` part means ``kv16``. ``fp`` is
``w16a16kv16``.

Modifiers (each at most once; defaults in brackets):

==================  ===========================================================================
``wasym``           asymmetric weights (min/max + zero point) [symmetric]
``wmse``            per-channel (per-group) MSE search of the weight clipping ratio, 1.0 .. 0.2
                    [off: plain max]
``aasym``           asymmetric per-token activations [symmetric]
``aclip<R>``        activation clip ratio R in (0, 1], e.g. ``aclip0.9`` [1.0]
``kvsym``           symmetric KV cache [asymmetric]
``kvg<N>``          KV-cache group size (must divide head_dim) [head_dim]
``kvclip<R>``       KV-cache clip ratio R in (0, 1] [1.0]
``skip=<names>``    modules left in full precision, ``+``-separated qualified names, suffixes
                    (``down_proj``) or globs (``layers.0.*``) [``lm_head``]
``noskip``          quantize every Linear, lm_head included
``fpprefix<N>``     the first N attended tokens of every sequence (the attention sink) keep
                    full-precision activations and KV entries (PrefixQuant, Chen et al. 2024);
                    only with quantized activations or KV (:mod:`quantizers.fp_prefix`) [0]
==================  ===========================================================================

Examples: ``fp``, ``w8a8``, ``w4a16``, ``w4a16g128``, ``w4a4kv4``, ``w3a3``,
``w4a4kv4-aasym-aclip0.9-kvclip0.95-wmse``, ``w8a8-wasym``, ``w4a16-skip=lm_head+down_proj``,
``w4a4kv4-aasym-aclip0.9-fpprefix1``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import QuantizerError

__all__ = ["QuantScheme", "VALID_BITS", "SCHEME_EXAMPLES"]

#: Allowed bit widths; 16 means "not quantized".
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)

#: Shown in every parse error.
SCHEME_EXAMPLES = ("fp", "w8a8", "w4a16g128", "w4a4kv4", "w4a4kv4-aasym-aclip0.9-kvclip0.95-wmse")

DEFAULT_SKIP = ("lm_head",)

_CORE_RE = re.compile(
    r"w(?P<w>\d+)(?:g(?P<g1>\d+))?"
    r"a(?P<a>\d+)(?:g(?P<g2>\d+))?"
    r"(?:kv(?P<kv>\d+))?(?:g(?P<g3>\d+))?",
    re.IGNORECASE,
)
_SKIP_NAME_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]]+$")
_FLOAT_RE = r"(\d+(?:\.\d*)?|\.\d+)"


def _error(text: str, reason: str) -> QuantizerError:
    examples = ", ".join(SCHEME_EXAMPLES)
    return QuantizerError(f"invalid quantization scheme {text!r}: {reason}; valid examples: {examples}")


@dataclass(frozen=True)
class QuantScheme:
    """A quantization scheme. Bit widths of 16 mean "not quantized".

    Weights: INT-``w_bits``, symmetric (``scale = max|w| / (2^(b-1)-1)``) unless
    ``w_symmetric=False``; one scale per output channel, or per ``w_group_size`` input columns;
    optional MSE search of a per-channel clip ratio (``w_clip_search``).
    Activations: the input of every quantized Linear, per token, dynamic, INT-``a_bits``,
    clipped at ``a_clip_ratio`` times the token's range.
    KV cache: keys (after RoPE) and values, per token and per group of ``kv_group_size`` channels
    (``None`` = the head dimension), asymmetric by default, clip ratio ``kv_clip_ratio``.
    ``skip``: Linear modules left in floating point (patterns, see :meth:`skips`).
    ``fp_prefix``: the first N attended tokens of each sequence skip the activation and KV
    fake-quant (:mod:`quantizers.fp_prefix`); 0 = none.
    """

    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16
    w_group_size: int | None = None
    w_symmetric: bool = True
    w_clip_search: bool = False
    a_symmetric: bool = True
    a_clip_ratio: float = 1.0
    kv_group_size: int | None = None
    kv_symmetric: bool = False
    kv_clip_ratio: float = 1.0
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP)
    fp_prefix: int = 0

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_BITS:
                raise QuantizerError(f"{name}={value!r} is not a valid bit width; use 2..8, or 16 for 'not quantized'")
        for name in ("w_group_size", "kv_group_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise QuantizerError(f"{name}={value!r} must be a positive integer or None")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
                raise QuantizerError(f"{name}={value!r} must be a number in (0, 1]")
            object.__setattr__(self, name, float(value))
        for name in ("w_symmetric", "w_clip_search", "a_symmetric", "kv_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise QuantizerError(f"{name}={getattr(self, name)!r} must be True or False")
        skip = self.skip
        if isinstance(skip, str):
            skip = (skip,)
        skip = tuple(skip)
        for pattern in skip:
            if not isinstance(pattern, str) or not _SKIP_NAME_RE.match(pattern):
                raise QuantizerError(
                    f"skip pattern {pattern!r} is not a module name or glob (letters, digits, '_', '.', '*')"
                )
        object.__setattr__(self, "skip", skip)
        if isinstance(self.fp_prefix, bool) or not isinstance(self.fp_prefix, int) or not 0 <= self.fp_prefix <= 64:
            raise QuantizerError(f"fp_prefix={self.fp_prefix!r} must be an integer in 0..64")
        if self.fp_prefix and not (self.quantizes_activations or self.quantizes_kv):
            raise QuantizerError("fpprefix keeps tokens' activations and KV entries in full precision; this scheme "
                                 "quantizes neither (drop fpprefix, or quantize activations or the KV cache)")

    # ------------------------------------------------------------------ properties
    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < 16

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_bits < 16

    @property
    def quantizes_linears(self) -> bool:
        """True when Linear layers must be replaced (weights or their inputs are quantized)."""
        return self.quantizes_weights or self.quantizes_activations

    @property
    def is_fp(self) -> bool:
        """Nothing is quantized."""
        return not (self.quantizes_linears or self.quantizes_kv)

    def skips(self, module_name: str) -> bool:
        """Whether the Linear called ``module_name`` (qualified name) stays in floating point.

        A pattern matches the full name, any dotted suffix of it (``lm_head`` matches
        ``model.lm_head``; ``down_proj`` matches every MLP down projection), or as an fnmatch glob.
        """
        for pattern in self.skip:
            if module_name == pattern or module_name.endswith("." + pattern):
                return True
            if fnmatch.fnmatchcase(module_name, pattern) or fnmatch.fnmatchcase(module_name, "*." + pattern):
                return True
        return False

    # ------------------------------------------------------------------ text form
    @property
    def label(self) -> str:
        """Canonical string form; ``QuantScheme.parse(s.label) == s``."""
        if self.w_bits == 16 and self.a_bits == 16 and self.kv_bits == 16 and self.w_group_size is None:
            core = "fp"
        else:
            core = f"w{self.w_bits}a{self.a_bits}"
            if self.kv_bits != 16:
                core += f"kv{self.kv_bits}"
            if self.w_group_size is not None:
                core += f"g{self.w_group_size}"
        mods: list[str] = []
        if not self.a_symmetric:
            mods.append("aasym")
        if self.a_clip_ratio != 1.0:
            mods.append(f"aclip{self.a_clip_ratio!r}")
        if self.kv_symmetric:
            mods.append("kvsym")
        if self.kv_group_size is not None:
            mods.append(f"kvg{self.kv_group_size}")
        if self.kv_clip_ratio != 1.0:
            mods.append(f"kvclip{self.kv_clip_ratio!r}")
        if not self.w_symmetric:
            mods.append("wasym")
        if self.w_clip_search:
            mods.append("wmse")
        if self.skip != DEFAULT_SKIP:
            mods.append("skip=" + "+".join(self.skip) if self.skip else "noskip")
        if self.fp_prefix:
            mods.append(f"fpprefix{self.fp_prefix}")
        return "-".join([core, *mods])

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """Parse a scheme string (grammar in the module docstring). Raises :class:`QuantizerError`."""
        if not isinstance(text, str):
            raise _error(repr(text), f"expected a string, got {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise _error(text, "empty scheme")
        head, *mods = stripped.split("-")
        kw: dict[str, Any] = {}
        if head.lower() == "fp":
            pass
        else:
            m = _CORE_RE.fullmatch(head)
            if m is None:
                raise _error(text, f"{head!r} is not 'fp' or of the form w<bits>a<bits>[kv<bits>][g<group>]")
            groups = [g for g in (m["g1"], m["g2"], m["g3"]) if g is not None]
            if len(groups) > 1:
                raise _error(text, "the weight group size g<N> is given more than once")
            kw["w_bits"] = cls._bits(text, "weight", m["w"])
            kw["a_bits"] = cls._bits(text, "activation", m["a"])
            if m["kv"] is not None:
                kw["kv_bits"] = cls._bits(text, "KV-cache", m["kv"])
            if groups:
                kw["w_group_size"] = cls._positive(text, "weight group size", groups[0])
        seen: set[str] = set()
        for mod in mods:
            key, value = cls._parse_modifier(text, mod)
            if key in seen:
                raise _error(text, f"modifier {mod!r} conflicts with an earlier one")
            seen.add(key)
            kw[key] = value
        try:
            return cls(**kw)
        except QuantizerError as exc:
            raise _error(text, str(exc)) from None

    @staticmethod
    def _bits(text: str, what: str, digits: str) -> int:
        bits = int(digits)
        if bits not in VALID_BITS:
            raise _error(text, f"{bits} {what} bits is not supported (use 2..8, or 16 for not quantized)")
        return bits

    @staticmethod
    def _positive(text: str, what: str, digits: str) -> int:
        value = int(digits)
        if value < 1:
            raise _error(text, f"{what} must be a positive integer")
        return value

    @classmethod
    def _parse_modifier(cls, text: str, mod: str) -> tuple[str, Any]:
        if not mod:
            raise _error(text, "empty modifier (two dashes in a row or a trailing dash)")
        low = mod.lower()
        flags = {
            "wasym": ("w_symmetric", False),
            "wsym": ("w_symmetric", True),
            "wmse": ("w_clip_search", True),
            "aasym": ("a_symmetric", False),
            "kvsym": ("kv_symmetric", True),
            "kvasym": ("kv_symmetric", False),
            "noskip": ("skip", ()),
        }
        if low in flags:
            return flags[low]
        if low.startswith("skip="):
            names = mod[len("skip="):]
            parts = names.split("+")
            if not names or any(not p for p in parts):
                raise _error(text, f"modifier {mod!r} needs module names, e.g. skip=lm_head+down_proj")
            for p in parts:
                if not _SKIP_NAME_RE.match(p):
                    raise _error(text, f"{p!r} in {mod!r} is not a module name or glob")
            return "skip", tuple(parts)
        for prefix, key in (("aclip", "a_clip_ratio"), ("kvclip", "kv_clip_ratio")):
            if low.startswith(prefix):
                m = re.fullmatch(_FLOAT_RE, low[len(prefix):])
                if m is None:
                    raise _error(text, f"modifier {mod!r} needs a ratio, e.g. {prefix}0.9")
                ratio = float(m.group(1))
                if not 0.0 < ratio <= 1.0:
                    raise _error(text, f"clip ratio in {mod!r} must be in (0, 1]")
                return key, ratio
        if low.startswith("fpprefix"):
            digits = low[len("fpprefix"):]
            if not digits.isdigit():
                raise _error(text, f"modifier {mod!r} needs a token count, e.g. fpprefix1")
            return "fp_prefix", cls._positive(text, "fpprefix token count", digits)
        if low.startswith("kvg"):
            digits = low[3:]
            if not digits.isdigit():
                raise _error(text, f"modifier {mod!r} needs a group size, e.g. kvg64")
            return "kv_group_size", cls._positive(text, "KV group size", digits)
        known = "wasym, wmse, aasym, aclip<R>, kvsym, kvg<N>, kvclip<R>, skip=<a+b>, noskip, fpprefix<N>"
        raise _error(text, f"unknown modifier {mod!r} (known: {known})")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def coerce(cls, value: QuantScheme | str) -> QuantScheme:
        """A scheme from a scheme or its string form."""
        if isinstance(value, QuantScheme):
            return value
        return cls.parse(value)

    def replace(self, **changes: Any) -> QuantScheme:
        """A copy with some fields changed (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (plus ``label``)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["skip"] = list(self.skip)
        out["label"] = self.label
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        """Inverse of :meth:`to_dict` (``label`` is ignored when present)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"label"})
        if unknown:
            raise QuantizerError(f"unknown QuantScheme fields {unknown}; valid: {sorted(names)}")
        kw = {k: v for k, v in data.items() if k in names}
        if "skip" in kw:
            kw["skip"] = tuple(kw["skip"])
        return cls(**kw)
