"""KL-top and AAQ's contrastive alignment loss against values computed by hand."""

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
