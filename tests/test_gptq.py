"""GPTQ (quantizers/gptq.py) on the real toy chat model with real calibration activations."""

import copy

import pytest
import torch
from torch import nn

from harness.calibration_data import CalibrationSpec, load_calibration
from harness.perplexity import PerplexitySettings, load_text, perplexity
from quantizers import (
    GPTQOptions,
    QuantContext,
    QuantizerError,
    QuantLinear,
    QuantScheme,
    build_quantizer,
    default_weight_fn,
    gptq_quantize,
    iter_quant_linears,
    quantize_linear_layers,
    quantize_weights,
)


@pytest.fixture(scope="module")
def calib(toy_chat):
    spec = CalibrationSpec("toy-pretrain", n_samples=8, seq_len=128, batch_size=4, seed=0)
    return load_calibration(spec, toy_chat.tokenizer).batches


@pytest.fixture(scope="module")
def small_calib(calib):
    return [b[:, :64] for b in calib[:1]]


@pytest.fixture(scope="module")
def layer_data(toy_chat, calib, one_thread):
    """Weight and real inputs of layer 1's down_proj: Hessian from one half, error on both."""
    module = toy_chat.model.model.layers[1].mlp.down_proj
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for batch in calib:
            toy_chat.model(input_ids=batch)
    handle.remove()
    x = torch.cat(seen)
    return module.weight.detach().clone(), x, 2.0 * x.T @ x / x.shape[0]


def _output_error(x, w, q):
    return float(torch.linalg.norm(x @ w.T - x @ q.T))


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16g64", "w4a16-wasym", "w4a16g64-wmse"])
def test_gptq_output_error_below_rtn(layer_data, scheme, one_thread):
    w, x, h = layer_data
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    rtn = default_weight_fn("", lin, QuantScheme.parse(scheme))
    for act_order in (True, False):
        q = gptq_quantize(w, h, scheme, GPTQOptions(act_order=act_order))
        assert _output_error(x, w, q) < 0.6 * _output_error(x, w, rtn), (scheme, act_order)


def test_sixteen_bits_is_lossless(layer_data):
    w, x, h = layer_data
    q = gptq_quantize(w, h, QuantScheme(w_bits=16, a_bits=8))
    assert torch.equal(q, w)


@pytest.mark.parametrize("scheme,group", [("w3a16", None), ("w3a16g64", 64), ("w4a16g64-wasym", 64), ("w3a16g48-wasym-wmse", 48)])
@pytest.mark.parametrize("act_order", [True, False])
def test_values_on_the_grid(layer_data, scheme, group, act_order):
    w, _, h = layer_data
    s = QuantScheme.parse(scheme)
    q = gptq_quantize(w, h, s, GPTQOptions(act_order=act_order))
    g = group or w.shape[1]
    for start in range(0, w.shape[1], g):
        for row in q[:16, start : start + g]:
            values = row.unique()
            assert values.numel() <= 2**s.w_bits
            # One scale per group: every gap between values is a whole number of grid steps.
            gaps = values.diff()
            steps = gaps / gaps.min()
            assert torch.allclose(steps, steps.round(), atol=1e-3), (scheme, act_order, start)


def test_gptq_beats_rtn_perplexity_end_to_end(toy_chat, calib, one_thread):
    tok = toy_chat.tokenizer
    text = load_text("toy-heldout")
    settings = PerplexitySettings(max_tokens=2048, window=256, stride=256)
    ctx = QuantContext(tokenizer=tok, calibration_batches=calib)
    rtn = build_quantizer("rtn").apply(copy.deepcopy(toy_chat.model), "w3a16", ctx)
    gptq_q = build_quantizer("gptq")
    gptq = gptq_q.apply(copy.deepcopy(toy_chat.model), "w3a16", ctx)
    ppl_fp = perplexity(toy_chat.model, tok, text, settings, progress=False)["perplexity"]
    ppl_rtn = perplexity(rtn, tok, text, settings, progress=False)["perplexity"]
    ppl_gptq = perplexity(gptq, tok, text, settings, progress=False)["perplexity"]
    assert ppl_gptq < ppl_rtn - 0.5 * (ppl_rtn - ppl_fp), (ppl_fp, ppl_rtn, ppl_gptq)
    names = [n for n, _ in iter_quant_linears(gptq)]
    assert len(names) == 4 * 7 and "lm_head" not in names
    assert gptq_q.metadata["weights"]["calibration_tokens"] == sum(b.numel() for b in calib)


def test_no_calibration_data_is_an_error(toy_chat):
    with pytest.raises(QuantizerError, match="calibration"):
        build_quantizer("gptq").apply(copy.deepcopy(toy_chat.model), "w4a16", QuantContext())
    with pytest.raises(QuantizerError, match="batches="):
        quantize_weights(copy.deepcopy(toy_chat.model), "w4a16", method="gptq")
    with pytest.raises(QuantizerError, match="damp"):
        build_quantizer("gptq", {"damp": "0"})
    with pytest.raises(QuantizerError, match="keeps them in full precision"):
        build_quantizer("gptq").apply(copy.deepcopy(toy_chat.model), "w16a8", QuantContext(calibration_batches=[1]))


def test_rtn_weight_step_equals_rtn_quantizer(toy_chat):
    a = build_quantizer("rtn").apply(copy.deepcopy(toy_chat.model), "w4a8g64-wmse")
    b = copy.deepcopy(toy_chat.model)
    quantize_weights(b, "w4a8g64-wmse", method="rtn")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weight_step_on_activation_wrapped_model(toy_chat, small_calib, one_thread):
    """A transform method that trained with W16A8 QuantLinears gets the same GPTQ weights as a
    plain model (FP activations during calibration), in place, with the scheme's settings."""
    plain = copy.deepcopy(toy_chat.model)
    quantize_weights(plain, "w4a8", method="gptq", batches=small_calib)
    wrapped = copy.deepcopy(toy_chat.model)
    quantize_linear_layers(wrapped, "w16a8")
    module = wrapped.model.layers[0].self_attn.q_proj
    quantize_weights(wrapped, "w4a8-aasym", method="gptq", batches=small_calib)
    assert wrapped.model.layers[0].self_attn.q_proj is module
    assert (module.w_bits, module.a_bits, module.a_symmetric) == (4, 8, False)
    sp, sw = plain.state_dict(), wrapped.state_dict()
    assert all(torch.allclose(sp[k], sw[k], atol=1e-6) for k in sp)
    with pytest.raises(QuantizerError, match="already has quantized weights"):
        quantize_weights(wrapped, "w4a8", method="rtn")


class _Rotate(nn.Module):
    def __init__(self, r: torch.Tensor):
        super().__init__()
        self.register_buffer("r", r)

    def forward(self, x):
        return x @ self.r


def test_online_input_transform_is_seen_by_gptq(toy_chat, small_calib, one_thread):
    """down_proj with an online rotation R and the fused weight W R: the function is unchanged, so
    GPTQ at 8 bits must stay close to FP; that needs the rotated input in the pass and the model."""
    torch.manual_seed(0)
    model = copy.deepcopy(toy_chat.model)
    transforms = {}
    for i, layer in enumerate(model.model.layers):
        lin = layer.mlp.down_proj
        r, _ = torch.linalg.qr(torch.randn(lin.in_features, lin.in_features))
        lin.weight.data = lin.weight.data @ r
        transforms[f"model.layers.{i}.mlp.down_proj"] = _Rotate(r)
    quantize_weights(model, "w8a16", method="gptq", batches=small_calib, input_transforms=transforms)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert model.model.layers[0].mlp.down_proj.input_transform is transforms["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        want = toy_chat.model(input_ids=small_calib[0]).logits
        got = model(input_ids=small_calib[0]).logits
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
