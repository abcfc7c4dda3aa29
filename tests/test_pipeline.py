"""The block pipeline (quantizers/pipeline.py): each block gets what the blocks before it hand on,
and with full_precision also the untouched model's inputs and outputs of that block."""

import pytest
import torch

from common.batching import left_pad, pad_token_id
from quantizers.base import QuantizerError
from quantizers.pipeline import BlockPipeline


def _batches(toy_chat):
    tok = toy_chat.tokenizer
    texts = [["How do I bake bread?", "Tell me about the moon and the stars tonight"], ["What is 2 + 2?"]]
    return [left_pad([tok(t, add_special_tokens=False)["input_ids"] for t in chunk], pad_token_id(tok))
            for chunk in texts]


def test_blocks_see_the_models_own_hidden_states_when_nothing_changes(toy_chat):
    model = toy_chat.model
    batches = _batches(toy_chat)
    with torch.no_grad():
        reference = [model(**b, output_hidden_states=True).hidden_states for b in batches]
        seen = []
        for block in BlockPipeline(model, batches, full_precision=True):
            assert block.name == f"model.layers.{block.index}"
            for k in range(len(batches)):
                assert torch.allclose(block.inputs[k], reference[k][block.index], atol=1e-5)
                assert torch.equal(block.fp_inputs[k], block.inputs[k])
            block.outputs = block.run(block.inputs)
            assert all(torch.equal(a, b) for a, b in zip(block.outputs, block.fp_outputs))
            seen.append(block.index)
    assert seen == list(range(model.config.num_hidden_layers))


def test_a_changed_block_changes_what_the_next_block_gets_but_not_the_fp_path(toy_chat):
    import copy

    model = copy.deepcopy(toy_chat.model)
    batches = _batches(toy_chat)
    with torch.no_grad():
        pipeline = iter(BlockPipeline(model, batches, full_precision=True))
        first = next(pipeline)
        first.layer.mlp.down_proj.weight.mul_(0.5)  # "quantize" block 0
        first.outputs = first.run(first.inputs)
        second = next(pipeline)
    assert torch.equal(second.inputs[0], first.outputs[0])
    assert torch.equal(second.fp_inputs[0], first.fp_outputs[0])
    assert not torch.allclose(second.inputs[0], second.fp_inputs[0])


def test_a_block_that_hands_back_nothing_stops_the_pipeline(toy_chat):
    with torch.no_grad(), pytest.raises(QuantizerError, match="handed back no outputs"):
        for _block in BlockPipeline(toy_chat.model, _batches(toy_chat)):
            pass
