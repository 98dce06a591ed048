"""Expert capacity: how many slots each expert gets, and which choices take them.

GShard (Lepikhin et al. 2020, §2.2) and Switch (Fedus et al. 2021, §2.2, eq. 3) give every
expert a fixed buffer of ``C`` slots per group of tokens, so that shapes are static:

    expert capacity = (tokens per group / number of experts) × capacity_factor      eq. (3)

For top-k routing every token makes k choices, so GShard's capacity is ``2S/E`` per group
of S tokens (``capacity_factor = 1``, k = 2). Implementations round this differently
(reference §7.1); tinymoe's convention, used by every capacity-mode gate:

    C = ceil(k · S / E · capacity_factor),  clamped to  1 <= C <= S

* **ceil**, as DeepSpeed: ``capacity_factor = 1`` with perfectly balanced routing never
  drops a token, even when E does not divide k·S;
* **k · S / E**: the factor counts all k·S assignments (GShard's ``2S/E``, DeepSpeed's
  ``2·cf`` for top-2), unlike Mesh TensorFlow, whose top-2 capacity is not doubled;
* **clamped to [1, S]**: an expert can never receive a token twice, so more than S slots
  would only be padding (and C > S crashed DeepSpeed, PRs #5353/#8155); at least one slot
  so that an expert always exists in the buffer. No ``min_capacity`` of 4 or 8.
  (Before rounding, ``k·S·capacity_factor/E`` is rounded to 9 decimals so that e.g.
  1 · 100 · 1.1 / 2 = 55.00000000000001 gives 55, not 56.)

Which choices take the slots (positions) is the dispatch contract's
:func:`~tinymoe.dispatch.reference.assign_positions`: choice-major priority (all first
choices of a group, in sequence order, before all second choices), an exclusive prefix sum,
``position < C`` kept. :func:`capacity_positions` adds the two things GShard needs on top:
**groups** (each group of S tokens fills its own C slots per expert) and **inactive
choices** (a second choice that lost GShard's random routing takes no slot at all).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinymoe.dispatch.backend import backend_module
from tinymoe.dispatch.functions import Routing
from tinymoe.tensor import Tensor


def check_capacity_factor(capacity_factor: Any, where: str) -> float:
    """``capacity_factor`` as a finite float > 0, or a ValueError naming ``where``."""
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real) \
            or not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"{where}: capacity_factor={capacity_factor!r} must be a finite "
                         f"number > 0 (1.0 gives each expert exactly its balanced share "
                         f"k·T/E; 1.25 and 2.0 are common)")
    return float(capacity_factor)


def check_num_experts(num_experts: Any, where: str) -> int:
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) \
            or num_experts < 1:
        raise ValueError(f"{where}: num_experts={num_experts!r} must be an integer >= 1")
    return int(num_experts)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float = 1.0,
                    k: int = 1) -> int:
    """Slots per expert for a group of ``num_tokens`` tokens (eq. 3 with the convention of
    the module docstring): ``ceil(k · T / E · capacity_factor)`` clamped to ``[1, T]``.

    >>> expert_capacity(64, 8, 1.0), expert_capacity(64, 8, 1.25), expert_capacity(10, 4)
    (8, 10, 3)
    >>> expert_capacity(64, 8, 1.0, k=2)     # GShard: 2S/E
    16
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) \
            or num_tokens < 0:
        raise ValueError(f"expert_capacity: num_tokens={num_tokens!r} must be an integer >= 0")
    E = check_num_experts(num_experts, "expert_capacity")
    cf = check_capacity_factor(capacity_factor, "expert_capacity")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= E:
        raise ValueError(f"expert_capacity: k={k!r} must be an integer in [1, {E}] "
                         f"(choices per token, at most num_experts)")
    T = int(num_tokens)
    ### BEGIN SOLUTION task4_1
    C = math.ceil(round(k * T * cf / E, 9))  # eq. (3), k·T assignments shared by E experts
    return int(min(max(C, 1), max(T, 1)))    # 1 <= C <= T
    ### END SOLUTION


def num_groups(num_tokens: int, group_size: int | None, where: str) -> tuple[int, int]:
    """``(G, S)``: the T tokens as G groups of S (``group_size=None``: one group of T)."""
    if group_size is None:
        return 1, int(num_tokens)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or group_size < 1:
        raise ValueError(f"{where}: group_size={group_size!r} must be an integer >= 1, or "
                         f"None for one group of all the tokens")
    if num_tokens % group_size:
        raise ValueError(f"{where}: {num_tokens} tokens do not split into groups of "
                         f"group_size={group_size}; choose a group_size that divides the "
                         f"number of tokens (batch × sequence length)")
    return int(num_tokens) // int(group_size), int(group_size)


def capacity_positions(expert_index: np.ndarray, num_experts: int, capacity: int, *,
                       active: np.ndarray | None = None, group_size: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Slot of every choice in its expert's buffer, per group, with choice-major priority.

    ``expert_index`` (T, k) int; ``active`` (T, k) bool (None: all active): an inactive
    choice takes no slot and gets position -1. The T tokens form G groups of S consecutive
    tokens; within a group, all active first choices queue (in sequence order) before all
    active second choices, and the first ``capacity`` choices of each expert are kept.

    Returns ``position`` (T, k), the slot in a buffer of ``G · capacity`` slots per expert
    (group g owns slots ``g·C .. g·C + C - 1``), -1 when dropped or inactive; and ``counts``
    (E,) the slots filled per expert over all groups.

    How: expert e of group g becomes the "virtual expert" ``g·E + e``, so one call of the
    dispatch backend's ``assign_positions`` on the active choices, listed column by column,
    gives every group its own queues.
    """
    e = np.asarray(expert_index)
    if e.ndim != 2:
        raise ValueError(f"capacity_positions: expert_index must be (T, k), got shape "
                         f"{e.shape}")
    E = check_num_experts(num_experts, "capacity_positions")
    T, k = e.shape
    G, S = num_groups(T, group_size, "capacity_positions")
    act = np.ones((T, k), dtype=bool) if active is None else np.asarray(active, dtype=bool)
    if act.shape != (T, k):
        raise ValueError(f"capacity_positions: active has shape {act.shape}, expected the "
                         f"shape of expert_index {(T, k)}")
    group = (np.arange(T) // max(S, 1))[:, None]  # (T, 1) group of each token
    ### BEGIN SOLUTION task4_1
    virtual = group * E + e                        # (T, k) expert e of group g -> g·E + e
    queue = virtual.T[act.T]                       # (n,) active choices, column 0 first
    slot, _ = backend_module().assign_positions(queue[:, None], G * E, capacity)  # (n, 1)
    position = np.full((k, T), -1, dtype=np.int64)  # (k, T) choice-major, like the queue
    position[act.T] = slot[:, 0]                   # back in place; -1 stays for inactive
    position = position.T                          # (T, k)
    kept = position >= 0                           # (T, k)
    position = np.where(kept, group * capacity + position, -1)  # (T, k) slot in G·C
    ### END SOLUTION
    counts = np.bincount(e[kept], minlength=E).astype(np.int64)  # (E,)
    return np.ascontiguousarray(position, dtype=np.int64), counts


@dataclass(eq=False)
class CapacityRouting:
    """What a capacity-mode gate (:class:`~tinymoe.moe.switch.SwitchGate`,
    :class:`~tinymoe.moe.gshard.Top2Gate`) hands to the layer for one batch of T tokens.

    ``routing`` is the dispatch contract (expert_index, combine_weight, position (T, k),
    counts, ``capacity = G · C`` slots per expert in the buffer); ``capacity`` is C per
    group. ``aux_loss`` is the load-balancing loss *without* its coefficient (1 at uniform
    routing) and ``z_loss`` the router z-loss, both scalar Tensors. ``demand`` (E,) counts
    the active choices per expert before dropping; ``routing.counts`` the kept ones.
    """

    routing: Routing
    router_logits: Tensor     # (T, E) in the router's dtype
    router_probs: Tensor      # (T, E) softmax(router_logits)
    capacity: int             # C, slots per expert per group
    num_groups: int           # G
    aux_loss: Tensor          # () N·Σ f_i P_i, 1 at uniform
    z_loss: Tensor            # () mean logsumexp²
    demand: np.ndarray        # (E,) active choices per expert, before dropping
    active: np.ndarray        # (T, k) bool: False for a second choice that lost random routing

    @property
    def expert_index(self) -> np.ndarray:
        return self.routing.expert_index

    @property
    def combine_weight(self) -> Tensor:
        return self.routing.combine_weight

    @property
    def position(self) -> np.ndarray:
        return self.routing.position

    @property
    def kept(self) -> np.ndarray:
        """(T, k) bool: the choices that got a slot."""
        return self.routing.position >= 0

    @property
    def dropped_tokens(self) -> np.ndarray:
        """(T,) bool: tokens that reach no expert (they pass through the residual only)."""
        return ~self.kept.any(axis=1)

    @property
    def dropped_fraction(self) -> float:
        """Share of the T tokens that reach no expert."""
        d = self.dropped_tokens
        return float(d.mean()) if d.size else 0.0

    @property
    def dropped_choices(self) -> int:
        """Active choices that found their expert full."""
        return int((self.active & ~self.kept).sum())
