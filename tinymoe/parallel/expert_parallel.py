"""Expert parallelism, simulated in one process: what crosses the network when experts live on
different machines (GShard, Lepikhin et al. 2020, §2.2; Switch, Fedus et al. 2021, §2.2).

D devices hold the model together. Tokens are **data parallel**: the T tokens are split into D
shards of S = T/D, and device r owns tokens ``r·S .. (r+1)·S - 1`` (one GShard group).
Experts are **expert parallel**: device q holds the E/D experts ``q·E/D .. (q+1)·E/D - 1``.
A token usually lives on one device and its expert on another, so one forward pass is

    1. route     every device r runs the gate on its own S tokens (C slots per expert for
                 that group, C = ceil(k·S/E · capacity_factor)) and dispatches them into its
                 send buffer (E, C, d) = D chunks (E/D, C, d), chunk q for device q;
    2. all-to-all  chunk [r][q] travels from device r to device q;
    3. experts   device q runs its E/D experts on what arrived: D·C rows per expert,
                 C from every device (group-major, exactly GShard's ``EGCM`` buffer);
    4. all-to-all  the outputs go back the reverse way: chunk [q][r] from q to r;
    5. combine   every device r adds the outputs into its own tokens, weighted by its gate.

In a real system ``all_to_all`` is one collective call (NCCL, MPI, XLA); here a "device" is an
index r, lists of length D hold one tensor per device, and the collective is a permutation
of chunks, so autograd gives the backward pass for free: the gradient of an all-to-all is
the reverse all-to-all. The result is identical to the single-device
:class:`~tinymoe.moe.layer.MoELayer` whose capacity router has ``group_size = T/D``: expert
parallelism changes where the arithmetic happens, not what it computes.

**What crosses the network.** The buffers have a fixed size, C slots per expert whether
they are filled or not (padding, the price of static shapes), so every device sends the
same number of bytes in each all-to-all, its own chunk excluded (it stays on the device):

    bytes sent per device per all-to-all = (D - 1) · (E/D) · C · d · itemsize

and receives as many. A forward pass makes two all-to-alls (dispatch and combine), the
backward pass two more (their gradients, the same sizes in reverse). Slots nobody took
still cost bandwidth; tokens an expert could not take (dropped) cost none but get no expert.
With fixed buffers every device multiplies E/D · D·C rows, so a skewed router shows up as
padding on the idle experts and drops on the busy ones; in a dropless system (variable-size
all-to-all) the busiest device instead sets the step time: ``load_imbalance`` = max over
devices of the tokens processed / their mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from tinymoe import ops, validate
from tinymoe.dispatch.functions import as_dtype, combine, dispatch, kernel_dtype
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.capacity import expert_capacity
from tinymoe.moe.experts import StackedExperts, batched_ffn
from tinymoe.moe.layer import MoELayer
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor


# --- checks ---------------------------------------------------------------------------------
def _common_divisors(a: int, b: int) -> list[int]:
    return [n for n in range(1, min(a, b) + 1) if a % n == 0 and b % n == 0]


def check_num_devices(num_devices: Any, num_tokens: int | None, num_experts: int,
                      where: str) -> int:
    """``num_devices`` D as an int, or a ValueError: D >= 1, D divides E (each device holds
    E/D experts) and, when known, the number of tokens T (each device owns T/D tokens)."""
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) \
            or num_devices < 1:
        raise ValueError(f"{where}: num_devices={num_devices!r} must be an integer >= 1 "
                         f"(1 is a single device, no all-to-all)")
    D, E = int(num_devices), int(num_experts)
    if E % D:
        ok = [n for n in range(1, E + 1) if E % n == 0]
        raise ValueError(f"{where}: num_experts={E} does not split over num_devices={D} "
                         f"(each device holds E/D experts); choose num_devices in {ok}, or "
                         f"a number of experts that is a multiple of {D}")
    if num_tokens is not None and num_tokens % D:
        raise ValueError(f"{where}: {num_tokens} tokens do not split over num_devices={D} "
                         f"(each device owns T/D tokens, one GShard group); choose "
                         f"num_devices in {_common_divisors(num_tokens, E)} (divisors of both "
                         f"T={num_tokens} and E={E}), or a batch of a multiple of {D} tokens")
    return D


def _split_gate_inputs(gate_inputs: dict[str, Any], T: int, D: int) -> list[dict[str, Any]]:
    """Per-token gate inputs (``jitter_noise`` (T, d), ``uniform`` (T,)) cut into D shards."""
    S = T // D
    shards: list[dict[str, Any]] = [{} for _ in range(D)]
    for name, value in gate_inputs.items():
        a = None if value is None else np.asarray(value)
        if a is not None and (a.ndim == 0 or a.shape[0] != T):
            raise ValueError(f"expert_parallel_forward: gate input {name} has shape "
                             f"{a.shape}; it must have one row per token, ({T}, ...), so that "
                             f"every device gets the rows of its own tokens")
        for r in range(D):
            shards[r][name] = None if a is None else a[r * S:(r + 1) * S]  # (S, ...)
    return shards


# --- the collective -------------------------------------------------------------------------
def all_to_all(chunks: Sequence[Any]) -> list[Tensor]:
    """The all-to-all collective: what device ``src`` sends to ``dst`` arrives at ``dst``.

        received[dst][src] = chunks[src][dst]          for src, dst in 0 .. D-1

    ``chunks`` holds D send buffers, one per device, each (D, *chunk): ``chunks[src][dst]`` is
    the chunk for device dst (a list of D tensors per device is stacked first). All chunks
    have one shape (a fixed-size all-to-all, like ``torch.distributed.all_to_all_single``
    with equal splits); chunk ``[r][r]`` stays on device r. Returns D receive buffers, each
    (D, *chunk), indexed ``received[dst][src]``.

    Seen as one tensor (D_src, D_dst, *chunk) the collective swaps the first two axes: a
    permutation, and the inverse of that permutation is the same swap. So the gradient of
    an all-to-all is an all-to-all in the reverse direction (the gradients of the tokens an
    expert processed travel back to the devices that own them), and applying it twice gives
    the input back. Built from ``stack``, ``swapaxes`` and indexing, autograd derives this.
    """
    if isinstance(chunks, Tensor) or not isinstance(chunks, Sequence) or not len(chunks):
        raise ValueError(f"all_to_all: chunks must be a non-empty list of D send buffers, "
                         f"one per device, got {type(chunks).__name__}")
    send = [ops.stack([as_tensor(c) for c in buf]) if isinstance(buf, (list, tuple))
            else as_tensor(buf) for buf in chunks]  # D × (D, *chunk)
    D = len(send)
    shapes = [tuple(s.shape) for s in send]
    if any(len(s) == 0 or s[0] != D for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"all_to_all: with D={D} devices every send buffer must have shape "
                         f"(D={D}, *chunk) and all the same shape, got {shapes}; device src "
                         f"puts its chunk for device dst at index [dst] (pad chunks to one "
                         f"size, as the capacity buffers are)")
    ### BEGIN SOLUTION task7_1
    grid = ops.stack(send, axis=0)          # (D_src, D_dst, *chunk) every chunk in flight
    grid = ops.swapaxes(grid, 0, 1)         # (D_dst, D_src, *chunk) sorted by destination
    return [grid[dst] for dst in range(D)]  # D × (D_src, *chunk) what each device receives
    ### END SOLUTION


def alltoall_bytes(T: int, d: int, E: int, D: int, capacity_factor: float = 1.0, k: int = 1,
                   itemsize: int = 4) -> int:
    """Bytes one device sends (and receives) in one all-to-all of an expert-parallel layer.

        C = ceil(k · (T/D) / E · capacity_factor)        slots per expert per device
        bytes = (D - 1) · (E/D) · C · d · itemsize        its D - 1 chunks that leave it

    Every slot counts, padding included (the buffers have a fixed size); the chunk a device
    keeps is not sent. A forward pass makes two such all-to-alls (dispatch, combine), the
    backward pass two more. Example: T=4096, d=256, E=8, D=4, cf 1.25, top-1, float32:
    C = 160, ``3 · 2 · 160 · 256 · 4`` = 983,040 bytes per device per all-to-all.
    """
    for name, v in (("T", T), ("d", d), ("E", E), ("itemsize", itemsize)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"alltoall_bytes: {name}={v!r} must be an integer >= 1")
    D = check_num_devices(D, T, E, "alltoall_bytes")
    C = expert_capacity(T // D, E, capacity_factor, k)  # per device = per GShard group
    return (D - 1) * (E // D) * C * d * itemsize


# --- the report ------------------------------------------------------------------------------
@dataclass
class CommReport:
    """What one expert-parallel forward pass sent over the network, and how full it was.

    Traffic matrices are (D_src, D_dst) in bytes, diagonal 0 (a device's chunk for itself
    stays local). Buffers are fixed-size: C slots per expert per device, **padding included**,
    so the bytes do not depend on the routing; the routing decides how many of those bytes
    are padding (``padding_bytes``) and how many tokens found no slot (``dropped_tokens``).
    """

    num_devices: int                 # D
    num_tokens: int                  # T, all devices
    num_experts: int                 # E, all devices
    capacity: int                    # C slots per expert in one device's buffer
    d_model: int                     # d
    itemsize: int                    # bytes per number in the buffers
    dispatch_traffic: np.ndarray     # (D_src, D_dst) bytes of the dispatch all-to-all
    combine_traffic: np.ndarray      # (D_src, D_dst) bytes of the combine all-to-all
    tokens_per_expert: np.ndarray    # (D, E) choices of device r's tokens kept by expert e
    demand: np.ndarray               # (D, E) the same before dropping
    dropped_tokens: np.ndarray       # (D,) tokens of device r that reached no expert
    padding_slots: np.ndarray        # (D_src, D_dst) empty slots in chunk src -> dst

    @property
    def tokens_per_device(self) -> int:
        return self.num_tokens // self.num_devices

    @property
    def experts_per_device(self) -> int:
        return self.num_experts // self.num_devices

    @property
    def dispatch_sent(self) -> np.ndarray:
        return self.dispatch_traffic.sum(axis=1)  # (D,)

    @property
    def dispatch_received(self) -> np.ndarray:
        return self.dispatch_traffic.sum(axis=0)  # (D,)

    @property
    def combine_sent(self) -> np.ndarray:
        return self.combine_traffic.sum(axis=1)  # (D,)

    @property
    def combine_received(self) -> np.ndarray:
        return self.combine_traffic.sum(axis=0)  # (D,)

    @property
    def total_bytes(self) -> int:
        """Bytes on the network in the forward pass (both all-to-alls, each byte once)."""
        return int(self.dispatch_traffic.sum() + self.combine_traffic.sum())

    @property
    def padding_fraction(self) -> float:
        """Share of the buffers' slots that are empty (padding), over all D² chunks."""
        slots = self.num_devices * self.num_experts * self.capacity
        return float(self.padding_slots.sum() / slots) if slots else 0.0

    @property
    def padding_bytes(self) -> int:
        """Bytes of ``total_bytes`` that carry empty slots (dispatch and combine)."""
        off = self.padding_slots.sum() - np.trace(self.padding_slots)  # network chunks only
        return int(2 * off * self.d_model * self.itemsize)

    @property
    def processed(self) -> np.ndarray:
        """(D,) real tokens (choices) the experts of each device process."""
        El = self.experts_per_device
        return self.tokens_per_expert.reshape(self.num_devices, self.num_devices, El
                                              ).sum(axis=(0, 2))  # (D_src, D_expert, El)

    @property
    def load_imbalance(self) -> float:
        """max / mean of ``processed``: 1 when balanced; a dropless system's step time."""
        p = self.processed
        return float(p.max() / p.mean()) if p.mean() > 0 else 1.0

    def summary(self) -> str:
        D, MB = self.num_devices, 1e6
        lines = [f"expert parallel: D={D} devices, T/D={self.tokens_per_device} tokens and "
                 f"E/D={self.experts_per_device} experts each,",
                 f"C={self.capacity} slots per expert per device (padding included), "
                 f"d={self.d_model}, {self.itemsize} B per number",
                 "device  dispatch sent/recv MB  combine sent/recv MB  processed  dropped"]
        for r in range(D):
            lines.append(f"{r:>6}  {self.dispatch_sent[r] / MB:>9.3f} "
                         f"{self.dispatch_received[r] / MB:>9.3f}  "
                         f"{self.combine_sent[r] / MB:>9.3f} {self.combine_received[r] / MB:>9.3f}"
                         f"  {self.processed[r]:>9}  {self.dropped_tokens[r]:>7}")
        lines.append(f"total {self.total_bytes / MB:.3f} MB on the network, "
                     f"{self.padding_bytes / MB:.3f} MB of it padding; "
                     f"{100 * self.padding_fraction:.1f}% of slots empty; load imbalance "
                     f"{self.load_imbalance:.3f}")
        return "\n".join(lines)


def _traffic(buffers: Sequence[Tensor]) -> np.ndarray:
    """(D_src, D_dst) bytes of chunk ``buffers[src][dst]``, 0 on the diagonal (local)."""
    D = len(buffers)
    b = np.array([[buffers[s].data[t].nbytes for t in range(D)] for s in range(D)],
                 dtype=np.int64)  # (D_src, D_dst)
    np.fill_diagonal(b, 0)
    return b


# --- the forward pass ---------------------------------------------------------------------------
class ExpertParallelOutput(NamedTuple):
    y: Tensor                        # the layer's output, x's shape
    routings: list[Routing]          # one per device, for its own T/D tokens
    report: CommReport


def check_layer(layer: Any, where: str) -> MoELayer:
    """An :class:`~tinymoe.moe.layer.MoELayer` with stacked experts and no shared experts
    (its router's routing decides capacity buffers, checked at the first forward)."""
    if not isinstance(layer, MoELayer) or not isinstance(layer.experts, StackedExperts) \
            or len(layer.shared):
        raise TypeError(f"{where}: layer must be an MoELayer with StackedExperts and no shared "
                        f"experts (e.g. tm.moe.switch_layer(...)), got {type(layer).__name__}")
    return layer


def expert_parallel_forward(layer: MoELayer, x: Any, num_devices: int,
                            **router_inputs: Any) -> ExpertParallelOutput:
    """Run ``layer`` on ``x`` (..., d) as D devices would: steps 1-5 of the module docstring.

    Gives ``layer(x)`` of a layer whose router has ``group_size = T/D`` (forward and
    gradients), where T is the number of tokens: the router's ``group_size`` must be None or
    divide T/D, and its routing must use capacity buffers. Per-token ``router_inputs``
    (``jitter_noise`` (T, d), ``uniform`` (T,)) are cut into the devices' shards; without
    them a training-mode router draws its noise device by device. Expert dropout draws one
    mask per device, so it matches the single-device layer only when off.
    """
    check_layer(layer, "expert_parallel_forward")
    x = as_tensor(x)
    validate.last_dim(x, layer.d_model, "expert_parallel_forward")
    lead, d = x.shape[:-1], layer.d_model
    x2 = x.reshape(-1, d)  # (T, d)
    T, E = x2.shape[0], layer.num_experts
    D = check_num_devices(num_devices, T, E, "expert_parallel_forward")
    S, El = T // D, E // D
    group_size = getattr(layer.router, "group_size", None)
    if group_size is not None and S % group_size:
        raise ValueError(f"expert_parallel_forward: the router's group_size={group_size} does "
                         f"not divide the {S} tokens of a device (T={T} over D={D}); set "
                         f"group_size=T/D={S} (one GShard group per device) or None")
    inputs = _split_gate_inputs(router_inputs, T, D)
    experts = layer.experts
    dtype = experts.W1.dtype

    # 1. every device r routes its own tokens and fills its send buffer
    routings: list[Routing] = []
    send: list[Tensor] = []
    for r in range(D):
        shard = x2[r * S:(r + 1) * S]  # (S, d) the tokens device r owns
        routing = layer.router(shard, **inputs[r])
        if routing.capacity is None:
            raise ValueError("expert_parallel_forward: the router's routing is dropless; "
                             "fixed all-to-all buffers need a capacity router (Switch, GShard)")
        buf = as_dtype(dispatch(kernel_dtype(shard), routing), dtype)  # (E, C, d) 0 padding
        C = buf.shape[1]
        send.append(buf.reshape(D, El, C, d))  # (D, E_local, C, d) chunk q for device q
        routings.append(routing)

    # 2. dispatch all-to-all: device q receives the chunks for its experts from everyone
    recv = all_to_all(send)  # D × (D_src, E_local, C, d)

    # 3. device q runs its E/D experts on D·C rows each, and sends the results home
    back: list[Tensor] = []
    for q in range(D):
        lo, hi = q * El, (q + 1) * El  # device q's experts: slices of the stacked weights
        rows = recv[q].transpose(1, 0, 2, 3).reshape(El, D * C, d)  # (E_local, D·C, d)
        out = batched_ffn(rows, experts.W1[lo:hi], experts.b1[lo:hi], experts.W2[lo:hi],
                          experts.b2[lo:hi], experts.activation,
                          experts.dropout)  # (E_local, D·C, d)
        back.append(out.reshape(El, D, C, d).transpose(1, 0, 2, 3))  # (D_dst, E_local, C, d)

    # 4. combine all-to-all: every device gets its slots back from every expert
    home = all_to_all(back)  # D × (D_expert, E_local, C, d)

    # 5. every device r combines its own tokens
    ys = []
    for r in range(D):
        out = kernel_dtype(home[r].reshape(E, C, d))  # (E, C, d) device r's buffer, processed
        ys.append(as_dtype(combine(out, routings[r]), x.dtype))  # (S, d) Σ_j w_tj FFN_e(x_t)
    y = ops.concatenate(ys, axis=0)  # (T, d) devices' shards back in token order
    if layer.residual:
        y = x2 + y  # (T, d)

    counts = np.stack([c.counts for c in routings])  # (D, E) kept per expert
    filled = counts.reshape(D, D, El).sum(axis=2)  # (D_src, D_dst) filled slots per chunk
    report = CommReport(
        num_devices=D, num_tokens=T, num_experts=E, capacity=C, d_model=d,
        itemsize=np.dtype(dtype).itemsize,
        dispatch_traffic=_traffic(send), combine_traffic=_traffic(back),
        tokens_per_expert=counts, demand=np.stack([c.stats["demand"] for c in routings]),
        dropped_tokens=np.array([int(c.dropped_tokens.sum()) for c in routings]),  # (D,)
        padding_slots=El * C - filled)  # (D_src, D_dst)
    return ExpertParallelOutput(y.reshape(*lead, d), routings, report)


class ExpertParallelMoE(Module):
    """An :class:`~tinymoe.moe.layer.MoELayer` run on ``num_devices`` simulated devices
    (:func:`expert_parallel_forward`); shares the layer's parameters.

    ``model(x)`` returns ``(y, aux_losses)`` like the layer: each auxiliary loss averaged over
    the devices, as the layer averages over its groups (the balancing loss is one value per
    group; the z-loss, a mean over tokens, averages exactly over equal shards). After each
    call it holds ``report`` (:class:`CommReport`) and ``last_routings`` (one per device).
    """

    def __init__(self, layer: MoELayer, num_devices: int) -> None:
        super().__init__()
        self.layer = check_layer(layer, "ExpertParallelMoE")
        self.num_devices = check_num_devices(num_devices, None, layer.num_experts,
                                             "ExpertParallelMoE")
        self.report: CommReport | None = None
        self.last_routings: list[Routing] | None = None

    def forward(self, x: Any, **router_inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        y, routings, report = expert_parallel_forward(self.layer, x, self.num_devices,
                                                      **router_inputs)
        self.report, self.last_routings = report, routings
        aux = {name: ops.stack([r.aux_losses[name] for r in routings]).mean()
               for name in routings[0].aux_losses}  # () mean over devices
        return y, aux

    def extra_repr(self) -> str:
        return f"num_devices={self.num_devices}"
