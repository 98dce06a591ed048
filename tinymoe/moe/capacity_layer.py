"""The capacity-mode MoE layer of GShard (2020) and the Switch Transformer (2021).

    gate -> dispatch into (E, G·C, d) buffers -> E FFN experts -> combine

    y_t = Σ_j w_tj · FFN_{e_tj}(x_t)      over the choices of token t that got a slot

Every expert processes a fixed buffer of ``G · C`` slots (C per group, G groups; empty slots
are zero padding), so the shapes are static: GShard's einsum form, Algorithm 2,
``EGCM,EMH->EGCH``, as a batched matmul over the experts' stacked weights
(:class:`~tinymoe.moe.experts.StackedExperts`). A token whose choices were all dropped gets
``y_t = 0``, so in a residual block ``x + layer(x)`` it passes through **unchanged**
(Switch §2.2: "passed directly to the next layer through the residual connection"; not
``p · x`` as in transformers issue #37017). ``residual=True`` adds the input inside the layer.

Expert dropout (Switch §2.4, Table 4) applies to the experts' interim activations
``act(x W1 + b1)``, in training only.

After each call the layer holds ``aux_loss`` (α · N Σ f_i P_i, α = ``aux_loss_coef``, 1e-2),
``z_loss`` (c_z · L_z, c_z = ``z_loss_coef``, 1e-3), ``router_loss`` (their sum, to add to the
task loss), ``last_routing`` (the gate's :class:`~tinymoe.moe.capacity.CapacityRouting`) and
``stats``, the per-step counters (tokens, dropped tokens, kept load and demand per expert).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.dispatch.functions import Routing, combine, dispatch
from tinymoe.moe.capacity import CapacityRouting, check_num_experts
from tinymoe.moe.experts import ACTIVATIONS, StackedExperts
from tinymoe.moe.gshard import Top2Gate
from tinymoe.moe.switch import INIT_SCALE, JITTER_EPS, SwitchGate, switch_init
from tinymoe.nn.dropout import Dropout
from tinymoe.nn.init import RNGLike, as_rng, check_positive_int
from tinymoe.nn.linear import check_last_dim
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor

AUX_LOSS_COEF = 1e-2
Z_LOSS_COEF = 1e-3


@dataclass
class LayerStats:
    """Per-step counters of one capacity-mode layer (plain numbers, no gradient)."""

    tokens: int               # T
    capacity: int             # C per group
    num_groups: int           # G
    dropped_tokens: int       # tokens that reached no expert
    dropped_choices: int      # active choices that found their expert full
    load: np.ndarray          # (E,) choices kept per expert
    demand: np.ndarray        # (E,) active choices per expert before dropping
    aux_loss: float           # N Σ f_i P_i (without α; 1 at uniform)
    z_loss: float             # mean logsumexp² (without c_z)

    @property
    def dropped_fraction(self) -> float:
        return self.dropped_tokens / self.tokens if self.tokens else 0.0


def expert_ffn(experts: StackedExperts, buffer: Tensor, dropout: Dropout | None = None
               ) -> Tensor:
    """E FFNs on their buffers at once: ``(E, n, d) -> (E, n, d)``, GShard's Algorithm 2.

    ``h = act(buffer @ W1 + b1)`` (E, n, d_ff) ("EGCM,EMH->EGCH"), expert dropout on h,
    then ``h @ W2 + b2`` (each ``@ ... +`` is one :func:`~tinymoe.ops.linear`: the bias is
    added into the product's array). Works in the experts' dtype.
    """
    h = ops.linear(buffer, experts.W1, ops.unsqueeze(experts.b1, 1))  # (E, n, d_ff)
    h = ACTIVATIONS[experts.activation](h)  # (E, n, d_ff)
    if dropout is not None:
        h = dropout(h)  # (E, n, d_ff) expert dropout on the interim activations
    return ops.linear(h, experts.W2, ops.unsqueeze(experts.b2, 1))  # (E, n, d)


def as_dtype(a: Tensor, dtype: Any) -> Tensor:
    """``a`` in ``dtype`` (no op when it already is)."""
    return a if a.dtype == np.dtype(dtype) else a.astype(dtype)


def kernel_dtype(a: Tensor) -> Tensor:
    """float16 (which the Numba dispatch kernels do not support) moves as float32: exact for
    the copies of dispatch, and combine's products are rounded once, at the end."""
    return as_dtype(a, np.float32) if a.dtype not in (np.float32, np.float64) else a


def gate_routing(gate: Module, x: Tensor, where: str, **gate_inputs: Any
                 ) -> tuple[CapacityRouting, Routing]:
    """Run a capacity-mode ``gate`` on ``x`` (T, d): its :class:`CapacityRouting`, and the
    dispatch routing with the combine weights in a dtype the kernels take."""
    r = gate(x, **gate_inputs)
    if not isinstance(r, CapacityRouting):
        raise TypeError(f"{where}: the gate returned {type(r).__name__}, not a CapacityRouting")
    routing = r.routing
    if routing.combine_weight.dtype != kernel_dtype(routing.combine_weight).dtype:
        routing = replace(routing, combine_weight=kernel_dtype(routing.combine_weight))
    return r, routing


def make_gate(kind: str, d_model: int, num_experts: int, rng: np.random.Generator,
              **kwargs: Any) -> Module:
    """``"switch"`` -> :class:`SwitchGate`, ``"top2"`` -> :class:`Top2Gate`."""
    if kind == "switch":
        return SwitchGate(d_model, num_experts, rng=rng, **kwargs)
    if kind == "top2":
        kwargs.setdefault("jitter", 0.0)
        return Top2Gate(d_model, num_experts, rng=rng, **kwargs)
    raise ValueError(f"make_gate: gate={kind!r}; choose 'switch' (top-1, Fedus et al. 2021) "
                     f"or 'top2' (GShard, Lepikhin et al. 2020), or pass a gate Module")


class CapacityMoELayer(Module):
    """Gate + capacity dispatch + stacked FFN experts + combine; ``layer(x)`` keeps x's shape.

    ``gate``: ``"switch"`` (default), ``"top2"``, or a Module whose ``forward(x (T, d))``
    returns a :class:`~tinymoe.moe.capacity.CapacityRouting`. ``gate_kwargs`` go to the
    built-in gates (``capacity_factor``, ``eval_capacity_factor``, ``group_size``,
    ``router_dtype``, ``jitter``, ``normalize``, ...). Expert weights start from the Switch
    initialisation (truncated normal, std ``sqrt(init_scale / fan_in)``).
    """

    def __init__(self, d_model: int, num_experts: int, d_ff: int, *,
                 gate: str | Module = "switch", capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, group_size: int | None = None,
                 router_dtype: Any = "float32", jitter: float | None = None,
                 activation: str = "relu", expert_dropout: float = 0.0,
                 aux_loss_coef: float = AUX_LOSS_COEF, z_loss_coef: float = Z_LOSS_COEF,
                 init_scale: float = INIT_SCALE, residual: bool = False,
                 dtype: Any = np.float32, rng: RNGLike = None, **gate_kwargs: Any) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model", "CapacityMoELayer")
        self.num_experts = check_num_experts(num_experts, "CapacityMoELayer")
        check_positive_int(d_ff, "d_ff", "CapacityMoELayer")
        for name, v in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if not float(v) >= 0.0:
                raise ValueError(f"CapacityMoELayer: {name}={v!r} must be >= 0")
        gen = as_rng(rng)
        if isinstance(gate, str):
            kw = dict(capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                      group_size=group_size, router_dtype=router_dtype, init_scale=init_scale,
                      **gate_kwargs)
            if jitter is not None:
                kw["jitter"] = jitter
            elif gate == "switch":
                kw["jitter"] = JITTER_EPS
            self.gate = make_gate(gate, d_model, num_experts, gen, **kw)
        elif isinstance(gate, Module):
            self.gate = gate
        else:
            raise TypeError(f"CapacityMoELayer: gate must be 'switch', 'top2' or a Module, "
                            f"got {type(gate).__name__}")
        self.experts = StackedExperts(num_experts, d_model, d_ff, activation, dtype=dtype,
                                      rng=gen)
        for name, fan_in in (("W1", d_model), ("W2", d_ff)):
            p = getattr(self.experts, name)
            p.data = switch_init(gen, fan_in, p.shape, p.dtype, init_scale)
        self.expert_dropout = Dropout(expert_dropout, rng=gen)
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        self.residual = bool(residual)
        self.aux_loss: Tensor | None = None
        self.z_loss: Tensor | None = None
        self.router_loss: Tensor | None = None
        self.last_routing: CapacityRouting | None = None
        self.stats: LayerStats | None = None

    @property
    def k(self) -> int:
        return getattr(self.gate, "k", 1)

    def forward(self, x: Any, **gate_inputs: Any) -> Tensor:
        """``x`` (..., d_model) -> (..., d_model). ``gate_inputs`` (e.g. ``jitter_noise``,
        ``uniform``) go to the gate, to fix its randomness in tests."""
        x = as_tensor(x)
        check_last_dim(self, x, self.d_model)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)  # (T, d)
        r, routing = gate_routing(self.gate, x2, "CapacityMoELayer", **gate_inputs)
        buf = dispatch(kernel_dtype(x2), routing)  # (E, G·C, d) tokens in slots, 0 padding
        buf = as_dtype(buf, self.experts.W1.dtype)
        out = expert_ffn(self.experts, buf, self.expert_dropout)  # (E, G·C, d)
        y = combine(kernel_dtype(out), routing)  # (T, d): Σ_j w_tj FFN_e(x_t), 0 if dropped
        y = as_dtype(y, x.dtype)
        self._record(r)
        if self.residual:
            y = x2 + y  # (T, d) dropped tokens: exactly x
        return y.reshape(*lead, self.d_model)

    def _record(self, r: CapacityRouting) -> None:
        self.last_routing = r
        self.aux_loss = r.aux_loss * self.aux_loss_coef  # α · N Σ f_i P_i, eq. (4)
        self.z_loss = r.z_loss * self.z_loss_coef  # c_z · L_z
        self.router_loss = self.aux_loss + self.z_loss
        self.stats = LayerStats(tokens=r.routing.num_tokens, capacity=r.capacity,
                                num_groups=r.num_groups,
                                dropped_tokens=int(r.dropped_tokens.sum()),
                                dropped_choices=r.dropped_choices,
                                load=r.routing.counts.copy(), demand=r.demand.copy(),
                                aux_loss=float(r.aux_loss.item()),
                                z_loss=float(r.z_loss.item()))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"aux_loss_coef={self.aux_loss_coef:g}, z_loss_coef={self.z_loss_coef:g}")
