"""The few-token fake-quantized Linear (quantizers.few_token_linear) is exact: the same values as
``F.linear`` of the autograd fake-quant of the smoothed weight, bit for bit, and the same gradients
to the input, the column factor and the clip ratios to float rounding (ties at a row's extremes,
an all-zero row, a row without negative values, clamped elements); what it refuses; and on the toy
model's Q-realign block, a malicious (last-token) and a benign step give the same outputs and
gradients with and without it, with the route actually taken."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import move_off_initial_values
from quantizers import QuantScheme
from quantizers.calibration import capture_layer_inputs, input_channel_absmax, run_layer
from quantizers.fake_quant import fake_quant_weight, range_stats
from quantizers.few_token_linear import MAX_TOKENS, few_token_linear, few_token_support
from quantizers.last_token import last_token_forward
from quantizers.qrealign import QRealignBlock, QRealignOptions, _batches, qrealign_loss


def _weight(out_f: int = 40, in_f: int = 64, seed: int = 1):
    """A weight with the awkward rows (ties at the max and min, all zeros, no negatives), a factor
    per column (one tie in ``W * factor`` at a row's max made through the factor), clip logits."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[3, :5] = w[3].max()
    w[3, 7:9] = w[3].min()
    w[4] = 0.0
    w[5] = w[5].abs()
    factor = torch.rand(in_f, generator=g) + 0.5
    factor[11] = factor[10]
    w[6, 10] = w[6, 11] = 2 * float(w[6].abs().max()) / float(factor[10])
    up, low = 2.0 + torch.randn(out_f, generator=g), 2.0 + torch.randn(out_f, generator=g)
    return w, factor, up, low


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("smoothed", [True, False])
@pytest.mark.parametrize("own_low", [True, False])
def test_values_and_gradients_equal_the_autograd_formula(bits, symmetric, tokens, smoothed, own_low) -> None:
    w, factor0, up0, low0 = _weight(seed=bits + tokens)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, tokens, w.shape[1], generator=g)[:1]  # [1, tokens, in]
    upstream = torch.randn(1, tokens, w.shape[0], generator=g)
    stats = None if smoothed else range_stats(w, symmetric=symmetric)
    results = []
    for few in (False, True):
        x, factor, up, low = (t.clone().requires_grad_(True) for t in (x0, factor0, up0, low0))
        fac = factor * 1.0 if smoothed else None
        clip, clip_low = torch.sigmoid(up), torch.sigmoid(low) if own_low else None
        if few:
            y = few_token_linear(x, w, fac, bits, symmetric=symmetric, clip_ratio=clip, clip_ratio_low=clip_low,
                                 stats=stats)
        else:  # the reference: plain autograd through the fake-quant formula
            q = fake_quant_weight(w * fac if smoothed else w, bits, symmetric=symmetric, clip_ratio=clip,
                                  clip_ratio_low=clip_low)
            y = F.linear(x, q)
        (y * upstream).sum().backward()
        results.append((y.detach(), x.grad, factor.grad, up.grad, low.grad))
    (y_ref, *grads_ref), (y_few, *grads_few) = results
    assert torch.equal(y_few, y_ref)
    assert float((torch.sigmoid(up0) < 1).float().mean()) > 0.5  # clamped elements
    for ref, got in zip(grads_ref, grads_few):
        assert (ref is None) == (got is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_bias_and_the_support_checks() -> None:
    w, factor, up, _ = _weight()
    x = torch.randn(1, 2, w.shape[1])
    bias = torch.randn(w.shape[0])
    clip = torch.sigmoid(up)
    y = few_token_linear(x, w, factor, 8, symmetric=False, clip_ratio=clip, bias=bias)
    want = F.linear(x, fake_quant_weight(w * factor, 8, symmetric=False, clip_ratio=clip), bias)
    assert torch.equal(y, want)
    assert few_token_support(x, w, factor, None, bias) is None
    many = torch.randn(1, MAX_TOKENS + 1, w.shape[1])
    assert "tokens" in few_token_support(many, w, factor, None)
    assert "grouped" in few_token_support(x, w, factor, 32)
    assert "constant" in few_token_support(x, w.clone().requires_grad_(True), factor, None)
    assert "bias learns" in few_token_support(x, w, factor, None, bias.clone().requires_grad_(True))
    zero = factor.clone()
    zero[3] = 0.0
    assert "exactly 0" in few_token_support(x, w, zero, None)


def test_the_backward_pass_runs_once() -> None:
    w, factor, up, _ = _weight()
    factor.requires_grad_(True)
    y = few_token_linear(torch.randn(1, w.shape[1]), w, factor, 8, symmetric=False, clip_ratio=torch.sigmoid(up))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        y.sum().backward()


# ------------------------------------------------------------------------------ in Q-realign's block


def _toy_block(toy_chat, few: bool):
    """Block 1 of a copy of the toy model with learnable clipping and smoothing, moved off their
    initial values (seeded), and its inputs on two harmful and two benign calibration prompts."""
    from harness.calibration_data import load_calibration_prompts

    records = load_calibration_prompts()
    chosen = [r for r in records if r["label"] == "harmful"][:2] + [r for r in records if r["label"] == "benign"][:2]
    model = copy.deepcopy(toy_chat.model)
    batches = _batches(toy_chat.tokenizer, chosen, QRealignOptions(), torch.device("cpu"))
    stats = input_channel_absmax(model, batches)
    captured = capture_layer_inputs(model, batches, 0)
    with torch.no_grad():
        hidden = [run_layer(model.model.layers[0], h, kw) for h, kw in zip(captured.hidden, captured.kwargs)]
    block = QRealignBlock(model, 1, QuantScheme.parse("w8a8-wasym"), QRealignOptions(), stats, few_token=few).install()
    move_off_initial_values(block)
    return model.model.layers[1], block, hidden, captured.kwargs


def test_qrealign_steps_are_the_same_with_and_without_the_few_token_route(toy_chat, one_thread, monkeypatch) -> None:
    import quantizers.few_token_linear as ftl

    calls: list[tuple[int, ...]] = []
    real = ftl.few_token_linear

    def counting(x, weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(ftl, "few_token_linear", counting)
    steps = {}
    for few in (False, True):
        layer, block, hidden, kwargs = _toy_block(toy_chat, few)
        params = [p for group in block.param_groups() for p in group["params"]]
        w = torch.randn(hidden[0].shape[-1], generator=torch.Generator().manual_seed(1)) / 8.0
        runs = []
        for k, malicious in ((0, True), (1, True), (2, False), (3, False)):
            for p in params:
                p.grad = None
            forward = last_token_forward if malicious else run_layer
            out = forward(layer, hidden[k], kwargs[k])
            loss, _ = qrealign_loss(out, out.detach() * 0.9, torch.tensor([malicious]), w, 0.0)
            loss.backward()
            runs.append((out.detach(), [p.grad.clone() for p in params]))
        steps[few] = runs
    # six of the seven Linears per step (v_proj's weight carries two scales: the dense route)
    assert all(h.shape[1] <= MAX_TOKENS for h in hidden)
    assert len(calls) == 4 * 6
    for (out_ref, g_ref), (out_few, g_few) in zip(steps[False], steps[True]):
        assert torch.equal(out_few, out_ref)
        scale = max(float(g.abs().max()) for g in g_ref)
        assert scale > 0
        for want, got in zip(g_ref, g_few):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
