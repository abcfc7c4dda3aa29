"""Left-padded token batches with explicit position ids, the one way prompts are batched.

Every reader of the last prompt position (generation-free refusal scores, probe capture, Q-realign's
calibration) pads on the left so that position ``-1`` is each row's last prompt token, and passes
``position_ids = cumsum(attention_mask) - 1`` so that a prompt gets the same rotary positions, and
therefore the same hidden states, whether it runs alone or beside longer prompts (what ``generate``
computes for left-padded rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

__all__ = ["left_pad", "pad_token_id"]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padded positions are masked anyway)."""
    return next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                 if isinstance(t, int)), 0)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, *,
             positions: Literal["always", "padded", "never"] = "always",
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[len(rows), longest]`` with every row flush right,
    plus ``position_ids`` (``always``; ``padded``: only when some row is padded; ``never``)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, toks in enumerate(rows):
        input_ids[i, width - len(toks):] = torch.tensor(list(toks), dtype=torch.long)
        mask[i, width - len(toks):] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if positions == "always" or (positions == "padded" and width and not bool(mask.all())):
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}
