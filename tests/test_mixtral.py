"""Mixtral's block: RMSNorm, SwiGLU experts, the top-2 renormalised dropless layer, the
Mixtral-style transformer; cross-checked against Hugging Face's ``MixtralRMSNorm`` and
``MixtralSparseMoeBlock`` when torch and transformers are installed."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.models.transformer import Transformer, TransformerConfig, mixtral_config
from tinymoe.moe.swiglu import SwiGLUExperts
from tinymoe.nn.rmsnorm import RMSNorm, rms_norm
from tinymoe.nn.swiglu import SwiGLU, swiglu, swiglu_gate

F64 = np.float64
task8_1 = pytest.mark.task8_1  # runs rms_norm
task8_2 = pytest.mark.task8_2  # runs swiglu


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --- RMSNorm ---------------------------------------------------------------------------------
@task8_1
def test_rms_norm_by_hand():
    x = np.array([[3.0, 4.0], [1.0, -1.0]])
    y = rms_norm(tm.tensor(x), np.array([1.0, 2.0]), 0.0).numpy()
    np.testing.assert_allclose(y, [[3 / 12.5 ** 0.5, 8 / 12.5 ** 0.5], [1.0, -2.0]])


@task8_1
def test_rmsnorm_output_has_unit_rms_and_is_scale_invariant():
    m = RMSNorm(16, eps=1e-12, dtype=F64)
    x = rand(5, 16) * 7 + 2
    y = m(x).numpy()
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1.0, rtol=1e-10)
    np.testing.assert_allclose(m(3.5 * x).numpy(), y, rtol=1e-10)


@task8_1
def test_rmsnorm_gradcheck():
    m = RMSNorm(6, dtype=F64)
    m.weight.data = 1 + 0.3 * rand(6, seed=1)
    x = tm.tensor(rand(3, 6), requires_grad=True)
    assert tm.gradcheck(lambda x, w: m(x), [x, m.weight])


def test_rmsnorm_refuses_bad_input():
    with pytest.raises(ValueError, match="eps must be positive"):
        RMSNorm(4, eps=0.0)
    with pytest.raises(ValueError, match=r"RMSNorm\(4.*last dim 3"):
        RMSNorm(4)(np.ones((2, 3), np.float32))


# --- SwiGLU ----------------------------------------------------------------------------------
@task8_2
def test_swiglu_by_hand():
    x = rand(4, 3)
    Wg, Wu, Wd = rand(3, 5, seed=1), rand(3, 5, seed=2), rand(5, 3, seed=3)
    a = x @ Wg
    want = (a / (1 + np.exp(-a)) * (x @ Wu)) @ Wd
    np.testing.assert_allclose(swiglu(x, Wg, Wu, Wd).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(swiglu_gate(np.array([0.0, 1.0]), 2.0).numpy(),
                               [0.0, 2 / (1 + np.exp(-1.0))])


@task8_2
def test_dense_swiglu_gradcheck():
    m = SwiGLU(4, 6, dtype=F64, rng=0)
    x = tm.tensor(rand(3, 4), requires_grad=True)
    assert tm.gradcheck(lambda x, *ps: m(x), [x, *m.parameters()])


@task8_2
def test_swiglu_experts_both_layouts_agree_with_each_expert_alone():
    ex = SwiGLUExperts(3, 4, 6, dtype=F64, rng=1)
    buf = rand(3, 2, 4)  # (E, C, d)
    out = ex(buf).numpy()
    rows = buf.reshape(6, 4)
    out_rows = ex(rows, np.array([0, 2, 4, 6])).numpy()
    for e in range(3):
        np.testing.assert_allclose(out[e], ex.expert(e, buf[e]).numpy(), rtol=1e-12)
        np.testing.assert_allclose(out_rows[2 * e:2 * e + 2], out[e], rtol=1e-12)


@task8_2
def test_swiglu_experts_gradcheck_with_an_empty_expert():
    ex = SwiGLUExperts(4, 3, 5, dtype=F64, rng=2)
    x = tm.tensor(rand(9, 3), requires_grad=True)
    offsets = np.array([0, 3, 3, 7, 9])
    assert tm.gradcheck(lambda x, *ps: ex(x, offsets), [x, *ex.parameters()])
    ex.zero_grad()
    ex(x, offsets).sum().backward()
    assert not ex.W_up.grad[1].any()  # expert 1 had no rows


# --- the Mixtral layer -----------------------------------------------------------------------
@pytest.mark.task6_1
def test_mixtral_layer_is_renormalised_top2_over_swiglu_experts():
    layer = tm.moe.mixtral_layer(4, 4, 6, router_dtype="float64", dtype=F64, rng=3)
    x = rand(10, 4, seed=4)
    y, aux = layer(x)
    p = layer.last_routing.probs.numpy()
    want = np.zeros_like(x)
    for t in range(10):
        top = np.argsort(-p[t], kind="stable")[:2]
        w = p[t, top] / p[t, top].sum()
        for e, wt in zip(top, w):
            want[t] += wt * layer.experts.expert(e, x[t:t + 1]).numpy()[0]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-10, atol=1e-12)
    assert set(aux) == {"balance"} and layer.last_routing.capacity is None  # dropless


@pytest.mark.task6_1
def test_ties_go_to_the_lowest_expert_index():
    layer = tm.moe.mixtral_layer(4, 8, 6, router_dtype="float64", dtype=F64, rng=0)
    layer.router.W_g.data[...] = 0.0  # every expert equally likely
    layer(rand(3, 4))
    np.testing.assert_array_equal(layer.last_routing.expert_index, [[0, 1]] * 3)


# --- the Mixtral-style transformer -----------------------------------------------------------
@pytest.mark.task8_1
@pytest.mark.task8_2
@pytest.mark.task6_1
def test_mixtral_config_builds_rmsnorm_swiglu_top2_and_trains():
    cfg = mixtral_config(d_model=16, n_layers=2, n_heads=2, d_ff=24, num_experts=4,
                         block_size=8)
    model = Transformer(cfg, rng=0)
    assert all(isinstance(b.ln1, RMSNorm) and b.is_moe for b in model.blocks)
    assert isinstance(model.blocks[0].ffn.experts, SwiGLUExperts)
    assert model.blocks[0].ffn.k == 2 and model.blocks[0].ffn.router.normalize
    pc = tm.params.count_params(model.params_config())
    # the params model leaves out attention biases (4d per layer) and the head's bias
    assert model.num_parameters() - pc.total == 2 * 4 * 16 + cfg.vocab_size
    assert model.num_parameters() - model.active_parameters() == pc.total - pc.active
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 8))
    opt = tm.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss, ce = model.loss(ids, ids)
        loss.backward()
        opt.step()
        first = ce.item() if first is None else first
    assert ce.item() < first - 1.0


def test_mixtral_kind_needs_swiglu_and_others_refuse_it():
    with pytest.raises(ValueError, match="SwiGLU experts"):
        TransformerConfig(kind="mixtral")
    with pytest.raises(ValueError, match="SwiGLU experts"):
        TransformerConfig(kind="switch", activation="swiglu")
    with pytest.raises(ValueError, match="norm="):
        TransformerConfig(norm="batchnorm")
    assert TransformerConfig(kind="dense", activation="swiglu", norm="rmsnorm").k == 1


# --- Hugging Face cross-checks -----------------------------------------------------------------
def _hf():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    return torch, mx


@pytest.mark.torch
@task8_1
def test_rmsnorm_matches_hf_mixtral_rmsnorm():
    torch, mx = _hf()
    ref = mx.MixtralRMSNorm(8, eps=1e-5).double()
    w = 1 + 0.2 * rand(8, seed=5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
    ours = RMSNorm(8, eps=1e-5, dtype=F64)
    ours.weight.data = w.copy()
    x = rand(3, 5, 8, seed=6) * 2
    np.testing.assert_allclose(ours(x).numpy(), ref(torch.tensor(x)).detach().numpy(),
                               rtol=1e-6, atol=1e-7)  # HF computes the norm in float32


def _hf_block(torch, mx, d, f, E, k, seed):
    cfg = mx.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    block = mx.MixtralSparseMoeBlock(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return block


def _ours_from_hf(block, d, E, k):
    """Map HF's weights onto a float64 mixtral_layer. Recent transformers fuse the experts
    into 3-D tensors (``gate_up_proj``, ``down_proj``); older ones keep a ModuleList of
    ``w1`` (gate), ``w3`` (up), ``w2`` (down) Linears."""
    layer = tm.moe.mixtral_layer(d, E, 1, k, router_dtype="float64", dtype=F64, rng=0)
    gate = block.gate.weight.detach().numpy()  # (E, d)
    layer.router.W_g.data = gate.T.copy()
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):
        layer.experts = SwiGLUExperts.from_hf(ex.gate_up_proj.detach().numpy(),
                                              ex.down_proj.detach().numpy())
    else:  # transformers < 4.57: one MixtralBlockSparseTop2MLP per expert
        gu = np.stack([np.concatenate([m.w1.weight.detach().numpy(),
                                       m.w3.weight.detach().numpy()]) for m in ex])
        dn = np.stack([m.w2.weight.detach().numpy() for m in ex])
        layer.experts = SwiGLUExperts.from_hf(gu, dn)
    return layer


@pytest.mark.torch
@pytest.mark.task8_2
@pytest.mark.task6_1
@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (6, 3)])
def test_mixtral_block_matches_hf_sparse_moe_block(E, k):
    torch, mx = _hf()
    d, f = 8, 12
    block = _hf_block(torch, mx, d, f, E, k, seed=E + k)
    layer = _ours_from_hf(block, d, E, k)
    x = rand(2, 7, d, seed=E)  # continuous draws: no exact ties among the router logits
    logits = x.reshape(-1, d) @ layer.router.W_g.data
    s = -np.sort(-logits, -1)
    assert (s[:, :k] - s[:, 1:k + 1]).min() > 1e-9
    xt = torch.tensor(x, requires_grad=True)
    ref = block(xt)
    ref = ref[0] if isinstance(ref, tuple) else ref
    xo = tm.tensor(x, requires_grad=True)
    y, _ = layer(xo)
    # HF takes the router's softmax in float32 (``router_logits.float()``): the gates agree
    # to float32's precision, everything else is float64 on both sides
    np.testing.assert_allclose(y.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    r = rand(*x.shape, seed=9)
    ref.backward(torch.tensor(r))
    (y * r).sum().backward()
    np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
