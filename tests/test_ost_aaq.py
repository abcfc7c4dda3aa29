"""OST (learned rotations + scales, KL-top) and AAQ (the same + contrastive loss) on the real toy
pair: toy-chat (FT, aligned) and toy-base (PT, its unaligned parent). Few steps on short windows
so that the default run stays fast; the full recipe runs in bench/ and the slow test."""

import copy
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.models import load_model
from harness.perplexity import PerplexitySettings, load_text, perplexity
from quantizers import QuantContext, QuantizerError, build_quantizer, iter_quant_linears
from quantizers.transforms import OnlineHadamard


@pytest.fixture(scope="module")
def toy_base():
    return load_model("toy-base", device="cpu")


@pytest.fixture(scope="module")
def batches(toy_chat):
    """Four batches of 2 x 64 tokens of held-out-style text (real tokens, not random ids)."""
    ids = toy_chat.tokenizer(load_text("toy-heldout")[:8000], return_tensors="pt", verbose=False)["input_ids"][0]
    return [ids[i * 128:(i + 1) * 128].reshape(2, 64) for i in range(4)]


def _ctx(toy_chat, batches, base=None):
    return QuantContext(tokenizer=toy_chat.tokenizer, calibration_batches=batches,
                        reference_model=toy_chat.model, base_model=base, seed=0)


def test_ost_training_reduces_kl_top(toy_chat, batches, one_thread):
    model = copy.deepcopy(toy_chat.model)
    q = build_quantizer("ost", {"steps": 8, "max_batches": 1, "weights": "rtn", "lr_rotation": 0.005})
    q.apply(model, "w4a4kv4", _ctx(toy_chat, batches))
    curve = q.metadata["calibration"]["curves"]["kl_top"]
    assert len(curve) == 8
    assert curve[-1] < 0.9 * curve[0]
    assert q.metadata["transforms"]["orthogonality_error"] < 1e-4
    # the reference model was not touched
    assert not any(True for _ in iter_quant_linears(toy_chat.model))
    assert toy_chat.model.lm_head.weight is toy_chat.model.model.embed_tokens.weight


def test_aaq_end_to_end_on_the_toy_pair(toy_chat, toy_base, batches, one_thread):
    model = copy.deepcopy(toy_chat.model)
    q = build_quantizer("aaq", {"steps": 4, "weights": "gptq"})
    q.apply(model, "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))
    cal = q.metadata["calibration"]
    assert cal["steps_run"] == 4 and cal["stopped_early"] is None
    for term in ("loss", "pull", "push"):
        assert len(cal["curves"][term]) == 4
    for loss, pull, push in zip(cal["curves"]["loss"], cal["curves"]["pull"], cal["curves"]["push"]):
        assert loss == pytest.approx(pull - 0.75 * push, abs=1e-4)
        assert pull >= 0 and push > 0
    assert q.metadata["weights"]["method"] == "gptq"
    linears = dict(iter_quant_linears(model))
    assert len(linears) == 4 * 7 and all(m.a_bits == 4 and m.w_bits == 4 for m in linears.values())
    assert isinstance(linears["model.layers.0.mlp.down_proj"].input_transform, OnlineHadamard)
    assert model.model.layers[0].self_attn.safequant_kv.bits == 4
    with torch.no_grad():
        out = model(batches[0]).logits
    assert torch.isfinite(out).all()
    ppl = perplexity(model, toy_chat.tokenizer, load_text("toy-heldout"), PerplexitySettings(max_tokens=2048),
                     progress=False)["perplexity"]
    assert ppl < 1000


def test_aaq_guard_stops_a_diverging_push(toy_chat, toy_base, batches, one_thread):
    opts = {"steps": 6, "max_batches": 1, "weights": "rtn", "alpha": 5.0, "lr_rotation": 0.3,
            "lr_scale": 0.3, "guard_factor": 1.05}
    q = build_quantizer("aaq", opts)
    q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))
    # pushing too hard shows first in the pull term (the model leaves FT) or in push itself
    assert re.search(r"(push|pull) term diverged", q.metadata["stopped_early"])
    assert q.metadata["calibration"]["steps_run"] < 6
    with pytest.raises(QuantizerError, match=r"(push|pull) term diverged"):
        build_quantizer("aaq", {**opts, "guard_action": "error"}).apply(
            copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, toy_base.model))


def test_aaq_rejects_a_base_model_with_another_vocabulary(toy_chat, batches):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(QuantizerError, match="vocabulary differs"):
        build_quantizer("aaq").apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches, other))
    with pytest.raises(QuantizerError, match="needs the unaligned base model"):
        build_quantizer("aaq").apply(copy.deepcopy(toy_chat.model), "w4a4kv4", _ctx(toy_chat, batches))


def test_ost_rejects_weight_only_schemes_and_bad_options(toy_chat, batches):
    with pytest.raises(QuantizerError, match="quantizes neither"):
        build_quantizer("ost").apply(copy.deepcopy(toy_chat.model), "w4a16", _ctx(toy_chat, batches))
    with pytest.raises(QuantizerError, match="nothing to learn"):
        build_quantizer("ost", {"learn_r1": "false", "learn_r2": "false", "learn_scales": "false"})
    with pytest.raises(QuantizerError, match="alpha"):
        build_quantizer("aaq", {"alpha": "-1"})
