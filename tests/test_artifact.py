"""Saved variants: save -> load reproduces the in-memory variant's logits without re-calibrating."""

import copy
import json

import pytest
import torch
from torch import nn

from quantizers import QuantContext, QuantizerError, build_quantizer
from quantizers.artifact import is_variant_dir, load_variant, read_variant_info, save_variant
from quantizers.modules import OnlineTransform, iter_quant_linears, register_online_transform


@register_online_transform
class SignFlip(OnlineTransform):
    """A random +-1 per feature (orthogonal); its signs live in a buffer, so they are saved."""

    kind = "test-sign-flip"

    def __init__(self, size: int, seed: int | None = None):
        super().__init__()
        signs = torch.ones(size)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (size,), generator=g).float() * 2 - 1
        self.register_buffer("signs", signs)

    def spec(self) -> dict:
        return {"kind": self.kind, "size": int(self.signs.numel())}

    def forward(self, x):
        return x * self.signs.to(x.dtype)


def _save(model, tokenizer, path, scheme="w4a4kv4"):
    from quantizers import QuantScheme

    return save_variant(model, path, tokenizer=tokenizer, method="rtn", scheme=QuantScheme.parse(scheme),
                        options={}, metadata={"note": "test"}, source={"fingerprint": "x"})


def test_saved_variant_reproduces_logits_including_kv_and_online_transforms(toy_chat, tmp_path, one_thread):
    model = build_quantizer("rtn").apply(copy.deepcopy(toy_chat.model), "w4a4kv4", QuantContext())
    down = model.model.layers[1].mlp.down_proj
    down.input_transform = SignFlip(down.in_features, seed=3)
    out = _save(model, toy_chat.tokenizer, tmp_path / "v")
    assert is_variant_dir(out) and not list(tmp_path.glob(".v.*"))  # no temp folder left behind
    loaded, tokenizer, info = load_variant(out)
    assert info["method"] == "rtn" and info["scheme"] == "w4a4kv4" and info["metadata"] == {"note": "test"}
    assert isinstance(loaded.model.layers[1].mlp.down_proj.input_transform, SignFlip)
    assert len(list(iter_quant_linears(loaded))) == len(list(iter_quant_linears(model)))
    ids = toy_chat.tokenizer("How do I sort a list in Python?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        # KV quantization really is active in the loaded copy: switching it off changes the logits
        loaded.model.layers[0].self_attn.safequant_kv = type(loaded.model.layers[0].self_attn.safequant_kv)()
        assert not torch.equal(model(ids).logits, loaded(ids).logits)
    assert tokenizer.chat_template == toy_chat.tokenizer.chat_template


def test_existing_folder_is_refused_and_bad_folders_are_clear_errors(toy_chat, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(QuantizerError, match="already exists"):
        _save(toy_chat.model, toy_chat.tokenizer, tmp_path / "taken")
    with pytest.raises(QuantizerError, match="not a saved variant"):
        read_variant_info(tmp_path / "taken")
    (tmp_path / "taken" / "variant.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(QuantizerError, match="format version 99"):
        read_variant_info(tmp_path / "taken")


def test_tied_embeddings_survive_save_and_load(toy_chat, tmp_path, one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(toy_chat.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = build_quantizer("rtn").apply(LlamaForCausalLM(config).eval(), "w4a8", QuantContext())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded, _, _ = load_variant(_save(model, toy_chat.tokenizer, tmp_path / "tied", "w4a8"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_quarot_variant_with_online_hadamards_round_trips(toy_chat, tmp_path, one_thread):
    from quantizers import QuantScheme

    model = build_quantizer("quarot", {"weights": "rtn"}).apply(copy.deepcopy(toy_chat.model), "w4a4kv4", QuantContext())
    attn = model.model.layers[0].self_attn
    assert getattr(attn, "safequant_qk_transform", None) is not None
    out = save_variant(model, tmp_path / "quarot", tokenizer=toy_chat.tokenizer, method="quarot",
                       scheme=QuantScheme.parse("w4a4kv4"), options={"weights": "rtn"},
                       source={"spec": "toy-chat", "fingerprint": toy_chat.fingerprint})
    loaded, _, _ = load_variant(out)
    ids = toy_chat.tokenizer("Write a haiku about the sea.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_fresh_process_loads_a_saved_quarot_variant(toy_chat, tmp_path, one_thread):
    """A program that only calls load_variant (a bench, a notebook) has imported no quantizer module,
    so the built-in online Hadamard kind was not registered yet: loading must not depend on that."""
    import subprocess
    import sys

    from quantizers import QuantScheme

    model = build_quantizer("quarot", {"weights": "rtn"}).apply(copy.deepcopy(toy_chat.model), "w4a4kv4", QuantContext())
    out = save_variant(model, tmp_path / "quarot", tokenizer=toy_chat.tokenizer, method="quarot",
                       scheme=QuantScheme.parse("w4a4kv4"), options={"weights": "rtn"},
                       source={"spec": "toy-chat", "fingerprint": toy_chat.fingerprint})
    code = ("import sys; from quantizers.artifact import load_variant; "
            "m, _, _ = load_variant(sys.argv[1]); "
            "print(sum(getattr(x, 'input_transform', None) is not None for x in m.modules()))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) > 0
