"""The routing: what every router returns, and what dispatch and combine read.

One type for every gate in the library, from the 1991 softmax gate to DeepSeek-V3's
biased router. For T tokens, E experts and k choices per token:

    expert_index  (T, k) int64   which experts each token chose, in priority order
    combine_weight (T, k) Tensor the gate value each choice is weighted by (the router
                                 learns through it)
    position      (T, k) int64   the choice's slot in its expert's buffer; -1 when the
                                 choice was dropped (its expert was full) or never active
    counts        (E,)   int64   the choices each expert kept
    capacity      int | None     slots per expert in the buffer (the dispatch mode:
                                 an (E, C, d) buffer), or None for dropless routing (rows
                                 sorted by expert, each expert takes all it was given)
    probs         (T, E) Tensor  the router's distribution over all experts (softmax, the
                                 2017 gate's sparse G(x), or DeepSeek-V3's sigmoid affinities)
    logits        (T, E) Tensor  the scores the choice was made on
    aux_losses    {name: Tensor} the auxiliary losses the router defines, each a scalar
                                 with its coefficient applied: add them to the task loss
    stats         {name: value}  whatever else the router reports (importance, load, demand,
                                 the slots per expert and group ``group_capacity``, the raw
                                 losses before their coefficients, ...)

The choice itself (``expert_index``, ``position``) gets no gradient: it is a discrete
decision. Gradients reach the router through ``combine_weight`` and ``aux_losses``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinymoe.dispatch.backend import backend_module
from tinymoe.tensor import Tensor


@dataclass(eq=False)
class Routing:
    """A router's decision for one batch of tokens (see the module docstring)."""

    expert_index: np.ndarray
    combine_weight: Any
    position: np.ndarray
    counts: np.ndarray
    num_experts: int
    capacity: int | None
    probs: Tensor | None = None
    logits: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.expert_index.shape[0]

    @property
    def k(self) -> int:
        return self.expert_index.shape[1]

    @property
    def kept(self) -> np.ndarray:
        """The choices that hold a slot, a (T, k) bool array."""
        return self.position >= 0

    @property
    def dropped_choices(self) -> np.ndarray:
        """The choices without a slot, a (T, k) bool array.

        A choice has no slot when its expert was full, or when it was never active (GShard's
        random routing can leave a second choice unused; those are in ``stats["active"]``).
        """
        return self.position < 0

    @property
    def dropped_tokens(self) -> np.ndarray:
        """The tokens that reach no expert, a (T,) bool array (in a residual block they pass
        unchanged)."""
        return ~self.kept.any(axis=1)

    @property
    def dropped_fraction(self) -> float:
        """The share of the T **tokens** that reach no expert (the papers' "dropped tokens")."""
        d = self.dropped_tokens
        return float(d.mean()) if d.size else 0.0

    @property
    def dropped_choice_fraction(self) -> float:
        """The share of the T·k **choices** without a slot (a top-2 token may keep one)."""
        return float(self.dropped_choices.mean()) if self.position.size else 0.0

    def total_aux_loss(self) -> Tensor | None:
        """The sum of ``aux_losses`` (None when the router defines none)."""
        return sum_losses(self.aux_losses.values())

    @property
    def filled_rows(self) -> np.ndarray:
        """(E,) one past the highest slot a kept choice holds in each expert's buffer (0 for
        an expert with none): the slots from there to C are padding (capacity mode)."""
        rows = np.zeros(self.num_experts, dtype=np.int64)
        kept = self.position >= 0  # (T, k)
        np.maximum.at(rows, self.expert_index[kept], self.position[kept] + 1)
        return rows

    def sorted_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(order (N,), offsets (E+1,))`` of the kept pairs grouped by expert, computed once."""
        if self._sorted is None:
            position = None if self.capacity is None else self.position
            self._sorted = backend_module().sort_tokens(self.expert_index, self.num_experts,
                                                        position)
        return self._sorted

    @property
    def order(self) -> np.ndarray:
        """(N,) the kept (token, choice) pairs as ``t·k + j``, grouped by expert."""
        return self.sorted_layout()[0]

    @property
    def offsets(self) -> np.ndarray:
        """(E+1,) expert e's rows in the sorted layout are ``offsets[e]:offsets[e + 1]``."""
        return self.sorted_layout()[1]


def sum_losses(losses: Any) -> Tensor | None:
    """``l_1 + l_2 + ...`` in the order given, or None for no losses."""
    total = None
    for loss in losses:
        total = loss if total is None else total + loss
    return total


def route(expert_index: Any, combine_weight: Any, num_experts: int,
          capacity: int | None = None, **fields: Any) -> Routing:
    """A :class:`Routing` from chosen experts and gate values: positions by the dispatch
    contract's choice-major priority (all first choices in token order, then all second
    choices, ...), the first ``capacity`` of each expert kept (all of them when None).

    ``fields`` fill the rest of the routing (``probs``, ``logits``, ``aux_losses``, ``stats``).
    """
    e = expert_index.data if isinstance(expert_index, Tensor) else np.asarray(expert_index)
    position, counts = backend_module().assign_positions(e, num_experts, capacity)
    return Routing(np.asarray(e, dtype=np.int64), combine_weight, position, counts,
                   int(num_experts), None if capacity is None else int(capacity), **fields)
