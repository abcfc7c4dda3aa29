"""Frozen models are freed once a method has read what it needs from them (QuantContext.release,
VariantMaker handing its own reference over for the last variant that needs it): AAQ's base and
OST's FP reference while the transforms train, Q-realign's aligned probe model while the blocks
calibrate. Real toy models; results must not depend on whether the frozen model stays alive."""

import copy
import gc
import weakref

import pytest
import torch

from harness.calibration_data import load_calibration_prompts
from harness.config import VariantSpec
from harness.models import load_model, resolve_model
from quantizers import QuantContext, QuantScheme, build_quantizer

AAQ = {"steps": 3, "weights": "rtn"}
QREALIGN = {"n_prompts": 8, "epochs_shallow": 1, "epochs_deep": 1, "loss": "probe+output"}


@pytest.fixture(scope="module")
def batches(toy_chat):
    """Three batches of 2 x 64 tokens of real held-out-style text."""
    from harness.perplexity import load_text

    ids = toy_chat.tokenizer(load_text("toy-heldout")[:8000], return_tensors="pt", verbose=False)["input_ids"][0]
    return [ids[i * 128:(i + 1) * 128].reshape(2, 64) for i in range(3)]


def _alive_while(stage_prefix: str, watched: dict[str, weakref.ref]) -> tuple[list, dict[str, list[bool]]]:
    """A progress callback recording, at every step of the stages named ``stage_prefix*``, whether
    each watched model is still alive (plain reference counting: no gc.collect, so a model kept
    only by a reference cycle would count as alive, as its memory would stay in use)."""
    seen: dict[str, list[bool]] = {name: [] for name in watched}

    def progress(stage: str, done: int, total: int) -> None:
        if stage.startswith(stage_prefix):
            for name, ref in watched.items():
                seen[name].append(ref() is not None)
    return [progress], seen


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_aaq_frees_base_and_reference_while_training_with_the_same_result(toy_chat, batches, one_thread):
    base = load_model("toy-base", device="cpu").model
    reference = copy.deepcopy(toy_chat.model)
    watched = {"base": weakref.ref(base), "reference": weakref.ref(reference)}
    (progress,), seen = _alive_while("aaq", watched)
    ctx = QuantContext(tokenizer=toy_chat.tokenizer, calibration_batches=batches, base_model=base,
                       reference_model=reference, seed=0, progress=progress)
    del base, reference  # the context is the only owner, as in `safequant quantize`
    freed = build_quantizer("aaq", AAQ)
    freed_model = freed.apply(copy.deepcopy(toy_chat.model), "w4a4kv4", ctx)
    assert len(seen["base"]) == 3 and not any(seen["base"]), "AAQ's base stayed alive while training"
    assert not any(seen["reference"]), "the FP reference copy stayed alive while training"
    assert ctx.base_model is None and ctx.reference_model is None

    # the same run with the caller keeping both models alive: the same loss curve and weights
    base = load_model("toy-base", device="cpu").model
    kept = build_quantizer("aaq", AAQ)
    kept_model = kept.apply(copy.deepcopy(toy_chat.model), "w4a4kv4",
                            QuantContext(tokenizer=toy_chat.tokenizer, calibration_batches=batches, base_model=base,
                                         reference_model=toy_chat.model, seed=0))
    assert base.training is False and next(base.parameters()).requires_grad  # still the caller's intact model
    assert freed.metadata["calibration"]["curves"] == kept.metadata["calibration"]["curves"]
    a, b = _state(freed_model), _state(kept_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qrealign_frees_the_probe_model_before_the_blocks_calibrate(one_thread):
    records = load_calibration_prompts()
    eroded = load_model("toy-chat-eroded", device="cpu")
    parent = load_model("toy-chat", device="cpu").model
    watched = {"probe": weakref.ref(parent)}
    (progress,), seen = _alive_while("qrealign block", watched)
    ctx = QuantContext(tokenizer=eroded.tokenizer, calibration_prompts=records, probe_model=parent, seed=0,
                       progress=progress)
    del parent
    freed = build_quantizer("qrealign", QREALIGN)
    freed_model = freed.apply(copy.deepcopy(eroded.model), "w8a8", ctx)
    assert seen["probe"] and not any(seen["probe"]), "the probe model stayed alive while the blocks calibrated"

    parent = load_model("toy-chat", device="cpu").model
    kept = build_quantizer("qrealign", QREALIGN)
    kept_model = kept.apply(copy.deepcopy(eroded.model), "w8a8",
                            QuantContext(tokenizer=eroded.tokenizer, calibration_prompts=records, probe_model=parent,
                                         seed=0))
    assert parent is not None
    a, b = _state(freed_model), _state(kept_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["final"] for e in freed.metadata["blocks"]] == [e["final"] for e in kept.metadata["blocks"]]
    assert freed.metadata["probes"]["source"] == kept.metadata["probes"]["source"] == "fitted on probe_model"


def _maker(specs, subject: str, **settings):
    from harness import quantize as maker
    from harness.quantize import VariantSettings

    return maker.check(specs, resolve_model(subject), VariantSettings(**settings))


def test_the_maker_hands_the_base_over_to_the_last_variant_that_needs_it(one_thread):
    """Two AAQ variants in one audit share the base; the second one's context is its only owner
    (freed while it trains); the record still names the base."""
    scheme = QuantScheme.parse("w4a4kv4")
    specs = [VariantSpec(f"aaq{i}", "aaq", scheme, {"steps": 1, "weights": "rtn", "alpha": alpha})
             for i, alpha in enumerate((0.5, 0.75))]
    variants = _maker(specs, "toy-chat", base="toy-base", calibration=_tiny_calibration())
    subject = load_model("toy-chat", device="cpu")
    variants.prepare(subject)
    base = weakref.ref(variants.base_model.model)
    first = variants.make(specs[0], subject)
    assert base() is not None, "freed before the second variant that needs it"
    second = variants.make(specs[1], subject)
    gc.collect()
    assert base() is None, "the maker kept the base after the last variant that needs it"
    assert first.record["base"]["spec"] == second.record["base"]["spec"]
    assert second.model is not subject.model  # the audit's subject is never trained in place
    # a variant made afterwards that needs the base loads it again
    again = variants.make(specs[1], subject)
    assert again.record["base"] == second.record["base"]
    assert again.record["metadata"]["calibration"]["curves"] == second.record["metadata"]["calibration"]["curves"]


def test_quantize_trains_the_consumed_subject_in_place(one_thread):
    """`safequant quantize` (consume_subject): OST reads its FP targets before any change, so the
    subject itself is trained, no second full model; the same weights as a copy trained next to
    the FP reference."""
    scheme = QuantScheme.parse("w4a4kv4")
    spec = VariantSpec("ost", "ost", scheme, {"steps": 2, "weights": "rtn"})
    calibration = _tiny_calibration()
    in_place_subject = load_model("toy-chat", device="cpu")
    in_place = _maker([spec], "toy-chat", base="none", calibration=calibration).make(
        spec, in_place_subject, consume_subject=True)
    assert in_place.model is in_place_subject.model
    subject = load_model("toy-chat", device="cpu")
    copied = _maker([spec], "toy-chat", base="none", calibration=calibration).make(spec, subject)
    assert copied.model is not subject.model
    a, b = _state(in_place.model), _state(copied.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert in_place.record["metadata"]["calibration"]["curves"] == copied.record["metadata"]["calibration"]["curves"]


def _tiny_calibration():
    from harness.calibration_data import CalibrationOptions

    return CalibrationOptions(samples=4, length=64, batch=2)
