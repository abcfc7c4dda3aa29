"""The shared calibration loop and block-input capture, on the real toy chat model."""

import copy
import math
from pathlib import Path

import pytest
import torch

from quantizers import QuantizerError
from quantizers.calibration import (
    DivergenceGuard,
    capture_layer_inputs,
    decoder_layers,
    input_channel_absmax,
    run_calibration,
    run_layer,
)


@pytest.fixture(scope="module")
def batches(toy_chat):
    tok = toy_chat.tokenizer
    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "Python lists keep their order; sets do not. " * 4]
    return [tok(t, return_tensors="pt").input_ids[:, :32] for t in texts]


def test_layer_by_layer_run_reproduces_the_model(toy_chat, batches, one_thread):
    model = toy_chat.model
    inputs = capture_layer_inputs(model, batches)
    assert len(inputs) == len(batches)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            h = inputs.hidden[i]
            for layer in decoder_layers(model):
                h = run_layer(layer, h, inputs.kwargs[i])
            want = model(input_ids=batch, output_hidden_states=True).hidden_states[-1]
            assert torch.allclose(model.model.norm(h), want, atol=1e-4)


def test_input_channel_absmax_matches_direct_computation(toy_chat, batches, one_thread):
    model = toy_chat.model
    stats = input_channel_absmax(model, batches[:1], select=lambda n, m: n == "model.layers.0.mlp.down_proj")
    assert list(stats) == ["model.layers.0.mlp.down_proj"]
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=batches[0])
    h.remove()
    assert torch.equal(stats["model.layers.0.mlp.down_proj"], seen[0].abs().reshape(-1, seen[0].shape[-1]).amax(0))


def test_loop_minimises_and_logs_terms():
    target = torch.tensor([3.0, -2.0])
    x = torch.nn.Parameter(torch.zeros(2))

    def loss_fn(batch, step):
        loss = ((x - target) ** 2).sum()
        return loss, {"gap": float((x - target).detach().abs().max())}

    log = run_calibration(loss_fn, [x], [None], steps=200, lr=0.1, show_progress=False)
    assert log.steps_run == 200 and len(log.history["loss"]) == 200 and len(log.history["gap"]) == 200
    assert log.history["loss"][-1] < 1e-3 < log.history["loss"][0]
    assert log.to_dict(max_points=10)["curves"]["loss"][0] == pytest.approx(13.0)


def _unbounded_push():
    x = torch.nn.Parameter(torch.ones(1))

    def loss_fn(batch, step):  # maximises |x| without bound, like AAQ's push term
        push = x.abs().sum()
        return -push, {"push": float(push)}

    return x, loss_fn


def test_divergence_guard_stops_and_restores_last_good_parameters():
    x, loss_fn = _unbounded_push()
    log = run_calibration(loss_fn, [x], [None], steps=1000, lr=0.5, show_progress=False,
                          guard=DivergenceGuard("push", factor=5.0))
    assert log.stopped_early and "push term diverged" in log.stopped_early
    assert log.steps_run < 1000
    assert float(x.abs()) <= 5.0  # restored to the last step within bounds
    x, loss_fn = _unbounded_push()
    with pytest.raises(QuantizerError, match="diverged"):
        run_calibration(loss_fn, [x], [None], steps=1000, lr=0.5,
                        show_progress=False, guard=DivergenceGuard("push", factor=5.0, action="error"))


def test_nan_loss_is_a_clear_error():
    x = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(QuantizerError, match="loss became nan"):
        run_calibration(lambda b, s: (x.sum() * float("nan"), {}), [x], [None], steps=3, show_progress=False)


def test_several_guards_the_first_to_trip_decides():
    x = torch.nn.Parameter(torch.ones(1))

    def loss_fn(batch, step):  # "pull" grows 3x faster than "push"
        push = x.abs().sum()
        return -push, {"push": float(push), "pull": float(3 * push - 2)}

    log = run_calibration(loss_fn, [x], [None], steps=1000, lr=0.5, show_progress=False,
                          guard=[DivergenceGuard("push", factor=5.0), DivergenceGuard("pull", factor=5.0)])
    assert log.stopped_early.startswith("pull term diverged")


@pytest.mark.parametrize("schedule,warmup", [("constant", 0), ("constant", 3), ("cosine", 0), ("cosine", 2)])
def test_learning_rate_schedule_is_what_every_step_runs_at(schedule, warmup):
    """With a constant unit gradient AdamW moves a parameter by exactly its learning rate each
    step, so the parameter's steps read the schedule back."""
    x = torch.nn.Parameter(torch.zeros(1))
    seen = []

    def loss_fn(batch, step):
        seen.append(float(x.detach()))
        return x.sum(), {}

    steps, lr = 8, 0.1
    run_calibration(loss_fn, [x], [None], steps=steps, lr=lr, schedule=schedule, warmup_steps=warmup,
                    show_progress=False)
    moved = [a - b for a, b in zip(seen, seen[1:])]
    expected = []
    for i in range(steps - 1):
        if i < warmup:
            expected.append((i + 1) / (warmup + 1))
        elif schedule == "constant":
            expected.append(1.0)
        else:
            expected.append(0.5 * (1 + math.cos(math.pi * (i - warmup) / (steps - warmup))))
    assert moved == pytest.approx([lr * f for f in expected], rel=1e-4)


def test_bad_schedule_is_a_clear_error():
    x = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(QuantizerError, match="unknown learning-rate schedule 'linear'"):
        run_calibration(lambda b, s: (x.sum(), {}), [x], [None], steps=4, schedule="linear", show_progress=False)
    with pytest.raises(QuantizerError, match="warm-up steps"):
        run_calibration(lambda b, s: (x.sum(), {}), [x], [None], steps=4, warmup_steps=4, show_progress=False)


def test_peak_memory_is_this_programs_own_not_its_parents(tmp_path) -> None:
    """A run started by a process that holds 600 MiB (a bench with a model loaded) reports its own
    peak: ``ru_maxrss`` would carry the parent's RSS at the fork over the ``exec``."""
    import subprocess
    import sys

    held = bytearray(600 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: resident
    code = "from quantizers.calibration import peak_memory_bytes; print(peak_memory_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert 0 < int(out) < 400 * 2**20, out  # torch alone is well under 400 MiB
    del held
