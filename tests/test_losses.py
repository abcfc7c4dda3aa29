"""KL-top and AAQ's contrastive alignment loss against values computed by hand."""

import copy
import math

import pytest
import torch

from quantizers import QuantizerError
from quantizers.losses import contrastive_alignment_loss, kl_top_loss

# One position, a vocabulary of four tokens, given as probabilities.
P_FT = [0.5, 0.3, 0.15, 0.05]
P_PT = [0.1, 0.2, 0.3, 0.4]
P_Q = [0.4, 0.3, 0.2, 0.1]


def logits(p):
    return torch.tensor([[p]]).log()  # [batch 1, seq 1, vocab 4]


# By hand, K = 2:
# S_top = {0, 1}: p_FT^S = (.625, .375), p_Q^S = (4/7, 3/7)
PULL = 0.625 * math.log(0.625 / (4 / 7)) + 0.375 * math.log(0.375 / (3 / 7))
# |p_FT - p_PT| = (.4, .1, .15, .35) -> S_diff = {0, 3}: p_PT^S = (.2, .8), p_Q^S = (.8, .2)
PUSH = 0.2 * math.log(0.2 / 0.8) + 0.8 * math.log(0.8 / 0.2)


def test_pull_push_and_total_match_hand_computation():
    q = logits(P_Q).requires_grad_(True)
    loss, terms = contrastive_alignment_loss(q, logits(P_FT), logits(P_PT), alpha=0.75, k=2)
    assert terms["pull"] == pytest.approx(PULL, rel=1e-5, abs=1e-7)
    assert terms["push"] == pytest.approx(PUSH, rel=1e-5, abs=1e-7)
    assert float(loss) == pytest.approx(PULL - 0.75 * PUSH, rel=1e-5, abs=1e-7)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_alpha_zero_is_kl_top():
    q = logits(P_Q)
    loss, _ = contrastive_alignment_loss(q, logits(P_FT), logits(P_PT), alpha=0.0, k=2)
    top, terms = kl_top_loss(q, logits(P_FT), k=2)
    assert float(loss) == pytest.approx(PULL, rel=1e-5, abs=1e-7) and float(top) == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
    assert terms["kl_top"] == pytest.approx(PULL, rel=1e-5, abs=1e-7)


def test_variants_push_on_pt_top_and_no_renormalisation():
    # PT's top 2 = {3, 2}: p_PT^S = (4/7, 3/7) on tokens (3, 2), p_Q^S = (1/3, 2/3)
    want = (4 / 7) * math.log((4 / 7) / (1 / 3)) + (3 / 7) * math.log((3 / 7) / (2 / 3))
    _, terms = contrastive_alignment_loss(logits(P_Q), logits(P_FT), logits(P_PT), k=2, push_set="pt_top")
    assert terms["push"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    # No renormalisation: full probabilities gathered at S_top = {0, 1}
    raw = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.3)
    _, terms = contrastive_alignment_loss(logits(P_Q), logits(P_FT), logits(P_PT), k=2, renormalize=False)
    assert terms["pull"] == pytest.approx(raw, rel=1e-5, abs=1e-7)
    # Logit-space S_diff: |log(p_FT / p_PT)| = (1.61, .41, .69, 2.08) -> the same {0, 3} here
    _, terms = contrastive_alignment_loss(logits(P_Q), logits(P_FT), logits(P_PT), k=2, diff_space="logit")
    assert terms["push"] == pytest.approx(PUSH, rel=1e-5, abs=1e-7)
    # A separate K for the pull term: K = 4 is the full KL
    full = sum(p * math.log(p / q) for p, q in zip(P_FT, P_Q))
    _, terms = contrastive_alignment_loss(logits(P_Q), logits(P_FT), logits(P_PT), k=2, k_pull=4)
    assert terms["pull"] == pytest.approx(full, rel=1e-5, abs=1e-7)


def test_masked_positions_do_not_count():
    q = torch.cat([logits(P_Q), logits(P_FT)], dim=1)  # position 2: q equals FT, pull 0 there
    ft = torch.cat([logits(P_FT), logits(P_FT)], dim=1)
    pt = torch.cat([logits(P_PT), logits(P_PT)], dim=1)
    _, both = contrastive_alignment_loss(q, ft, pt, k=2, attention_mask=torch.tensor([[1, 1]]))
    _, first = contrastive_alignment_loss(q, ft, pt, k=2, attention_mask=torch.tensor([[1, 0]]))
    assert first["pull"] == pytest.approx(PULL, rel=1e-5, abs=1e-7)
    assert both["pull"] == pytest.approx(PULL / 2, rel=1e-5, abs=1e-7)


def test_bad_input():
    with pytest.raises(QuantizerError, match="vocabulary"):
        contrastive_alignment_loss(logits(P_Q), logits(P_FT), torch.zeros(1, 1, 5))
    with pytest.raises(QuantizerError, match="alpha"):
        contrastive_alignment_loss(logits(P_Q), logits(P_FT), logits(P_PT), alpha=-1)
    with pytest.raises(QuantizerError, match="masked out"):
        kl_top_loss(logits(P_Q), logits(P_FT), attention_mask=torch.tensor([[0]]))


def test_cached_targets_give_the_same_losses_as_the_frozen_logits():
    """What the frozen models leave behind (subset indices + log-probs) reproduces both losses."""
    from quantizers.losses import (contrastive_from_targets, contrastive_targets, kl_top_from_targets,
                                   kl_top_targets)

    g = torch.Generator().manual_seed(0)
    ft, pt, q = (torch.randn(2, 5, 50, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for renormalize in (True, False):
        direct, _ = kl_top_loss(q, ft, k=7, renormalize=renormalize, attention_mask=mask)
        targets = kl_top_targets(ft, k=7, renormalize=renormalize)
        assert targets["top"].index.dtype == torch.int32 and targets["top"].log_p.shape == (2, 5, 7)
        cached, _ = kl_top_from_targets(q, targets, mask)
        assert float(cached) == pytest.approx(float(direct), rel=1e-6)
    for kw in ({}, {"diff_space": "logit"}, {"push_set": "pt_top"}, {"k_pull": 11}):
        direct, terms = contrastive_alignment_loss(q, ft, pt, alpha=0.5, k=7, attention_mask=mask, **kw)
        cached, cterms = contrastive_from_targets(q, contrastive_targets(ft, pt, k=7, **kw), alpha=0.5,
                                                  attention_mask=mask)
        assert float(cached) == pytest.approx(float(direct), rel=1e-6)
        assert cterms["push_pull"] == pytest.approx(terms["push"] / terms["pull"], rel=1e-6)
    with pytest.raises(QuantizerError, match="out of step"):
        kl_top_from_targets(q[:, :4], kl_top_targets(ft, k=7))


def test_contrast_diagnostic_by_hand():
    from quantizers.losses import contrast_diagnostic

    ft, pt = logits(P_FT), logits(P_PT)
    d = contrast_diagnostic(ft, pt, torch.tensor([[[0, 3]]]), k=2)
    assert d["tv"] == pytest.approx(0.5 * (0.4 + 0.1 + 0.15 + 0.35))
    assert d["top1_differs"] == 1.0  # FT's top token is 0, PT's is 3
    assert d["topk_differs"] == pytest.approx(1.0)  # FT top-2 {0, 1}, PT top-2 {3, 2}: none shared
    assert d["sdiff_abs_diff"] == pytest.approx((0.4 + 0.35) / 2)
    same = contrast_diagnostic(ft, ft, torch.tensor([[[0, 3]]]), k=2)
    assert same["tv"] == pytest.approx(0.0, abs=1e-7) and same["top1_differs"] == 0.0 and same["topk_differs"] == 0.0


def test_head_logits_at_a_subset_equal_the_full_head_with_gradients(toy_chat):
    """The loss-side lm_head (``HeadLogits``): logits and input gradients at K tokens per position
    equal those of the whole-vocabulary head gathered there, and the subset KL is the same."""
    from quantizers.losses import HeadLogits, kl_top_from_targets, kl_top_targets

    head = copy.deepcopy(toy_chat.model.lm_head).requires_grad_(False)  # frozen, as in training
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, head.weight.shape[1], generator=g)
    ref = kl_top_targets(torch.randn(2, 6, head.weight.shape[0], generator=g), k=9)
    losses, grads = [], []
    for fused in (False, True):
        h = hidden.clone().requires_grad_(True)
        q = HeadLogits(h, head.weight) if fused else head(h)
        if fused:
            index = ref["top"].index
            assert torch.allclose(q.at(index), head(hidden).gather(-1, index.long()), atol=1e-5)
            assert q.shape == head(hidden).shape
        loss, _ = kl_top_from_targets(q, ref)
        loss.backward()
        losses.append(float(loss))
        grads.append(h.grad)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert torch.allclose(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    # a loss over the whole vocabulary (no renormalisation) still gets every logit
    full = kl_top_targets(torch.randn(2, 6, head.weight.shape[0], generator=g), k=9, renormalize=False)
    a, _ = kl_top_from_targets(HeadLogits(hidden, head.weight), full)
    b, _ = kl_top_from_targets(head(hidden).detach(), full)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    with pytest.raises(QuantizerError, match="frozen"):
        HeadLogits(hidden, torch.nn.Parameter(head.weight.detach().clone()))
