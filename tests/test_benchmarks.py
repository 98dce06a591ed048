"""The benchmarks compare like with like: every implementation in a benchmark computes the same
numbers as tinymoe before anything is timed. (No timing is asserted anywhere.)

The Switch layer runs the code of three classroom tasks (capacity positions, the balancing
loss, the z-loss), so its tests carry those tasks' markers.
"""
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.task4_1, pytest.mark.task4_2, pytest.mark.task4_3]




@pytest.fixture(scope="module")
def switch_bench(load_benchmark):
    return load_benchmark("switch_layer")


def test_switch_layer_numpy_by_hand_matches_tinymoe(switch_bench):
    # T = 512 tokens, 8 experts, C = 80: the router sends one expert 86 tokens, so dropping
    # is part of what is compared.
    layer, x, g = switch_bench.make_problem(512, 32, 64, 8)
    tinymoe = switch_bench.tinymoe_step(layer, x, g)
    assert layer.last_routing.dropped_tokens.sum() > 0
    assert switch_bench.check_agreement(T=512, d=32, d_ff=64, E=8) == ["tinymoe", "numpy"]
    numpy = switch_bench.numpy_step(switch_bench.weights(layer), x, g)
    assert set(numpy) == set(tinymoe)
    np.testing.assert_allclose(numpy["x"], tinymoe["x"], rtol=1e-4, atol=1e-6)


def test_switch_layer_agreement_check_catches_a_wrong_implementation(switch_bench, monkeypatch):
    real = switch_bench.numpy_step

    def wrong(w, x, g):
        out = real(w, x, g)
        out["W1"] = out["W1"] * 1.01  # a 1 % error in one gradient
        return out

    monkeypatch.setattr(switch_bench, "numpy_step", wrong)
    with pytest.raises(AssertionError, match="numpy disagrees with tinymoe on W1"):
        switch_bench.check_agreement(T=256, d=16, d_ff=32, E=4)


@pytest.mark.torch
def test_switch_layer_torch_versions_match_tinymoe(switch_bench):
    torch = pytest.importorskip("torch")
    assert switch_bench.check_agreement(T=512, d=32, d_ff=64, E=8, torch=torch) == [
        "tinymoe", "numpy", "torch-buffer", "torch-sorted"]


@pytest.mark.torch
def test_switch_layer_hf_layer_matches_tinymoe(switch_bench):
    # HF's SwitchTransformersSparseMLP: one sequence of T tokens (its capacity is per
    # sequence), dropped tokens output 0 (transformers 5.x), no expert biases (ours are 0).
    torch = pytest.importorskip("torch")
    hf = switch_bench.try_hf()
    if hf is None:
        pytest.skip("transformers not installed")
    assert switch_bench.check_agreement(T=512, d=32, d_ff=64, E=8, torch=torch, hf=hf)[-1] \
        == "hf"
