"""Capture the hidden state of every decoder layer (or a chosen subset) for a list of prompts.

Layer convention: layer ``i`` (0-based) is the **output of decoder block i**, for every i. With
``output_hidden_states=True`` a transformers model returns ``L + 1`` tensors: the embeddings, then
the block outputs; but for most architectures (Llama, Qwen, Mistral, Gemma, GPT-2) the *last* one
has the final norm applied already. So that the last layer means the same thing as the others
(and a probe direction of layer L-1 applies to the raw block output, which is what Q-realign's loss
sees), the raw output of the last block is taken from a forward hook on it when the decoder-layer
list can be found; otherwise the normed tensor is used and ``Activations.last_layer`` says so.

Positions: ``last`` is the hidden state of the last prompt token (for a chat-formatted prompt, the
final token of the assistant header, right before the model's first generated token); ``mean`` is
the mean over every prompt token (padding excluded). Prompts are passed in *already formatted*
(the caller applies the chat template), tokenized without extra special tokens by default, as the
harness's generation does, so the probe sees exactly the tokens the model sees when it answers.

Batches are left-padded with explicit ``position_ids`` (``cumsum(attention_mask) - 1``), so a
prompt gets the same rotary positions, and therefore the same hidden states, whether it runs alone
or in a batch with longer prompts. Prompts are batched longest first, and results are written back
in the caller's order.

Memory: results are float32 numpy arrays ``[n_prompts, hidden]`` per (position, layer). With
``stream_dir`` each array is a ``.npy`` file written batch by batch through a memory map (nothing
but one batch's hidden states is held in RAM), reloadable with :meth:`Activations.load`.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.files import atomic_write_json

from .errors import ProbeError

log = logging.getLogger(__name__)

POSITIONS: tuple[str, ...] = ("last", "mean")
#: Warn (and suggest ``stream_dir``) when in-memory activations would exceed this many bytes.
MEMORY_WARN_BYTES = 4 << 30
MANIFEST = "activations.json"
_RANGE = re.compile(r"^(\d+)\s*[-:]\s*(\d+)$")


# ---------------------------------------------------------------------------------------------
# layers and positions


def _layer_ranges(spec: Any) -> list[tuple[int, int]] | None:
    """Syntax of a layer selection: inclusive (lo, hi) pairs, or None for all layers."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    parts: list[Any]
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        parts = [int(spec)]
    else:
        parts = list(spec)
    ranges: list[tuple[int, int]] = []
    for part in parts:
        if isinstance(part, str):
            try:
                ranges.append((int(part), int(part)))
                continue
            except ValueError:
                pass
            match = _RANGE.match(part)
            if not match:
                raise ProbeError(f"layer {part!r} is not an integer or a range; write e.g. all, 0,2,5, 4-10 or -1")
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise ProbeError(f"layer range {part!r} runs backwards; write the smaller index first")
            ranges.append((lo, hi))
        elif isinstance(part, (int, np.integer)) and not isinstance(part, bool):
            ranges.append((int(part), int(part)))
        else:
            raise ProbeError(f"layer {part!r} is not an integer; write e.g. all, 0,2,5, 4-10 or -1")
    if not ranges:
        raise ProbeError(f"layer selection {spec!r} is empty; write e.g. all, 0,2,5 or 4-10")
    return ranges


def check_layer_spec(spec: Any) -> None:
    """Raise :class:`ProbeError` if ``spec`` is not a valid layer selection (range not checked)."""
    _layer_ranges(spec)


def parse_layers(spec: Any, n_layers: int) -> list[int]:
    """Decoder-block indices from ``None``/``"all"``, ``"0,2,5"``, ``"4-10"`` (inclusive),
    ``"-1"`` (counted from the end) or a sequence of ints; sorted, without repeats."""
    if n_layers < 1:
        raise ProbeError(f"the model has {n_layers} decoder layers; nothing to probe")
    ranges = _layer_ranges(spec)
    if ranges is None:
        return list(range(n_layers))
    out: set[int] = set()
    for lo, hi in ranges:
        for i in (lo, hi):
            j = i + n_layers if i < 0 else i
            if not 0 <= j < n_layers:
                raise ProbeError(
                    f"layer {i} is out of range: the model has {n_layers} decoder layers "
                    f"(0..{n_layers - 1}, or -1..-{n_layers} from the end)"
                )
        if lo == hi:
            out.add(lo + n_layers if lo < 0 else lo)
        else:
            out.update(range(lo, hi + 1))
    return sorted(out)


def parse_positions(position: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(position, str):
        names = list(POSITIONS) if position == "both" else [position]
    else:
        names = list(position)
    bad = [p for p in names if p not in POSITIONS]
    if bad or not names:
        raise ProbeError(f"position {bad[0] if bad else position!r} is unknown; use last, mean or both")
    return tuple(dict.fromkeys(names))


def count_layers(model) -> int | None:
    """Number of decoder blocks from the config (text config for multimodal models), else None."""
    cfg = getattr(model, "config", None)
    for c in (cfg, _call(cfg, "get_text_config")):
        n = getattr(c, "num_hidden_layers", None) if c is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def _call(obj, name):
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # pragma: no cover - exotic configs
        return None


# ---------------------------------------------------------------------------------------------
# result container


@dataclass
class Activations:
    """Captured hidden states: ``data[position][layer]`` is a float32 array ``[n_prompts, hidden]``.

    ``last_layer`` is ``"block"`` when the last decoder layer is the raw block output (hooked) or
    ``"hidden_states"`` when it is the model's last ``hidden_states`` entry (usually after the
    final norm). ``directory`` is set when the arrays are ``.npy`` files on disk (memory-mapped).
    """

    layers: list[int]
    positions: tuple[str, ...]
    data: dict[str, dict[int, np.ndarray]]
    n_layers: int
    hidden_size: int
    n_tokens: np.ndarray
    last_layer: str = "block"
    directory: Path | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.n_tokens))

    def get(self, layer: int, position: str | None = None) -> np.ndarray:
        position = position or self.positions[0]
        if position not in self.data:
            raise ProbeError(f"position {position!r} was not captured (captured: {', '.join(self.positions)})")
        if layer not in self.data[position]:
            raise ProbeError(f"layer {layer} was not captured (captured: {', '.join(map(str, self.layers))})")
        return self.data[position][layer]

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.get(layer)

    def by_layer(self, position: str | None = None) -> dict[int, np.ndarray]:
        position = position or self.positions[0]
        return {layer: self.get(layer, position) for layer in self.layers}

    def meta(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "positions": list(self.positions), "n": len(self),
                "n_layers": self.n_layers, "hidden_size": self.hidden_size, "last_layer": self.last_layer,
                "seconds": round(self.seconds, 3), "tokens_mean": float(np.mean(self.n_tokens)) if len(self) else 0.0}

    @classmethod
    def load(cls, directory: str | Path) -> Activations:
        """Reopen activations streamed to ``directory`` (arrays memory-mapped read-only)."""
        directory = Path(directory)
        manifest = directory / MANIFEST
        if not manifest.is_file():
            raise ProbeError(f"{directory}: no {MANIFEST}; pass a folder written by capture(stream_dir=...)")
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ProbeError(f"{manifest}: unreadable ({exc}); capture again") from None
        data: dict[str, dict[int, np.ndarray]] = {}
        for position in meta["positions"]:
            data[position] = {}
            for layer in meta["layers"]:
                path = directory / _array_name(position, layer)
                if not path.is_file():
                    raise ProbeError(f"{path}: missing; capture again")
                data[position][int(layer)] = np.load(path, mmap_mode="r", allow_pickle=False)
        return cls([int(x) for x in meta["layers"]], tuple(meta["positions"]), data, int(meta["n_layers"]),
                   int(meta["hidden_size"]), np.asarray(meta["n_tokens"], dtype=np.int64),
                   meta.get("last_layer", "block"), directory, float(meta.get("seconds", 0.0)))


def _array_name(position: str, layer: int) -> str:
    return f"{position}_layer{int(layer):03d}.npy"


# ---------------------------------------------------------------------------------------------
# capture


def _tokenize(tokenizer, prompts: Sequence[str], add_special_tokens: bool, max_tokens: int | None) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ProbeError("prompts must be a list of strings (already chat-formatted), not a single string")
    if len(prompts) == 0:
        raise ProbeError("no prompts to capture; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ProbeError(f"prompt {i} is {'empty' if p == '' else type(p).__name__}; every prompt must be non-empty text")
    enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens)
    ids = [list(x) for x in enc["input_ids"]]
    for i, x in enumerate(ids):
        if not x:
            raise ProbeError(f"prompt {i} tokenizes to no tokens; check the tokenizer and the prompt")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ProbeError(f"max_tokens must be positive, got {max_tokens}")
        ids = [x[-max_tokens:] for x in ids]  # keep the end: the last token is what `last` reads
    return ids


def _forward_kwargs(model) -> dict[str, bool]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {"position_ids": True, "logits_to_keep": False}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"position_ids": "position_ids" in params or var_kw, "logits_to_keep": "logits_to_keep" in params}


def capture(
    model,
    tokenizer,
    prompts: Sequence[str],
    layers: Any = None,
    position: str | Sequence[str] = "last",
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    add_special_tokens: bool = False,
    stream_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "capture",
) -> Activations:
    """Hidden states of ``layers`` (default all) at ``position`` (``last``, ``mean`` or ``both``).

    ``prompts`` are strings already formatted with the chat template. ``max_tokens`` keeps only the
    last N tokens of longer prompts. ``stream_dir`` writes each (position, layer) array to a
    ``.npy`` file as batches arrive (for large models) and returns them memory-mapped.
    Raises :class:`ProbeError` for bad input or a model that returns no hidden states.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from common.batching import left_pad, pad_token_id
    from common.layout import decoder_layers as find_decoder_layers

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ProbeError(f"batch_size must be a positive integer, got {batch_size!r}")
    positions = parse_positions(position)
    ids = _tokenize(tokenizer, prompts, add_special_tokens, max_tokens)
    n = len(ids)
    n_layers = count_layers(model)
    chosen = parse_layers(layers, n_layers) if n_layers is not None else None
    pad_id = pad_token_id(tokenizer)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ProbeError("the model has no parameters; pass a loaded causal language model") from None
    fkw = _forward_kwargs(model)

    hook_out: dict[str, Any] = {}
    decoder_layers = find_decoder_layers(model, n_layers)  # common.layout: the one adapter
    handle = None
    if decoder_layers is not None:
        def _hook(_mod, _inp, out):
            hook_out["h"] = out[0] if isinstance(out, (tuple, list)) else out
        handle = decoder_layers[-1].register_forward_hook(_hook)

    stream = Path(stream_dir) if stream_dir is not None else None
    if stream is not None:
        stream.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict[int, np.ndarray]] = {}
    hidden = None
    last_layer = "block" if handle is not None else "hidden_states"
    order = sorted(range(n), key=lambda i: (-len(ids[i]), i))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="prompt", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            padded = left_pad([ids[i] for i in rows], pad_id, positions="always" if fkw["position_ids"] else "never")
            mask = padded["attention_mask"]
            kwargs: dict[str, Any] = {**{k: v.to(device) for k, v in padded.items()},
                                      "output_hidden_states": True, "use_cache": False, "return_dict": True}
            if fkw["logits_to_keep"]:
                kwargs["logits_to_keep"] = 1
            hook_out.clear()
            with torch.inference_mode():
                try:
                    out = model(**kwargs)
                except TypeError as exc:
                    raise ProbeError(
                        f"model {type(model).__name__} cannot be called with output_hidden_states=True "
                        f"({' '.join(str(exc).split())}); probes need a transformers causal LM"
                    ) from None
            hs = getattr(out, "hidden_states", None)
            if hs is None and isinstance(out, dict):
                hs = out.get("hidden_states")
            if not hs:
                raise ProbeError(
                    f"model {type(model).__name__} returned no hidden states with output_hidden_states=True; "
                    "probes need a transformers causal LM that supports it"
                )
            if n_layers is None:
                n_layers = len(hs) - 1
            if chosen is None:
                chosen = parse_layers(layers, n_layers)
            if len(hs) != n_layers + 1:
                raise ProbeError(
                    f"model {type(model).__name__} returned {len(hs)} hidden states for {n_layers} decoder layers "
                    "(expected one more than the layers); this architecture is not supported by the probes"
                )
            if hidden is None:
                hidden = int(hs[-1].shape[-1])
                _allocate(data, positions, chosen, n, hidden, stream)
            m = mask.to(device=hs[0].device).unsqueeze(-1).bool()
            count = mask.sum(-1, keepdim=True).to(device=hs[0].device, dtype=torch.float32)
            for layer in chosen:
                h = hook_out.get("h") if (layer == n_layers - 1 and handle is not None) else hs[layer + 1]
                if h is None:  # the hook did not fire (unexpected wrapper): fall back to hidden_states
                    h, last_layer = hs[layer + 1], "hidden_states"
                h = h.float()
                for pos in positions:
                    if pos == "last":
                        vec = h[:, -1, :]
                    else:
                        vec = torch.where(m, h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(1) / count
                    data[pos][layer][rows] = vec.cpu().numpy()
            bar.update(len(rows))
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    n_tokens = np.asarray([len(x) for x in ids], dtype=np.int64)
    acts = Activations(chosen, positions, data, n_layers, hidden, n_tokens, last_layer, stream, seconds)
    if stream is not None:
        for pos in positions:
            for layer in chosen:
                arr = data[pos][layer]
                arr.flush()
                del arr
                data[pos][layer] = np.load(stream / _array_name(pos, layer), mmap_mode="r", allow_pickle=False)
        atomic_write_json(stream / MANIFEST, {**acts.meta(), "n_tokens": n_tokens.tolist(),
                                               "files": [_array_name(p, l) for p in positions for l in chosen]},
                          indent=1, end="")
    log.info("captured %d prompts x %d layers (%s) in %.1f s", n, len(chosen), "+".join(positions), seconds)
    return acts


def _allocate(data, positions, layers, n, hidden, stream: Path | None) -> None:
    total = n * hidden * len(layers) * len(positions) * 4
    if stream is None and total > MEMORY_WARN_BYTES:
        log.warning("activations will take %.1f GiB in memory; pass stream_dir= (CLI: --stream) to keep them on disk",
                    total / 2**30)
    for pos in positions:
        data[pos] = {}
        for layer in layers:
            if stream is None:
                data[pos][layer] = np.zeros((n, hidden), dtype=np.float32)
            else:
                data[pos][layer] = np.lib.format.open_memmap(stream / _array_name(pos, layer), mode="w+",
                                                             dtype=np.float32, shape=(n, hidden))
