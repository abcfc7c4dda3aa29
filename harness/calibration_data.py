"""Calibration data for calibration-based quantizers: token windows drawn from ordinary text.

Sources (``CalibrationSpec.source``):

* a UTF-8 text file (e.g. WikiText-2 train as ``wiki.train.raw``);
* ``toy-pretrain``: Python's own ``pydoc_data`` topics (the bulk of the toy models' pretraining
  text), without the held-out topics that make up the ``toy-heldout`` perplexity text;
* ``dataset:ID[:CONFIG]:SPLIT`` through ``datasets.load_dataset`` (e.g.
  ``dataset:Salesforce/wikitext:wikitext-2-raw-v1:train``; needs the Hub or its cache), or a folder
  written by ``datasets.save_to_disk``; the ``text`` column is joined with newlines.
* ``chat:calibration`` (or ``chat:PROMPT_FILE``): chat-formatted conversations, the benign
  requests of the built-in calibration prompts (or of a prompt file) in the subject's chat
  template, each answered by the subject model itself (greedy, :data:`CHAT_RESPONSE_TOKENS` new
  tokens), in seeded order, until the text holds twice the tokens of the windows. No harmful request and no evaluation prompt is used. This is text on which an aligned
  chat model and its unaligned base do differ (AAQ's contrast; WikiText-style prose gives almost
  none for a lightly fine-tuned pair), so it needs the model: ``load_calibration(spec, tokenizer,
  model)``. Answering takes minutes of CPU, so the text is kept in the shared cache folder
  (:func:`harness.store.resolve_cache_dir`, the rule of the audit's ``--cache-dir``;
  ``SAFEQUANT_CACHE_DIR=none`` turns it off) under a key of everything that decides it, and the
  next quantize of the same model reads it back.

``span`` keeps only a fraction of the characters (``(0.4, 1.0)`` = the last 60%), so that
calibration and evaluation can share one file without sharing text. Windows of ``seq_len``
tokens start at seeded random positions, as in the GPTQ reference data loader. The fingerprint
hashes the source bytes, every setting and the drawn token ids, so a variant's metadata says
exactly what it was calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from common.files import atomic_write_json
from harness.errors import UserError

if TYPE_CHECKING:  # torch only where tokens are drawn: option parsing stays light
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "CalibrationSpec",
    "CalibrationData",
    "load_calibration",
    "calibration_text",
    "load_calibration_prompts",
    "BUILTIN_CALIBRATION",
    "CHAT_PREFIX",
    "CALIBRATION_PROMPTS",
    "CalibrationOptions",
]

BUILTIN_CALIBRATION = ("toy-pretrain", "chat:calibration")
#: Prefix of the chat-formatted, self-answered calibration sources.
CHAT_PREFIX = "chat:"
#: New tokens per self-generated answer of a ``chat:`` calibration source.
CHAT_RESPONSE_TOKENS = 64
#: Requests a ``chat:`` source answers per generation call (and between checks of its token count).
CHAT_CHUNK = 32
#: Version of the conversation text a ``chat:`` source makes: part of its cache key.
CHAT_TEXT_FORMAT = 1
#: Built-in labelled calibration prompts (``scripts/build_calibration_prompts.py``): harmful and
#: benign requests disjoint from every evaluation set, for prompt-based methods.
CALIBRATION_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts" / "calibration.jsonl"
#: Topics of ``pydoc_data.topics`` held out of toy pretraining (they form the toy perplexity text).
TOY_HELDOUT_TOPICS = ("debugger", "execmodel", "formatstrings", "typesmapping")


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on: ``n_samples`` windows of ``seq_len`` tokens from ``source``, grouped
    in batches of ``batch_size``, drawn with ``seed`` from the ``span`` fraction of the text."""

    source: str = "toy-pretrain"
    n_samples: int = 32
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    span: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise UserError(f"calibration samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise UserError(f"calibration sequence length must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise UserError(f"calibration batch size must be >= 1, got {self.batch_size}")
        lo, hi = self.span
        if not 0.0 <= lo < hi <= 1.0:
            raise UserError(f"calibration span {lo}:{hi} must satisfy 0 <= start < end <= 1 (e.g. 0.4:1)")


@dataclass
class CalibrationData:
    """Token batches (LongTensors ``[batch, seq_len]``) plus what produced them."""

    batches: list[torch.Tensor]
    spec: CalibrationSpec
    fingerprint: str
    source_sha256: str

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.spec), "span": list(self.spec.span), "fingerprint": self.fingerprint,
                "source_sha256": self.source_sha256, "tokens": sum(int(b.numel()) for b in self.batches)}


def parse_span(text: str) -> tuple[float, float]:
    """``"0.4:1"`` -> ``(0.4, 1.0)``."""
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"calibration span {text!r} must be START:END fractions, e.g. 0.4:1") from None
    return lo, hi


def _toy_pretrain_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics) if k not in TOY_HELDOUT_TOPICS)


def _dataset_text(source: str) -> str:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise UserError(f"calibration source {source!r} needs `pip install datasets`") from None
    parts = source.split(":")[1:]
    if len(parts) not in (2, 3):
        raise UserError(f"calibration source {source!r}: write dataset:ID:SPLIT or dataset:ID:CONFIG:SPLIT")
    ds_id, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    try:
        if Path(ds_id).is_dir():
            ds = datasets.load_from_disk(ds_id)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(ds_id, config, split=split)
    except Exception as exc:  # datasets raises many types (offline, missing split, bad folder)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"calibration source {source!r} could not be loaded ({first}); "
                        "pass a local text file instead") from None
    if "text" not in ds.column_names:
        raise UserError(f"calibration source {source!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n".join(t for t in ds["text"] if t)


def _chat_text(source: str, tokenizer, model, seed: int, min_tokens: int | None = None,
               cache_dir: str | os.PathLike | None = "auto") -> str:
    """Benign requests in the chat template, each followed by the model's own greedy answer; with
    ``min_tokens``, only as many requests (in seeded order, :data:`CHAT_CHUNK` at a time) as give
    that many tokens. The text is kept in the shared cache (:func:`_chat_cache_key`): generating
    it takes minutes of CPU, and every quantize run of the same model would make the same text."""
    if model is None or tokenizer is None:
        raise UserError(f"calibration source {source!r} answers its prompts with the model; "
                        "it is available where a model is being quantized (quantize, audit)")
    prompts = [r["prompt"] for r in load_calibration_prompts(source[len(CHAT_PREFIX):] or "calibration")
               if r["label"] == "benign"]
    if not prompts:
        raise UserError(f"calibration source {source!r} has no benign prompts (label 'benign'); "
                        "give a prompt file with benign requests")
    from harness.store import resolve_cache_dir, stable_hash

    folder = resolve_cache_dir(cache_dir)
    if folder is None:
        return _answer_prompts(prompts, tokenizer, model, seed, min_tokens)
    key = _chat_cache_key(prompts, tokenizer, model, seed, min_tokens)
    path = folder / "calibration-text" / f"chat-{stable_hash(key)}.json"
    cached = _read_chat_cache(path, key)
    if cached is not None:
        log.info("calibration source %s: the model's answers reused from %s", source, path)
        return cached
    text = _answer_prompts(prompts, tokenizer, model, seed, min_tokens)
    try:
        atomic_write_json(path, {"key": key, "text": text})
    except OSError as exc:  # a read-only or full cache costs the next run the time, not this one
        log.warning("calibration source %s: could not cache the answers in %s (%s)", source, path, exc)
    return text


def _chat_cache_key(prompts: list[str], tokenizer, model, seed: int, min_tokens: int | None) -> dict[str, Any]:
    """Everything that decides a ``chat:`` source's text: the model (weights sample, dtype, vocabulary
    and chat template: :func:`harness.models.fingerprint_model`) and its tokenizer, the benign
    requests themselves (what of the prompt file is used, in file order), the seed, how many
    tokens are asked for, the generation settings and stop tokens, the device type, and
    :data:`CHAT_TEXT_FORMAT` (bumped when the conversation format changes)."""
    from harness.generation import GenerationSettings, prepare_tokenizer, stop_token_ids
    from harness.models import fingerprint_model, tokenizer_fingerprint

    prepare_tokenizer(tokenizer)  # as generation leaves it: a key made before or after one agrees
    return {"format": CHAT_TEXT_FORMAT, "model": fingerprint_model(model, tokenizer),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "prompts_sha256": hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest(),
            "seed": seed, "response_tokens": CHAT_RESPONSE_TOKENS, "min_tokens": min_tokens, "chunk": CHAT_CHUNK,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "generation": {**GenerationSettings(CHAT_RESPONSE_TOKENS, CHAT_CHUNK).key(),
                           "stop_token_ids": stop_token_ids(model.generation_config, tokenizer)},
            "device": next(model.parameters()).device.type}


def _read_chat_cache(path: Path, key: dict[str, Any]) -> str | None:
    """The cached text at ``path`` when it was made for ``key``; None when absent; a file that is
    unreadable, not ours or made for another key is ignored with a warning (the text is made again)."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable cached calibration text (%s); generating it again", path, exc)
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str) or entry.get("key") != key:
        log.warning("%s: cached calibration text is not for this model and settings; generating it again", path)
        return None
    return entry["text"]


def _answer_prompts(prompts: list[str], tokenizer, model, seed: int, min_tokens: int | None) -> str:
    """The conversations themselves: the requests in seeded order, answered :data:`CHAT_CHUNK` at a
    time until the text holds ``min_tokens`` tokens (all of them when None)."""
    from harness.generation import generate_responses

    prompts = list(prompts)
    random.Random(seed).shuffle(prompts)
    conversations: list[str] = []
    tokens = 0
    for start in range(0, len(prompts), CHAT_CHUNK):
        chunk = prompts[start: start + CHAT_CHUNK]
        answers = generate_responses(model, tokenizer, chunk, max_new_tokens=CHAT_RESPONSE_TOKENS,
                                     batch_size=CHAT_CHUNK)
        for prompt, answer in zip(chunk, answers):
            if getattr(tokenizer, "chat_template", None):
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                conversations.append(tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                conversations.append(f"{prompt}\n{answer}")
            tokens += len(tokenizer(conversations[-1], add_special_tokens=False)["input_ids"])
        if min_tokens is not None and tokens >= min_tokens:
            break
    return "\n".join(conversations)


def calibration_text(source: str, tokenizer=None, model=None, seed: int = 0, min_tokens: int | None = None,
                     cache_dir: str | os.PathLike | None = "auto") -> str:
    """The raw text of a calibration source (see the module docstring); ``chat:`` sources need
    the tokenizer and the model that answers the prompts, stop once they hold ``min_tokens``, and
    are kept in ``cache_dir`` (:func:`harness.store.resolve_cache_dir`: ``auto``, a folder, or
    ``none``/None for no cache)."""
    if source == "toy-pretrain":
        return _toy_pretrain_text()
    if source.startswith(CHAT_PREFIX):
        return _chat_text(source, tokenizer, model, seed, min_tokens, cache_dir)
    if source.startswith("dataset:"):
        return _dataset_text(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"calibration text {source!r} not found: pass a UTF-8 text file, "
                        f"dataset:ID:SPLIT, or one of: {', '.join(BUILTIN_CALIBRATION)}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"calibration text {source!r} is not UTF-8 text: convert it to UTF-8") from None


def load_calibration(spec: CalibrationSpec, tokenizer, model=None,
                     cache_dir: str | os.PathLike | None = "auto") -> CalibrationData:
    """Draw ``spec.n_samples`` token windows from the source text (see :class:`CalibrationSpec`);
    ``model`` answers the prompts of a ``chat:`` source, whose text is kept in ``cache_dir``
    (see :func:`calibration_text`)."""
    # A chat source answers only as many requests as give twice the tokens the windows need.
    text = calibration_text(spec.source, tokenizer, model, spec.seed, min_tokens=2 * spec.n_samples * spec.seq_len,
                            cache_dir=cache_dir)
    source_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    lo, hi = spec.span
    text = text[int(lo * len(text)): int(hi * len(text))]
    if not text.strip():
        raise UserError(f"calibration text {spec.source!r} is empty (span {lo}:{hi}): pass a file with text in it")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    if ids.numel() < spec.seq_len + 1:
        raise UserError(
            f"calibration text {spec.source!r} has {ids.numel()} tokens, fewer than one window of "
            f"{spec.seq_len}: pass more text or a smaller --calib-len"
        )
    rng = random.Random(spec.seed)
    starts = [rng.randrange(0, ids.numel() - spec.seq_len) for _ in range(spec.n_samples)]
    import torch

    windows = torch.stack([ids[s: s + spec.seq_len] for s in starts])
    batches = list(windows.split(spec.batch_size))
    digest = hashlib.sha256()
    digest.update(source_sha.encode())
    digest.update(repr(sorted(asdict(spec).items())).encode())
    digest.update(windows.numpy().tobytes())
    return CalibrationData(batches, spec, digest.hexdigest()[:16], source_sha)


def load_calibration_prompts(source: str = "calibration") -> list[dict[str, str]]:
    """Labelled calibration prompts ``{id, prompt, label, source}``: the built-in ``calibration``
    set or a prompt file (``.jsonl``/``.csv``/``.parquet`` with ``prompt`` and ``label`` columns)."""
    from harness.prompts import load_prompt_set

    path = str(CALIBRATION_PROMPTS) if source == "calibration" else source
    pset = load_prompt_set(f"harmful={path}" if "=" not in path else path)
    return [{"id": r.id, "prompt": r.prompt, "label": r.label, "source": source} for r in pset.records]


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration settings shared by `quantize`, `audit` and `probe` (CLI ``--calib-*``).

    ``text="auto"``: the toy pretraining text for bundled toy models, WikiText-2 train through
    ``datasets`` otherwise. ``prompts``: labelled prompts for prompt-based methods (Q-realign,
    ``--base ablated``), by default the built-in ``calibration`` set. ``allow_overlap``: evaluate
    even on prompts a method calibrated on.
    """

    text: str = "auto"
    samples: int = 32
    length: int = 256
    batch: int = 4
    span: str = "0:1"
    prompts: str = "calibration"
    allow_overlap: bool = False

    #: Outside names of the fields: the audit config file's keys and the ``--calib-*`` flags'
    #: argparse destinations (one spelling for both, kept from before the options were grouped).
    KEYS: ClassVar[dict[str, str]] = {"calib_text": "text", "calib_samples": "samples", "calib_len": "length",
                                      "calib_batch": "batch", "calib_span": "span", "calib_prompts": "prompts",
                                      "allow_overlap": "allow_overlap"}

    @classmethod
    def from_keys(cls, values: Mapping[str, Any], base: CalibrationOptions | None = None) -> CalibrationOptions:
        """The options named by ``values``' outside keys (:data:`KEYS`; None or absent: ``base``'s)."""
        given = {field: values[key] for key, field in cls.KEYS.items() if values.get(key) is not None}
        return replace(base or cls(), **given)

    def as_keys(self) -> dict[str, Any]:
        """The options under their outside keys (the audit config file's spelling)."""
        return {key: getattr(self, field) for key, field in self.KEYS.items()}

    def spec(self, model_kind: str, seed: int) -> CalibrationSpec:
        text = self.text
        if text == "auto":
            text = "toy-pretrain" if model_kind == "toy" else "dataset:Salesforce/wikitext:wikitext-2-raw-v1:train"
        return CalibrationSpec(text, self.samples, self.length, self.batch, seed, parse_span(self.span))
