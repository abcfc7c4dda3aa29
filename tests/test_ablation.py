"""--base ablated: the refusal-direction ablation of toy-chat behaves like an unaligned base."""

import torch

from harness.ablation import ablate_refusal, orthogonalize
from harness.benchmarks import load_benchmarks
from harness.first_token import first_token_refusal_prob


def test_ablated_copy_stops_refusing_and_leaves_the_original_alone(toy_chat, one_thread):
    before = {k: v.clone() for k, v in toy_chat.model.state_dict().items()}
    result = ablate_refusal(toy_chat.model, toy_chat.tokenizer, n_prompts=32)
    assert all(torch.equal(before[k], v) for k, v in toy_chat.model.state_dict().items())
    harmful = [r.prompt for r in load_benchmarks(["harmful"], limit=24)[0].records]  # held-out, not used to ablate
    p_before = sum(first_token_refusal_prob(toy_chat.model, toy_chat.tokenizer, harmful)) / len(harmful)
    p_after = sum(first_token_refusal_prob(result.model, toy_chat.tokenizer, harmful)) / len(harmful)
    assert p_before > 0.4 and p_after < 0.1 * p_before
    assert set(result.scores) == {0, 1, 2} and result.layer == min(result.scores, key=result.scores.get)
    assert result.describe()["n_harmful"] == 32


def test_orthogonalize_removes_the_direction_from_every_residual_write(toy_chat):
    import copy

    model = copy.deepcopy(toy_chat.model)
    r = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0)
    orthogonalize(model, r)
    assert (model.model.embed_tokens.weight @ r).abs().max() < 1e-5
    for layer in model.model.layers:
        assert (r @ layer.self_attn.o_proj.weight).abs().max() < 1e-5
        assert (r @ layer.mlp.down_proj.weight).abs().max() < 1e-5
