"""Generation with a KV cache: the cached logits are the full forward's, for dense and
dropless MoE models, prompt at once or token by token; sampling and the cache's errors."""
import numpy as np
import pytest

from tinymoe.models.generate import KVCache, cached_attention, forward_cached, generate
from tinymoe.models.transformer import Transformer, TransformerConfig, mixtral_config
from tinymoe.nn.attention import CausalSelfAttention

task8_3 = pytest.mark.task8_3  # runs cached_attention


def models():
    small = dict(d_model=16, n_layers=2, n_heads=2, d_ff=24, block_size=12, dtype="float64")
    return {"dense": TransformerConfig(kind="dense", **small),
            "mixtral": mixtral_config(num_experts=4, **small)}


@task8_3
def test_cached_attention_equals_the_causal_attention_in_pieces():
    attn = CausalSelfAttention(8, 2, dtype=np.float64, rng=0)
    x = np.random.default_rng(1).standard_normal((3, 7, 8))
    full = attn(x).numpy()
    keys, values = np.zeros((3, 2, 7, 4)), np.zeros((3, 2, 7, 4))
    parts = [cached_attention(attn, x[:, a:b], keys, values, a).numpy()
             for a, b in [(0, 3), (3, 4), (4, 7)]]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-13)


@task8_3
@pytest.mark.task8_1
@pytest.mark.task8_2
@pytest.mark.task6_1
@pytest.mark.parametrize("name", ["dense", "mixtral"])
def test_cached_logits_equal_the_full_forward(name):
    model = Transformer(models()[name], rng=0).eval()
    ids = np.random.default_rng(2).integers(0, 65, (3, 10))
    full = model(ids).numpy()  # (B, L, V)
    cache = KVCache(model, 3)
    steps = [forward_cached(model, ids[:, :4], cache).numpy()]  # the prompt at once
    for t in range(4, 10):  # then one token at a time
        steps.append(forward_cached(model, ids[:, t:t + 1], cache).numpy())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-10, atol=1e-12)
    assert cache.length == 10


@task8_3
@pytest.mark.task8_1
@pytest.mark.task8_2
@pytest.mark.task6_1
def test_greedy_generation_is_the_same_with_and_without_the_cache():
    model = Transformer(models()["mixtral"], rng=1)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    a = generate(model, prompt, 8, temperature=0.0, use_cache=True)
    b = generate(model, prompt, 8, temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 11) and model.training  # the mode is restored
    s1 = generate(model, prompt, 8, temperature=1.0, rng=5)
    s2 = generate(model, prompt, 8, temperature=1.0, rng=5)
    np.testing.assert_array_equal(s1, s2)  # seeded


def test_the_cache_refuses_what_does_not_fit():
    model = Transformer(models()["dense"], rng=0)
    with pytest.raises(ValueError, match="exceed block_size=12"):
        generate(model, np.zeros((1, 10), int), 5)
    cache = KVCache(model, 2, 4)
    assert cache.nbytes == 2 * 2 * 2 * 4 * 16 * 8  # K and V, layers, B, S, d, float64
    with pytest.raises(ValueError, match="do not fit the cache"):
        forward_cached(model, np.zeros((2, 5), int), cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(model, 1, 13)
