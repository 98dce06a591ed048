"""A small decoder-only transformer LM whose feed-forward slot takes a dense FFN or any MoE layer.

    ids (B, L) -> token + position embeddings                              (B, L, d)
    n_layers x [ x = x + Attention(LayerNorm(x));  x = x + FFN(LayerNorm(x)) ]   pre-norm
    LayerNorm -> logits = x · E_tokᵀ (tied embeddings) or a Linear head      (B, L, V)

The FFN of block ``i`` (0-based) is an MoE layer when ``(i + 1) % moe_every == 0``: with
``moe_every = 2`` every other block, Switch-Base's "experts every other FFN layer" (Fedus et
al. 2021, Table 1); with ``moe_every = 1`` every block. The other blocks, and every block of
``kind="dense"``, have one dense FFN of the size of **one** expert, so a token costs the
same FLOPs in the dense and the top-1 model (up to the router's d·E multiply-adds): the
paper's FLOP-matched comparison (Switch-Base vs T5-Base).

``kind`` picks the MoE layer (all of them one :class:`~tinymoe.moe.layer.MoELayer`, whose
``layer(x)`` returns ``(y, aux_losses)``):

- ``"noisy_topk"``: the sparsely-gated layer of Shazeer et al. (2017), noisy top-k gating,
  dropless, losses ``w_importance·CV(Importance)² + w_load·CV(Load)²`` (eqs. 7, 11);
- ``"top2"``: GShard's top-2 gate with capacity and random routing (Lepikhin et al. 2020);
- ``"switch"``: the Switch Transformer's top-1 router with capacity, the balancing loss
  α·N·Σ f_i P_i and the z-loss (Fedus et al. 2021; Zoph et al. 2022);
- ``"mixtral"``: Mixtral's block (Jiang et al. 2024): top-k (default 2) softmax router
  with renormalised gates, dropless, SwiGLU experts
  (:func:`~tinymoe.moe.topk_router.mixtral_layer`); it needs ``activation="swiglu"``, and
  :func:`mixtral_config` also sets RMSNorm, an untied head and an MoE layer in every block;
- ``"custom"``: whatever ``make_moe(cfg, rng)`` builds (e.g. a modern router);
- ``"dense"``: no MoE layer at all, the baseline.

The model returns the logits and, with ``return_aux=True``, the auxiliary losses that the
MoE layers returned in that forward, one dict per MoE layer. The training loss is

    cross_entropy + Σ_layers Σ_name aux_losses[name]

(the paper adds the losses "for each Switch layer"); :meth:`Transformer.loss` computes it.

Initialisation (``init``): ``"switch"`` redraws every Linear and Embedding weight from the
Switch initialisation, a normal with standard deviation ``sqrt(init_scale / fan_in)``,
``init_scale = 0.1``, truncated at two standard deviations (§2.4). ``"lecun"`` keeps
``tm.nn``'s defaults: LeCun normal for Linear layers, N(0, 0.1²) for the embeddings. The
MoE layers keep their builders' initialisation either way: the Switch one for the Switch and
top-2 experts and routers, zero gate weights and LeCun experts for the 2017 layer. Biases
start at 0 and LayerNorm at 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np

from tinymoe import losses, ops, validate
from tinymoe.dispatch.routing import sum_losses
from tinymoe.moe.experts import ACTIVATIONS
from tinymoe.moe.gshard import gshard_layer
from tinymoe.moe.noisy_topk import sparse_moe_layer
from tinymoe.moe.precision import round_bfloat16
from tinymoe.moe.precision import router_dtype as check_router_dtype
from tinymoe.moe.switch import switch_layer
from tinymoe.moe.topk_router import mixtral_layer
from tinymoe.nn import (
    CausalSelfAttention,
    Embedding,
    FeedForward,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    RMSNorm,
    SwiGLU,
)
from tinymoe.nn.init import RNGLike, as_rng, switch_init
from tinymoe.params import MoEConfig, flops_per_token
from tinymoe.tensor import Tensor

KINDS = ("switch", "top2", "noisy_topk", "mixtral", "custom", "dense")
NORMS = ("layernorm", "rmsnorm")
FFN_ACTIVATIONS = (*sorted(ACTIVATIONS), "swiglu")  # swiglu: the dense and mixtral kinds
INITS = ("switch", "lecun")
EMBEDDING_SCALE = 0.1  # std of the embeddings under init="lecun"
FIXED_K = {"switch": 1, "top2": 2, "dense": 1}  # the kinds whose k is not a choice
DEFAULT_K = 2  # noisy_topk, mixtral and custom (tensor2tensor's default; Mixtral's k)

MakeMoE = Callable[["TransformerConfig", np.random.Generator], Module]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes, FFN kind, routing and initialisation of a :class:`Transformer`.

    The defaults are :mod:`tinymoe.params`' ``tinymoe-switch-lm`` preset (d 128, 4 layers,
    8 experts every other layer, d_ff 512, context 128, tied embeddings, GELU) with the
    Switch paper's router settings (capacity factor 1.0, α = 1e-2, c_z = 1e-3, jitter 1e-2,
    init 0.1).

    Which settings apply to which ``kind``:

    - every kind: ``vocab_size``, ``block_size``, ``d_model``, ``n_layers``, ``n_heads``,
      ``d_ff`` (the dense FFN's and each expert's hidden width), ``dropout`` (attention and
      dense FFN), ``activation``, ``init``, ``init_scale``, ``tie_embeddings``, ``dtype``,
      ``bf16_activations`` (simulated bfloat16: the residual stream, the attention and
      FFN inputs and outputs and the logits rounded to bfloat16 in the forward and the
      backward; the router still computes in ``router_dtype``; float32 models only);
    - MoE kinds: ``num_experts``, ``moe_every``, ``k`` (experts per token: 1 for
      ``"switch"``, 2 for ``"top2"``, a choice for ``"noisy_topk"``, default 2; for
      ``"custom"`` it only describes the layer, for :meth:`Transformer.params_config`);
    - ``"mixtral"``: ``k``, ``router_dtype``, ``aux_loss_coef`` (on
      :func:`~tinymoe.moe.topk_router.topk_balance_loss`), ``z_loss_coef``,
      ``expert_dropout``, ``init_scale`` (the router's);
    - ``norm``: ``"layernorm"`` (LayerNorm with bias) or ``"rmsnorm"`` (Mixtral's) for the
      two norms of each block and the final one;
    - ``activation="swiglu"``: SwiGLU FFNs (no biases), for ``"dense"`` and ``"mixtral"``;
    - ``"switch"`` and ``"top2"``: ``capacity_factor`` (training), ``eval_capacity_factor``
      (None: the same), ``group_size`` (tokens per capacity group; None: the batch is one
      group), ``router_dtype`` (selective precision), ``jitter`` (multiplicative input
      noise in training), ``aux_loss_coef`` (α), ``z_loss_coef`` (c_z), ``expert_dropout``;
    - ``"noisy_topk"``: ``w_importance``, ``w_load`` (the paper's LM: 0.1 each),
      ``noisy_gating`` (noise on the gate in training).
    """

    vocab_size: int = 65
    block_size: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    kind: str = "switch"
    num_experts: int = 8
    moe_every: int = 2
    k: int | None = None
    capacity_factor: float = 1.0
    eval_capacity_factor: float | None = None
    group_size: int | None = None
    router_dtype: str = "float32"
    jitter: float = 1e-2
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    expert_dropout: float = 0.0
    w_importance: float = 0.0
    w_load: float = 0.0
    noisy_gating: bool = True
    dropout: float = 0.0
    activation: str = "gelu"
    norm: str = "layernorm"
    init: str = "switch"
    init_scale: float = 0.1
    tie_embeddings: bool = True
    dtype: str = "float32"
    bf16_activations: bool = False

    def __post_init__(self) -> None:
        where = "TransformerConfig"
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "d_ff",
                     "moe_every"):
            validate.positive_int(getattr(self, name), name, where)
        validate.num_experts(self.num_experts, where)
        if self.d_model % self.n_heads:
            raise ValueError(f"{where}: d_model={self.d_model} is not divisible by "
                             f"n_heads={self.n_heads}; pick n_heads that divides d_model")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind={self.kind!r}; choose one of {KINDS}")
        if self.kind == "top2" and self.num_experts < 2:
            raise ValueError(f"{where}: kind='top2' needs num_experts >= 2, got "
                             f"{self.num_experts}")
        k = self.k
        if self.kind in FIXED_K:
            if k is not None and k != FIXED_K[self.kind]:
                raise ValueError(f"{where}: kind={self.kind!r} routes each token to "
                                 f"{FIXED_K[self.kind]} expert(s), got k={k}; leave k unset")
            k = FIXED_K[self.kind]
        else:
            k = validate.top_k(DEFAULT_K if k is None else k, self.num_experts, where)
        object.__setattr__(self, "k", k)  # frozen: the resolved value is part of the config
        validate.capacity_factor(self.capacity_factor, where)
        if self.eval_capacity_factor is not None:
            validate.capacity_factor(self.eval_capacity_factor, where + " (eval)")
        if self.group_size is not None:
            validate.positive_int(self.group_size, "group_size", where)
        object.__setattr__(self, "router_dtype", check_router_dtype(self.router_dtype, where))
        for name in ("jitter", "dropout", "expert_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{where}: {name}={getattr(self, name)!r} must be in [0, 1) "
                                 f"(0 turns it off)")
        for name in ("aux_loss_coef", "z_loss_coef", "w_importance", "w_load"):
            validate.coef(getattr(self, name), name, where)
        if self.activation not in FFN_ACTIVATIONS:
            raise ValueError(f"{where}: activation={self.activation!r}; choose one of "
                             f"{FFN_ACTIVATIONS}")
        if (self.activation == "swiglu") != (self.kind == "mixtral") and \
                self.kind not in ("dense", "custom"):
            raise ValueError(f"{where}: kind={self.kind!r} with activation="
                             f"{self.activation!r}: the mixtral kind has SwiGLU experts "
                             f"(activation='swiglu'), the other MoE kinds ReLU/GELU ones")
        if self.norm not in NORMS:
            raise ValueError(f"{where}: norm={self.norm!r}; choose one of {NORMS}")
        if self.init not in INITS:
            raise ValueError(f"{where}: init={self.init!r}; choose 'switch' (truncated "
                             f"normal, Fedus et al. 2021) or 'lecun' (tm.nn's defaults)")
        if not self.init_scale > 0:
            raise ValueError(f"{where}: init_scale={self.init_scale!r} must be > 0")
        dt = validate.float_dtype(self.dtype, "dtype", where)
        object.__setattr__(self, "dtype", dt.name)  # a name, so the config is plain JSON
        if self.bf16_activations and dt != np.float32:
            raise ValueError(f"{where}: bf16_activations=True emulates bfloat16 on float32; "
                             f"got dtype={dt.name!r}, use dtype='float32'")

    @property
    def moe_layer_ids(self) -> list[int]:
        """The 0-based blocks with an MoE FFN (none for ``kind="dense"``)."""
        if self.kind == "dense":
            return []
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """The inverse of :meth:`to_dict`; settings missing from ``d`` take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TransformerConfig.from_dict: unknown fields {unknown}; the "
                             f"fields are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with ``changes``; ``k`` is re-derived when ``kind`` changes."""
        d = asdict(self)
        if "kind" in changes and "k" not in changes:
            d["k"] = None
        return TransformerConfig.from_dict({**d, **changes})


# --- the feed-forward slot -----------------------------------------------------------------
def moe_ffn(cfg: TransformerConfig, rng: np.random.Generator,
            make_moe: MakeMoE | None = None) -> Module:
    """The MoE layer of ``cfg.kind`` (``"custom"``: ``make_moe(cfg, rng)``)."""
    dt = np.dtype(cfg.dtype)
    if cfg.kind == "custom":
        return make_moe(cfg, rng)
    if cfg.kind == "mixtral":
        return mixtral_layer(cfg.d_model, cfg.num_experts, cfg.d_ff, cfg.k,
                             aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef,
                             router_dtype=cfg.router_dtype,
                             expert_dropout=cfg.expert_dropout, init_scale=cfg.init_scale,
                             dtype=dt, rng=rng)
    if cfg.kind == "noisy_topk":
        return sparse_moe_layer(cfg.d_model, cfg.num_experts, cfg.k, d_ff=cfg.d_ff,
                                activation=cfg.activation, w_importance=cfg.w_importance,
                                w_load=cfg.w_load, noisy_gating=cfg.noisy_gating, rng=rng,
                                dtype=dt)
    build = switch_layer if cfg.kind == "switch" else gshard_layer
    return build(cfg.d_model, cfg.num_experts, cfg.d_ff, activation=cfg.activation,
                 expert_dropout=cfg.expert_dropout, init_scale=cfg.init_scale, dtype=dt,
                 rng=rng, capacity_factor=cfg.capacity_factor,
                 eval_capacity_factor=cfg.eval_capacity_factor, group_size=cfg.group_size,
                 router_dtype=cfg.router_dtype, jitter=cfg.jitter,
                 aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef)


def mixtral_config(**changes: Any) -> TransformerConfig:
    """A tiny Mixtral (Jiang et al. 2024, Table 1, scaled down): RMSNorm, SwiGLU experts in
    every block, top-2 (``k`` unset: 2) renormalised dropless routing, an untied head,
    HF's balance coefficient (1e-3 on its scale = 2e-3 on ours), no z-loss, no jitter;
    ``d_ff`` 448 = 3.5·d (Mixtral's 14336 / 4096).
    Mixtral uses rotary positions and grouped-query attention; this model keeps learned
    positions and multi-head attention."""
    base = dict(kind="mixtral", activation="swiglu", norm="rmsnorm", moe_every=1,
                d_ff=448, tie_embeddings=False, aux_loss_coef=2e-3, z_loss_coef=0.0,
                jitter=0.0, init="lecun")
    return TransformerConfig(**{**base, **changes})


def make_norm(cfg: TransformerConfig) -> Module:
    """The ``cfg.norm`` of width ``d_model``: LayerNorm or RMSNorm."""
    dt = np.dtype(cfg.dtype)
    return RMSNorm(cfg.d_model, dtype=dt) if cfg.norm == "rmsnorm" else \
        LayerNorm(cfg.d_model, dtype=dt)


def dense_ffn(cfg: TransformerConfig, rng: np.random.Generator) -> Module:
    """A dense FFN of the size of one expert: SwiGLU or a two-layer FFN."""
    dt = np.dtype(cfg.dtype)
    if cfg.activation == "swiglu":
        return SwiGLU(cfg.d_model, cfg.d_ff, cfg.dropout, dtype=dt, rng=rng)
    return FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout, dtype=dt, rng=rng)


class Block(Module):
    """Pre-norm transformer block: ``x + Attn(LN1(x))``, then ``x + FFN(LN2(x))``.

    ``forward(x) -> (x, aux_losses)``: the FFN's auxiliary losses (an empty dict for a dense
    FFN). A token an MoE layer dropped gets a zero FFN output and leaves through the
    residual unchanged.
    """

    def __init__(self, cfg: TransformerConfig, moe: bool, rng: np.random.Generator,
                 make_moe: MakeMoE | None = None) -> None:
        super().__init__()
        dt = np.dtype(cfg.dtype)
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, dtype=dt,
                                        rng=rng)
        self.ln2 = make_norm(cfg)
        self.is_moe = bool(moe)
        self.bf16 = bool(cfg.bf16_activations)
        if moe:
            self.ffn = moe_ffn(cfg, rng, make_moe)
        else:
            self.ffn = dense_ffn(cfg, rng)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        r = round_bfloat16 if self.bf16 else (lambda t: t)  # simulated bfloat16, or nothing
        x = r(x + r(self.attn(r(self.ln1(x)))))  # (B, L, d)
        if self.is_moe:
            h, aux = self.ffn(r(self.ln2(x)))  # (B, L, d), {name: scalar}
        else:
            h, aux = self.ffn(r(self.ln2(x))), {}  # (B, L, d)
        return r(x + r(h)), aux  # (B, L, d)


def switch_init_(module: Module, rng: np.random.Generator, scale: float) -> None:
    """Redraw every Linear and Embedding weight of ``module`` from the Switch initialisation
    (Fedus et al. 2021, §2.4), in module order."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.weight.data = switch_init(rng, m.in_features, m.weight.shape, m.weight.dtype,
                                        scale)
        elif isinstance(m, Embedding):
            m.weight.data = switch_init(rng, m.embedding_dim, m.weight.shape, m.weight.dtype,
                                        scale)


def total_aux_loss(aux: Sequence[dict[str, Tensor]]) -> Tensor | None:
    """``Σ_layers Σ_name aux[layer][name]``: each layer's losses summed in their order, then
    the layers' sums (None when no layer returned a loss)."""
    per_layer = [t for t in (sum_losses(a.values()) for a in aux) if t is not None]
    if not per_layer:
        return None
    return ops.stack(per_layer).sum()  # () over layers


# --- the model ---------------------------------------------------------------------------
class Transformer(Module):
    """``model(ids) -> logits``; ``model(ids, return_aux=True) -> (logits, aux)``;
    ``model.loss(ids, targets) -> (total, cross_entropy)``.

    ``rng``: one generator (or a seed) for every weight, in construction order (embeddings,
    blocks, final norm, head, then the Switch initialisation), and for the routers' noise
    and the dropout masks. ``make_moe(cfg, rng)``: for ``kind="custom"``, builds each MoE
    layer (a Module mapping (..., d_model) to ``(y, aux_losses)``, e.g. a
    :class:`~tinymoe.moe.layer.MoELayer`).
    """

    def __init__(self, cfg: TransformerConfig, rng: RNGLike = None,
                 make_moe: MakeMoE | None = None) -> None:
        super().__init__()
        if (cfg.kind == "custom") != (make_moe is not None):
            raise ValueError(f"Transformer: make_moe is for kind='custom' and needed there; "
                             f"got kind={cfg.kind!r} with make_moe="
                             f"{'given' if make_moe is not None else 'None'}")
        gen = as_rng(rng)
        self.cfg = cfg
        dt = np.dtype(cfg.dtype)
        self.tok = Embedding(cfg.vocab_size, cfg.d_model, dtype=dt, rng=gen,
                             init_scale=EMBEDDING_SCALE)
        self.pos = Embedding(cfg.block_size, cfg.d_model, dtype=dt, rng=gen,
                             init_scale=EMBEDDING_SCALE)
        moe_ids = set(cfg.moe_layer_ids)
        self.blocks = ModuleList([Block(cfg, i in moe_ids, gen, make_moe)
                                  for i in range(cfg.n_layers)])
        self.ln_f = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.head = Linear(cfg.d_model, cfg.vocab_size, dtype=dt, rng=gen)
        if cfg.init == "switch":
            switch_init_(self, gen, cfg.init_scale)  # the Switch/top-2 experts start so too

    @property
    def moe_layers(self) -> list[Module]:
        """The MoE layers, in block order (``layer.last_routing`` after a forward)."""
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, ids: Any, return_aux: bool = False
                ) -> Tensor | tuple[Tensor, list[dict[str, Tensor]]]:
        """``ids`` (B, L) -> logits (B, L, V); with ``return_aux`` also the list of the MoE
        layers' ``aux_losses`` dicts, in block order (empty for a dense model)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.cfg.block_size:
            raise ValueError(f"Transformer: ids must be (B, L) with 1 <= L <= block_size="
                             f"{self.cfg.block_size}, got shape {ids.shape}; feed at most "
                             f"the last block_size tokens")
        x = self.tok(ids) + self.pos(np.arange(ids.shape[1]))  # (B, L, d)
        if self.cfg.bf16_activations:
            x = round_bfloat16(x)
        aux = []
        for block in self.blocks:
            x, block_aux = block(x)  # (B, L, d)
            if block.is_moe:
                aux.append(block_aux)
        x = self.ln_f(x)  # (B, L, d)
        logits = x @ self.tok.weight.T if self.cfg.tie_embeddings else self.head(x)  # (B, L, V)
        if self.cfg.bf16_activations:
            logits = round_bfloat16(logits)  # the loss itself is taken in float32
        return (logits, aux) if return_aux else logits

    def loss(self, ids: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """``(cross_entropy + Σ aux losses, cross_entropy)`` for one batch."""
        logits, aux = self(ids, return_aux=True)
        ce = losses.cross_entropy(logits, targets)
        extra = total_aux_loss(aux)
        if extra is None:
            return ce, ce
        return ce + (extra if extra.dtype == ce.dtype else extra.astype(ce.dtype)), ce

    # --- sizes ---------------------------------------------------------------------------
    def expert_parameters(self) -> int:
        """Parameters of one FFN expert (= one dense FFN): d·d_ff + d_ff + d_ff·d + d, or
        3·d·d_ff for SwiGLU (no biases)."""
        d, f = self.cfg.d_model, self.cfg.d_ff
        if self.cfg.activation == "swiglu":
            return 3 * d * f
        return 2 * d * f + f + d

    def active_parameters(self) -> int:
        """Parameters one token uses: all but the ``E - k`` routed experts it did not pick,
        in every MoE layer (the embedding row lookup counted as active, as in
        :mod:`tinymoe.params`). Read from the layers, so it holds for a custom layer with a
        fixed ``k`` too."""
        unused = 0
        for layer in self.moe_layers:
            E = layer.num_experts
            per_expert = sum(p.size for p in layer.experts.parameters()) // E
            unused += (E - layer.k) * per_expert
        return self.num_parameters() - unused

    def params_config(self) -> MoEConfig:
        """This model in :mod:`tinymoe.params`' terms (its FFNs have biases; its attention
        biases, 4·d per layer, are not in that model; the 2017 gate's noise weights, d·E
        per layer, neither)."""
        c = self.cfg
        return MoEConfig(vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layers,
                         n_heads=c.n_heads, d_ff=c.d_ff,
                         n_experts=1 if c.kind == "dense" else c.num_experts, top_k=c.k,
                         moe_every=c.moe_every, ffn_kind=c.activation,
                         tie_embeddings=c.tie_embeddings, norm_kind=c.norm,
                         ffn_bias=c.activation != "swiglu", n_positions=c.block_size)

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


def describe(model: Transformer) -> str:
    """``"total / active"`` parameters, e.g. ``"1,234,567 / 456,789"``."""
    return f"{model.num_parameters():,} / {model.active_parameters():,}"
