"""tinymoe's own adapter: every component of the suite, computed by tinymoe's code.

Also the worked example of an adapter: a module (or any object) whose functions take and
return NumPy arrays, and a ``conventions`` dict. Run the suite on it with

    python -m pytest -p tinymoe.conformance.plugin --pyargs tinymoe.conformance \
        --moe-impl tinymoe.conformance.tinymoe_adapter
"""
from __future__ import annotations

import numpy as np

from tinymoe import ops
from tinymoe.conformance.conventions import TINYMOE
from tinymoe.dispatch.backend import backend_module
from tinymoe.moe import aux_free, aux_losses, capacity, expert_choice as ec, noisy_topk
from tinymoe.moe.experts import StackedExperts
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.switch import SwitchRouter, switch_route
from tinymoe.moe.topk_router import TopKRouter, topk_balance_loss, topk_gates
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor

conventions = dict(TINYMOE)  # tinymoe follows the first value of every convention


def _router_logits(logits: np.ndarray) -> Tensor:
    """Selective precision: half-precision logits are computed on in float32."""
    z = np.asarray(logits)
    return Tensor(z.astype(np.float32) if z.dtype.itemsize < 4 or z.dtype == np.float32
                  else z)


def top1_router(logits):
    z = _router_logits(logits)
    r = switch_route(z, ops.softmax(z, axis=-1), capacity_factor=max(z.shape[1], 1))
    return r.expert_index[:, 0], r.combine_weight.data[:, 0]


def topk_router(logits, k):
    z = _router_logits(logits)
    expert, weight = topk_gates(ops.softmax(z, axis=-1), k, normalize=True)
    return expert, weight.data


def noisy_topk_router(clean, noise_stddev, noise, k):
    clean, sigma = Tensor(clean), Tensor(noise_stddev)
    H = clean + np.asarray(noise) * sigma  # (T, E) eq. (4)
    expert, weight, top_values = noisy_topk.keep_top_k_softmax(H, k)
    gates = noisy_topk.dense_gates(expert, weight, clean.shape[1])  # (T, E)
    if k < clean.shape[1]:
        load = noisy_topk.prob_in_top_k(clean, H, sigma, top_values, k).sum(axis=0).data
    else:
        load = noisy_topk.expert_counts(expert, clean.shape[1]).astype(np.float64)
    return gates.data, load


def expert_choice(scores, capacity):
    position = ec.expert_choice_positions(scores, capacity)  # (T, E) slot or -1
    T, E = position.shape
    token = np.zeros((E, capacity), dtype=np.int64)
    t, e = np.nonzero(position >= 0)
    token[e, position[t, e]] = t  # (E, C) slot -> token
    return token, np.asarray(scores)[token, np.arange(E)[:, None]]


def bias_update(bias, load, speed):
    return aux_free.bias_update(bias, load, speed)


def expert_capacity(num_tokens, num_experts, capacity_factor, k):
    return capacity.expert_capacity(num_tokens, num_experts, capacity_factor, k)


def capacity_positions(expert_index, num_experts, capacity_):
    return capacity.capacity_positions(expert_index, num_experts, capacity_)[0]


def dispatch(x, expert_index, position, num_experts, capacity_):
    return backend_module().dispatch(np.asarray(x), expert_index, position, num_experts,
                                     capacity_)


def combine(expert_out, expert_index, position, weight):
    return backend_module().combine(np.asarray(expert_out), expert_index, position,
                                    np.asarray(weight))


def switch_aux_loss(layer_probs, layer_expert_index):
    """One loss per layer, summed (as tinymoe's Transformer sums its layers' losses)."""
    return sum(float(aux_losses.load_balancing_loss(Tensor(p), e).data)
               for p, e in zip(layer_probs, layer_expert_index))


def gshard_aux_loss(gates, first_choice):
    return float(aux_losses.gshard_aux_loss(Tensor(gates), first_choice).data)


def mixtral_aux_loss(layer_logits, k):
    total = 0.0
    for z in layer_logits:
        p = ops.softmax(Tensor(z), axis=-1)
        expert, _ = topk_gates(p, k)
        total += float(topk_balance_loss(p, expert).data)
    return total


def z_loss(logits):
    return float(aux_losses.router_z_loss(Tensor(np.asarray(logits, np.float64))).data)


def switch_layer(x, router_weight, w_in, w_out, capacity_):
    T, d = x.shape
    E, _, f = w_in.shape
    cf = capacity_ * E / T if T else 1.0  # expert_capacity(T, E, cf) == capacity_
    router = SwitchRouter(d, E, capacity_factor=cf, router_dtype="float64", jitter=0.0)
    router.W_r = Parameter(np.asarray(router_weight, np.float64))
    experts = StackedExperts(E, d, f, "relu", dtype=np.float64, rng=0)
    experts.W1, experts.W2 = Parameter(w_in.copy()), Parameter(w_out.copy())
    layer = MoELayer(router, experts).eval()
    return layer(Tensor(x))[0].data


class SwiGLU(Module):
    """Mixtral's expert: ``(silu(x W_gate) ⊙ x W_up) W_down``."""

    def __init__(self, w_gate, w_up, w_down):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (Parameter(np.asarray(w, np.float64))
                                               for w in (w_gate, w_up, w_down))

    def forward(self, x, offsets=None):
        g = x @ self.w_gate
        return (g * ops.sigmoid(g) * (x @ self.w_up)) @ self.w_down


def mixtral_layer(x, router_weight, w_gate, w_up, w_down, k):
    T, d = x.shape
    E = router_weight.shape[1]
    router = TopKRouter(d, E, k, router_dtype="float64")
    router.W_g = Parameter(np.asarray(router_weight, np.float64))
    experts = [SwiGLU(w_gate[e], w_up[e], w_down[e]) for e in range(E)]
    return MoELayer(router, experts).eval()(Tensor(x))[0].data
