"""Writing a llama-architecture model and its byte-level BPE tokenizer to one GGUF file.

Two users: `safequant export --format gguf` (a saved variant whose weights already lie on a
symmetric integer grid is packed into Q4_0/Q8_0 blocks that reproduce those weights, up to the
float16 block scale GGUF stores) and the tests, which make "third-party" artifacts with the
`gguf` package's own reference quantizers (the same rounding as llama.cpp's `ggml-quants.c`).

The layout follows llama.cpp's converter as transformers' GGUF loader reads it back: tensor names
from `gguf.get_tensor_name_map`, Q/K rows permuted into llama.cpp's rotary order (transformers
undoes it at load), tied embeddings as one `token_embd.weight` and no `output.weight`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.errors import UserError
from harness.grid import grid_scales, signed_range

log = logging.getLogger(__name__)

#: GGUF block size of Q4_0 and Q8_0: 32 consecutive input weights share one float16 scale.
BLOCK = 32
#: Target GGUF type -> the bits of the signed integers its blocks hold (value = d * q).
TYPE_BITS = {"Q4_0": 4, "Q8_0": 8}


@dataclass
class EncodedTensor:
    """One tensor as GGUF bytes (or plain float32) plus the GGML type name it is stored as."""

    data: np.ndarray
    type_name: str  # F32 | Q4_0 | Q8_0 | ... (quantized data is uint8, one row of blocks per weight row)


def permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Q and K rows with the two rotary halves of each head interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode_reference(weight: np.ndarray, type_name: str) -> EncodedTensor:
    """Quantize with the `gguf` package's reference quantizer (what llama.cpp's tools write)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[type_name]
    return EncodedTensor(quantize(np.ascontiguousarray(weight, dtype=np.float32), qtype), type_name)


def encode_exact(weight: np.ndarray, bits: int, group: int | None) -> tuple[EncodedTensor, float]:
    """Pack weights that lie on a symmetric ``bits``-bit grid into Q4_0 (bits <= 4) or Q8_0 blocks
    holding the same values; returns the tensor and the largest relative error the float16 block
    scale introduces (|w - w'| / max|w| of the row)."""
    rows, cols = weight.shape
    type_name = "Q4_0" if bits <= 4 else "Q8_0"
    group = cols if group is None else group
    if cols % BLOCK or group % BLOCK:
        raise ValueError(f"{cols} input columns in groups of {group} do not fill GGUF's {BLOCK}-weight blocks")
    scales = np.repeat(grid_scales(weight, group, TYPE_BITS[type_name]), group // BLOCK, axis=-1)  # per block
    blocks = weight.astype(np.float64).reshape(rows, cols // BLOCK, BLOCK)
    d16 = scales.astype(np.float16)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    q = np.rint(blocks / safe).astype(np.int16)
    q = np.clip(q, *signed_range(TYPE_BITS[type_name]))
    restored = d16.astype(np.float64)[..., None] * q
    row_max = np.abs(weight).max(axis=1).astype(np.float64)
    error = float((np.abs(restored - blocks).reshape(rows, -1).max(axis=1) / np.where(row_max == 0, 1, row_max)).max())
    d_bytes = d16.reshape(-1, 1).view(np.uint8)
    if type_name == "Q8_0":
        q_bytes = q.reshape(-1, BLOCK).astype(np.int8).view(np.uint8)
    else:  # nibbles: element j in the low half of byte j, element j+16 in its high half
        u = (q.reshape(-1, BLOCK) + 8).astype(np.uint8)
        q_bytes = u[:, : BLOCK // 2] | (u[:, BLOCK // 2 :] << np.uint8(4))
    data = np.concatenate([d_bytes, q_bytes], axis=1).reshape(rows, -1)
    return EncodedTensor(np.ascontiguousarray(data), type_name), error


def float_tensor(tensor: torch.Tensor) -> EncodedTensor:
    return EncodedTensor(tensor.detach().to(torch.float32).cpu().numpy(), "F32")


def _tokenizer_definition(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("the model's tokenizer is not a fast (tokenizers) tokenizer: only byte-level BPE "
                        "tokenizers can be written to GGUF here; export with --format hf")
    definition = json.loads(backend.to_str())
    model = definition.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(definition.get("pre_tokenizer")):
        raise UserError(f"the model's tokenizer is {model.get('type')!r} without a byte-level pre-tokenizer: only "
                        "byte-level BPE tokenizers (GPT-2 style) can be written to GGUF here; export with --format hf")
    return definition


def _pre_tokenizer_name(definition: dict) -> str:
    """llama.cpp's name for the split regex of this tokenizer, so the loader splits text the same way."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers: GPT-2's own regex
        return "default"
    text = json.dumps(definition.get("pre_tokenizer"))
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if json.dumps(regex)[1:-1] in text:
            return name
    return "default"


def add_tokenizer(writer, tokenizer) -> None:
    """Vocabulary, merges, special ids and chat template as llama.cpp's `gpt2` tokenizer keys."""
    definition = _tokenizer_definition(tokenizer)
    vocab = dict(definition["model"]["vocab"])
    special = {}
    for added in definition.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
        if added.get("special"):
            special[added["id"]] = added["content"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in definition["model"].get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(definition))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(size)])  # 3: CONTROL, 1: NORMAL
    writer.add_token_merges(merges)
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, key, None)
        if isinstance(value, int):
            setter(value)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def check_writable_architecture(model: nn.Module) -> None:
    """Only llama-architecture decoders (the bundled models, SmolLM2, Llama, Mistral-style) are written."""
    config = model.config
    if config.model_type != "llama":
        raise UserError(f"GGUF export writes llama-architecture models; this one is {config.model_type!r}: "
                        "export with --format hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export of llama models with attention or MLP biases is not supported: export with --format hf")


def write_llama_gguf(model: nn.Module, tokenizer, path: str | os.PathLike,
                     encode: Callable[[str, torch.Tensor], EncodedTensor], *, name: str = "safequant") -> dict[str, str]:
    """Write ``model`` (llama architecture) and ``tokenizer`` to ``path``; ``encode(hf_name, tensor)``
    decides how each tensor is stored. Returns ``{gguf_name: type}``. Writes to ``path`` directly:
    callers write into a temporary folder and rename."""
    from gguf import GGMLQuantizationType, GGUFWriter, MODEL_ARCH, get_tensor_name_map

    check_writable_architecture(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    add_tokenizer(writer, tokenizer)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    types: dict[str, str] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            if "rotary_emb" in hf_name:
                continue
            raise UserError(f"tensor {hf_name!r} has no GGUF name for the llama architecture: export with --format hf")
        encoded = encode(hf_name, _gguf_order(hf_name, tensor, config))
        writer.add_tensor(gguf_name, encoded.data,
                          raw_dtype=None if encoded.type_name == "F32" else GGMLQuantizationType[encoded.type_name])
        types[gguf_name] = encoded.type_name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def _gguf_order(hf_name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """Q and K projections in llama.cpp's row order; every other tensor as it is."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return torch.from_numpy(permute_for_gguf(tensor.detach().float().cpu().numpy(), config.num_attention_heads))
    if hf_name.endswith("self_attn.k_proj.weight"):
        return torch.from_numpy(permute_for_gguf(tensor.detach().float().cpu().numpy(), config.num_key_value_heads))
    return tensor


def reference_encoder(type_name: str) -> Callable[[str, torch.Tensor], EncodedTensor]:
    """An ``encode`` for :func:`write_llama_gguf` that quantizes every 2-D projection (not the
    embeddings) with the gguf package's reference ``type_name`` quantizer, as llama.cpp's
    `llama-quantize --pure` would; norms and embeddings stay float32."""
    def encode(hf_name: str, tensor: torch.Tensor) -> EncodedTensor:
        if tensor.dim() == 2 and "embed_tokens" not in hf_name and hf_name != "lm_head.weight":
            return encode_reference(tensor.detach().float().cpu().numpy(), type_name)
        return float_tensor(tensor)
    return encode


def write_reference_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, type_name: str) -> Path:
    """A GGUF of ``model`` quantized by the gguf package (Q8_0, Q4_0, ...): a third-party artifact."""
    write_llama_gguf(model, tokenizer, path, reference_encoder(type_name), name=f"{type_name} by gguf")
    return Path(path)
