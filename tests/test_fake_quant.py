"""Fake-quant numerics against hand-computed values, and their invariants."""

import pytest
import torch

from quantizers.fake_quant import (
    fake_quant,
    fake_quant_activation,
    fake_quant_kv,
    fake_quant_weight,
    mse_clip_search,
    range_stats,
    round_ste,
)


def test_symmetric_4bit_hand_computed():
    # max|w| = 1.75, 4 bits: qmax = 7, scale = 0.25; -0.875/0.25 = -3.5 rounds half-to-even to -4.
    w = torch.tensor([[1.75, -0.875, 0.25, 0.0, 0.3]])
    out = fake_quant_weight(w, 4)
    assert torch.equal(out, torch.tensor([[1.75, -1.0, 0.25, 0.0, 0.25]]))


def test_symmetric_clip_and_clamp_hand_computed():
    # clip 0.5: scale = 0.875 / 7 = 0.125; 1.75/0.125 = 14 clamps to 7, -0.875 -> -7.
    w = torch.tensor([[1.75, -0.875, 0.25, 0.0]])
    out = fake_quant_weight(w, 4, clip_ratio=0.5)
    assert torch.equal(out, torch.tensor([[0.875, -0.875, 0.25, 0.0]]))
    # The negative end of the symmetric grid is -2^(b-1) = -8: reachable only through clipping.
    out = fake_quant(torch.tensor([[-2.0, 0.875]]), 4, clip_ratio=0.4375)  # scale = 0.125
    assert torch.equal(out, torch.tensor([[-1.0, 0.875]]))


def test_asymmetric_2bit_hand_computed():
    # lo = -0.75, hi = 3, scale = 3.75 / 3 = 1.25, zero = round(0.6) = 1
    x = torch.tensor([[0.0, 1.5, 3.0, -0.75]])
    out = fake_quant(x, 2, symmetric=False)
    assert torch.allclose(out, torch.tensor([[0.0, 1.25, 2.5, -1.25]]))


def test_asymmetric_range_includes_zero():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # all positive: lo = 0, scale = 4/15
    out = fake_quant(x, 4, symmetric=False)
    scale = 4.0 / 15
    assert torch.allclose(out, torch.round(x / scale) * scale)


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_decreases_with_bits(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    errs = [(fake_quant_weight(w, b, symmetric=symmetric) - w).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-3 * errs[0]
    assert torch.equal(fake_quant_weight(w, 16), w)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_idempotent(symmetric, bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 16, generator=g) * 3
    once = fake_quant_kv(x, bits, symmetric=symmetric)
    twice = fake_quant_kv(once, bits, symmetric=symmetric)
    assert torch.allclose(once, twice, atol=1e-6, rtol=0)
    once = fake_quant_weight(x[0, 0], bits, symmetric=symmetric, group_size=8)
    assert torch.allclose(fake_quant_weight(once, bits, symmetric=symmetric, group_size=8), once, atol=1e-6, rtol=0)


def test_not_idempotent_with_clip_documented():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    once = fake_quant_kv(x, 4, clip_ratio=0.8)
    assert not torch.allclose(fake_quant_kv(once, 4, clip_ratio=0.8), once)


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_rows_and_groups(symmetric):
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    w[2, 4:] = 0.5  # second group of row 2 constant, first group zero
    for group in (None, 4):
        out = fake_quant_weight(w, 4, symmetric=symmetric, group_size=group)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros(8))
    out = fake_quant_weight(w, 4, symmetric=symmetric, group_size=4)
    assert torch.equal(out[2, :4], torch.zeros(4))
    assert torch.allclose(out[2, 4:], torch.full((4,), 0.5))
    x = torch.zeros(2, 5, 16)
    assert torch.equal(fake_quant_activation(x, 4, symmetric=symmetric), x)
    assert torch.equal(fake_quant_kv(x.unsqueeze(0), 2, symmetric=symmetric), x.unsqueeze(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_keeps_dtype_and_shape(dtype):
    x = torch.randn(2, 4, 6, 8).to(dtype)
    for out in (fake_quant_kv(x, 4), fake_quant_activation(x, 8, symmetric=False),
                fake_quant_weight(x[0, 0], 3, group_size=4)):
        assert out.dtype == dtype
    assert fake_quant_kv(x, 4).shape == x.shape


def test_per_group_vs_per_channel():
    w = torch.tensor([[100.0, 1.0, 0.5, -0.25, 0.1, -0.2, 0.3, 0.4]])
    per_channel = fake_quant_weight(w, 4)
    per_group = fake_quant_weight(w, 4, group_size=4)
    # One scale per row: the outlier wipes out every small value.
    assert torch.equal(per_channel[0, 1:], torch.zeros(7))
    # Per group the second group has its own scale (0.4/7) and survives.
    assert torch.allclose(per_group[0, 4:], fake_quant_weight(w[:, 4:], 4))
    assert (per_group - w).abs().sum() < (per_channel - w).abs().sum()
    # Groups equal to the row length are per channel.
    assert torch.equal(fake_quant_weight(w, 4, group_size=8), per_channel)


def test_partial_last_group():
    # 10 columns in groups of 4: groups [0:4], [4:8], [8:10]; zero padding of the last is exact.
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(9))
    for symmetric in (True, False):
        out = fake_quant_weight(w, 3, group_size=4, symmetric=symmetric)
        parts = [fake_quant_weight(w[:, i : i + 4], 3, symmetric=symmetric) for i in (0, 4, 8)]
        assert torch.equal(out, torch.cat(parts, dim=1))
    with pytest.raises(ValueError):
        fake_quant_weight(w, 4, group_size=0)


def test_activation_is_per_token():
    x = torch.randn(2, 5, 32)
    x[0, 2] *= 1000  # one huge token must not change the others
    out = fake_quant_activation(x, 4)
    for b in range(2):
        for t in range(5):
            assert torch.equal(out[b, t], fake_quant_activation(x[b, t : t + 1], 4)[0])
    clipped = fake_quant_activation(x, 4, clip_ratio=0.9)
    # The positive end of the symmetric grid is qmax * scale = 0.9 * max|x| (the negative end,
    # -2^(b-1) * scale, is one step further out).
    assert clipped.amax(-1).le(x.abs().amax(-1) * 0.9 * (1 + 1e-6)).all()
    assert clipped.abs().amax(-1).le(x.abs().amax(-1) * 0.9 * 8 / 7 * (1 + 1e-6)).all()


def test_kv_groups_are_per_token_per_head_group():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 3, 16, generator=g)
    out = fake_quant_kv(k, 4, group_size=8)
    manual = fake_quant(k.reshape(-1, 8), 4, symmetric=False).reshape(k.shape)
    assert torch.equal(out, manual)
    # Whole head by default
    assert torch.equal(fake_quant_kv(k, 4), fake_quant(k.reshape(-1, 16), 4, symmetric=False).reshape(k.shape))


def test_straight_through_gradients():
    x = torch.randn(4, 8, requires_grad=True)
    assert torch.equal(round_ste(x), torch.round(x))
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    w = torch.randn(4, 8, requires_grad=True)
    clip = torch.full((4,), 0.9, requires_grad=True)  # learnable per-channel clipping
    fake_quant_weight(w, 4, clip_ratio=clip).pow(2).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert clip.grad is not None and clip.grad.abs().sum() > 0
    a = torch.randn(3, 8, requires_grad=True)
    fake_quant_activation(a, 4, symmetric=False).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_mse_clip_search_improves_error():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    w[:, 0] *= 8  # outliers make shrinking worthwhile at 3 bits
    for group in (None, 16):
        clip = mse_clip_search(w, 3, group_size=group)
        assert clip.shape == ((32,) if group is None else (32, 4))
        assert clip.min() >= 0.2 - 1e-6 and clip.max() <= 1.0
        plain = (fake_quant_weight(w, 3, group_size=group) - w).pow(2).sum(-1)
        searched = (fake_quant_weight(w, 3, group_size=group, clip_ratio=clip) - w).pow(2).sum(-1)
        assert (searched <= plain + 1e-6).all()
        assert searched.sum() < plain.sum()
    clip = mse_clip_search(w, 4, symmetric=False, group_size=24)  # partial last group
    assert clip.shape == (32, 3)
    clip = mse_clip_search(w, 4, symmetric=False)
    assert ((fake_quant_weight(w, 4, symmetric=False, clip_ratio=clip) - w).pow(2).sum()
            <= (fake_quant_weight(w, 4, symmetric=False) - w).pow(2).sum())


def test_bad_bits_rejected():
    with pytest.raises(ValueError):
        fake_quant(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError):
        fake_quant_weight(torch.zeros(2, 2, 2), 4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_search_matches_brute_force(symmetric):
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(10)) * torch.tensor([[1.0], [5], [0.1], [2], [1], [3]])
    w[0, 3] = 9.0
    clip = mse_clip_search(w, 3, symmetric=symmetric, grid=20, max_shrink=0.75)
    candidates = [1 - i / 20 for i in range(16)]
    errs = torch.stack([(fake_quant_weight(w, 3, symmetric=symmetric, clip_ratio=p) - w).pow(2).sum(-1)
                        for p in candidates])  # [candidates, rows]
    chosen = (fake_quant_weight(w, 3, symmetric=symmetric, clip_ratio=clip) - w).pow(2).sum(-1)
    assert torch.allclose(chosen, errs.min(0).values, rtol=1e-5, atol=1e-7)
    assert clip[0] < 1.0  # the outlier row is clipped


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("own_low", [True, False])
def test_fused_fake_quant_equals_autograd(bits, symmetric, group_size, own_low):
    """``fused=True`` gives the very same values and autograd's gradients (to float rounding) to the
    weight and both learnable clip ratios, with ties at a row's maximum and minimum (de-quantized
    checkpoints have them), an all-zero row, a row without negative values and clamped elements."""
    g = torch.Generator().manual_seed(bits + 2 * symmetric + (group_size or 0))
    w0 = torch.randn(96, 200, generator=g) * 0.05
    w0[3, :5] = w0[3].max()
    w0[3, 7:9] = w0[3].min()
    w0[4] = 0.0
    w0[5] = w0[5].abs()
    shape = (96,) if group_size is None else (96, -(-200 // group_size))
    up0, low0 = 2.0 + torch.randn(shape, generator=g), 2.0 + torch.randn(shape, generator=g)
    upstream = torch.randn(96, 200, generator=g)
    results = []
    for fused in (False, True):
        w, up, low = (t.clone().requires_grad_(True) for t in (w0, up0, low0))
        q = fake_quant_weight(w, bits, group_size=group_size, symmetric=symmetric, clip_ratio=torch.sigmoid(up),
                              clip_ratio_low=torch.sigmoid(low) if own_low else None, fused=fused)
        (q * upstream).sum().backward()
        results.append((q.detach(), w.grad, up.grad, low.grad))
    (q_ref, *grads_ref), (q_fused, *grads_fused) = results
    assert torch.equal(q_fused, q_ref)
    assert float((torch.sigmoid(up0) < 1).float().mean()) > 0.5  # the clip ratios do clip: clamped elements
    for ref, got in zip(grads_ref, grads_fused):
        assert (ref is None) == (got is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_fused_fake_quant_with_a_float_clip_ratio():
    w0 = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (False, True):
        w = w0.clone().requires_grad_(True)
        out = fake_quant(w, 4, symmetric=False, clip_ratio=0.9, fused=fused)
        out.pow(2).sum().backward()
        grads.append((out.detach(), w.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 64])
def test_fused_fake_quant_of_a_constant_weight_with_cached_range(symmetric, group_size):
    """A weight that needs no gradient (no learnable transform on it) with its range measured once
    (``range_stats``, reused at every step): the same values as autograd and the same clip-ratio
    gradients to float rounding; stats of another shape are not used."""
    g = torch.Generator().manual_seed(7 + symmetric)
    w = torch.randn(48, 160, generator=g) * 0.05
    w[2, :3] = w[2].max()  # ties at the maximum
    shape = (48,) if group_size is None else (48, -(-160 // group_size))
    up0, low0 = 2.0 + torch.randn(shape, generator=g), 2.0 + torch.randn(shape, generator=g)
    upstream = torch.randn(48, 160, generator=g)
    cached = range_stats(w, group_size=group_size, symmetric=symmetric)
    other = range_stats(w[:10], group_size=group_size, symmetric=symmetric)
    results = []
    for fused, stats in ((False, None), (True, None), (True, cached), (True, other), (True, cached)):
        up, low = up0.clone().requires_grad_(True), low0.clone().requires_grad_(True)
        q = fake_quant_weight(w, 8, group_size=group_size, symmetric=symmetric, clip_ratio=torch.sigmoid(up),
                              clip_ratio_low=torch.sigmoid(low), fused=fused, stats=stats)
        (q * upstream).sum().backward()
        results.append((q.detach(), up.grad, low.grad))
    (q_ref, *grads_ref), *rest = results
    for q_got, *grads in rest:
        assert torch.equal(q_got, q_ref)
        for ref, got in zip(grads_ref, grads):
            assert (ref is None) == (got is None)  # symmetric: no lower clip ratio
            if ref is not None:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_fused_node_lets_checkpointing_free_its_input():
    """The fused node must hold its input only through ``save_for_backward``: OST checkpoints each
    decoder layer, and a plain reference (its range statistics) kept every layer's quantized
    inputs alive until the backward pass (+0.4 GiB on SmolLM2 at 1,024 tokens)."""
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint

    seen = {}

    def layer(x):
        h = x * 2.0
        seen["h"] = weakref.ref(h)
        return fake_quant(h, 4, symmetric=False, clip_ratio=0.9, fused=True)

    torch.manual_seed(0)
    x = torch.randn(8, 64, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    gc.collect()
    assert seen["h"]() is None
    y.pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    fake_quant(x_ref * 2.0, 4, symmetric=False, clip_ratio=0.9).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
