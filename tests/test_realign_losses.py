"""Q-realign's realignment terms beside the paper's probe loss (quantizers/realign_losses.py): the
option parser, each term on hand-made numbers, the fallback MSE at the last token, and on the
eroded toy model that the output term pulls the next-token distribution of malicious calibration
prompts toward the aligned parent's (closer than the paper's loss gets it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from quantizers import QuantContext, QuantizerError, build_quantizer
from quantizers.qrealign import QRealignOptions, qrealign_loss
from quantizers.realign_losses import BlockRealign, ParentTargets, parse_loss


def test_loss_option_names_terms_and_rejects_unknown_ones() -> None:
    assert parse_loss("paper") == ("probe",)
    assert parse_loss("probe + output+probe") == ("probe", "output")
    assert QRealignOptions(loss="parent_probe+direction").loss_terms == ("parent_probe", "direction")
    for bad in ("bogus", "probe+", "probe+outputs", ""):
        with pytest.raises(QuantizerError, match="loss="):
            QRealignOptions(loss=bad)
    with pytest.raises(QuantizerError, match="output_weight"):
        QRealignOptions(output_weight=0.0)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


class _Readout(torch.nn.Module):
    """A model with only a final norm (identity) and an LM head, for the ``output`` term."""

    def __init__(self, head: torch.Tensor) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.norm = _Identity()
        self.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(head)


W, B = torch.tensor([1.0, -2.0]), 0.5
PARENT = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]])  # [n=2 samples, L=1 layer, H=2]: parent's states


def _targets(terms, model=None) -> ParentTargets:
    targets = ParentTargets(hidden=PARENT, source="test")
    # parent's benign mean at 0 along e0, its harmful mean at 4: d = x0 / 4
    targets.directions[0] = (torch.tensor([1.0, 0.0]), 0.0, 4.0)
    if "output" in terms:
        targets.log_probs[0] = torch.log_softmax(PARENT[:, 0] @ model.lm_head.weight.T, dim=-1)
    return targets


def test_parent_probe_and_direction_terms_on_hand_made_numbers() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    rows = torch.tensor([0, 1])
    realign = BlockRealign(("parent_probe", "direction"), 0, 1, (W, B), 0.0, _targets(()), _Readout(torch.eye(2)), 1, 1.0)
    loss, terms = realign(h, torch.zeros(2, 2), rows)
    # parent logits: 3 + 0.5 = 3.5 and -2 + 0.5 = -1.5; quantized logits 1.5 and 0.5
    parent_probe = torch.tensor([math.log1p(math.exp(3.5 - 1.5)), math.log1p(math.exp(-1.5 - 0.5))])
    # scaled projections: parent 0.75 and 0, quantized 0.25 and 0 -> relu(0.5)^2 and 0
    direction = torch.tensor([0.25, 0.0])
    torch.testing.assert_close(loss, parent_probe + direction)
    assert terms["logit"] == pytest.approx(1.0)
    assert terms["direction"] == pytest.approx(0.125)


def test_output_term_is_the_kl_to_the_parent_and_zero_at_the_parent() -> None:
    model = _Readout(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    realign = BlockRealign(("output",), 0, 1, (W, B), 0.0, _targets(("output",), model), model, 1, 2.0)
    rows = torch.tensor([1, 0])
    loss, _ = realign(PARENT[[1, 0], 0], torch.zeros(2, 2), rows)
    torch.testing.assert_close(loss, torch.zeros(2), atol=1e-6, rtol=0)
    h = torch.tensor([[0.0, 0.0], [3.0, 0.0]], requires_grad=True)
    loss, terms = realign(h, torch.zeros(2, 2), rows)
    p = torch.softmax(torch.tensor([0.0, 1.0, 1.0]), -1)
    want = 2.0 * (p * (p.log() - math.log(1 / 3))).sum()
    assert loss[0].item() == pytest.approx(want.item(), rel=1e-5) and loss[1].item() == pytest.approx(0.0, abs=1e-6)
    loss.sum().backward()
    assert h.grad[0, 1] < 0  # raising h1 raises the parent's two likely tokens
    assert not model.lm_head.weight.requires_grad  # the readout stays frozen


def test_a_block_without_an_active_term_keeps_malicious_rows_at_fp_on_the_last_token() -> None:
    model = _Readout(torch.eye(2))
    # two layers, output term on the last block only: block 0 has no term for malicious rows
    targets = ParentTargets(hidden=PARENT.repeat(1, 2, 1), source="test",
                            log_probs={1: torch.log_softmax(PARENT[:, 0], dim=-1)})
    realign = BlockRealign(("output",), 0, 2, (W, B), 0.0, targets, model, 1, 1.0)
    q = torch.tensor([[[9.0, 9.0], [1.0, 2.0]]])
    fp = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    loss, terms = qrealign_loss(q, fp, torch.tensor([True]), W, B, realign=realign, rows=torch.tensor([0]))
    assert loss.item() == pytest.approx(2.0) and terms["mse_t"] == pytest.approx(2.0)  # (0 + 4) / 2, last token only


def test_probe_blocks_puts_the_probe_loss_on_the_chosen_blocks_only(toy_chat, one_thread) -> None:
    """``probe_blocks=2-3`` on the 4-block toy: blocks 0-1 keep malicious rows at FP (MSE at the
    last token), blocks 2-3 carry the paper's probe loss; a bad or out-of-range selection is one
    QuantizerError naming the option."""
    from harness.calibration_data import load_calibration_prompts

    records = load_calibration_prompts()
    records = [r for r in records if r["label"] == "harmful"][:8] + [r for r in records if r["label"] == "benign"][:8]
    ctx = QuantContext(tokenizer=toy_chat.tokenizer, calibration_prompts=records)
    q = build_quantizer("qrealign", {"n_prompts": 8, "epochs_shallow": 1, "epochs_deep": 1,
                                     "probe_blocks": "2-3", "diagnostic_prompts": 0})
    q.apply(copy.deepcopy(toy_chat.model), "w8a8", ctx)
    finals = [b["final"] for b in q.metadata["blocks"]]
    assert ["probe" in f for f in finals] == [False, False, True, True], finals
    assert ["mse_t" in f for f in finals] == [True, True, False, False], finals
    assert q.metadata["loss"]["probe_blocks"] == [2, 3]
    with pytest.raises(QuantizerError, match="probe_blocks"):
        QRealignOptions(probe_blocks="deep")
    q = build_quantizer("qrealign", {"n_prompts": 8, "probe_blocks": "9", "diagnostic_prompts": 0})
    with pytest.raises(QuantizerError, match="probe_blocks='9'.*out of range"):
        q.apply(copy.deepcopy(toy_chat.model), "w8a8", ctx)


def _kl_to_parent(model, parent, tokenizer, records) -> float:
    """Mean KL(parent || model) of the next-token distribution after each chat-formatted prompt."""
    from common.prompts import chat_prompt

    total = 0.0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([tokenizer(chat_prompt(tokenizer, r["prompt"], ""), add_special_tokens=False)["input_ids"]])
            log_p = torch.log_softmax(parent(input_ids=ids).logits[0, -1].float(), -1)
            log_q = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
    return total / len(records)


def test_output_term_moves_the_eroded_toy_model_toward_its_aligned_parent(toy_chat, one_thread) -> None:
    """toy-chat-eroded quantized at W8A8 with probes and targets from toy-chat (clipping learning
    rate 0.3, so that the short schedule can move the clipping at all): on the malicious
    calibration prompts, the next-token distribution ends closer to toy-chat's with the output term
    on the last two blocks than with the paper's loss (seconds on one thread)."""
    from harness.calibration_data import load_calibration_prompts
    from harness.models import load_model

    records = load_calibration_prompts()
    records = [r for r in records if r["label"] == "harmful"][:12] + [r for r in records if r["label"] == "benign"][:12]
    eroded = load_model("toy-chat-eroded", device="cpu")
    kl = {}
    for loss in ("paper", "output"):
        q = build_quantizer("qrealign", {"n_prompts": 8, "epochs_shallow": 2, "epochs_deep": 4, "loss": loss,
                                         "output_blocks": 2, "output_weight": 4.0, "lr_clip": 0.3,
                                         "diagnostic_prompts": 0})
        ctx = QuantContext(tokenizer=eroded.tokenizer, calibration_prompts=records, probe_model=toy_chat.model)
        model = q.apply(copy.deepcopy(eroded.model), "w8a8", ctx)
        ids = set(q.metadata["calibration_prompts"]["ids"])
        chosen = [r for r in records if r["id"] in ids and r["label"] == "harmful"]
        kl[loss] = _kl_to_parent(model, toy_chat.model, eroded.tokenizer, chosen)
        if loss == "output":
            assert q.metadata["loss"]["terms"] == ["output"]
            assert q.metadata["loss"]["parent_targets"]["output_layers"] == [2, 3]
            assert "output" in q.metadata["blocks"][-1]["final"] and "mse_t" in q.metadata["blocks"][0]["final"]
    assert kl["output"] < 0.7 * kl["paper"], kl  # measured: 0.019 against 0.041
