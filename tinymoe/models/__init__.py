"""Small end-to-end models built from ``tm.nn`` and ``tm.moe``.

- :class:`CharMoELM` (``char_lm``): a character-level transformer LM whose feed-forward part
  is a sparsely-gated MoE layer (Shazeer et al. 2017).
- :class:`SwitchTransformerLM` and its dense twin :class:`DenseLM` (``switch_lm``): causal
  attention blocks with a Switch (or GShard) FFN in every other block (Fedus et al. 2021).
"""
from tinymoe.models.char_lm import CharLMConfig, CharMoELM, MoEBlock
from tinymoe.models.switch_lm import DenseLM, SwitchLMConfig, SwitchTransformerLM, build_model

__all__ = ["CharLMConfig", "CharMoELM", "MoEBlock", "SwitchLMConfig", "SwitchTransformerLM",
           "DenseLM", "build_model"]
