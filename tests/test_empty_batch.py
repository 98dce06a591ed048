"""An empty batch (T = 0 tokens) works in every layer: the output has shape (0, d) (the
transformer: (0, L, V)), the auxiliary losses are 0 and every gradient is zero, on both
dispatch backends, in training and in eval mode."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe import moe
from tinymoe.dispatch import use_backend
from tinymoe.models.transformer import Transformer, TransformerConfig

D = 8


def moe_layers():
    """name -> a builder of a layer whose forward(x) returns (y, aux_losses)."""
    return {
        "switch": lambda: moe.switch_layer(D, 4, 16, rng=0),
        "switch-groups": lambda: moe.switch_layer(D, 4, 16, group_size=4, rng=0),
        "switch-bfloat16-router": lambda: moe.switch_layer(D, 4, 16, router_dtype="bfloat16",
                                                           rng=0),
        "top2": lambda: moe.gshard_layer(D, 4, 16, rng=0),
        "top2-groups": lambda: moe.gshard_layer(D, 4, 16, group_size=4, rng=0),
        "noisy-topk": lambda: moe.sparse_moe_layer(D, 4, 2, d_ff=16, w_importance=0.1,
                                                   w_load=0.1, rng=0),
        "expert-choice": lambda: moe.moe_layer(moe.ExpertChoiceRouter(D, 4, rng=0), 16, rng=0),
        "topk": lambda: moe.moe_layer(moe.TopKRouter(D, 4, 2, rng=0), 16, rng=0),
        "aux-free": lambda: moe.moe_layer(moe.AuxFreeRouter(D, 4, 2, rng=0), 16, rng=0),
        "hierarchical": lambda: moe.hierarchical_moe(D, 2, 2, 2, d_ff=16, w_importance=0.1,
                                                     w_load=0.1, rng=0),
        "shared-experts": lambda: moe.moe_layer(moe.TopKRouter(D, 4, 2, rng=0), 16,
                                                num_shared=1, rng=0),
    }


def assert_zero_grads(module):
    for name, p in module.named_parameters():
        assert p.grad is None or not p.grad.any(), name


def _first_task(name: str, training: bool) -> str | None:
    """The classroom task whose region an empty batch through ``name`` runs first (the
    student copy's stub stops there), or None where T = 0 runs no region."""
    if name.startswith(("switch", "top2")):
        return "task4_1"  # capacity
    if name in ("noisy-topk", "hierarchical"):
        return "task3_1"  # noisy top-k gating
    if name in ("topk", "shared-experts"):
        return "task6_1"  # Mixtral's router
    if name == "aux-free" and training:
        return "task6_3"  # the bias update runs in training only
    return None


def _layer_cases():
    for name in sorted(moe_layers()):
        for training in (True, False):
            task = _first_task(name, training)
            marks = [getattr(pytest.mark, task)] if task else []
            yield pytest.param(name, training, marks=marks, id=f"{name}-{training}")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name,training", list(_layer_cases()))
def test_moe_layers_take_an_empty_batch(name, training, backend):
    layer = moe_layers()[name]()
    layer.train(training)
    x = tm.tensor(np.zeros((0, D), np.float32), requires_grad=True)
    with use_backend(backend):
        y, aux = layer(x)
        total = y.sum()
        for loss in aux.values():
            assert loss.item() == 0.0
            total = total + loss
        total.backward()
    assert y.shape == (0, D) and y.dtype == np.float32
    assert x.grad is not None and x.grad.shape == (0, D)
    assert_zero_grads(layer)


def test_the_1991_mixture_takes_an_empty_batch():
    m = moe.AdaptiveMixture(D, 3, 4, rng=np.random.default_rng(0))
    x = tm.tensor(np.zeros((0, D)), requires_grad=True)
    out = m(x)
    out.output.sum().backward()
    assert out.output.shape == (0, 3) and x.grad.shape == (0, D)
    assert_zero_grads(m)


def test_the_1994_hme_takes_an_empty_batch():
    m = moe.HME(D, 2, n_branches=2, n_experts=3, rng=0)
    y = m(np.zeros((0, D)))
    assert y.shape == (0, 2) and m.gate_probs(np.zeros((0, D))).shape == (0, 6)
    ll = m.log_likelihood(np.zeros((0, D)), np.zeros((0, 2)), reduction="sum")
    (y.sum() + ll).backward()
    assert ll.item() == 0.0
    assert_zero_grads(m)


@pytest.mark.parametrize("kind,group_size", [
    pytest.param("switch", None, marks=pytest.mark.task4_1),
    pytest.param("switch", 4, marks=pytest.mark.task4_1),
    pytest.param("top2", None, marks=pytest.mark.task4_1),
    pytest.param("top2", 4, marks=pytest.mark.task4_1), ("dense", None),
    pytest.param("noisy_topk", None, marks=pytest.mark.task3_1)])
def test_the_transformer_takes_an_empty_batch(kind, group_size):
    cfg = TransformerConfig(vocab_size=10, block_size=8, d_model=D, n_layers=2, n_heads=2,
                            d_ff=16, num_experts=4, kind=kind, group_size=group_size)
    model = Transformer(cfg, rng=0)
    logits = model(np.zeros((0, 8), np.int64))
    logits.sum().backward()
    assert logits.shape == (0, 8, 10)
    assert_zero_grads(model)
