"""Perplexity on a plain-text set, over windows of `window` tokens advancing by `stride`.

Each token is scored once. With `stride == window` (the default) the windows do not overlap,
which is how the quantization papers (GPTQ, QuaRot, OSTQuant) evaluate WikiText-2; a smaller
stride gives every scored token up to `window - stride` tokens of extra context (the Hugging Face
sliding-window style) at proportionally more compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from harness.errors import UserError

TOY_HELDOUT = Path(__file__).resolve().parent / "data" / "toy_heldout.txt"
BUILTIN_TEXTS = {"toy-heldout": TOY_HELDOUT}


@dataclass(frozen=True)
class PerplexitySettings:
    source: str = "toy-heldout"
    window: int = 256
    stride: int = 256
    max_tokens: int = 16384
    batch_size: int = 8

    def key(self) -> dict:
        return {"source": self.source, "window": self.window, "stride": self.stride, "max_tokens": self.max_tokens}


def load_text(source: str) -> str:
    """A built-in text name or a path to a UTF-8 text file."""
    path = BUILTIN_TEXTS.get(source, Path(source).expanduser())
    if not path.is_file():
        known = ", ".join(BUILTIN_TEXTS)
        raise UserError(f"perplexity text {source!r} not found: pass a text file path or one of: {known}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"perplexity text {source!r} is not UTF-8 text: convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"perplexity text {source!r} is empty: pass a file with text in it")
    return text


def perplexity(model, tokenizer, text: str, settings: PerplexitySettings, progress: bool = True) -> dict:
    """Perplexity of `model` on `text`; returns {"perplexity", "tokens", "nll"}."""
    import torch  # here, not at the top: `safequant list` names the texts without loading torch

    with torch.inference_mode():
        return _perplexity(model, tokenizer, text, settings, progress)


def _perplexity(model, tokenizer, text: str, settings: PerplexitySettings, progress: bool) -> dict:
    import torch

    if settings.stride <= 0 or settings.stride > settings.window:
        raise UserError(f"perplexity stride {settings.stride} must be in 1..window ({settings.window})")
    device = next(model.parameters()).device
    # Tokenizing a multi-megabyte file costs more than scoring it: cut the text first, generously
    # (no tokenizer averages more than 16 characters per token on prose).
    text = text[: settings.max_tokens * 16]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0][: settings.max_tokens]
    if ids.numel() < 2:
        raise UserError(f"perplexity text {settings.source!r} has fewer than 2 tokens")
    spans = _windows(ids.numel(), settings.window, settings.stride)
    total_nll, total_tokens = 0.0, 0
    # Windows of equal length share a batch; only the last one may be shorter.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress, leave=False)
    for length, group in groups.items():
        for i in range(0, len(group), settings.batch_size):
            chunk = group[i : i + settings.batch_size]
            batch = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            logits = model(input_ids=batch).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            token_lp = logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)
            for row, (_, _, scored) in enumerate(chunk):
                # The last `scored` positions of the window are new; position 0 has no prediction.
                scored = min(scored, length - 1)
                total_nll -= token_lp[row, -scored:].sum().item()
                total_tokens += scored
            bar.update(len(chunk))
    bar.close()
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "tokens": total_tokens, "nll": nll}


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, number of new tokens to score) for each window over n tokens."""
    spans, prev_end, begin = [], 0, 0
    while prev_end < n:
        end = min(begin + window, n)
        spans.append((begin, end, end - prev_end if prev_end else end - begin))
        prev_end = end
        begin += stride
        if end == n:
            break
    return spans
