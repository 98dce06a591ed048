"""A small character-level language model whose feed-forward part is a sparsely-gated MoE.

    ids (B, L) -> token + position embeddings (B, L, d)
    n_layers x [ x = x + Attention(LayerNorm(x));  x = x + MoE(LayerNorm(x)) ]
    LayerNorm -> Linear -> logits (B, L, V)

The MoE layer (Shazeer et al. 2017) sees the B·L positions as one batch of tokens, the
"convolutional" use of the paper (§3.1). The paper's LM put one MoE between two LSTM layers;
a tiny pre-norm transformer is the modern equivalent and trains in minutes in NumPy.
The training loss is ``cross_entropy + Σ_layers aux_loss`` where each layer's aux loss is
``w_importance·CV(Importance)² + w_load·CV(Load)²`` (eqs. 7 and 11).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from tinymoe import losses, ops
from tinymoe.moe.layer import MoELayer
from tinymoe.nn import CausalSelfAttention, Embedding, LayerNorm, Linear, Module, ModuleList
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.tensor import Tensor


@dataclass(frozen=True)
class CharLMConfig:
    """Sizes of :class:`CharMoELM`. ``k=4`` is the paper's flat-MoE LM setting (App. C.1)."""

    vocab_size: int
    block_size: int = 64
    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 4
    num_experts: int = 16
    k: int = 4
    d_ff: int = 64
    w_importance: float = 0.0
    w_load: float = 0.0
    noisy_gating: bool = True
    dtype: Any = np.float32


class MoEBlock(Module):
    """Pre-norm transformer block with an MoE feed-forward: attention, then MoE, each residual.

    The MoE is the 2017 :class:`~tinymoe.moe.layer.MoELayer`, or whatever ``make_moe(cfg,
    rng)`` builds (e.g. a :class:`~tinymoe.moe.routed_layer.RoutedMoELayer` with a modern
    router): any Module mapping (..., d_model) to (..., d_model) with an ``aux_loss``
    attribute (a scalar Tensor or None) after each call.
    """

    def __init__(self, cfg: CharLMConfig, rng: np.random.Generator,
                 make_moe: Callable[[CharLMConfig, np.random.Generator], Module] | None = None
                 ) -> None:
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, dtype=cfg.dtype)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, dtype=cfg.dtype, rng=rng)
        self.ln2 = LayerNorm(cfg.d_model, dtype=cfg.dtype)
        if make_moe is None:
            self.moe = MoELayer(cfg.d_model, cfg.num_experts, cfg.k, d_ff=cfg.d_ff,
                                w_importance=cfg.w_importance, w_load=cfg.w_load,
                                noisy_gating=cfg.noisy_gating, rng=rng, dtype=cfg.dtype)
        else:
            self.moe = make_moe(cfg, rng)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))  # (B, L, d)
        return x + self.moe(self.ln2(x))  # (B, L, d)


class CharMoELM(Module):
    """``model(ids) -> logits``; ``model.loss(ids, targets) -> (total, cross_entropy)``."""

    def __init__(self, cfg: CharLMConfig, rng: RNGLike = None,
                 make_moe: Callable[[CharLMConfig, np.random.Generator], Module] | None = None
                 ) -> None:
        super().__init__()
        gen = as_rng(rng)
        self.cfg = cfg
        self.tok = Embedding(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, rng=gen,
                             init_scale=0.1)
        self.pos = Embedding(cfg.block_size, cfg.d_model, dtype=cfg.dtype, rng=gen,
                             init_scale=0.1)
        self.blocks = ModuleList([MoEBlock(cfg, gen, make_moe) for _ in range(cfg.n_layers)])
        self.ln_f = LayerNorm(cfg.d_model, dtype=cfg.dtype)
        self.head = Linear(cfg.d_model, cfg.vocab_size, dtype=cfg.dtype, rng=gen)

    @property
    def moe_layers(self) -> list[Module]:
        return [b.moe for b in self.blocks]

    def forward(self, ids: Any) -> Tensor:
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] > self.cfg.block_size:
            raise ValueError(f"CharMoELM: ids must be (B, L) with L <= block_size="
                             f"{self.cfg.block_size}, got shape {ids.shape}")
        x = self.tok(ids) + self.pos(np.arange(ids.shape[1]))  # (B, L, d)
        for block in self.blocks:
            x = block(x)  # (B, L, d)
        return self.head(self.ln_f(x))  # (B, L, V)

    def aux_loss(self) -> Tensor:
        """Σ over MoE layers of their balancing loss from the last forward (0 if none)."""
        terms = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        if not terms:
            return Tensor(np.zeros((), dtype=self.cfg.dtype))
        return ops.stack(terms).sum()

    def loss(self, ids: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """``(cross_entropy + aux_loss, cross_entropy)`` for one batch."""
        ce = losses.cross_entropy(self(ids), targets)
        return ce + self.aux_loss(), ce

    def config_dict(self) -> dict:
        d = asdict(self.cfg)
        d["dtype"] = np.dtype(d["dtype"]).name
        return d
