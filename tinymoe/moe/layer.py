"""The Mixture-of-Experts layer: one class for every router, from 2017 to today.

    y = Σ_i G(x)_i E_i(x)                                   (Shazeer et al. 2017, eq. 1)

computed sparsely, in four steps that every MoE layer in the literature shares::

    routing = router(x)                 # which experts, with which weights (a Routing)
    buf = dispatch(x, routing)          # tokens into the experts' inputs
    out = experts(buf, offsets)         # every expert on its tokens at once
    y = combine(out, routing)           # y_t = Σ_j w_tj · out[e_tj, p_tj]

The router decides the **dispatch mode** through ``routing.capacity``: a number C gives
capacity buffers (E, C, d) in which late tokens are dropped (GShard, Switch, expert choice);
None gives dropless routing, rows sorted by expert (the 2017 layer, Mixtral, DeepSeek).
Shared experts (DeepSeekMoE, eq. 9) see every token, unweighted::

    y_t = Σ_{i=1}^{K_s} FFN_i(x_t)  +  Σ_j w_tj · FFN_{e_tj}(x_t)

``layer(x)`` returns ``(y, aux_losses)``, as Hugging Face's MoE blocks return their router
outputs: ``aux_losses`` is the router's dict of auxiliary losses (coefficients applied) for
the model to add to its task loss. Leading axes are flattened: (B, L, d) is T = B·L tokens,
the layer applied "convolutionally" over time (Shazeer et al. 2017, §3.1).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinymoe import validate
from tinymoe.dispatch.functions import as_dtype, combine, dispatch, kernel_dtype
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.experts import ExpertList, StackedExperts
from tinymoe.nn.feedforward import FeedForward
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module, ModuleList
from tinymoe.tensor import Tensor, as_tensor


class MoELayer(Module):
    """``router -> dispatch -> experts -> combine`` (+ shared experts, + residual).

    ``router``: a Module with ``d_model`` and ``num_experts`` whose ``forward(x)``, for
    tokens ``x`` (T, d_model), returns a :class:`~tinymoe.dispatch.routing.Routing`.
    ``experts``: a :class:`~tinymoe.moe.experts.StackedExperts`, an
    :class:`~tinymoe.moe.experts.ExpertList`, or a list of E Modules (made an ExpertList).
    ``shared``: Modules every token goes through unweighted. ``residual=True`` adds ``x``
    to the output, so a dropped token leaves the layer unchanged.
    After each call ``last_routing`` holds the router's decision, for inspection.
    """

    def __init__(self, router: Module, experts: Module | Sequence[Module], *,
                 shared: Sequence[Module] = (), residual: bool = False) -> None:
        super().__init__()
        if not isinstance(router, Module) or not hasattr(router, "num_experts") \
                or not hasattr(router, "d_model"):
            raise TypeError(f"MoELayer: router must be a Module with num_experts and d_model "
                            f"attributes whose forward(x) returns a Routing, got "
                            f"{type(router).__name__}")
        self.router = router
        self.d_model, self.num_experts = int(router.d_model), int(router.num_experts)
        if not isinstance(experts, Module):
            experts = ExpertList(experts)
        n = getattr(experts, "num_experts", None)
        if n is None and not hasattr(experts, "__len__"):
            raise TypeError(f"MoELayer: experts must be a StackedExperts, an ExpertList or a "
                            f"list of E Modules, got {type(experts).__name__}")
        n = len(experts) if n is None else n
        if n != self.num_experts:
            raise ValueError(f"MoELayer: {n} experts given for a router over "
                             f"num_experts={self.num_experts}; pass exactly one per expert")
        self.experts = experts
        self.shared = ModuleList(list(shared))
        self.residual = bool(residual)
        self.last_routing: Routing | None = None

    @property
    def k(self) -> int:
        """Experts per token (the router's k; E columns for expert choice)."""
        return int(getattr(self.router, "k", 1))

    def forward(self, x: Any, **router_inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``x`` (..., d_model) -> ``(y (..., d_out), aux_losses)``. ``router_inputs`` (e.g.
        ``noise``, ``jitter_noise``, ``uniform``) fix the router's randomness in tests."""
        x = as_tensor(x)
        validate.last_dim(x, self.d_model, f"MoELayer({self.extra_repr()})")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)  # (T, d)
        r = self.router(x2, **router_inputs)
        if not isinstance(r, Routing):
            raise TypeError(f"MoELayer: the router returned {type(r).__name__}, not a Routing")
        buf = dispatch(kernel_dtype(x2), r)  # (E, C, d) buffers, or (N, d) rows by expert
        offsets = None if r.capacity is not None else r.offsets  # (E+1,) for sorted rows
        if offsets is None and isinstance(self.experts, StackedExperts):
            # (E,) filled slots per buffer: the padding past them is not multiplied
            out = self.experts(buf, rows=r.filled_rows)  # (E, C, d)
        else:
            out = self.experts(buf, offsets)  # same layout, every expert on its tokens
        y = as_dtype(combine(kernel_dtype(out), r), x.dtype)  # (T, d) Σ_j w_tj E_{e_tj}(x_t)
        for expert in self.shared:
            y = y + expert(x2)  # (T, d) shared experts: every token, unweighted
        if self.residual:
            y = x2 + y  # (T, d) a dropped token leaves as it came
        self.last_routing = r
        return y.reshape(*lead, y.shape[-1]), r.aux_losses

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"shared={len(self.shared)}, residual={self.residual}")


def moe_layer(router: Module, d_ff: int, *, num_shared: int = 0, shared_d_ff: int | None = None,
              activation: str = "relu", dtype: Any = np.float32, rng: RNGLike = None
              ) -> MoELayer:
    """The common case: ``router`` + its E FFN experts of hidden width ``d_ff`` (stacked
    weights), + ``num_shared`` shared FFN experts of width ``shared_d_ff`` (default ``d_ff``).

    Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024, §3.1) is just more
    experts with a smaller ``d_ff``; DeepSeekMoE uses 1 or 2 shared experts.
    """
    validate.count(num_shared, "num_shared", "moe_layer")
    gen = as_rng(rng)
    d = int(router.d_model)
    experts = StackedExperts(int(router.num_experts), d, validate.positive_int(
        d_ff, "d_ff", "moe_layer"), activation, dtype=dtype, rng=gen)
    width = d_ff if shared_d_ff is None else validate.positive_int(
        shared_d_ff, "shared_d_ff", "moe_layer")
    shared = [FeedForward(d, width, activation, dtype=dtype, rng=gen)
              for _ in range(int(num_shared))]
    return MoELayer(router, experts, shared=shared)
