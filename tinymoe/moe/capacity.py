"""Expert capacity: how many slots each expert gets, and which choices take them.

GShard (Lepikhin et al. 2020, §2.2) and Switch (Fedus et al. 2021, §2.2, eq. 3) give every
expert a fixed buffer of ``C`` slots per group of tokens, so that shapes are static:

    expert capacity = (tokens per group / number of experts) × capacity_factor      eq. (3)

For top-k routing every token makes k choices, so GShard's capacity is ``2S/E`` per group
of S tokens (``capacity_factor = 1``, k = 2). Implementations round this differently
(GShard, Mesh TensorFlow, fairseq and DeepSpeed each differ a little); tinymoe's convention,
used by every capacity-mode router:

    C = ceil(k · S / E · capacity_factor),  clamped to  1 <= C <= S

* **ceil**, as DeepSpeed: ``capacity_factor = 1`` with perfectly balanced routing never
  drops a token, even when E does not divide k·S;
* **k · S / E**: the factor counts all k·S assignments (GShard's ``2S/E``, DeepSpeed's
  ``2·cf`` for top-2), unlike Mesh TensorFlow, whose top-2 capacity is not doubled;
* **clamped to [1, S]**: an expert can never receive a token twice, so more than S slots
  would only be padding (and C > S crashed DeepSpeed, PRs #5353/#8155); at least one slot
  so that an expert always exists in the buffer. No ``min_capacity`` of 4 or 8 (DeepSpeed's
  default is 4).
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

import numpy as np

from tinymoe import validate
from tinymoe.dispatch.backend import backend_module


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
    E = validate.num_experts(num_experts, "expert_capacity")
    cf = validate.capacity_factor(capacity_factor, "expert_capacity")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= E:
        raise ValueError(f"expert_capacity: k={k!r} must be an integer in [1, {E}] "
                         f"(choices per token, at most num_experts)")
    T = int(num_tokens)
    ### BEGIN SOLUTION task4_1
    C = math.ceil(round(k * T * cf / E, 9))  # eq. (3), k·T assignments shared by E experts
    return int(min(max(C, 1), max(T, 1)))    # 1 <= C <= T
    ### END SOLUTION


def num_groups(num_tokens: int, group_size: int | None, where: str) -> tuple[int, int]:
    """``(G, S)``: the T tokens as G groups of S (``group_size=None``: one group of T; an
    empty batch, T = 0, is one empty group)."""
    if group_size is None:
        return 1, int(num_tokens)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or group_size < 1:
        raise ValueError(f"{where}: group_size={group_size!r} must be an integer >= 1, or "
                         f"None for one group of all the tokens")
    if num_tokens == 0:
        return 1, 0
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
    E = validate.num_experts(num_experts, "capacity_positions")
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
