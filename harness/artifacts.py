"""Third-party artifacts as audit variants: what ships, paired with its full-precision parent.

`--variants q4=model-Q4_0.gguf` audits a GGUF file (any type transformers de-quantizes: the
weights are exactly the file's); `--variants NAME=DIR` a Hugging Face folder, either plain (e.g.
`safequant export --format hf`) or with a `quantization_config` (compressed-tensors, GPTQ, AWQ,
bitsandbytes, torchao, HQQ, quanto, ...), loaded through transformers' own integration with that
library. Three hooks, each called by the audit:

* :func:`parse_artifact_variant` when a variant is parsed (nothing loaded): the file exists, the
  quantization library is installed (the message names the package);
* :func:`check_artifact` right after the parent loads, before the run directory exists: the
  architecture (config) and the vocabulary must be the parent's;
* :func:`load_artifact` when the variant's turn comes: the model plus its provenance (format,
  quantization type, SHA-256 of the files) for summary.json.

Responses are always generated with the parent's tokenizer and chat template, so the comparison
isolates the weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from harness.errors import UserError

log = logging.getLogger(__name__)

GGUF = "gguf"
HF_FOLDER = "hf"
HF_QUANTIZED = "hf-quantized"
#: The ``method`` of a variant that is a third-party artifact (never a quantizer name).
ARTIFACT_METHODS = (GGUF, HF_FOLDER, HF_QUANTIZED)

#: quantization_config["quant_method"] -> (module transformers imports, package to pip install).
QUANT_LIBRARIES = {
    "compressed-tensors": ("compressed_tensors", "compressed-tensors"),
    "gptq": ("gptqmodel", "gptqmodel optimum"),
    "awq": ("gptqmodel", "gptqmodel"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "torchao": ("torchao", "torchao"),
    "hqq": ("hqq", "hqq"),
    "quanto": ("optimum.quanto", "optimum-quanto"),
    "aqlm": ("aqlm", "aqlm"),
    "eetq": ("eetq", "eetq"),
    "fbgemm_fp8": ("fbgemm_gpu", "fbgemm-gpu"),
    "vptq": ("vptq", "vptq"),
    "auto-round": ("auto_round", "auto-round"),
}
#: Formats that need a CUDA device in transformers (documented; the load fails with that reason).
GPU_ONLY = ("bitsandbytes (4-bit)", "awq", "hqq", "eetq", "fbgemm_fp8", "fp8", "vptq", "aqlm")

#: GGUF type -> the nearest safequant scheme, and whether it is that scheme exactly (block scales
#: in float16; K-quants quantize their per-block scales too, so they are only near).
GGUF_SCHEMES = {
    "F32": ("fp", True), "F16": ("fp", False), "BF16": ("fp", False),
    "Q8_0": ("w8a16g32", True), "Q4_0": ("w4a16g32", True), "Q5_0": ("w5a16g32", True),
    "Q4_1": ("w4a16g32-wasym", True), "Q5_1": ("w5a16g32-wasym", True),
    "Q2_K": ("w2a16g16-wasym", False), "Q3_K": ("w3a16g16", False), "Q4_K": ("w4a16g32-wasym", False),
    "Q5_K": ("w5a16g32-wasym", False), "Q6_K": ("w6a16g16", False),
}
#: What `safequant quantize` writes next to a library's own output (method, recipe, library
#: versions, calibration, source model); :func:`describe_artifact` carries it as ``made_by``.
MADE_BY_FILE = "safequant_quantize.json"
#: Config fields an artifact must share with its parent (absent on both sides is fine).
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size", "vocab_size")


def artifact_format(path: str) -> str | None:
    """``gguf``, ``hf-quantized`` or ``hf`` when ``path`` is such an artifact, else None (a method
    name, or a folder saved by `safequant quantize`, which has its own loader)."""
    return _resolve(path)[0]


def artifact_path(path: str) -> Path:
    """The file or folder an artifact variant reads: the ``.gguf`` file (also the one inside a
    folder), or the Hugging Face folder."""
    return _resolve(path)[1]


def _resolve(path: str) -> tuple[str | None, Path]:
    """The format and the file or folder to read: a ``.gguf`` file, a folder holding exactly one
    (what `safequant export --format gguf` writes), or a Hugging Face folder."""
    p = _path(path)
    if p.suffix == ".gguf" and p.is_file():
        return GGUF, p
    if not p.is_dir() or (p / "variant.json").is_file():
        return None, p
    if (p / "config.json").is_file():
        return (HF_QUANTIZED if "quantization_config" in _read_config(p) else HF_FOLDER), p
    ggufs = sorted(p.glob("*.gguf"))
    return (GGUF, ggufs[0]) if len(ggufs) == 1 else (None, p)


def _path(text: str) -> Path:
    """``text`` as a path, ``~`` expanded where there is a home to expand it to (``~nobody`` stays)."""
    try:
        return Path(text).expanduser()
    except (RuntimeError, ValueError):  # "~user" without such a user, or "~" with a NUL byte: not a
        return Path(text)  # path we can resolve, so not an artifact (is_file/is_dir say False)


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model folder {str(folder)!r}: config.json cannot be read ({exc}): pass a complete "
                        "Hugging Face model folder") from None
    if not isinstance(config, dict):
        raise UserError(f"model folder {str(folder)!r}: config.json is not a JSON object: pass a Hugging Face model folder")
    return config


def _gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (2-D weights only: norms are always F32)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"GGUF file {str(path)!r} cannot be read ({exc}): pass a complete .gguf file") from None
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        if len(tensor.shape) == 2 and not tensor.name.startswith("token_embd"):
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def quantization_of(path: str) -> dict[str, Any]:
    """What the artifact says about its quantization: ``{"type", "scheme", "scheme_exact", ...}``."""
    fmt, p = _resolve(path)
    if fmt == GGUF:
        types = _gguf_tensor_types(p)
        main = max(types, key=types.get) if types else "F32"
        scheme, exact = GGUF_SCHEMES.get(main, ("fp", False))
        return {"type": main, "tensor_types": types, "scheme": scheme,
                "scheme_exact": exact and len(types) == 1}
    if fmt == HF_FOLDER:
        return {"type": "none", **_exported_scheme(p)}
    config = _read_config(p)["quantization_config"]
    method = str(config.get("quant_method", "?")) if isinstance(config, dict) else "?"
    scheme = _scheme_from_config(method, config) if isinstance(config, dict) else None
    return {"type": method, "config": config, "scheme": scheme or "fp", "scheme_exact": False}


def _exported_scheme(folder: Path) -> dict[str, Any]:
    """A plain folder holds full-precision tensors; one written by `safequant export --format hf`
    holds a variant's de-quantized grid, and says which (its safequant_export.json)."""
    try:
        record = json.loads((folder / "safequant_export.json").read_text(encoding="utf-8"))
        scheme = record["variant"]["scheme"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"scheme": "fp", "scheme_exact": True}
    return {"scheme": scheme, "scheme_exact": True, "exported_from": record["variant"]}


def _scheme_from_config(method: str, config: dict) -> str | None:
    """The nearest safequant scheme label of a quantization_config, when its fields say it."""
    weights, acts = None, None
    if method == "compressed-tensors":
        groups = config.get("config_groups") or {}
        first = next(iter(groups.values()), {}) if isinstance(groups, dict) else {}
        weights, acts = first.get("weights") or {}, first.get("input_activations") or {}
        bits, group, sym = weights.get("num_bits"), weights.get("group_size"), weights.get("symmetric", True)
        a_bits = acts.get("num_bits", 16) if acts else 16
    elif method in ("gptq", "awq", "auto-round"):
        bits, group, sym, a_bits = config.get("bits"), config.get("group_size"), config.get("sym", True), 16
    elif method == "bitsandbytes":
        bits, group, sym, a_bits = (4 if config.get("load_in_4bit") else 8), None, True, 16
    elif method == "torchao":
        kind = json.dumps(config.get("quant_type"))
        bits = next((b for b, names in ((8, ("Int8Weight", "int8_weight")), (4, ("Int4Weight", "int4_weight")))
                     if any(n in kind for n in names)), None)
        group, sym, a_bits = None, True, 8 if "Int8DynamicActivation" in kind else 16
    elif method == "hqq":
        bits, group, sym, a_bits = config.get("nbits") or (config.get("quant_config") or {}).get("nbits"), None, False, 16
    else:
        return None
    if not isinstance(bits, int) or bits not in (2, 3, 4, 5, 6, 7, 8):
        return None
    label = f"w{bits}a{a_bits if a_bits in (4, 8, 16) else 16}"
    if isinstance(group, int) and group > 0:
        label += f"g{group}"
    return label + ("" if sym else "-wasym")


def parse_artifact_variant(name: str | None, path: str, text: str):
    """A :class:`harness.config.VariantSpec` for the artifact at ``path`` (``text`` as the user
    wrote the variant, for messages); refuses a quantization library that is not installed."""
    from harness.config import VariantSpec, check_variant_name
    from quantizers import QuantizerError, QuantScheme

    fmt = artifact_format(path)
    info = quantization_of(path)
    if fmt == HF_QUANTIZED:
        check_library(info["type"], path)
    try:
        scheme = QuantScheme.parse(info["scheme"])
    except QuantizerError:
        scheme = QuantScheme.parse("fp")
    p = _path(path)
    name = check_variant_name(name or (p.stem if p.is_file() else p.resolve().name), text)
    return VariantSpec(name, fmt, scheme, {}, artifact=str(p))


def check_library(method: str, path: str) -> None:
    """The library transformers needs for ``quant_method`` must be importable (name the package)."""
    module, package = QUANT_LIBRARIES.get(method, (None, None))
    if module is None:
        return  # transformers' own (e.g. fp8, bitnet) or unknown to us: transformers says what is missing
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        found = False
    if not found:
        raise UserError(f"variant {path!r} is quantized with {method}, whose library is not installed: "
                        f"run `pip install {package}` (or audit another artifact)")


def file_hashes(path: str) -> dict[str, str]:
    """SHA-256 of the artifact's files: the GGUF file, or a folder's config and weight files."""
    p = _resolve(path)[1]
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json") and f.is_file())
    out = {}
    for f in files:
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out


def describe_artifact(path: str) -> dict[str, Any]:
    """Provenance for summary.json: format, quantization type (and nearest scheme), file hashes."""
    fmt, p = _resolve(path)
    hashes = file_hashes(path)
    out = {"format": fmt, "path": str(p.resolve()), "quantization": quantization_of(path),
           "sha256": hashes[p.name] if p.is_file() else hashes}
    if p.is_file():
        out["bytes"] = p.stat().st_size
    made_by = p / MADE_BY_FILE
    if p.is_dir() and made_by.is_file():
        try:
            out["made_by"] = json.loads(made_by.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("%s cannot be read (%s); provenance without it", made_by, exc)
    return out


def _artifact_config_and_vocab(path: str) -> tuple[dict, dict[int, str]]:
    """The artifact's config (transformers' field names) and its id -> token map, without weights."""
    fmt, p = _resolve(path)
    if fmt == GGUF:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            parsed = load_gguf_checkpoint(str(p), return_tensors=False)
        except (ValueError, KeyError, OSError) as exc:
            raise UserError(f"GGUF file {str(p)!r} cannot be read by transformers ({exc}): pass a GGUF of an "
                            "architecture transformers supports (llama, mistral, qwen2, ...)") from None
        tokens = parsed.get("tokenizer", {}).get("tokens") or []
        return parsed["config"], dict(enumerate(tokens))
    from transformers import AutoTokenizer

    config = _read_config(p)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"model folder {str(p)!r} has no tokenizer that loads ({exc}): the folder must carry its "
                        "tokenizer files") from None
    return config, {i: t for t, i in tokenizer.get_vocab().items()}


def check_artifact(path: str, name: str, parent) -> None:
    """Refuse an artifact whose architecture or vocabulary is not the parent's (``parent`` is the
    audit's :class:`harness.models.LoadedModel`); reads only metadata, loads no weights."""
    config, vocab = _artifact_config_and_vocab(path)
    mine = parent.model.config
    for key in ARCHITECTURE_FIELDS:
        theirs, ours = config.get(key), getattr(mine, key, None)
        if theirs is not None and ours is not None and theirs != ours and not (key == "model_type" and {theirs, ours} <= {"llama", "mistral"}):
            raise UserError(f"variant {name} ({path}) is not a quantization of {parent.source.spec!r}: its {key} is "
                            f"{theirs!r}, the parent's {ours!r}; audit it with its own parent as --model")
    ours_vocab = {i: t for t, i in parent.tokenizer.get_vocab().items()}
    limit = getattr(mine, "vocab_size", None) or max(ours_vocab) + 1
    differ = [i for i in sorted(set(ours_vocab) | set(vocab)) if i < limit and vocab.get(i) != ours_vocab.get(i)]
    if differ:
        i = differ[0]
        raise UserError(f"variant {name} ({path}) has another vocabulary than {parent.source.spec!r}: {len(differ)} "
                        f"token ids differ (e.g. id {i}: {vocab.get(i)!r} vs {ours_vocab.get(i)!r}); audit it with "
                        "the model it was quantized from as --model")


def load_artifact(path: str, parent, *, device: str = "cpu", dtype: str = "auto"):
    """The artifact as a :class:`harness.quantize.QuantizedVariant` with its provenance record."""
    from harness.models import ModelSource, load_model
    from harness.quantize import QuantizedVariant

    fmt, p = _resolve(path)
    source = (ModelSource(path, "gguf", str(p.resolve().parent), p.name) if fmt == GGUF
              else ModelSource(path, "folder", str(p.resolve())))
    started = time.perf_counter()
    try:
        loaded = load_model(source, device, dtype)
    except (ImportError, RuntimeError) as exc:  # a library or device the quantization needs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"variant {path!r} does not load here ({first}); formats that need a GPU: "
                        f"{', '.join(GPU_ONLY)}") from None
    _decompress(loaded.model)
    seconds = time.perf_counter() - started
    provenance = describe_artifact(path)
    info = provenance["quantization"]
    record = {"method": fmt, "scheme": info["scheme"], "options": {}, "metadata": {}, "calibration": None,
              "calibration_prompts": None, "base": None, "seconds": 0.0, "load_seconds": round(seconds, 3),
              "source_model": {"spec": parent.source.spec, "fingerprint": parent.fingerprint},
              "artifact": str(p), "provenance": provenance}
    log.info("variant %s: %s artifact, %s, sha256 %s", p.name, fmt, info["type"],
             provenance["sha256"] if isinstance(provenance["sha256"], str) else "per file")
    return QuantizedVariant(loaded.model, 0.0, record)


def _decompress(model) -> None:
    """A compressed-tensors model loads packed and decompresses on its first forward pass (a hook
    of the library); do it now, with the library's own decompression, so the weights the audit
    fingerprints and probes are the ones generation uses."""
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None and hasattr(compressor, "decompress_model"):
        compressor.decompress_model(model)
