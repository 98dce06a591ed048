"""A tiny Switch Transformer language model, and its FLOP-matched dense baseline.

    ids (B, L) -> token + position embeddings (B, L, d)
    n_layers x [ x = x + Attention(LayerNorm(x));  x = x + FFN(LayerNorm(x)) ]
    LayerNorm -> logits = x · E_tokᵀ  (tied embeddings)                     (B, L, V)

Layer ``i`` (0-based) has a Switch (or GShard top-2) FFN when ``(i + 1) % moe_every == 0``:
with ``moe_every = 2`` every other block, as in Switch-Base's "experts every other FFN
layer" (Table 1) and :mod:`tinymoe.params`' ``tinymoe-switch-lm`` preset. The others, and
every block of :class:`DenseLM`, have one dense FFN of the same size as **one** expert, so a
token costs the same FLOPs in both models (up to the router's d·E multiply-adds): the
paper's FLOP-matched comparison (Switch-Base vs T5-Base).

The training loss is ``cross_entropy + Σ_layers (α · N Σ f_i P_i + c_z · L_z)``: the
balancing loss and the z-loss of each Switch layer, summed over layers (the paper adds the
loss "for each Switch layer"). Every weight starts from the Switch initialisation: a
truncated normal with standard deviation ``sqrt(init_scale / fan_in)``, ``init_scale = 0.1``
(§2.4); biases and LayerNorm at 0 and 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from tinymoe import losses, ops
from tinymoe.moe.capacity import check_capacity_factor
from tinymoe.moe.capacity_layer import CapacityMoELayer
from tinymoe.moe.switch import ROUTER_DTYPES, switch_init
from tinymoe.nn import (
    CausalSelfAttention,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
)
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.params import MoEConfig, flops_per_token
from tinymoe.tensor import Tensor

KINDS = ("switch", "top2", "dense")


@dataclass(frozen=True)
class SwitchLMConfig:
    """Sizes and routing settings of :class:`SwitchTransformerLM` / :class:`DenseLM`.

    The defaults are :mod:`tinymoe.params`' ``tinymoe-switch-lm`` preset (d 128, 4 layers,
    8 experts every other layer, d_ff 512, context 128, tied embeddings) with the paper's
    router settings (capacity factor 1.0, α = 1e-2, c_z = 1e-3, jitter 1e-2, init 0.1).
    ``kind``: ``"switch"`` (top-1), ``"top2"`` (GShard) or ``"dense"`` (the baseline).
    """

    vocab_size: int = 65
    block_size: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    num_experts: int = 8
    moe_every: int = 2
    kind: str = "switch"
    capacity_factor: float = 1.0
    eval_capacity_factor: float | None = None
    group_size: int | None = None
    router_dtype: str = "float32"
    jitter: float = 1e-2
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    expert_dropout: float = 0.0
    dropout: float = 0.0
    activation: str = "gelu"
    init_scale: float = 0.1
    tie_embeddings: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        where = "SwitchLMConfig"
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "d_ff",
                     "num_experts", "moe_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{where}: {name}={v!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(f"{where}: d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind={self.kind!r}; choose one of {KINDS}")
        if self.kind == "top2" and self.num_experts < 2:
            raise ValueError(f"{where}: kind='top2' needs num_experts >= 2")
        check_capacity_factor(self.capacity_factor, where)
        if self.eval_capacity_factor is not None:
            check_capacity_factor(self.eval_capacity_factor, where + " (eval)")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"{where}: router_dtype={self.router_dtype!r}; choose one of "
                             f"{ROUTER_DTYPES}")
        if not self.init_scale > 0:
            raise ValueError(f"{where}: init_scale={self.init_scale!r} must be > 0")

    @property
    def moe_layer_ids(self) -> list[int]:
        """The 0-based blocks with an MoE FFN (none for ``kind="dense"``)."""
        if self.kind == "dense":
            return []
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]

    @property
    def k(self) -> int:
        return {"switch": 1, "top2": 2, "dense": 1}[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwitchLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SwitchLMConfig.from_dict: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> SwitchLMConfig:
        return SwitchLMConfig.from_dict({**asdict(self), **changes})


class Block(Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + FFN(LN(x))``.

    ``ffn`` is a dense :class:`~tinymoe.nn.FeedForward` or a
    :class:`~tinymoe.moe.capacity_layer.CapacityMoELayer`; the residual is what carries a
    dropped token through unchanged.
    """

    def __init__(self, cfg: SwitchLMConfig, moe: bool, rng: np.random.Generator) -> None:
        super().__init__()
        dt = np.dtype(cfg.dtype)
        self.ln1 = LayerNorm(cfg.d_model, dtype=dt)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, dtype=dt,
                                        rng=rng)
        self.ln2 = LayerNorm(cfg.d_model, dtype=dt)
        if moe:
            self.ffn = CapacityMoELayer(
                cfg.d_model, cfg.num_experts, cfg.d_ff, gate=cfg.kind,
                capacity_factor=cfg.capacity_factor,
                eval_capacity_factor=cfg.eval_capacity_factor, group_size=cfg.group_size,
                router_dtype=cfg.router_dtype, jitter=cfg.jitter, activation=cfg.activation,
                expert_dropout=cfg.expert_dropout, aux_loss_coef=cfg.aux_loss_coef,
                z_loss_coef=cfg.z_loss_coef, init_scale=cfg.init_scale, dtype=dt, rng=rng)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout,
                                   dtype=dt, rng=rng)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, CapacityMoELayer)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))  # (B, L, d)
        return x + self.ffn(self.ln2(x))  # (B, L, d)


def _switch_init_(module: Module, rng: np.random.Generator, scale: float) -> None:
    """Redraw every Linear and Embedding weight from the Switch initialisation (§2.4)."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.weight.data = switch_init(rng, m.in_features, m.weight.shape, m.weight.dtype,
                                        scale)
        elif isinstance(m, Embedding):
            m.weight.data = switch_init(rng, m.embedding_dim, m.weight.shape, m.weight.dtype,
                                        scale)


class TransformerLM(Module):
    """``model(ids) -> logits``; ``model.loss(ids, targets) -> (total, cross_entropy)``.

    Use :class:`SwitchTransformerLM` or :class:`DenseLM` (or :func:`build_model`).
    """

    def __init__(self, cfg: SwitchLMConfig, rng: RNGLike = None) -> None:
        super().__init__()
        gen = as_rng(rng)
        self.cfg = cfg
        dt = np.dtype(cfg.dtype)
        self.tok = Embedding(cfg.vocab_size, cfg.d_model, dtype=dt, rng=gen)
        self.pos = Embedding(cfg.block_size, cfg.d_model, dtype=dt, rng=gen)
        moe_ids = set(cfg.moe_layer_ids)
        self.blocks = ModuleList([Block(cfg, i in moe_ids, gen) for i in range(cfg.n_layers)])
        self.ln_f = LayerNorm(cfg.d_model, dtype=dt)
        if not cfg.tie_embeddings:
            self.head = Linear(cfg.d_model, cfg.vocab_size, dtype=dt, rng=gen)
        _switch_init_(self, gen, cfg.init_scale)  # the MoE experts were drawn this way

    @property
    def moe_layers(self) -> list[CapacityMoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, ids: Any) -> Tensor:
        ids = np.asarray(ids)
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.cfg.block_size:
            raise ValueError(f"{type(self).__name__}: ids must be (B, L) with 1 <= L <= "
                             f"block_size={self.cfg.block_size}, got shape {ids.shape}")
        x = self.tok(ids) + self.pos(np.arange(ids.shape[1]))  # (B, L, d)
        for block in self.blocks:
            x = block(x)  # (B, L, d)
        x = self.ln_f(x)  # (B, L, d)
        if self.cfg.tie_embeddings:
            return x @ self.tok.weight.T  # (B, L, V)
        return self.head(x)  # (B, L, V)

    def router_loss(self) -> Tensor | None:
        """Σ over MoE layers of ``aux_loss + z_loss`` from the last forward (None if dense)."""
        layers = self.moe_layers
        if not layers:
            return None
        return ops.stack([m.router_loss for m in layers]).sum()

    def loss(self, ids: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """``(cross_entropy + router losses, cross_entropy)`` for one batch."""
        ce = losses.cross_entropy(self(ids), targets)
        extra = self.router_loss()
        return (ce if extra is None else ce + extra.astype(ce.dtype)), ce

    def expert_parameters(self) -> int:
        """Parameters of one FFN expert (= one dense FFN): d·d_ff + d_ff + d_ff·d + d."""
        d, f = self.cfg.d_model, self.cfg.d_ff
        return 2 * d * f + f + d

    def active_parameters(self) -> int:
        """Parameters one token uses: all but the ``E - k`` experts it did not pick, in every
        MoE layer (the embedding row lookup counted as active, as in :mod:`tinymoe.params`)."""
        unused = len(self.moe_layers) * (self.cfg.num_experts - self.cfg.k)
        return self.num_parameters() - unused * self.expert_parameters()

    def params_config(self) -> MoEConfig:
        """This model in :mod:`tinymoe.params`' terms (its FFNs have biases; its attention
        biases, 4·d per layer, are not in that model)."""
        c = self.cfg
        return MoEConfig(vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers,
                         n_heads=c.n_heads, d_ff=c.d_ff,
                         n_experts=1 if c.kind == "dense" else c.num_experts, top_k=c.k,
                         moe_every=c.moe_every, ffn_kind=c.activation,
                         tie_embeddings=c.tie_embeddings, norm_kind="layernorm",
                         ffn_bias=True, n_positions=c.block_size)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token over a full context (:func:`tinymoe.params.flops_per_token`;
        for the dense model the "router" of its 1-expert MoE layers is removed)."""
        pc = self.params_config()
        flops = flops_per_token(pc, self.cfg.block_size)
        if self.cfg.kind == "dense":
            flops -= 2 * pc.n_moe_layers * self.cfg.d_model  # a 1-expert router is no router
        return flops

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def extra_repr(self) -> str:
        return f"kind={self.cfg.kind!r}, moe_layers={self.cfg.moe_layer_ids}"


class SwitchTransformerLM(TransformerLM):
    """Transformer LM with Switch (top-1) or GShard top-2 FFNs every ``moe_every`` blocks."""

    def __init__(self, cfg: SwitchLMConfig, rng: RNGLike = None) -> None:
        if cfg.kind == "dense":
            raise ValueError("SwitchTransformerLM: cfg.kind='dense'; use DenseLM (or "
                             "build_model) for the dense baseline")
        super().__init__(cfg, rng)


class DenseLM(TransformerLM):
    """The FLOP-matched baseline: the same transformer with a dense FFN in every block."""

    def __init__(self, cfg: SwitchLMConfig, rng: RNGLike = None) -> None:
        if cfg.kind != "dense":
            cfg = cfg.replace(kind="dense")
        super().__init__(cfg, rng)


def build_model(cfg: SwitchLMConfig, rng: RNGLike = None) -> TransformerLM:
    """:class:`DenseLM` for ``kind="dense"``, else :class:`SwitchTransformerLM`."""
    return DenseLM(cfg, rng) if cfg.kind == "dense" else SwitchTransformerLM(cfg, rng)


def describe(model: TransformerLM) -> str:
    """``"total / active"`` parameters, e.g. ``"1,234,567 / 456,789"``."""
    return f"{model.num_parameters():,} / {model.active_parameters():,}"
