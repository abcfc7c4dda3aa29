"""The transformers generation backend: batched, greedy, chat-templated, left-padded.

Greedy decoding makes a response a deterministic function of (model, prompt, settings), which is
what lets a run resume and lets two variants be compared prompt by prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from common.prompts import chat_prompt


@dataclass(frozen=True)
class GenerationSettings:
    """What, besides the model and the prompt, decides a response (part of the cache key)."""

    max_new_tokens: int = 48
    batch_size: int = 32
    system_prompt: str | None = None

    def key(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "system_prompt": self.system_prompt, "decoding": "greedy"}


def _batches(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@torch.inference_mode()
def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    system_prompt: str | None = None,
    on_batch: Callable[[int, list[str], list[bool]], None] | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy responses to `prompts`, in order.

    `on_batch(start_index, responses, hit_max_tokens)` is called after each batch so callers can
    persist results as they arrive (that is how an interrupted audit resumes); `hit_max_tokens[i]`
    says the response was cut by `max_new_tokens` rather than ended by the model, which judges use
    to tell a truncated answer from a finished one.
    """
    _prepare_tokenizer(tokenizer)
    device = next(model.parameters()).device
    eos_ids = _stop_token_ids(model, tokenizer)
    responses: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False)
    for start, batch in _batches(list(prompts), batch_size):
        texts = [chat_prompt(tokenizer, p, system_prompt) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        decoded = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        stopped = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device)).any(dim=1)
        responses.extend(decoded)
        if on_batch is not None:
            on_batch(start, decoded, [not bool(s) for s in stopped])
        bar.update(len(batch))
    bar.close()
    return responses


def _stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn tokens: the generation config's eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.append(cfg_eos)
    elif cfg_eos:
        ids.extend(cfg_eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
