"""Small end-to-end models built from ``tm.nn`` and ``tm.moe``.

- :class:`CharMoELM` (``char_lm``): a character-level transformer LM whose feed-forward part
  is a sparsely-gated MoE layer (Shazeer et al. 2017).
"""
from tinymoe.models.char_lm import CharLMConfig, CharMoELM, MoEBlock

__all__ = ["CharLMConfig", "CharMoELM", "MoEBlock"]
