"""The layer of the modern routers (2022-2024): any router, routed experts, shared experts.

    y_t = Σ_{i=1}^{K_s} FFN_i(x_t)  +  Σ_j w_tj · FFN_{e_tj}(x_t)       (DeepSeekMoE, eq. 9)
          shared, always active        routed: the router's choices

A router is a Module with ``num_experts`` and ``d_model`` attributes whose ``forward(x)``
takes the tokens ``x`` (T, d_model) and returns a :class:`RouterOutput`: the arrays of the
dispatch contract (a :class:`~tinymoe.dispatch.Routing`) plus what the router wants to
report. The layer does not care how the choice was made, so the same layer serves

* Mixtral's top-k softmax router (:class:`~tinymoe.moe.topk_router.TopKRouter`): dropless,
  the routing is sorted rows, experts run as one grouped matmul;
* expert choice (:class:`~tinymoe.moe.expert_choice.ExpertChoiceRouter`): each expert takes
  exactly C tokens, the routing is a capacity buffer (E, C, d);
* DeepSeek-V3's auxiliary-loss-free router (:class:`~tinymoe.moe.aux_free.AuxFreeRouter`).

With ``num_shared = K_s > 0`` the layer adds K_s shared experts, FFNs that every token goes
through unweighted (DeepSeekMoE's "shared expert isolation"): common knowledge lives there,
and the routed experts are free to specialise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tinymoe.dispatch.functions import Routing, combine, dispatch
from tinymoe.moe.capacity_layer import expert_ffn
from tinymoe.moe.experts import StackedExperts
from tinymoe.nn.feedforward import FeedForward
from tinymoe.nn.init import RNGLike, as_rng, check_positive_int
from tinymoe.nn.linear import check_last_dim
from tinymoe.nn.module import Module, ModuleList
from tinymoe.tensor import Tensor, as_tensor


@dataclass(eq=False)
class RouterOutput:
    """What a router hands to :class:`RoutedMoELayer` for one batch of T tokens.

    ``routing``: the dispatch contract (``capacity=None`` for dropless sorted rows, or a
    capacity C for an (E, C, d) buffer); its ``combine_weight`` is a Tensor so the router
    learns. ``logits`` (T, E) the router's raw scores, ``scores`` (T, E) its affinities
    (softmax or sigmoid); ``aux_loss`` a scalar Tensor to add to the task loss, its
    coefficient already applied, or None when the router needs none.
    """

    routing: Routing
    logits: Tensor
    scores: Tensor
    aux_loss: Tensor | None = None

    @property
    def load(self) -> np.ndarray:
        """(E,) (token, choice) pairs each expert processes in this batch."""
        return self.routing.counts


def check_router(router: Any, where: str) -> Module:
    if not isinstance(router, Module) or not hasattr(router, "num_experts") \
            or not hasattr(router, "d_model"):
        raise TypeError(f"{where}: router must be a Module with num_experts and d_model "
                        f"attributes whose forward(x) returns a RouterOutput, got "
                        f"{type(router).__name__}")
    return router


class RoutedMoELayer(Module):
    """router -> dispatch -> E routed FFN experts -> combine, plus K_s shared FFN experts.

    ``router``: see the module docstring. ``d_ff``: hidden width of each routed expert
    (fine-grained segmentation, DeepSeekMoE §3.1, is just more experts with a smaller
    ``d_ff``). ``num_shared``: K_s shared experts of hidden width ``shared_d_ff`` (default
    ``d_ff``). After each call: ``aux_loss`` (the router's, or None), ``last_router`` (its
    :class:`RouterOutput`).
    """

    def __init__(self, router: Module, d_ff: int, *, num_shared: int = 0,
                 shared_d_ff: int | None = None, activation: str = "relu",
                 dtype: Any = np.float32, rng: RNGLike = None) -> None:
        super().__init__()
        self.router = check_router(router, "RoutedMoELayer")
        self.d_model, self.num_experts = int(router.d_model), int(router.num_experts)
        check_positive_int(d_ff, "d_ff", "RoutedMoELayer")
        if isinstance(num_shared, bool) or not isinstance(num_shared, (int, np.integer)) \
                or num_shared < 0:
            raise ValueError(f"RoutedMoELayer: num_shared={num_shared!r} must be an integer "
                             f">= 0 (DeepSeekMoE uses 1 or 2 shared experts)")
        gen = as_rng(rng)
        self.experts = StackedExperts(self.num_experts, self.d_model, d_ff, activation,
                                      dtype=dtype, rng=gen)
        width = d_ff if shared_d_ff is None else check_positive_int(
            shared_d_ff, "shared_d_ff", "RoutedMoELayer")
        self.shared = ModuleList([FeedForward(self.d_model, width, activation, dtype=dtype,
                                              rng=gen) for _ in range(int(num_shared))])
        self.aux_loss: Tensor | None = None
        self.last_router: RouterOutput | None = None

    def forward(self, x: Any) -> Tensor:
        """``x`` (..., d_model) -> (..., d_model)."""
        x = as_tensor(x)
        check_last_dim(self, x, self.d_model)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)  # (T, d)
        r = self.router(x2)
        if not isinstance(r, RouterOutput):
            raise TypeError(f"RoutedMoELayer: the router returned {type(r).__name__}, not a "
                            f"RouterOutput")
        routing = r.routing
        buf = dispatch(x2, routing)  # (N, d) sorted by expert, or (E, C, d) with a capacity
        if routing.capacity is None:
            out = self.experts(buf, routing.offsets)  # (N, d) one grouped matmul
        else:
            out = expert_ffn(self.experts, buf)  # (E, C, d) batched over the experts
        y = combine(out, routing)  # (T, d) Σ_j w_tj FFN_{e_tj}(x_t)
        for expert in self.shared:
            y = y + expert(x2)  # (T, d) shared experts: every token, unweighted
        self.aux_loss, self.last_router = r.aux_loss, r
        return y.reshape(*lead, self.d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"num_shared={len(self.shared)}")
