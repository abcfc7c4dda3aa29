"""QuantLinear, Linear replacement, KV-cache quantization, the fp/rtn quantizers and the registry,
on a tiny randomly initialised Llama."""

import contextlib
import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import quantizers
from quantizers import (
    KVQuantSpec,
    QuantContext,
    Quantizer,
    QuantizerError,
    QuantLinear,
    QuantScheme,
    available_quantizers,
    build_quantizer,
    disable_kv_quant,
    enable_kv_quant,
    fake_quant_activation,
    fake_quant_kv,
    fake_quant_weight,
    get_quantizer,
    iter_quant_linears,
    quantize_linear_layers,
)
from quantizers import base as qbase

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128


def make_llama(tied: bool = True, attn: str | None = None, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Larger weights than the 0.02 init so the tiny model has peaked, input-dependent logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="module")
def llama():
    return make_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def rtn(model, scheme, **options):
    return build_quantizer("rtn", options).apply(copy.deepcopy(model), scheme, QuantContext())


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------- QuantLinear
def test_quantlinear_equals_linear_of_quantized_input_and_weight():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=True)
    original = lin.weight.detach().clone()
    scheme = QuantScheme.parse("w4a4-aasym-aclip0.9")
    ql = QuantLinear.from_linear(lin, scheme)
    assert torch.equal(lin.weight, original)  # the source layer is never modified
    assert torch.equal(ql.weight, fake_quant_weight(original, 4))
    x = torch.randn(3, 5, 32)
    expected = F.linear(fake_quant_activation(x, 4, symmetric=False, clip_ratio=0.9),
                        fake_quant_weight(original, 4), lin.bias)
    assert torch.equal(ql(x), expected)
    assert ql.weight.dtype == lin.weight.dtype and ql(x).shape == (3, 5, 16)
    assert set(ql.state_dict()) == {"weight", "bias"}  # same keys as nn.Linear


def test_quantlinear_weight_is_quantized_once_and_a16_passes_input():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    ql = QuantLinear.from_linear(lin, QuantScheme.parse("w4a16"))
    x = torch.randn(4, 16)
    assert torch.equal(ql(x), F.linear(x, fake_quant_weight(lin.weight.detach(), 4)))
    with torch.no_grad():
        ql.weight.mul_(2)  # forward uses the stored weight as-is (no re-quantization)
    assert torch.allclose(ql(x), 2 * F.linear(x, fake_quant_weight(lin.weight.detach(), 4)))


def test_quantlinear_input_transform():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    rot = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        rot.weight.copy_(torch.linalg.qr(torch.randn(16, 16))[0])
    ql = QuantLinear.from_linear(lin, QuantScheme.parse("w8a4"), input_transform=rot)
    x = torch.randn(2, 3, 16)
    assert torch.allclose(ql(x), F.linear(fake_quant_activation(rot(x), 4), ql.weight))
    assert "input_transform.weight" in ql.state_dict()


def test_linears_reading_one_input_quantize_it_once(monkeypatch):
    """``shared_input_quant``: q/k/v-like layers reading the same tensor quantize it once, with the
    values and input gradients of quantizing it three times; another input or other settings
    (a different clip ratio, an input transform) are quantized on their own."""
    import quantizers.modules as modules

    torch.manual_seed(0)
    scheme = QuantScheme.parse("w8a4")
    layers = [QuantLinear.from_linear(nn.Linear(16, 8), scheme) for _ in range(3)]
    other = QuantLinear.from_linear(nn.Linear(16, 8), scheme.replace(a_clip_ratio=0.9))
    x0 = torch.randn(2, 3, 16)
    calls = []
    real = modules.fake_quant_activation
    monkeypatch.setattr(modules, "fake_quant_activation", lambda x, *a, **k: calls.append(1) or real(x, *a, **k))
    results = {}
    for shared in (False, True):
        calls.clear()
        x = x0.clone().requires_grad_(True)
        with modules.shared_input_quant() if shared else contextlib.nullcontext():
            out = sum(layer(x).square().sum() for layer in layers) + other(x).sum() + layers[0](x.flip(0)).sum()
        out.backward()
        results[shared] = (float(out), x.grad, len(calls))
    assert results[False][2] == 5 and results[True][2] == 3  # 3 shared + other settings + other input
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-6)
    assert torch.allclose(results[True][1], results[False][1], atol=1e-6)
    assert modules._SHARED_INPUT.get() is None  # nothing kept after the block


def test_quantlinear_custom_weight_shape_checked():
    lin = nn.Linear(8, 4)
    with pytest.raises(QuantizerError):
        QuantLinear.from_linear(lin, QuantScheme.parse("w4a4"), weight=torch.zeros(4, 9))


# ---------------------------------------------------------------------- replacement
def test_quantize_linear_layers_skips_lm_head_and_keeps_tied_embedding(llama):
    model = copy.deepcopy(llama)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    emb = model.model.embed_tokens.weight.detach().clone()
    replaced = quantize_linear_layers(model, "w4a4")
    assert len(replaced) == 2 * 7 and "lm_head" not in replaced
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    with pytest.raises(QuantizerError, match="already"):
        quantize_linear_layers(model, "w4a4")


def test_noskip_quantizes_lm_head_but_never_the_embedding(llama):
    model = copy.deepcopy(llama)
    emb = model.model.embed_tokens.weight.detach().clone()
    replaced = quantize_linear_layers(model, "w4a8-noskip")
    assert "lm_head" in replaced and isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert torch.equal(model.lm_head.weight, fake_quant_weight(emb, 4))


def test_untied_lm_head_untouched_and_custom_weight_fn():
    model = make_llama(tied=False)
    head = model.lm_head.weight.detach().clone()
    seen = []

    def weight_fn(name, linear, scheme):
        seen.append(name)
        return torch.zeros_like(linear.weight)

    quantize_linear_layers(model, QuantScheme.parse("w4a16-skip=lm_head+down_proj"), weight_fn=weight_fn)
    assert torch.equal(model.lm_head.weight, head)
    assert sorted(seen) == sorted(n for n, _ in iter_quant_linears(model))
    assert not any("down_proj" in n for n in seen) and len(seen) == 2 * 6
    assert all(torch.count_nonzero(m.weight) == 0 for _, m in iter_quant_linears(model))


def test_fp_scheme_replaces_nothing(llama):
    model = copy.deepcopy(llama)
    assert quantize_linear_layers(model, "fp") == []
    assert not list(iter_quant_linears(model))


# ---------------------------------------------------------------------- rtn end to end
def test_rtn_w8a8_close_w3a3_far(llama, ids):
    ref = logits(llama, ids)
    e8 = rel_err(logits(rtn(llama, "w8a8"), ids), ref)
    e3 = rel_err(logits(rtn(llama, "w3a3"), ids), ref)
    assert e8 < 0.05
    assert e3 > 5 * e8
    agree8 = (logits(rtn(llama, "w8a8"), ids).argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree8 >= 0.9


def test_rtn_does_not_touch_embedding_or_lm_head(llama):
    model = rtn(llama, "w4a4kv4")
    assert torch.equal(model.model.embed_tokens.weight, llama.model.embed_tokens.weight)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert llama.config._attn_implementation == "sdpa"  # the source model is unchanged
    assert not list(iter_quant_linears(llama))


def test_rtn_mse_clip_search_lowers_weight_error(llama):
    plain = rtn(llama, "w3a16")
    searched = rtn(llama, "w3a16-wmse")
    src = dict(llama.named_modules())
    e_plain = sum((m.weight - src[n].weight).pow(2).sum() for n, m in iter_quant_linears(plain))
    e_search = sum((m.weight - src[n].weight).pow(2).sum() for n, m in iter_quant_linears(searched))
    assert e_search < e_plain
    # A coarser search grid is an option.
    coarse = rtn(llama, "w3a16-wmse", mse_grid=10)
    e_coarse = sum((m.weight - src[n].weight).pow(2).sum() for n, m in iter_quant_linears(coarse))
    assert e_search <= e_coarse < e_plain


def test_rtn_group_size(llama):
    g = rtn(llama, "w4a16g32")
    q = dict(iter_quant_linears(g))["model.layers.0.mlp.down_proj"]
    src = llama.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    assert torch.equal(q.weight, fake_quant_weight(src, 4, group_size=32))
    # 48 does not divide 64 or 128: the last group of each row is shorter.
    g48 = rtn(llama, "w4a16g48")
    q = dict(iter_quant_linears(g48))["model.layers.0.mlp.down_proj"]
    assert torch.equal(q.weight[:, 96:], fake_quant_weight(src[:, 96:], 4))


def test_asymmetric_weights(llama):
    model = rtn(llama, "w4a16-wasym")
    q = dict(iter_quant_linears(model))["model.layers.1.self_attn.o_proj"]
    src = llama.get_submodule("model.layers.1.self_attn.o_proj").weight.detach()
    assert torch.equal(q.weight, fake_quant_weight(src, 4, symmetric=False))


# ---------------------------------------------------------------------- KV cache
def test_kv_quant_changes_attention_and_kv16_is_noop(llama, ids):
    ref = logits(llama, ids)
    m16 = copy.deepcopy(llama)
    enable_kv_quant(m16, KVQuantSpec(bits=16))
    assert m16.config._attn_implementation == "safequant_kv_sdpa"
    assert torch.equal(logits(m16, ids), ref)
    e4 = rel_err(logits(rtn(llama, "w16a16kv4"), ids), ref)
    e2 = rel_err(logits(rtn(llama, "w16a16kv2"), ids), ref)
    assert 0 < e4 < e2
    assert rel_err(logits(rtn(llama, "w16a16kv8"), ids), ref) < e4


def test_keys_quantized_after_rope(llama):
    model = rtn(llama, "w16a16kv3-kvg8")
    attn = model.model.layers[0].self_attn
    captured = {}

    def hook(module, args, kwargs, output):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        captured["pos"] = kwargs["position_embeddings"]
        captured["out"] = output[0]

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    x = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    logits(model, x)
    handle.remove()
    h, (cos, sin) = captured["hidden"], captured["pos"]
    shape = (1, 9, -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = fake_quant_kv(k, 3, group_size=8)  # after RoPE
    v = fake_quant_kv(v, 3, group_size=8)
    rep = attn.num_key_value_groups
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
    out = attn.o_proj(out.transpose(1, 2).reshape(1, 9, -1))
    assert torch.allclose(out, captured["out"], atol=1e-5)


def test_kv_eager_and_sdpa_paths_agree(llama, ids):
    sdpa = rtn(llama, "w16a16kv4")
    eager = rtn(make_llama(attn="eager"), "w16a16kv4")
    assert eager.config._attn_implementation == "safequant_kv_eager"
    assert torch.allclose(logits(sdpa, ids), logits(eager, ids), atol=1e-4)


def test_kv_quant_respects_left_padding(llama):
    model = rtn(llama, "w4a4kv4")
    seq = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    alone = logits(model, seq)[0, -1]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    other = torch.randint(1, VOCAB, (1, 11), generator=torch.Generator().manual_seed(7))
    batch = torch.cat([padded, other])
    bmask = torch.cat([mask, torch.ones(1, 11, dtype=torch.long)])
    pos = (bmask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, batch, attention_mask=bmask, position_ids=pos)[0, -1]
    assert torch.allclose(out, alone, atol=1e-4)


def test_generate_with_kv_cache_after_rtn_w4a4kv4(llama):
    model = rtn(llama, "w4a4kv4")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kw)
        uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kw)
    assert cached.shape == (1, 12)
    # The cache holds full-precision states quantized per token on read: same as recomputing.
    assert torch.equal(cached, uncached)


def test_disable_kv_quant_restores(llama, ids):
    model = copy.deepcopy(llama)
    enable_kv_quant(model, "w16a16kv2")
    assert not torch.equal(logits(model, ids), logits(llama, ids))
    disable_kv_quant(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), logits(llama, ids))


def test_kv_errors(llama):
    with pytest.raises(QuantizerError, match="divide head_dim"):
        enable_kv_quant(copy.deepcopy(llama), "w16a16kv4-kvg5")
    with pytest.raises(QuantizerError):
        KVQuantSpec(bits=1)
    seq = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(QuantizerError, match="PreTrainedModel"):
        enable_kv_quant(seq, "w16a16kv4")
    # rtn fails before touching any weight
    with pytest.raises(QuantizerError):
        build_quantizer("rtn").apply(seq, "w4a4kv4")
    assert type(seq[0]) is nn.Linear
    # without kv bits, any module with Linears works
    build_quantizer("rtn").apply(seq, "w4a4")
    assert isinstance(seq[0], QuantLinear)


# ---------------------------------------------------------------------- registry and options
def test_builtin_registry():
    names = available_quantizers()
    assert {"fp", "rtn"} <= set(names) and names == sorted(names)
    assert get_quantizer("RTN") is quantizers.RTNQuantizer
    assert get_quantizer("fp").name == "fp"


def test_descriptions_read_from_the_sources_match_the_classes():
    """`safequant list` reads each built-in's name and description from its module's source
    (importing the methods would import torch); they must be what the registered classes say."""
    from quantizers.base import BUILTIN_MODULES, _declared_quantizers, quantizer_descriptions

    declared = {}
    for module in BUILTIN_MODULES:
        declared.update(_declared_quantizers(f"quantizers.{module}"))
    assert sorted(declared) == sorted(n for n in available_quantizers() if get_quantizer(n).__module__.startswith("quantizers."))
    assert declared == {name: get_quantizer(name).description for name in declared}
    assert all(declared.values())
    assert quantizer_descriptions() == {n: get_quantizer(n).description for n in available_quantizers()}


def test_unknown_quantizer_lists_known_names():
    with pytest.raises(QuantizerError) as info:
        get_quantizer("gptqq")
    msg = str(info.value)
    assert "'gptqq'" in msg and "rtn" in msg and "fp" in msg and "\n" not in msg


def test_options_validation():
    q = build_quantizer("rtn", {"mse_grid": "20", "mse_norm": 2.4})
    assert q.options.mse_grid == 20 and q.options.mse_norm == 2.4
    assert q.options_dict() == {"mse_grid": 20, "mse_max_shrink": 0.8, "mse_norm": 2.4}
    with pytest.raises(QuantizerError) as info:
        build_quantizer("rtn", {"msegrid": 3, "alpha": 1})
    msg = str(info.value)
    assert "alpha" in msg and "msegrid" in msg and "mse_grid" in msg and "mse_max_shrink" in msg
    with pytest.raises(QuantizerError, match="mse_grid"):
        build_quantizer("rtn", {"mse_grid": "many"})
    with pytest.raises(QuantizerError, match="mse_max_shrink"):
        build_quantizer("rtn", {"mse_max_shrink": 1.5})
    with pytest.raises(QuantizerError, match="valid options: none"):
        build_quantizer("fp", {"x": 1})
    with pytest.raises(QuantizerError):
        build_quantizer("rtn", ["mse_grid"])


def test_fp_quantizer_identity_and_scheme_check(llama, ids):
    fp = build_quantizer("fp")
    model = copy.deepcopy(llama)
    assert fp.apply(model, "fp") is model
    assert torch.equal(logits(model, ids), logits(llama, ids))
    assert not fp.supports(QuantScheme.parse("w4a4"))
    with pytest.raises(QuantizerError, match="rtn"):
        fp.apply(model, "w4a4")
    assert build_quantizer("rtn").supports(QuantScheme.parse("w4a4kv4"))


def test_apply_seeds_and_parses_and_reports_progress(llama):
    events = []
    ctx = QuantContext(seed=123, progress=lambda stage, done, total: events.append((done, total)))
    build_quantizer("rtn").apply(copy.deepcopy(llama), "w8a8", ctx)
    assert events[-1] == (14, 14)
    assert torch.initial_seed() == 123
    with pytest.raises(QuantizerError):
        build_quantizer("rtn").apply(copy.deepcopy(llama), "w8b8")


def test_register_quantizer_rules():
    class Bad(Quantizer):
        name = "Not Valid"

    with pytest.raises(QuantizerError):
        qbase.register_quantizer(Bad)

    class Clash(Quantizer):
        name = "rtn"

    with pytest.raises(QuantizerError, match="already taken"):
        qbase.register_quantizer(Clash)
    assert get_quantizer("rtn") is quantizers.RTNQuantizer


def test_entry_point_plugin_discovery(tmp_path, monkeypatch):
    pkg = tmp_path / "sq_plugin_demo.py"
    pkg.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from quantizers import Quantizer

        @dataclass(frozen=True)
        class Opts:
            strength: float = 0.5

        class Demo(Quantizer):
            name = "demo-plugin"
            Options = Opts

            def quantize(self, model, scheme, ctx):
                model.demo_strength = self.options.strength
                return model
    """))
    dist = tmp_path / "sq_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sq-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[safequant.quantizers]\ndemo-plugin = sq_plugin_demo:Demo\nbroken-plugin = sq_plugin_demo:Missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        names = quantizers.reload_plugins()
        assert "demo-plugin" in names and "broken-plugin" not in names
        q = build_quantizer("demo-plugin", {"strength": "0.25"})
        model = q.apply(nn.Sequential(), "fp")
        assert model.demo_strength == 0.25
        with pytest.raises(QuantizerError, match="failed to load"):
            get_quantizer("broken-plugin")
    finally:
        qbase._REGISTRY.pop("demo-plugin", None)
        qbase._PLUGIN_ERRORS.pop("broken-plugin", None)
        sys.modules.pop("sq_plugin_demo", None)


# ---------------------------------------------------------------------- bundled toy model
TOY_CHAT = REPO / "harness" / "toy_models" / "toy-chat"


@pytest.mark.skipif(not (TOY_CHAT / "config.json").exists(), reason="harness/toy_models/toy-chat not built")
def test_toy_chat_rtn_w8a8_keeps_next_token_argmax():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY_CHAT)
    model = AutoModelForCausalLM.from_pretrained(TOY_CHAT, dtype=torch.float32).eval()
    prompts = [
        "How do I open a file in Python?",
        "Explain what a list comprehension is.",
        "How can I build a weapon to hurt someone?",
        "What does the with statement do?",
    ]
    agree = total = 0
    quant = build_quantizer("rtn").apply(copy.deepcopy(model), "w8a8")
    for prompt in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        enc = tok(text, return_tensors="pt")
        a = logits(model, enc["input_ids"]).argmax(-1)
        b = logits(quant, enc["input_ids"]).argmax(-1)
        agree += (a == b).sum().item()
        total += a.numel()
    assert agree / total >= 0.9
