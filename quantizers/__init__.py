"""safequant quantizers: quantization schemes, fake-quant ops and the quantizer plugin registry.

The names below are imported from their modules on first use (PEP 562 ``__getattr__``), so that
``from quantizers import QuantScheme`` or the registry's list of names does not import torch;
only the modules that compute (``fake_quant``, ``modules``, the methods) do.
"""

from importlib import import_module
from typing import Any

#: Public name -> the module of this package that defines it.
_EXPORTS = {
    **dict.fromkeys(("BUILTIN_MODULES", "ENTRY_POINT_GROUP", "NoOptions", "QuantContext", "Quantizer",
                     "available_quantizers", "build_quantizer", "get_quantizer", "quantizer_descriptions",
                     "register_quantizer", "reload_plugins"), "base"),
    "QuantizerError": "errors",
    **dict.fromkeys(("SCHEME_EXAMPLES", "VALID_BITS", "QuantScheme"), "scheme"),
    # not the function fake_quant: `quantizers.fake_quant` is its module (imported on first use, the
    # import system sets the attribute to the module); write `from quantizers.fake_quant import fake_quant`
    **dict.fromkeys(("fake_quant_activation", "fake_quant_kv", "fake_quant_weight", "mse_clip_search", "round_ste"),
                    "fake_quant"),
    "FPQuantizer": "fp",
    **dict.fromkeys(("GPTQOptions", "GPTQQuantizer", "gptq_quantize", "quantize_weights"), "gptq"),
    **dict.fromkeys(("KVQuantSpec", "QuantLinear", "default_weight_fn", "disable_kv_quant", "enable_kv_quant",
                     "find_attention_modules", "iter_quant_linears", "quantize_linear_layers"), "modules"),
    **dict.fromkeys(("RTNOptions", "RTNQuantizer"), "rtn"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantizers' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

