"""``fpprefix<N>``: the first N attended tokens keep full-precision activations and KV entries, in
plain forwards, left-padded batches, cached generation, learned-transform training and saved
folders (the bundled toy pair; quantizers.fp_prefix)."""

import copy
import json

import pytest
import torch

from quantizers import QuantContext, QuantizerError, build_quantizer, iter_quant_linears
from quantizers.artifact import load_variant, read_variant_info, save_variant
from quantizers.fp_prefix import fp_prefix_of
from quantizers.modules import disable_kv_quant
from quantizers.scheme import QuantScheme

SCHEME = "w4a4kv4-aasym-fpprefix1"


@pytest.fixture(scope="module")
def prefixed(toy_chat):
    return build_quantizer("rtn", {}).apply(copy.deepcopy(toy_chat.model), SCHEME)


@pytest.fixture(scope="module")
def plain(toy_chat):
    return build_quantizer("rtn", {}).apply(copy.deepcopy(toy_chat.model), "w4a4kv4-aasym")


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def test_the_modifier_parses_prints_and_needs_quantized_activations_or_kv():
    s = QuantScheme.parse("w4a4kv4-aasym-aclip0.9-fpprefix2")
    assert s.fp_prefix == 2 and s.label == "w4a4kv4-aasym-aclip0.9-fpprefix2"
    assert QuantScheme.parse(s.label) == s == QuantScheme.from_dict(s.to_dict())
    assert QuantScheme.parse("w16a16kv4-fpprefix1").fp_prefix == 1  # KV alone is enough
    for bad, says in (("w4a16-fpprefix1", "quantizes neither"), ("w4a4-fpprefix0", "positive"),
                      ("w4a4-fpprefix", "token count")):
        with pytest.raises(QuantizerError, match=says):
            QuantScheme.parse(bad)


def test_the_first_token_sees_exactly_the_full_precision_activations(toy_chat, prefixed, plain):
    """Position 0 attends only to itself: with its activations and KV in full precision its logits
    are those of the same quantized weights with no activation or KV quantization at all, while
    later positions stay quantized (they differ from that model and from the plain scheme's)."""
    ids = torch.tensor([_ids(toy_chat.tokenizer, "hello there, how are you doing today my friend")])
    weights_only = copy.deepcopy(prefixed)
    for _, module in iter_quant_linears(weights_only):
        module.a_bits = 16
    disable_kv_quant(weights_only)
    with torch.no_grad():
        got, reference, quantized = (m(ids).logits[0] for m in (prefixed, weights_only, plain))
    assert torch.allclose(got[0], reference[0], atol=1e-5)
    assert not torch.allclose(quantized[0], reference[0], atol=1e-2)
    assert not torch.allclose(got[1:], reference[1:], atol=1e-2)
    assert not torch.allclose(got[1:], quantized[1:], atol=1e-2)  # the sink's FP entries reach every later token


def test_left_padding_keeps_the_first_real_token_not_the_first_column(toy_chat, prefixed):
    tok = toy_chat.tokenizer
    short, long = _ids(tok, "hi there friend"), _ids(tok, "a much longer prompt about many things here")
    pad = len(long) - len(short)
    batch = torch.tensor([[0] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    with torch.no_grad():
        together = prefixed(input_ids=batch, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        alone = prefixed(torch.tensor([short])).logits
    assert torch.allclose(together[0, pad:], alone[0], atol=1e-4)


def test_cached_generation_matches_recomputing_the_whole_sequence(toy_chat, prefixed):
    """Decoding steps quantize every new token and keep the prefix's cached entries as they were."""
    prompt = torch.tensor([_ids(toy_chat.tokenizer, "hi there friend")])
    out = prefixed.generate(prompt, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        recomputed = prefixed(out).logits[0, prompt.shape[1] - 1:-1].argmax(-1)
    assert out[0, prompt.shape[1]:].tolist() == recomputed.tolist()


def test_learned_transforms_train_against_the_prefix_in_both_engines(toy_chat):
    """OST's training forward goes through the model's own forward, so its loss sees the prefix:
    the fused and parametrize engines give the same loss, and not the loss without fpprefix."""
    ids = toy_chat.tokenizer("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt")["input_ids"]
    batches = [ids[:, :64].reshape(1, 64)]
    torch.set_num_threads(1)
    curves = {}
    runs = (("fused", SCHEME, "true"), ("fused", SCHEME, "false"), ("parametrize", SCHEME, "false"),
            ("fused", "w4a4kv4-aasym", "false"))
    for engine, scheme, checkpointed in runs:  # a checkpointed layer's recomputation keeps the prefix too
        q = build_quantizer("ost", {"steps": 1, "lr_rotation": 0, "lr_scale": 0, "weights": "rtn", "engine": engine,
                                    "autocast": "off", "checkpoint": checkpointed})
        ctx = QuantContext(tokenizer=toy_chat.tokenizer, calibration_batches=batches,
                           reference_model=toy_chat.model, seed=0)
        q.apply(copy.deepcopy(toy_chat.model), scheme, ctx)
        curves[engine, scheme, checkpointed] = q.metadata["calibration"]["curves"]["kl_top"][0]
    fused = curves["fused", SCHEME, "true"]
    assert fused == pytest.approx(curves["fused", SCHEME, "false"], rel=1e-5, abs=1.01e-6)
    assert fused == pytest.approx(curves["parametrize", SCHEME, "false"], rel=1e-5, abs=1.01e-6)
    assert fused != pytest.approx(curves["fused", "w4a4kv4-aasym", "false"], rel=1e-3)


def test_a_saved_folder_keeps_the_prefix_and_a_tampered_record_is_refused(toy_chat, prefixed, tmp_path):
    folder = tmp_path / "v"
    save_variant(prefixed, folder, tokenizer=toy_chat.tokenizer, method="rtn",
                 scheme=QuantScheme.parse(SCHEME), options={},
                 source={"spec": "toy-chat", "fingerprint": toy_chat.fingerprint})
    loaded, _, info = load_variant(folder)
    assert info["structure"]["fp_prefix"] == 1 and fp_prefix_of(loaded) == 1
    ids = torch.tensor([_ids(toy_chat.tokenizer, "a short test sentence")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, prefixed(ids).logits)
    record = json.loads((folder / "variant.json").read_text())
    record["structure"]["fp_prefix"] = 0
    (folder / "variant.json").write_text(json.dumps(record))
    with pytest.raises(QuantizerError, match="prefix token"):
        read_variant_info(folder)


def test_qrealign_refuses_the_modifier(toy_chat):
    with pytest.raises(QuantizerError, match="fpprefix"):
        build_quantizer("qrealign", {}).check(QuantScheme.parse("w8a8-fpprefix1"))
