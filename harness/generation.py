"""The generation interface and its transformers backend: batched, greedy, chat-templated, left-padded.

Greedy decoding makes a response a deterministic function of (model, prompt, settings), which is
what lets a run resume and lets two variants be compared prompt by prompt. Every backend
(:class:`HFBackend` here, :class:`harness.vllm_backend.VLLMBackend`) feeds the model the same token
ids (:func:`prompt_token_ids`), stops on the same tokens (:func:`stop_token_ids`) and decodes the
same way (:func:`decode_response`), so two backends differ only in how they compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from common.batching import left_pad
from common.prompts import chat_prompt


@dataclass(frozen=True)
class GenerationSettings:
    """What, besides the model and the prompt, decides a response (part of the cache key)."""

    max_new_tokens: int = 48
    batch_size: int = 32
    system_prompt: str | None = None

    def key(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "system_prompt": self.system_prompt, "decoding": "greedy"}


#: ``on_batch(start_index, responses, hit_max_tokens)``: called as results arrive (the resume point).
OnBatch = Callable[[int, list[str], list[bool]], None]


class Backend(Protocol):
    """What the audit asks of a generation backend for one variant."""

    name: str

    def generate(self, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings,
                 on_batch: OnBatch | None = None, progress: bool = True) -> list[str]:
        """Greedy responses to ``prompts`` in order, reported through ``on_batch`` as they arrive."""

    def first_token_refusal_prob(self, tokenizer: Any, prompts: Sequence[str],
                                 settings: GenerationSettings) -> list[float]:
        """P(first assistant token opens a refusal) per prompt (:mod:`harness.first_token`)."""

    def describe(self) -> dict:
        """The provenance record of the runtime (summary.json ``variants[].backend``)."""

    def close(self) -> None:
        """Release what the backend holds (an engine, its memory, temporary weights)."""


@dataclass
class HFBackend:
    """transformers' ``generate`` on the variant's own (fake-quantized) torch model."""

    model: Any
    name: str = "hf"

    def generate(self, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings,
                 on_batch: OnBatch | None = None, progress: bool = True) -> list[str]:
        return generate_responses(self.model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                                  settings.system_prompt, on_batch=on_batch, progress=progress)

    def first_token_refusal_prob(self, tokenizer: Any, prompts: Sequence[str],
                                 settings: GenerationSettings) -> list[float]:
        from harness.first_token import first_token_refusal_prob

        return first_token_refusal_prob(self.model, tokenizer, prompts, settings.batch_size,
                                        system_prompt=settings.system_prompt)

    def describe(self) -> dict:
        import transformers

        from harness.backends import dtype_name

        return {"name": self.name, "transformers": transformers.__version__, "dtype": dtype_name(self.model)}

    def close(self) -> None:
        pass


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str], system_prompt: str | None = None) -> list[list[int]]:
    """The ids every backend feeds the model: the chat template as :func:`chat_prompt` renders it,
    no special tokens added on top (the template writes its own)."""
    return [tokenizer(chat_prompt(tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"] for p in prompts]


def decode_response(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """A response as every backend reports it: special tokens (end of turn, padding) dropped, stripped."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()


def _batches(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def prepare_tokenizer(tokenizer) -> None:
    """Set the tokenizer up for batched generation (left padding, a pad token): done by every
    generation, and by whoever keys a cache on the tokenizer before the first one (the pad token is
    part of its fingerprint)."""
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
    prepare_tokenizer(tokenizer)
    device = next(model.parameters()).device
    eos_ids = stop_token_ids(model.generation_config, tokenizer)
    responses: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False)
    for start, batch in _batches(list(prompts), batch_size):
        enc = left_pad(prompt_token_ids(tokenizer, batch, system_prompt), tokenizer.pad_token_id, positions="never",
                       device=device)
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
        decoded = [decode_response(tokenizer, row) for row in new_tokens.tolist()]
        stopped = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device)).any(dim=1)
        responses.extend(decoded)
        if on_batch is not None:
            on_batch(start, decoded, [not bool(s) for s in stopped])
        bar.update(len(batch))
    bar.close()
    return responses


def stop_token_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """End-of-turn tokens: the generation config's eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    cfg_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.append(cfg_eos)
    elif cfg_eos:
        ids.extend(cfg_eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
