"""Cross-checks of tm.nn and tm.optim against PyTorch (skipped when torch is absent).

Everything runs in float64 on both sides, so agreement is to ~1e-12. Our Linear stores its
weight as (in, out); torch's is (out, in), hence the transposes.
"""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.nn import CausalSelfAttention, Embedding, FeedForward, LayerNorm, Linear

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch
F64 = np.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


def t(a, grad=False):
    return torch.tensor(np.array(a), dtype=torch.float64, requires_grad=grad)


def backward_both(ours, theirs, seed=0):
    """Backpropagate the same random cotangent through both outputs."""
    r = np.random.default_rng(seed).standard_normal(ours.shape)
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), **TOL)
    ours.backward(r)
    theirs.backward(t(r))


def close(ours, theirs):
    np.testing.assert_allclose(ours, theirs.detach().numpy() if hasattr(theirs, "detach")
                               else theirs, **TOL)


def rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def test_linear_matches_torch():
    lin = Linear(5, 3, dtype=F64, rng=0)
    lin.bias.data[...] = rand(3)
    ref = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        ref.weight.copy_(t(lin.weight.data.T))
        ref.bias.copy_(t(lin.bias.data))
    x = rand(2, 4, 5)
    xo, xt = tm.tensor(x, requires_grad=True), t(x, grad=True)
    backward_both(lin(xo), ref(xt))
    close(xo.grad, xt.grad)
    close(lin.weight.grad, ref.weight.grad.T)
    close(lin.bias.grad, ref.bias.grad)


def test_layernorm_matches_torch():
    ln = LayerNorm(6, eps=1e-5, dtype=F64)
    ln.weight.data[...] = rand(6, seed=2)
    ln.bias.data[...] = rand(6, seed=3)
    x = rand(3, 4, 6) * 3 + 1
    xo, xt = tm.tensor(x, requires_grad=True), t(x, grad=True)
    wt, bt = t(ln.weight.data, grad=True), t(ln.bias.data, grad=True)
    backward_both(ln(xo), F.layer_norm(xt, (6,), wt, bt, eps=1e-5))
    close(xo.grad, xt.grad)
    close(ln.weight.grad, wt.grad)
    close(ln.bias.grad, bt.grad)


def test_embedding_matches_torch():
    emb = Embedding(7, 3, dtype=F64, rng=0)
    ids = np.array([[1, 1, 6], [0, 1, 3]])
    wt = t(emb.weight.data, grad=True)
    backward_both(emb(ids), F.embedding(torch.tensor(ids), wt))
    close(emb.weight.grad, wt.grad)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_feedforward_matches_torch(activation):
    ff = FeedForward(4, 10, activation=activation, dtype=F64, rng=0)
    for b in (ff.fc1.bias, ff.fc2.bias):
        b.data[...] = rand(*b.shape, seed=4)
    ws = {k: t(v.data, grad=True) for k, v in ff.named_parameters()}
    x = rand(2, 3, 4)
    xo, xt = tm.tensor(x, requires_grad=True), t(x, grad=True)
    act = F.gelu if activation == "gelu" else F.relu  # torch's default GELU is the exact one
    ref = act(xt @ ws["fc1.weight"] + ws["fc1.bias"]) @ ws["fc2.weight"] + ws["fc2.bias"]
    backward_both(ff(xo), ref)
    close(xo.grad, xt.grad)
    for k, p in ff.named_parameters():
        close(p.grad, ws[k].grad)


@pytest.mark.parametrize("B,T,d,H", [(2, 5, 8, 2), (1, 3, 6, 3)])
def test_attention_matches_torch(B, T, d, H):
    att = CausalSelfAttention(d, H, dtype=F64, rng=0)
    for lin in (att.qkv, att.proj):
        lin.bias.data[...] = rand(*lin.bias.shape, seed=5)
    ws = {k: t(v.data, grad=True) for k, v in att.named_parameters()}
    x = rand(B, T, d)
    xo, xt = tm.tensor(x, requires_grad=True), t(x, grad=True)

    qkv = xt @ ws["qkv.weight"] + ws["qkv.bias"]  # (B, T, 3d)
    q, k, v = (z.reshape(B, T, H, d // H).transpose(1, 2) for z in qkv.split(d, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d_h)
    ref = y.transpose(1, 2).reshape(B, T, d) @ ws["proj.weight"] + ws["proj.bias"]

    backward_both(att(xo), ref)
    close(xo.grad, xt.grad)
    for name, p in att.named_parameters():
        close(p.grad, ws[name].grad)


# ------------------------------------------------------------------------ optimizers

def run_both(make_ours, make_theirs, steps=5, shapes=((3, 4), (4,))):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s) for s in shapes]
    ours = [tm.nn.Parameter(a.copy()) for a in init]
    theirs = [torch.nn.Parameter(t(a)) for a in init]
    opt_o, opt_t = make_ours(ours), make_theirs(theirs)
    for _ in range(steps):
        for po, pt in zip(ours, theirs):
            g = rng.standard_normal(po.shape)
            po.grad, pt.grad = g.copy(), t(g)
        opt_o.step()
        opt_t.step()
    for po, pt in zip(ours, theirs):
        close(po.data, pt)


@pytest.mark.parametrize("kw", [{"lr": 0.1}, {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6},
                                {"lr": 0.05, "weight_decay": 0.1}])
def test_adam_matches_torch(kw):
    run_both(lambda ps: tm.optim.Adam(ps, **kw), lambda ps: torch.optim.Adam(ps, **kw))


@pytest.mark.parametrize("kw", [{"lr": 0.1},
                                {"lr": 0.05, "weight_decay": 0.2, "betas": (0.5, 0.9)}])
def test_adamw_matches_torch(kw):
    run_both(lambda ps: tm.optim.AdamW(ps, **kw), lambda ps: torch.optim.AdamW(ps, **kw))


@pytest.mark.parametrize("kw", [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9},
                                {"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                 "weight_decay": 0.01}])
def test_sgd_matches_torch(kw):
    run_both(lambda ps: tm.optim.SGD(ps, **kw), lambda ps: torch.optim.SGD(ps, **kw))


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(s) for s in ((3, 4), (5,))]
    ours = [tm.nn.Parameter(np.zeros(g.shape)) for g in grads]
    theirs = [torch.nn.Parameter(t(np.zeros(g.shape))) for g in grads]
    for po, pt, g in zip(ours, theirs, grads):
        po.grad, pt.grad = g.copy(), t(g)
    total_o = tm.optim.clip_grad_norm_(ours, max_norm)
    total_t = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert total_o == pytest.approx(float(total_t), rel=1e-12)
    for po, pt in zip(ours, theirs):
        close(po.grad, pt.grad)


# --- MoE layers: the one MoELayer against the same layer written the usual way in PyTorch -------
def torch_ffn(h, W1, b1, W2, b2):
    """One of tinymoe's stacked ReLU experts: relu(h W1 + b1) W2 + b2."""
    return F.relu(h @ W1 + b1) @ W2 + b2


@pytest.mark.task6_1
@pytest.mark.parametrize("k", [1, 2])
def test_mixtral_style_layer_matches_torch(k):
    """HF MixtralSparseMoeBlock's routing (softmax in float, top-k, renormalise, one loop
    over the experts with index_add_) and HF's load_balancing_loss_func (one f per choice
    slot, so k times ours) against MoELayer(TopKRouter): y, the loss and every gradient."""
    rng = np.random.default_rng(20 + k)
    T, d, f, E, coef = 9, 4, 6, 3, 0.1
    router = tm.moe.TopKRouter(d, E, k, normalize=k > 1, aux_loss_coef=coef,
                               router_dtype="float64", rng=0)
    router.W_g.data = rng.standard_normal((d, E))
    layer = tm.moe.moe_layer(router, f, dtype=F64, rng=1)
    ex = layer.experts
    for b in (ex.b1, ex.b2):
        b.data = 0.1 * rng.standard_normal(b.shape)
    x = rand(T, d, seed=k)
    xt = tm.tensor(x, requires_grad=True)
    y, aux = layer(xt)
    loss = tm.moe.sum_losses(aux.values())

    xx = t(x, grad=True)
    Wg, W1, b1, W2, b2 = (t(p.data, grad=True) for p in (router.W_g, ex.W1, ex.b1, ex.W2, ex.b2))
    probs = torch.softmax(xx @ Wg, dim=-1)  # (T, E)
    weights, chosen = torch.topk(probs, k, dim=-1)  # (T, k)
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(xx)
    mask = F.one_hot(chosen, E).permute(2, 1, 0)  # (E, k, T)
    for e in range(E):
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, weights[tok, slot, None] * torch_ffn(xx[tok], W1[e], b1[e],
                                                                    W2[e], b2[e]))
    slots = F.one_hot(chosen, E).double()  # (T, k, E)
    hf = E * (slots.mean(dim=0) * probs.mean(dim=0)).sum()  # HF's loss: k at uniform
    theirs = coef * hf / k
    np.testing.assert_array_equal(layer.last_routing.expert_index, chosen.numpy())
    close(y.numpy(), out)
    close(loss.item(), theirs.item())
    g = rand(T, d, seed=10 + k)  # one backward of both: a cotangent on y plus the aux loss
    ((y * tm.tensor(g)).sum() + loss).backward()
    ((out * t(g)).sum() + theirs).backward()
    close(xt.grad, xx.grad)
    for ours, tt in zip((router.W_g, ex.W1, ex.b1, ex.W2, ex.b2), (Wg, W1, b1, W2, b2)):
        close(ours.grad, tt.grad)
