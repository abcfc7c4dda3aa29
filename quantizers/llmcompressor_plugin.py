"""llm-compressor's own ``oneshot`` as a safequant quantizer: audit the exact recipe users deploy.

`llm-compressor <https://github.com/vllm-project/llm-compressor>`_ quantizes a Hugging Face model
with a *recipe* (a list of modifiers) and saves a compressed-tensors checkpoint that vLLM and
transformers load. This quantizer runs that library unchanged on the subject with safequant's
calibration batches (the same token windows every other method sees) and writes its output folder
to ``ctx.artifact_dir``; the harness then loads that folder back through transformers'
compressed-tensors integration (``harness/artifacts.py``), so the audit measures exactly what
llm-compressor produced, not a re-implementation of it.

Recipes (``recipe=`` option):

* ``gptq``: ``GPTQModifier`` (Frantar et al. 2022, arXiv:2210.17323), e.g. ``--scheme w4a16g128``;
* ``smoothquant-gptq``: ``SmoothQuantModifier`` (Xiao et al. 2023, arXiv:2211.10438) then
  ``GPTQModifier``, for schemes that quantize activations (``w8a8``);
* ``awq``: ``AWQModifier`` (Lin et al. 2024, arXiv:2306.00978), weight-only (``w4a16g128``);
* a path to a recipe YAML file, used as given: the scheme it produces must be ``--scheme``.

The named recipes take their quantization arguments from the safequant scheme: integer weights of
``w_bits`` (symmetric unless ``-wasym``; per group of ``g`` input columns, else per output
channel), and, for ``aN`` with N < 16, dynamic per-token integer activations; the linears the
scheme skips (``lm_head`` by default) go to the recipe's ``ignore``. Schemes llm-compressor does
not express the same way are refused: KV-cache quantization (its KV scales are static, calibrated;
safequant's are dynamic per token), activation clipping, MSE weight clipping.

The ``llmcompressor`` package is optional and imported only when a variant is checked or run; it
pins transformers (``<=5.17``) and compressed-tensors (``==0.19``) below the project's main
environment, so it lives in its own one (``scripts/make_llmc_venv.sh``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .base import QuantContext, Quantizer, QuantizerError, register_quantizer
from .scheme import QuantScheme

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["INSTALL_HINT", "LLMCompressorOptions", "LLMCompressorQuantizer", "RECIPES", "config_groups",
           "llmcompressor_versions"]

log = logging.getLogger(__name__)

#: Recipe names the ``recipe`` option accepts (anything else must be a recipe YAML file).
RECIPES = ("gptq", "smoothquant-gptq", "awq")

#: How to get the package: in its own environment, since it would downgrade the main one.
INSTALL_HINT = ("run scripts/make_llmc_venv.sh and use .venv-llmc (llmcompressor pins transformers<=5.17, so it "
                "gets its own environment), or `pip install 'safequant[llmcompressor]'` in a fresh one")


@dataclass(frozen=True)
class LLMCompressorOptions:
    """``recipe``: ``gptq``, ``smoothquant-gptq``, ``awq`` or a recipe YAML path.
    ``smoothing_strength``: SmoothQuant's alpha (llm-compressor's default 0.8). ``dampening_frac``,
    ``block_size``, ``actorder``: GPTQModifier's (its defaults: 0.01, 128, ``static``, i.e. act
    order with group scales from the unquantized weight, as safequant's ``gptq`` does)."""

    recipe: str = "gptq"
    smoothing_strength: float = 0.8
    dampening_frac: float = 0.01
    block_size: int = 128
    actorder: Literal["static", "weight", "group", "none"] = "static"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            path = Path(self.recipe).expanduser()
            if path.suffix not in (".yaml", ".yml") or not path.is_file():
                raise QuantizerError(f"recipe {self.recipe!r} is neither one of {', '.join(RECIPES)} nor a recipe "
                                     "YAML file that exists: name a recipe or give the path of a .yaml file")
        if not 0.0 < self.smoothing_strength < 1.0:
            raise QuantizerError(f"smoothing_strength must be in (0, 1), got {self.smoothing_strength}")
        if not 0.0 < self.dampening_frac < 1.0:
            raise QuantizerError(f"dampening_frac must be in (0, 1), got {self.dampening_frac}")
        if self.block_size < 1:
            raise QuantizerError(f"block_size must be >= 1, got {self.block_size}")


def llmcompressor_versions() -> dict[str, str]:
    """Versions of llmcompressor and the libraries its output depends on (for provenance);
    :class:`QuantizerError` with the install command when it is not installed."""
    if importlib.util.find_spec("llmcompressor") is None:
        raise QuantizerError(f"quantizer 'llmcompressor' needs the llmcompressor package, which is not installed: "
                             f"{INSTALL_HINT}")
    return {name: metadata.version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


def config_groups(scheme: QuantScheme, *, actorder: str | None) -> dict[str, Any]:
    """The compressed-tensors ``config_groups`` of ``scheme``: one group over every Linear."""
    weights: dict[str, Any] = {"num_bits": scheme.w_bits, "type": "int", "symmetric": scheme.w_symmetric,
                               "strategy": "group" if scheme.w_group_size else "channel", "dynamic": False}
    if scheme.w_group_size:
        weights["group_size"] = scheme.w_group_size
    if actorder is not None:
        weights["actorder"] = actorder
    group: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
    if scheme.quantizes_activations:
        group["input_activations"] = {"num_bits": scheme.a_bits, "type": "int", "symmetric": scheme.a_symmetric,
                                      "strategy": "token", "dynamic": True}
    return {"group_0": group}


def _loader(batches: Sequence[Any]):
    """safequant's calibration batches as the DataLoader ``oneshot`` takes as given (no shuffling,
    no re-tokenization): each batch a dict of ``input_ids`` and ``attention_mask``."""
    import torch
    from torch.utils.data import DataLoader

    items = []
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        items.append({k: batch[k] for k in ("input_ids", "attention_mask") if k in batch})
    return DataLoader(items, batch_size=None, shuffle=False)


@register_quantizer
class LLMCompressorQuantizer(Quantizer):
    """llm-compressor's ``oneshot`` with a named recipe or a recipe file, saved as compressed-tensors."""

    name = "llmcompressor"
    description = ("llm-compressor's own oneshot (recipe=gptq, smoothquant-gptq, awq or a YAML file), audited as the "
                   "compressed-tensors checkpoint it saves (optional: its own environment)")
    Options = LLMCompressorOptions
    requires_calibration = True
    writes_artifact = True

    def check(self, scheme: QuantScheme) -> None:
        recipe = self.options.recipe
        if not scheme.quantizes_weights:
            raise QuantizerError(f"llmcompressor recipes quantize weights; scheme {scheme.label!r} keeps them in full "
                                 "precision")
        if scheme.quantizes_kv:
            raise QuantizerError(f"scheme {scheme.label!r} quantizes the KV cache: llm-compressor calibrates static KV "
                                 "scales where safequant's are dynamic per token, so it would not be this scheme; drop "
                                 "the kv part")
        if scheme.a_clip_ratio != 1.0 or scheme.w_clip_search:
            raise QuantizerError(f"scheme {scheme.label!r}: llm-compressor's named recipes have no activation clip "
                                 "ratio or MSE weight clipping; drop aclip/wmse or give a recipe file")
        if recipe == "awq" and scheme.quantizes_activations:
            raise QuantizerError(f"recipe awq is weight-only; scheme {scheme.label!r} quantizes activations (use "
                                 "recipe=smoothquant-gptq, or a16)")
        if recipe == "smoothquant-gptq" and not scheme.quantizes_activations:
            raise QuantizerError(f"recipe smoothquant-gptq smooths activations for their quantization; scheme "
                                 f"{scheme.label!r} keeps them in full precision (use recipe=gptq, or e.g. w8a8)")
        llmcompressor_versions()  # the package must be there before any model loads
        if recipe == "awq":
            import torch

            if not (torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())):
                raise QuantizerError("recipe awq needs an accelerator: llmcompressor 0.14's AWQModifier pins its cached "
                                     "activations in page-locked memory, which fails without one (RuntimeError: Cannot "
                                     "access accelerator device); run it on a GPU machine or use recipe=gptq")

    def recipe(self, scheme: QuantScheme, ignore: list[str]) -> Any:
        """The recipe ``oneshot`` gets: llm-compressor modifiers for a named recipe, else the file."""
        opts = self.options
        if opts.recipe not in RECIPES:
            return str(Path(opts.recipe).expanduser())
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        if opts.recipe == "awq":
            return [AWQModifier(config_groups=config_groups(scheme, actorder=None), ignore=ignore)]
        actorder = None if opts.actorder == "none" else opts.actorder
        gptq = GPTQModifier(config_groups=config_groups(scheme, actorder=actorder), ignore=ignore,
                            dampening_frac=opts.dampening_frac, block_size=opts.block_size)
        if opts.recipe == "smoothquant-gptq":
            return [SmoothQuantModifier(smoothing_strength=opts.smoothing_strength), gptq]
        return [gptq]

    def quantize(self, model: nn.Module, scheme: QuantScheme, ctx: QuantContext) -> nn.Module:
        from torch import nn

        if ctx.artifact_dir is None:
            raise QuantizerError("quantizer 'llmcompressor' saves a compressed-tensors folder: give ctx.artifact_dir")
        versions = llmcompressor_versions()
        from llmcompressor import oneshot

        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and scheme.skips(n)]
        recipe = self.recipe(scheme, ignore)
        out = Path(ctx.artifact_dir)
        log.info("llmcompressor %s: oneshot recipe %s on %d calibration batches -> %s", versions["llmcompressor"],
                 self.options.recipe, len(ctx.calibration_batches), out)
        # oneshot re-reads the config from disk (config.name_or_path) to refuse models another
        # library quantized; a model loaded from a GGUF file or with merged adapters has no such
        # folder, so it gets the in-memory config, written where the output will go (a GGUF
        # file's marks are dropped when it loads: harness.models._drop_gguf_marks).
        config = model.config
        out.mkdir(parents=True, exist_ok=True)
        previous = config.name_or_path
        try:
            config.save_pretrained(out)
            config.name_or_path = str(out)
            oneshot(model=model, tokenizer=ctx.tokenizer, dataset=_loader(ctx.calibration_batches), recipe=recipe,
                    output_dir=str(out), save_compressed=True)
        finally:
            config.name_or_path = previous
        saved_recipe = out / "recipe.yaml"
        self.metadata.update({
            "versions": versions, "recipe": self.options.recipe, "ignore": ignore,
            "recipe_yaml": saved_recipe.read_text(encoding="utf-8") if saved_recipe.is_file() else None,
        })
        return model
