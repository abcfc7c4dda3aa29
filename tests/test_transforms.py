"""Function-preserving transforms (quantizers/transforms.py), SmoothQuant and QuaRot on real models.

The equivalence tests use random, far-from-identity rotations and scales: any wrong transpose,
head grouping, rotary pairing or bias handling moves the logits by O(1), far above the tolerance.
"""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from harness.calibration_data import CalibrationSpec, load_calibration
from harness.perplexity import PerplexitySettings, load_text, perplexity
from quantizers import QuantContext, QuantizerError, build_quantizer, iter_quant_linears
from quantizers.calibration import input_channel_absmax
from quantizers.modules import KVQuantSpec, enable_kv_quant, online_transform_from_spec, quantize_linear_layers
from quantizers.smoothquant import smoothing_scales
from quantizers.transforms import (
    ChainBuilder,
    OnlineHadamard,
    Rotation,
    Scale,
    attach_chains,
    column_factor,
    detach_chains,
    fold_rmsnorms,
    fuse_chains,
    install_online_hadamards,
    model_parts,
    random_orthogonal,
    rotation_chains,
    scale_sites,
    site_chains,
)


def _transform_everything(model, generator, *, online_down=False, online_qk=False, online_o=False):
    """Fold norms, random R1/R2, random scales on every site (and online Hadamards), fused."""
    dtype = next(model.parameters()).dtype
    parts = model_parts(model)
    fold_rmsnorms(parts)
    builder = ChainBuilder()
    r1 = Rotation(random_orthogonal(parts.hidden, generator, dtype))
    r2 = [Rotation(random_orthogonal(parts.head_dim, generator, dtype)) for _ in parts.layers]
    rotation_chains(parts, builder, r1=r1, r2=r2)
    sites = scale_sites(parts)
    scales = {s.name: Scale(init=torch.rand(s.size, generator=generator, dtype=torch.float64) * 1.5 + 0.5) for s in sites}
    site_chains(sites, scales, builder)
    down = list(range(len(parts.layers))) if online_down else []
    o_layers = list(range(len(parts.layers))) if online_o else []
    online = install_online_hadamards(parts, builder, down_layers=down, qk=online_qk, generator=generator,
                                      o_layers=o_layers)
    fuse_chains(builder.chains())
    return online


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_transforms_keep_toy_chat_logits(toy_chat, dtype, one_thread):
    ref = copy.deepcopy(toy_chat.model).to(dtype)
    model = copy.deepcopy(ref)
    ids = torch.randint(5, toy_chat.model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    _transform_everything(model, torch.Generator().manual_seed(0))
    # the transforms really changed the weights, and untied the tied head
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids).logits
    # RMSNorm and RoPE compute in float32 inside transformers, so fp64 is not tighter than this
    assert (expected - got).abs().max() < 1e-4 * expected.abs().max()


@pytest.fixture
def tiny_gqa():
    """A random Llama with GQA (2 KV heads for 4 query heads), biases everywhere, a hidden size
    that is not a power of two (48 = 3 x 16) and a tied head; norms and biases made non-trivial."""
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_fused_transforms_keep_gqa_logits_with_online_hadamards(tiny_gqa, one_thread):
    ref = copy.deepcopy(tiny_gqa)
    model = tiny_gqa
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    online = _transform_everything(model, torch.Generator().manual_seed(0), online_down=True, online_qk=True,
                                   online_o=True)
    # install the down_proj and o_proj Hadamards as QuantLinear input transforms (activations at 16 bits)
    replaced = quantize_linear_layers(model, "w16a8-skip=lm_head+q_proj+k_proj+v_proj+gate_proj+up_proj",
                                      input_transforms=online)
    assert sorted(replaced) == sorted(online)
    for _, module in iter_quant_linears(model):
        module.a_bits = 16
    enable_kv_quant(model, KVQuantSpec(bits=16))  # routes attention through the Q/K transform hook
    assert isinstance(model.model.layers[0].self_attn.safequant_qk_transform, OnlineHadamard)
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids).logits
    assert (expected - got).abs().max() < 1e-5 * expected.abs().max()
    assert model.config.tie_word_embeddings is False


@pytest.mark.parametrize("size", [64, 48, 576, 1536])
def test_online_hadamard_is_orthogonal_and_rebuilds_from_spec(size):
    h = OnlineHadamard.random(size, torch.Generator().manual_seed(size))
    m = h.matrix(torch.float64)
    assert torch.allclose(m @ m.T, torch.eye(size, dtype=torch.float64), atol=1e-6)
    # spreads a single outlier channel over every channel
    assert m[0].abs().min() > 0
    rebuilt = online_transform_from_spec(h.spec())
    assert not torch.equal(rebuilt.signs, h.signs) or size & (size - 1) == 0
    rebuilt.load_state_dict(h.state_dict())
    x = torch.randn(3, 5, size)
    assert torch.equal(rebuilt(x), h(x))
    assert torch.allclose(h(x), x @ m.float(), atol=1e-5)
    # a transposed (non-contiguous) input, as a weight moved by an earlier chain step is
    w = torch.randn(size, 7).T
    assert torch.allclose(h(w), h(w.contiguous()), atol=1e-6)


def test_learnable_rotation_stays_orthogonal():
    rot = Rotation(random_orthogonal(32, torch.Generator().manual_seed(0)), learnable=True)
    opt = torch.optim.AdamW(rot.parameters(), lr=0.05)
    target = torch.randn(32, 32)
    for _ in range(5):
        opt.zero_grad()
        ((rot.matrix() - target) ** 2).sum().backward()
        opt.step()
    r = rot.matrix().detach()
    assert torch.allclose(r @ r.T, torch.eye(32), atol=1e-5)


def test_column_factor_reads_a_single_consumer_scale_exactly(toy_chat):
    """``column_factor`` gives ``(original, s)`` with ``original * s`` bit for bit the parametrised
    weight for one multiplying scale on the input columns (q/k/o/gate/up under SmoothQuant-style
    sites), the weight itself without parametrisation, and None for a weight with a producer
    scale too (v_proj under norm -> qkv and v -> o)."""
    model = copy.deepcopy(toy_chat.model)
    sites = scale_sites(model, ["norm_qkv", "norm_mlp", "vo"], layers=[0])
    g = torch.Generator().manual_seed(0)
    scales = {s.name: Scale(init=torch.rand(s.size, generator=g) + 0.5, learnable=True) for s in sites}
    chains = site_chains(sites, scales)
    layer = model.model.layers[0]
    assert column_factor(layer.self_attn.q_proj) == (layer.self_attn.q_proj.weight, None)
    attach_chains(chains)
    try:
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            module = layer.get_submodule(name)
            original, factor = column_factor(module)
            assert factor.requires_grad and not original.requires_grad
            assert torch.equal(original * factor, module.weight), name
        assert column_factor(layer.self_attn.v_proj) is None
        assert column_factor(layer.mlp.down_proj) == (layer.mlp.down_proj.weight, None)
    finally:
        detach_chains(chains)


def test_smoothing_scales_follow_the_formula(toy_chat):
    site = scale_sites(toy_chat.model, ("norm_qkv",), layers=[1])[0]
    act = {name: torch.rand(256) * 10 for name, _, _ in site.consumers}
    s = smoothing_scales(site, act, alpha=0.5)
    a = torch.stack(list(act.values())).amax(0)
    w = torch.stack([lin.weight.detach().abs().amax(0) for _, lin, _ in site.consumers]).amax(0)
    assert torch.allclose(s, a.sqrt() / w.sqrt(), rtol=1e-5)


@pytest.fixture(scope="module")
def calib(toy_chat):
    spec = CalibrationSpec("toy-pretrain", n_samples=4, seq_len=128, batch_size=4, seed=0)
    return load_calibration(spec, toy_chat.tokenizer).batches


def test_smoothquant_fold_keeps_logits_and_runs(toy_chat, calib, one_thread):
    model = copy.deepcopy(toy_chat.model)
    q = build_quantizer("smoothquant", {"sites": "norm_qkv+norm_mlp+vo+updown", "weights": "rtn"})
    ids = calib[0][:1, :32]
    with torch.no_grad():
        expected = toy_chat.model(ids).logits
    # smoothing alone (no quantization) must not change the model
    parts = model_parts(model)
    sites = scale_sites(parts, ("norm_qkv", "norm_mlp", "vo", "updown"))
    act = input_channel_absmax(model, calib)
    fuse_chains(site_chains(sites, {s.name: Scale(init=smoothing_scales(s, act, 0.5)) for s in sites}))
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() < 1e-4 * expected.abs().max()
    quantized = q.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", QuantContext(calibration_batches=calib))
    assert q.metadata["smoothing"]["n_sites"] == 16 and q.metadata["weights"]["method"] == "rtn"
    with torch.no_grad():
        assert torch.isfinite(quantized(ids).logits).all()


def test_quarot_w4a4_beats_rtn_w4a4_on_toy_perplexity(toy_chat, one_thread):
    text = load_text("toy-heldout")
    settings = PerplexitySettings(max_tokens=4096)
    scores = {}
    for name, opts in (("rtn", {}), ("quarot", {"weights": "rtn", "mse_clip": "false"})):
        model = copy.deepcopy(toy_chat.model)
        build_quantizer(name, opts).apply(model, "w4a4kv4", QuantContext())
        scores[name] = perplexity(model, toy_chat.tokenizer, text, settings, progress=False)["perplexity"]
    assert scores["quarot"] < scores["rtn"]


def test_quarot_installs_online_transforms(toy_chat):
    model = copy.deepcopy(toy_chat.model)
    q = build_quantizer("quarot", {"weights": "rtn"})
    q.apply(model, "w4a4kv4-skip=lm_head+layers.0.mlp.down_proj", QuantContext())
    downs = {n: m for n, m in iter_quant_linears(model) if n.endswith("down_proj")}
    assert len(downs) == 3 and all(isinstance(m.input_transform, OnlineHadamard) for m in downs.values())
    assert all(isinstance(layer.self_attn.safequant_qk_transform, OnlineHadamard) for layer in model.model.layers)
    assert q.metadata["transforms"]["online_down_proj"] == 3
    # KV cache not quantized: no Q/K transform
    model = copy.deepcopy(toy_chat.model)
    build_quantizer("quarot", {"weights": "rtn"}).apply(model, "w4a4", QuantContext())
    assert not hasattr(model.model.layers[0].self_attn, "safequant_qk_transform")


def test_bad_inputs_raise_quantizer_error(toy_chat):
    with pytest.raises(QuantizerError, match="quantizes nothing"):
        build_quantizer("quarot").apply(copy.deepcopy(toy_chat.model), "fp", QuantContext())
    with pytest.raises(QuantizerError, match="needs calibration data"):
        build_quantizer("smoothquant").apply(copy.deepcopy(toy_chat.model), "w4a4", QuantContext())
    with pytest.raises(QuantizerError, match="weights=gptq needs calibration"):
        build_quantizer("quarot", {"weights": "gptq"}).apply(copy.deepcopy(toy_chat.model), "w4a4", QuantContext())
    with pytest.raises(QuantizerError, match="alpha"):
        build_quantizer("smoothquant", {"alpha": "1.5"})
    with pytest.raises(QuantizerError, match="sites"):
        build_quantizer("smoothquant", {"sites": "norm_qkv+bogus"})
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(QuantizerError, match="model_type 'gpt2'"):
        build_quantizer("quarot", {"weights": "rtn"}).apply(gpt2, "w4a4", QuantContext())


@pytest.mark.slow
def test_smollm2_transforms_exact_and_quarot_closes_most_of_the_w4a4_gap(shared_data, one_thread):
    """SmolLM2-135M: GQA 9/3 heads, hidden 576 = 9 x 64 and intermediate 1536 = 3 x 512 (the
    Kronecker Hadamards), real activation outliers: RTN W4A4KV4 takes perplexity into the
    thousands, QuaRot's rotations bring it back by well over an order of magnitude."""
    from harness.models import load_model

    lm = load_model("smollm2-135m-instruct", device="cpu")
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    model = copy.deepcopy(lm.model)
    _transform_everything(model, torch.Generator().manual_seed(0), online_down=False)
    with torch.no_grad():
        expected, got = lm.model(ids).logits, model(ids).logits
    assert (expected - got).abs().max() < 1e-4 * expected.abs().max() * 10
    text = (shared_data / "wikitext2_test.raw").read_text(encoding="utf-8")
    settings = PerplexitySettings(window=512, stride=512, max_tokens=1024)
    scores = {}
    for name, opts in (("rtn", {}), ("quarot", {"weights": "rtn"})):
        model = copy.deepcopy(lm.model)
        build_quantizer(name, opts).apply(model, "w4a4kv4", QuantContext())
        scores[name] = perplexity(model, lm.tokenizer, text, settings, progress=False)["perplexity"]
    assert scores["quarot"] < 0.1 * scores["rtn"]
