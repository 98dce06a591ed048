"""The hierarchical MoE of Shazeer et al. (2017, Appendix B): experts that are MoEs.

A primary gate picks k of ``a`` groups; each group's own gate picks k of its ``b`` experts::

    y_H = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_{i,j}(x)                    eq. (12)

Written as a routing, this is one gate over all ``a·b`` experts: token t's choices are the
pairs (group i, expert j) with weight ``G_primary(x)_i · G_i(x)_j``, and expert (i, j) is
flat expert ``i·b + j``. So the hierarchical layer is the ordinary
:class:`~tinymoe.moe.layer.MoELayer` with a :class:`HierarchicalGate` and ``a·b`` experts.
Group i's gate sees only the tokens the primary gate sent to it, ``X^(i)``.

The balancing losses use the hierarchical importance and load over all ``a·b`` experts
(eqs. 13-14, :mod:`tinymoe.moe.balance`) instead of each gate's own.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.dispatch.routing import Routing, route
from tinymoe.moe.balance import balance_loss, hierarchical_importance, hierarchical_load
from tinymoe.moe.experts import StackedExperts
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.noisy_topk import NoisyTopKGate
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module, ModuleList
from tinymoe.tensor import Tensor, as_tensor


class HierarchicalGate(Module):
    """A primary :class:`~tinymoe.moe.noisy_topk.NoisyTopKGate` over ``a`` groups and one
    gate per group over its ``b`` experts; ``gate(x)`` routes to the ``a·b`` flat experts.

    ``k = k_primary · k_group`` choices per token. ``w_importance``/``w_load`` weight the
    hierarchical losses (eqs. 13-14); the groups' own balancing losses are not used.
    ``noise``: the primary gate's (T, a) noise, to fix it in tests (the groups draw theirs).
    """

    def __init__(self, primary: NoisyTopKGate, groups: list[NoisyTopKGate], *,
                 w_importance: float = 0.0, w_load: float = 0.0) -> None:
        super().__init__()
        if len(groups) != primary.num_experts:
            raise ValueError(f"HierarchicalGate: {len(groups)} group gates for a primary gate "
                             f"over {primary.num_experts} groups; pass one gate per group")
        b = {g.num_experts for g in groups}
        if len(b) != 1 or {g.d_model for g in groups} != {primary.d_model}:
            raise ValueError("HierarchicalGate: every group gate needs the same number of "
                             "experts and the primary gate's d_model")
        self.primary, self.groups = primary, ModuleList(groups)
        self.d_model, self.num_groups, self.experts_per_group = primary.d_model, \
            primary.num_experts, b.pop()
        self.num_experts = self.num_groups * self.experts_per_group
        self.k = primary.k * groups[0].k
        self.w_importance = validate.coef(w_importance, "w_importance", "HierarchicalGate")
        self.w_load = validate.coef(w_load, "w_load", "HierarchicalGate")

    def forward(self, x: Any, noise: np.ndarray | None = None) -> Routing:
        x = as_tensor(x)
        validate.tokens(x, self.d_model, "HierarchicalGate")
        T, b = x.shape[0], self.experts_per_group
        r1 = self.primary(x, noise=noise)  # over the a groups, (T, k1)
        order, offsets, k1 = r1.order, r1.offsets, r1.k  # (N,), (a+1,) rows by group
        inner = []
        for i, gate in enumerate(self.groups):
            pairs = order[offsets[i]:offsets[i + 1]]  # (n_i,) pairs t·k1 + j1 sent to group i
            inner.append(gate(x[pairs // k1]))  # routing of X^(i) over the group's b experts
        w1 = r1.combine_weight.reshape(-1)[order]  # (N,) primary gate of each row
        w2 = ops.concatenate([r.combine_weight for r in inner], axis=0)  # (N, k2)
        flat = np.concatenate([i * b + r.expert_index for i, r in enumerate(inner)])  # (N, k2)
        rows = np.empty_like(order)
        rows[order] = np.arange(order.size)  # rows[t·k1 + j1]: its row in the sorted order
        k = k1 * flat.shape[1]
        weight = (ops.unsqueeze(w1, 1) * w2)[rows].reshape(T, k)  # (T, k) eq. (12) products
        expert_index = flat[rows].reshape(T, k)  # (T, k) flat experts i·b + j
        weights = [w1[offsets[i]:offsets[i + 1]] for i in range(self.num_groups)]  # (n_i,)
        imp = hierarchical_importance(weights, [r.probs for r in inner])  # (a, b) eq. (13)
        load = hierarchical_load(r1.stats["load"], [r.stats["load"] for r in inner],
                                 r1.counts)  # (a, b) eq. (14)
        aux = {"balance": balance_loss(imp, load, self.w_importance, self.w_load)}
        stats = dict(importance=imp, load=load, primary=r1, groups=inner)
        return route(expert_index, weight, self.num_experts, aux_losses=aux, stats=stats)


def hierarchical_moe(d_model: int, num_groups: int, experts_per_group: int, k: int = 2, *,
                     d_ff: int, activation: str = "relu", w_importance: float = 0.0,
                     w_load: float = 0.0, noisy_gating: bool = True, rng: RNGLike = None,
                     dtype: Any = np.float32) -> MoELayer:
    """A two-level MoE (Appendix B): ``num_groups`` groups of ``experts_per_group`` FFN
    experts, k choices at each level (the paper's hierarchical LMs used k = 2 per level),
    as one :class:`~tinymoe.moe.layer.MoELayer` over the ``a·b`` experts."""
    gen = as_rng(rng)
    groups = [NoisyTopKGate(d_model, experts_per_group, k, noisy_gating=noisy_gating, rng=gen,
                            dtype=dtype) for _ in range(num_groups)]
    primary = NoisyTopKGate(d_model, num_groups, k, noisy_gating=noisy_gating, rng=gen,
                            dtype=dtype)
    gate = HierarchicalGate(primary, groups, w_importance=w_importance, w_load=w_load)
    experts = StackedExperts(num_groups * experts_per_group, d_model, d_ff, activation,
                             dtype=dtype, rng=gen)  # expert (i, j) is row i·b + j
    return MoELayer(gate, experts)


def group_output(layer: MoELayer, group: int, expert: int, x: Any) -> Tensor:
    """Expert ``(group, expert)`` of a hierarchical layer alone on ``x`` (n, d)."""
    gate = layer.router
    return layer.experts.expert(group * gate.experts_per_group + expert, x)
