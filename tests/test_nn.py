"""tm.nn: Module bookkeeping, state dicts, and every layer gradient-checked in float64."""
import re

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.nn import (
    CausalSelfAttention,
    Dropout,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    Parameter,
)

F64 = np.float64


def gradcheck_module(module, *inputs):
    """Gradient-check ``module(*inputs)`` w.r.t. the inputs that require grad and every
    parameter."""
    n = len(inputs)
    params = list(module.parameters())
    names = [f"input {i}" for i in range(n)] + [k for k, _ in module.named_parameters()]
    return tm.gradcheck(lambda *a: module(*a[:n]), [*inputs, *params], names=names)


def noncontiguous(shape, kind, seed=0):
    """A float64 leaf of ``shape`` whose data is a transposed (or reversed) or strided
    view of a larger array, so the layers must not assume C order."""
    rng = np.random.default_rng(seed)
    if kind == "transposed" and len(shape) == 1:
        data = rng.standard_normal(shape)[::-1]  # a negative stride
    elif kind == "transposed":
        data = rng.standard_normal(shape[::-1]).transpose(tuple(range(len(shape)))[::-1])
    elif kind == "strided":
        data = rng.standard_normal(shape[:-1] + (2 * shape[-1],))[..., ::2]
    else:
        data = rng.standard_normal(shape)
    assert data.shape == tuple(shape)
    assert (kind == "contiguous") == data.flags.c_contiguous
    return tm.Tensor(data, requires_grad=True)


LAYOUTS = ["contiguous", "transposed", "strided"]


# ------------------------------------------------------------------------ Parameter

def test_parameter_keeps_dtype_copies_and_requires_grad():
    a = np.arange(6, dtype=F64).reshape(2, 3)
    p = Parameter(a)
    assert p.requires_grad and p.dtype == F64 and isinstance(p, tm.Tensor)
    a[0, 0] = 99.0
    assert p.data[0, 0] == 0.0  # a copy
    assert Parameter([1.0, 2.0]).dtype == np.float32
    assert Parameter(np.ones(2, np.float32)).dtype == np.float32
    assert "Parameter(shape (2, 3), float64)" == repr(p)


def test_parameter_refuses_integers():
    with pytest.raises(TypeError, match="floating"):
        Parameter(np.arange(3))


# ------------------------------------------------------------------------ Module bookkeeping

class Mixed(Module):
    def __init__(self):
        super().__init__()
        self.embed = Linear(3, 4, rng=0)
        self.pos = Parameter(np.zeros((2, 4), np.float32))
        self.blocks = ModuleList([Linear(4, 4, rng=i) for i in range(2)])
        self.note = "a plain attribute"

    def forward(self, x):
        x = self.embed(x) + self.pos
        for b in self.blocks:
            x = b(x)
        return x


def test_named_parameters_follow_assignment_order_with_dotted_names():
    m = Mixed()
    assert [k for k, _ in m.named_parameters()] == [
        "embed.weight", "embed.bias", "pos", "blocks.0.weight", "blocks.0.bias",
        "blocks.1.weight", "blocks.1.bias"]
    assert next(m.named_parameters(prefix="model"))[0] == "model.embed.weight"
    assert m.num_parameters() == 3 * 4 + 4 + 8 + 2 * (16 + 4)
    assert len(list(m.parameters())) == 7
    assert m.note == "a plain attribute"
    assert [type(c).__name__ for c in m.children()] == ["Linear", "ModuleList"]
    assert [n for n, _ in m.named_modules()] == ["", "embed", "blocks", "blocks.0", "blocks.1"]
    assert len(list(m.modules())) == 5
    assert m(np.ones((2, 3), np.float32)).shape == (2, 4)


def test_shared_parameter_is_listed_once():
    m = Mixed()
    m.blocks[1].weight = m.blocks[0].weight  # tie
    names = [k for k, _ in m.named_parameters()]
    assert "blocks.1.weight" not in names and len(names) == 6
    assert m.num_parameters() == 3 * 4 + 4 + 8 + 16 + 4 + 4


def test_reassigning_keeps_position_and_none_unregisters():
    lin = Linear(2, 3, rng=0)
    lin.weight = Parameter(np.ones((2, 3), np.float32))
    assert [k for k, _ in lin.named_parameters()] == ["weight", "bias"]
    lin.bias = None
    assert [k for k, _ in lin.named_parameters()] == ["weight"]
    assert lin.bias is None
    assert np.allclose(lin(np.ones((1, 2), np.float32)).data, 2.0)


def test_registration_errors_are_readable():
    class Forgot(Module):
        def __init__(self):
            self.fc = Linear(2, 2)

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)"):
        Forgot()

    class PlainList(Module):
        def __init__(self):
            super().__init__()
            self.layers = [Linear(2, 2), Linear(2, 2)]

    with pytest.raises(TypeError, match="ModuleList"):
        PlainList()
    lin = Linear(2, 2)
    with pytest.raises(TypeError, match=r"weight is a parameter.*\.weight\.data"):
        lin.weight = np.zeros((2, 2))
    with pytest.raises(AttributeError, match="Linear has no attribute 'wieght'"):
        lin.wieght  # noqa: B018
    with pytest.raises(NotImplementedError, match="forward"):
        Module()(1)
    with pytest.raises(NotImplementedError, match="loop over it"):
        ModuleList()(1)
    with pytest.raises(TypeError, match="only hold Modules"):
        ModuleList([Linear(2, 2), "nope"])


def test_module_list_indexing():
    ml = ModuleList([Linear(2, 2, rng=i) for i in range(3)])
    assert len(ml) == 3 and ml[-1] is list(ml)[2]
    assert isinstance(ml[1:], ModuleList) and len(ml[1:]) == 2
    ml.append(Linear(2, 2))
    assert len(ml) == 4 and "3.weight" in dict(ml.named_parameters())
    with pytest.raises(IndexError, match="out of range for 4"):
        ml[4]


def test_train_eval_zero_grad_and_repr():
    m = Mixed()
    assert m.training and all(c.training for c in m.modules())
    assert m.eval() is m
    assert not any(c.training for c in m.modules())
    m.train()
    assert all(c.training for c in m.modules())
    m(np.ones((2, 3), np.float32)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    text = repr(m)
    assert "(embed): Linear(3 -> 4)" in text and "(pos): Parameter(shape (2, 4), float32)" in text
    assert "(0): Linear(4 -> 4)" in text
    assert repr(Linear(3, 2, bias=False)) == "Linear(3 -> 2, bias=False)"


# ------------------------------------------------------------------------ state dicts

def test_state_dict_is_a_copy_and_round_trips():
    a, b = FeedForward(4, 8, dtype=F64, rng=0), FeedForward(4, 8, dtype=F64, rng=1)
    sd = a.state_dict()
    assert list(sd) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    sd["fc1.weight"][...] = 0.0
    assert np.abs(a.fc1.weight.data).sum() > 0  # the module did not change
    sd = a.state_dict()
    res = b.load_state_dict(sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    x = np.random.default_rng(2).standard_normal((3, 4))
    np.testing.assert_array_equal(a(x).data, b(x).data)
    sd["fc1.weight"][...] = 7.0
    assert not np.any(b.fc1.weight.data == 7.0)  # loading copied the arrays


def _snapshot(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


def _assert_unchanged(m, snap):
    now = m.state_dict()
    assert list(now) == list(snap)
    for k in snap:
        assert now[k].dtype == snap[k].dtype
        np.testing.assert_array_equal(now[k], snap[k])


def test_load_state_dict_refuses_any_mismatch_and_changes_nothing():
    m = FeedForward(4, 8, rng=0)
    snap = _snapshot(m)
    good = FeedForward(4, 8, rng=1).state_dict()
    bad = dict(good)
    del bad["fc2.bias"]
    bad["fc3.bias"] = np.zeros(4, np.float32)
    bad["fc1.weight"] = np.zeros((4, 9), np.float32)
    bad["fc2.weight"] = good["fc2.weight"].astype(F64)
    with pytest.raises(ValueError) as e:
        m.load_state_dict(bad)
    msg = str(e.value)
    for piece in ("missing key: fc2.bias", "unexpected key: fc3.bias",
                  "fc1.weight: (4, 9) float32 in the state dict, (4, 8) float32 in the module",
                  "fc2.weight: (8, 4) float64", "nothing was loaded", "FeedForward"):
        assert piece in msg
    _assert_unchanged(m, snap)


def test_load_state_dict_non_strict_skips_keys_but_not_shapes():
    m = FeedForward(4, 8, rng=0)
    sd = FeedForward(4, 8, rng=1).state_dict()
    del sd["fc2.bias"]
    sd["extra"] = np.zeros(1, np.float32)
    res = m.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["fc2.bias"] and res.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(m.fc1.weight.data, sd["fc1.weight"])
    snap = _snapshot(m)
    sd["fc1.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="fc1.weight"):
        m.load_state_dict(sd, strict=False)
    _assert_unchanged(m, snap)


# ------------------------------------------------------------------------ Linear

def test_linear_init_is_seeded_and_scaled():
    a, b = Linear(400, 300, rng=7), Linear(400, 300, rng=7)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert a.weight.shape == (400, 300) and a.weight.dtype == np.float32
    assert np.all(a.bias.data == 0)
    assert abs(a.weight.data.std() - 1 / 20) < 0.002  # init_scale / sqrt(fan_in)
    c = Linear(400, 300, rng=7, init_scale=0.5)
    np.testing.assert_allclose(c.weight.data, 0.5 * a.weight.data, rtol=1e-6)
    gen = np.random.default_rng(3)
    d, e = Linear(4, 4, rng=gen), Linear(4, 4, rng=gen)  # one stream, different draws
    assert not np.array_equal(d.weight.data, e.weight.data)
    assert Linear(2, 2, dtype=F64).weight.dtype == F64


def test_linear_errors_name_layer_and_shapes():
    lin = Linear(4, 8)
    with pytest.raises(ValueError, match=re.escape("Linear(4 -> 8): input has last dim 3, "
                                                   "expected 4")):
        lin(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="Embedding first"):
        lin(np.ones((2, 4), np.int64))
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        Linear(0, 3)
    with pytest.raises(TypeError, match="dtype must be floating"):
        Linear(2, 3, dtype=np.int32)
    with pytest.raises(TypeError, match="rng must be"):
        Linear(2, 3, rng="seed")


def test_linear_forward_matches_numpy():
    lin = Linear(3, 5, dtype=F64, rng=0)
    lin.bias.data[...] = np.arange(5.0)
    x = np.random.default_rng(1).standard_normal((2, 4, 3))
    y = lin(x)
    assert y.shape == (2, 4, 5)
    np.testing.assert_allclose(y.data, x @ lin.weight.data + np.arange(5.0))


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 2, 3)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_gradcheck(shape, layout):
    lin = Linear(3, 4, dtype=F64, rng=0)
    lin.bias.data[...] = np.random.default_rng(5).standard_normal(4)
    gradcheck_module(lin, noncontiguous(shape, layout))


def test_linear_without_bias_gradcheck():
    gradcheck_module(Linear(3, 2, bias=False, dtype=F64, rng=0),
                     noncontiguous((4, 3), "transposed"))


# ------------------------------------------------------------------------ Embedding

def test_embedding_lookup_and_gradcheck_with_repeated_ids():
    emb = Embedding(6, 3, dtype=F64, rng=0)
    ids = np.array([[0, 5, 2], [2, 2, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out.data, emb.weight.data[ids])
    np.testing.assert_array_equal(emb(tm.tensor(ids)).data, out.data)  # int tensors work
    out.sum().backward()
    np.testing.assert_array_equal(emb.weight.grad[:, 0], [1, 1, 3, 0, 0, 1])  # counts
    gradcheck_module(emb, ids)
    gradcheck_module(emb, ids.T)  # non-contiguous ids


def test_embedding_errors():
    emb = Embedding(65, 4)
    with pytest.raises(ValueError, match=r"id 70 is out of range; ids must lie in \[0, 64\]"):
        emb(np.array([3, 70]))
    with pytest.raises(ValueError, match=r"id -1 is out of range"):
        emb([-1, 2])
    with pytest.raises(TypeError, match="ids must be integers"):
        emb(np.array([1.0, 2.0]))
    assert Embedding(5, 2, rng=1).weight.dtype == np.float32
    np.testing.assert_array_equal(Embedding(5, 2, rng=1).weight.data,
                                  Embedding(5, 2, rng=1).weight.data)


# ------------------------------------------------------------------------ LayerNorm

def test_layernorm_normalises_the_last_axis():
    ln = LayerNorm(6, dtype=F64)
    x = np.random.default_rng(0).standard_normal((4, 6)) * 5 + 3
    y = ln(x).data
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-5)  # var/(var + eps)
    ln.weight.data[...] = 2.0
    ln.bias.data[...] = -1.0
    np.testing.assert_allclose(ln(x).data, 2 * y - 1)
    assert LayerNorm(6)(x.astype(np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match=re.escape("LayerNorm(6, eps=1e-05): input has last "
                                                   "dim 5, expected 6")):
        ln(np.ones((2, 5)))
    with pytest.raises(ValueError, match="eps must be positive"):
        LayerNorm(3, eps=0)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layernorm_gradcheck(shape, layout):
    ln = LayerNorm(5, dtype=F64)
    rng = np.random.default_rng(1)
    ln.weight.data[...] = rng.standard_normal(5)
    ln.bias.data[...] = rng.standard_normal(5)
    gradcheck_module(ln, noncontiguous(shape, layout))


# ------------------------------------------------------------------------ Dropout

def test_dropout_train_and_eval():
    d = Dropout(0.25, rng=0)
    x = np.ones((200, 200), np.float32)
    y = d(x).data
    assert y.dtype == np.float32
    assert abs((y == 0).mean() - 0.25) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / 0.75)
    np.testing.assert_array_equal(y, Dropout(0.25, rng=0)(x).data)  # seeded
    d.eval()
    np.testing.assert_array_equal(d(x).data, x)
    assert np.array_equal(Dropout(0.0)(x).data, x)
    with pytest.raises(ValueError, match=r"p=1.0 must be in \[0, 1\)"):
        Dropout(1.0)


def test_dropout_gradcheck_with_a_fixed_mask():
    d = Dropout(0.4)

    def f(x):
        d.rng = np.random.default_rng(3)  # the same mask on every call
        return d(x)

    x = noncontiguous((4, 5), "transposed")
    tm.gradcheck(f, [x])


# ------------------------------------------------------------------------ FeedForward

@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_feedforward_gradcheck(activation, layout):
    ff = FeedForward(4, 6, activation=activation, dtype=F64, rng=0)
    for b in (ff.fc1.bias, ff.fc2.bias):
        b.data[...] = np.random.default_rng(9).standard_normal(b.shape)
    gradcheck_module(ff, noncontiguous((2, 3, 4), layout))


def test_feedforward_shapes_dropout_and_errors():
    ff = FeedForward(4, 16, dropout=0.5, rng=0)
    x = np.ones((2, 3, 4), np.float32)
    assert ff(x).shape == (2, 3, 4)
    ff.eval()
    np.testing.assert_array_equal(ff(x).data, ff(x).data)
    assert ff.num_parameters() == 4 * 16 + 16 + 16 * 4 + 4
    with pytest.raises(ValueError, match="activation='swish'; choose one of"):
        FeedForward(4, 8, activation="swish")
    with pytest.raises(ValueError, match=r"Linear\(4 -> 16\): input has last dim 5"):
        ff(np.ones((2, 5), np.float32))


# ------------------------------------------------------------------------ attention

@pytest.mark.parametrize("B,T,d,H", [(1, 1, 4, 1), (2, 3, 4, 2), (1, 5, 6, 3)])
def test_attention_gradcheck(B, T, d, H):
    att = CausalSelfAttention(d, H, dtype=F64, rng=0)
    for lin in (att.qkv, att.proj):
        lin.bias.data[...] = np.random.default_rng(4).standard_normal(lin.bias.shape)
    gradcheck_module(att, noncontiguous((B, T, d), "contiguous"))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_attention_gradcheck_noncontiguous(layout):
    att = CausalSelfAttention(4, 2, dtype=F64, rng=1)
    gradcheck_module(att, noncontiguous((2, 3, 4), layout))


def test_attention_is_causal():
    att = CausalSelfAttention(8, 2, dtype=F64, rng=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 8))
    y = att(x).data
    for t in range(5):
        x2 = x.copy()
        x2[:, t + 1:] = rng.standard_normal(x2[:, t + 1:].shape) * 10  # change the future
        y2 = att(x2).data
        np.testing.assert_allclose(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-12)
        assert not np.allclose(y2[:, t + 1:], y[:, t + 1:])
    # and no gradient flows from an output at t to inputs after t
    xt = tm.tensor(x, requires_grad=True)
    att(xt)[:, 2].sum().backward()
    assert np.all(xt.grad[:, 3:] == 0) and np.any(xt.grad[:, :3] != 0)


def test_attention_single_position_copies_value_and_first_row_is_own_value():
    att = CausalSelfAttention(4, 2, dtype=F64, rng=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 4))
    v = (x @ att.qkv.weight.data + att.qkv.bias.data)[..., 8:]  # (1, 3, 4) values
    expected_first = v[:, 0] @ att.proj.weight.data + att.proj.bias.data
    np.testing.assert_allclose(att(x).data[:, 0], expected_first, atol=1e-12)


def test_attention_errors_and_eval_dropout():
    with pytest.raises(ValueError, match="d_model=6 is not divisible by n_heads=4"):
        CausalSelfAttention(6, 4)
    att = CausalSelfAttention(8, 2, dropout=0.5, rng=0)
    with pytest.raises(ValueError, match=r"must be \(B, T, d\), got shape \(3, 8\)"):
        att(np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"CausalSelfAttention\(d_model=8, n_heads=2\): input "
                                         r"has last dim 4, expected 8"):
        att(np.ones((1, 3, 4), np.float32))
    x = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    assert not np.array_equal(att(x).data, att(x).data)  # dropout on while training
    att.eval()
    y = att(x)
    assert y.dtype == np.float32 and y.shape == (2, 4, 8)
    np.testing.assert_array_equal(y.data, att(x).data)


def test_layers_are_exported():
    for name in ("Module", "ModuleList", "Parameter", "Linear", "Embedding", "LayerNorm",
                 "Dropout", "FeedForward", "CausalSelfAttention", "save", "load", "load_into"):
        assert hasattr(tm.nn, name), name
