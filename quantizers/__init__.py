"""safequant quantizers: quantization schemes, fake-quant ops and the quantizer plugin registry."""

from .base import (
    BUILTIN_MODULES,
    ENTRY_POINT_GROUP,
    NoOptions,
    QuantContext,
    Quantizer,
    available_quantizers,
    build_quantizer,
    get_quantizer,
    register_quantizer,
    reload_plugins,
)
from .errors import QuantizerError
from .fake_quant import (
    fake_quant,
    fake_quant_activation,
    fake_quant_kv,
    fake_quant_weight,
    mse_clip_search,
    round_ste,
)
from .fp import FPQuantizer
from .gptq import GPTQOptions, GPTQQuantizer, gptq_quantize, quantize_weights
from .modules import (
    KVQuantSpec,
    QuantLinear,
    default_weight_fn,
    disable_kv_quant,
    enable_kv_quant,
    find_attention_modules,
    iter_quant_linears,
    quantize_linear_layers,
)
from .rtn import RTNOptions, RTNQuantizer
from .scheme import SCHEME_EXAMPLES, VALID_BITS, QuantScheme

__all__ = [
    "BUILTIN_MODULES",
    "ENTRY_POINT_GROUP",
    "FPQuantizer",
    "GPTQOptions",
    "GPTQQuantizer",
    "KVQuantSpec",
    "NoOptions",
    "QuantContext",
    "QuantLinear",
    "QuantScheme",
    "Quantizer",
    "QuantizerError",
    "RTNOptions",
    "RTNQuantizer",
    "SCHEME_EXAMPLES",
    "VALID_BITS",
    "available_quantizers",
    "build_quantizer",
    "default_weight_fn",
    "disable_kv_quant",
    "enable_kv_quant",
    "fake_quant",
    "fake_quant_activation",
    "fake_quant_kv",
    "fake_quant_weight",
    "find_attention_modules",
    "get_quantizer",
    "gptq_quantize",
    "iter_quant_linears",
    "mse_clip_search",
    "quantize_linear_layers",
    "quantize_weights",
    "register_quantizer",
    "reload_plugins",
    "round_ste",
]
