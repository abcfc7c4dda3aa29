"""The block-by-block pipeline that sequential methods (GPTQ, Q-realign) plug their work into.

Like llm-compressor's sequential pipeline: the calibration batches run through the model up to the
first decoder block (:func:`~quantizers.calibration.capture_layer_inputs`), then block ``i`` gets

* ``inputs``: what it receives from blocks ``0..i-1`` *as already quantized* (``X_q``);
* with ``full_precision=True`` also ``fp_inputs`` (``X_fp``, what it receives in the untouched
  model) and ``fp_outputs`` (``F_i(X_fp)``, computed before the method changes the block);

the method does its per-block work (collect Hessians and round, or learn clipping and scales) and
hands back the block's propagated outputs in ``block.outputs`` (usually ``block.run(block.inputs)``
with the block as it will be quantized), which become block ``i + 1``'s ``inputs``. The method
computes them itself because only it knows when the block computes what the quantized model will
(GPTQ with its input-transform hooks still on, Q-realign before folding its learned scales).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import QuantizerError
from .calibration import capture_layer_inputs, decoder_layers, model_inputs, run_layer

__all__ = ["Block", "BlockPipeline"]


@dataclass
class Block:
    """One decoder block's turn in the pipeline (lists hold one tensor per calibration batch)."""

    index: int
    layer: nn.Module
    #: the block's qualified module name (``model.layers.3``)
    name: str
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    #: ``attention_mask`` of each batch on the model's device (None: not padded)
    masks: list[torch.Tensor | None]
    fp_inputs: list[torch.Tensor] | None = None
    fp_outputs: list[torch.Tensor] | None = None
    #: set by the method: the block's outputs on ``inputs``, fed to the next block
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)

    def run(self, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The block's outputs on ``hidden`` (one tensor per batch) with the captured kwargs."""
        return [run_layer(self.layer, h, kw) for h, kw in zip(hidden, self.kwargs)]


class BlockPipeline:
    """Iterate over ``model``'s decoder blocks with their inputs (see the module docstring)."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], *, full_precision: bool = False) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        names = {id(m): n for n, m in model.named_modules()}
        self.names = [names[id(layer)] for layer in self.layers]
        self.batches = batches
        self.full_precision = full_precision

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Block]:
        device = next(self.model.parameters()).device
        masks = [_mask(batch, device) for batch in self.batches]
        captured = capture_layer_inputs(self.model, self.batches, 0)
        kwargs = captured.kwargs
        x_fp = list(captured.hidden) if self.full_precision else None
        x_q = [h.clone() for h in captured.hidden] if self.full_precision else captured.hidden
        for i, layer in enumerate(self.layers):
            y_fp = None
            if x_fp is not None:
                with torch.no_grad():
                    y_fp = [run_layer(layer, h, kw) for h, kw in zip(x_fp, kwargs)]
            block = Block(i, layer, self.names[i], x_q, kwargs, masks, fp_inputs=x_fp, fp_outputs=y_fp)
            yield block
            if block.outputs is None:
                raise QuantizerError(f"block {i} handed back no outputs; set block.outputs before the next block")
            x_q, x_fp = block.outputs, y_fp


def _mask(batch: Any, device: torch.device) -> torch.Tensor | None:
    inputs = model_inputs(batch, device)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask
