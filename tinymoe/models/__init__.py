"""Small end-to-end models built from ``tm.nn`` and ``tm.moe``.

:class:`Transformer` (``transformer``): a pre-norm decoder-only transformer LM whose
feed-forward slot holds a dense FFN or an MoE layer: the 2017 noisy top-k layer (Shazeer et
al.), GShard's top-2 (Lepikhin et al. 2020), the Switch Transformer's top-1 (Fedus et al.
2021), or any layer a ``make_moe`` function builds. ``kind="dense"`` is the FLOP-matched
baseline. :class:`TransformerConfig` holds every setting.
"""
from tinymoe.models.transformer import (
    KINDS,
    Block,
    Transformer,
    TransformerConfig,
    describe,
    total_aux_loss,
)

__all__ = ["KINDS", "Block", "Transformer", "TransformerConfig", "describe", "total_aux_loss"]
