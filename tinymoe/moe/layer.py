"""The sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017, §2 and Appendix B).

    y = Σ_i G(x)_i E_i(x)                                                  eq. (1)

computed sparsely: gate -> dispatch -> experts -> combine. The gate picks k experts per
token (:class:`~tinymoe.moe.noisy_topk.NoisyTopKGate` by default); ``tm.dispatch`` copies
each (token, choice) pair into rows grouped by expert (dropless: every expert takes however
many tokens chose it, as in tensor2tensor's ``SparseDispatcher``); expert ``e`` runs on its
block of rows; ``combine`` adds the outputs back weighted by the gates. No (T, E, d) expert
output and no (T, E, C) one-hot is ever built.

Experts are either any Modules (``experts=[...]``; expert ``e`` gets an ``(n_e, d)`` batch,
possibly empty) or, by default, E feed-forward networks with stacked weights
(:class:`~tinymoe.moe.experts.StackedExperts`), run as one grouped matmul.

Hierarchical MoE (Appendix B): an expert may itself be an MoELayer. The outer ("primary")
gate picks groups, each group's gate picks experts::

    y_H = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_{i,j}(x)                   eq. (12)

and the balancing losses use ``Importance_H`` and ``Load_H`` (eqs. 13-14, over all a·b
experts) instead of the inner layers' own losses.

Leading axes are flattened: an input (B, L, d) is T = B·L tokens, the layer applied
"convolutionally" over time as in the paper.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinymoe import ops
from tinymoe.dispatch import combine, dispatch, route
from tinymoe.moe.balance import (balance_loss, hierarchical_importance, hierarchical_load)
from tinymoe.moe.experts import StackedExperts
from tinymoe.moe.noisy_topk import NOISE_EPSILON, GateOutput, NoisyTopKGate
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.linear import check_last_dim
from tinymoe.nn.module import Module, ModuleList
from tinymoe.tensor import Tensor, as_tensor


class MoELayer(Module):
    """Gate + dispatch + experts + combine; ``layer(x)`` returns ``y`` with x's leading axes.

    After each call: ``aux_loss`` (a scalar Tensor to add to the task loss: ``w_importance·
    CV(Importance)² + w_load·CV(Load)²``), ``last_gate`` (the gate's output), ``last_counts``
    (E,) tokens per expert, ``last_importance`` and ``last_load`` (E,), or (a, b) when the
    experts are MoE layers themselves.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, *, d_ff: int | None = None,
                 experts: Sequence[Module] | None = None, gate: Module | None = None,
                 activation: str = "relu", w_importance: float = 0.0, w_load: float = 0.0,
                 noisy_gating: bool = True, noise_epsilon: float = NOISE_EPSILON,
                 rng: RNGLike = None, dtype: Any = np.float32) -> None:
        super().__init__()
        gen = as_rng(rng)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.gate = gate if gate is not None else NoisyTopKGate(
            d_model, num_experts, k, noisy_gating=noisy_gating, noise_epsilon=noise_epsilon,
            w_importance=w_importance, w_load=w_load, rng=gen, dtype=dtype)
        if experts is None:
            if d_ff is None:
                raise ValueError("MoELayer: give d_ff (the hidden width of the default FFN "
                                 "experts) or a list of expert Modules in experts=")
            self.experts = StackedExperts(num_experts, d_model, d_ff, activation,
                                          dtype=dtype, rng=gen)
        else:
            experts = list(experts)
            if len(experts) != num_experts:
                raise ValueError(f"MoELayer: {len(experts)} experts given for "
                                 f"num_experts={num_experts}; pass exactly one per expert")
            self.experts = ModuleList(experts)
        self.aux_loss: Tensor | None = None
        self.last_gate: GateOutput | None = None
        self.last_counts: np.ndarray | None = None
        self.last_importance: Tensor | None = None
        self.last_load: Tensor | None = None

    @property
    def hierarchical(self) -> bool:
        """True when the experts are MoE layers (a two-level MoE, Appendix B)."""
        return isinstance(self.experts, ModuleList) and \
            any(isinstance(e, MoELayer) for e in self.experts)

    def forward(self, x: Any, noise: np.ndarray | None = None) -> Tensor:
        """``x`` (..., d_model) -> (..., d_out). ``noise`` (T, E): the gate's noise, explicit."""
        x = as_tensor(x)
        check_last_dim(self, x, self.d_model)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)  # (T, d)
        g = self.gate(x2) if noise is None else self.gate(x2, noise=noise)
        routing = route(g.expert_index, g.combine_weight, self.num_experts)  # dropless
        rows = dispatch(x2, routing)  # (N, d) grouped by expert, N = T·k
        offsets = routing.offsets  # (E+1,)
        if isinstance(self.experts, StackedExperts):
            rows_out = self.experts(rows, offsets)  # (N, d) one grouped matmul
        else:
            rows_out = self._run_experts(rows, offsets)  # (N, d_out)
        y = combine(rows_out, routing)  # (T, d_out): Σ_j w_tj E_{e_tj}(x_t)
        self.last_gate, self.last_counts = g, routing.counts
        if self.hierarchical:
            self._hierarchical_losses(g, routing)
        else:
            self.last_importance, self.last_load = g.importance, g.load
            self.aux_loss = self.gate.aux_loss(g)
        return y.reshape(*lead, y.shape[-1])

    def _run_experts(self, rows: Tensor, offsets: np.ndarray) -> Tensor:
        """Expert e on its block ``rows[offsets[e]:offsets[e+1]]`` (run even when empty)."""
        outs = []
        for e, expert in enumerate(self.experts):
            block = rows[int(offsets[e]):int(offsets[e + 1])]  # (n_e, d)
            out = expert(block)  # (n_e, d_out)
            if out.ndim != 2 or out.shape[0] != block.shape[0]:
                raise ValueError(f"MoELayer: expert {e} ({type(expert).__name__}) returned "
                                 f"shape {out.shape} for a batch of shape {block.shape}; an "
                                 f"expert must map (n, d) to (n, d_out)")
            outs.append(out)
        widths = {o.shape[1] for o in outs}
        if len(widths) > 1:
            raise ValueError(f"MoELayer: the experts return different widths {sorted(widths)};"
                             f" every expert must produce the same d_out")
        return ops.concatenate(outs, axis=0)  # (N, d_out)

    def _hierarchical_losses(self, g: GateOutput, routing: Any) -> None:
        """Eqs. (13)-(14) from the primary gate and each group's last gate output."""
        order, offsets = routing.order, routing.offsets  # (N,), (E+1,)
        w_sorted = g.combine_weight.reshape(-1)[order]  # (N,) primary gate of each row
        weights, gates, loads = [], [], []
        for e, inner in enumerate(self.experts):
            if not isinstance(inner, MoELayer):
                raise TypeError(f"MoELayer: expert {e} is a {type(inner).__name__}, but the "
                                f"hierarchical losses need every expert to be an MoELayer")
            weights.append(w_sorted[int(offsets[e]):int(offsets[e + 1])])  # (n_e,)
            gates.append(inner.last_gate.gates)  # (n_e, b)
            loads.append(inner.last_gate.load)  # (b,)
        self.last_importance = hierarchical_importance(weights, gates)  # (a, b) eq. (13)
        self.last_load = hierarchical_load(g.load, loads, routing.counts)  # (a, b) eq. (14)
        self.aux_loss = balance_loss(self.last_importance, self.last_load,
                                     self.gate.w_importance, self.gate.w_load)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"


def hierarchical_moe(d_model: int, num_groups: int, experts_per_group: int, k: int = 2, *,
                     d_ff: int, activation: str = "relu", w_importance: float = 0.0,
                     w_load: float = 0.0, noisy_gating: bool = True, rng: RNGLike = None,
                     dtype: Any = np.float32) -> MoELayer:
    """A two-level MoE (Appendix B): ``num_groups`` groups of ``experts_per_group`` FFN
    experts, k choices at each level (the paper's hierarchical LMs used k = 2 per level).

    The balancing weights apply to the hierarchical Importance_H and Load_H (eqs. 13-14).
    """
    gen = as_rng(rng)
    groups = [MoELayer(d_model, experts_per_group, k, d_ff=d_ff, activation=activation,
                       noisy_gating=noisy_gating, rng=gen, dtype=dtype)
              for _ in range(num_groups)]
    return MoELayer(d_model, num_groups, k, experts=groups, w_importance=w_importance,
                    w_load=w_load, noisy_gating=noisy_gating, rng=gen, dtype=dtype)
