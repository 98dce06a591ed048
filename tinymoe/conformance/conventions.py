"""The conventions on which MoE implementations legitimately differ, and tinymoe's choices.

Each entry: the allowed values (the first is tinymoe's) and what they mean. An adapter
declares the ones it follows in a ``conventions`` dict; a key it leaves out takes tinymoe's
value. The docs page "Test your own MoE" lists which projects follow which value, with
sources.
"""
from __future__ import annotations

from typing import Any

CONVENTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "tie_breaking": (("lowest_index", "any"), (
        "among equal router scores, the lowest expert (or token) index wins "
        "(np.argmax, torch.argmax); 'any': any of the tied ones is accepted")),
    "router_precision": (("float32", "input"), (
        "float16/bfloat16 logits: the softmax runs in float32 (selective precision, Fedus et "
        "al. 2021 §2.4), or in the logits' own dtype")),
    "capacity_rounding": (("ceil", "floor"), (
        "C = ceil(k·S·cf/E) (DeepSpeed) or floor (Mesh TensorFlow's int(...))")),
    "capacity_counts_k": ((True, False), (
        "the capacity counts all k·S choices (GShard's 2S/E) or only S (Mesh TF's top-2)")),
    "min_capacity": ((1, 4, 8), "a floor on C (DeepSpeed's min_capacity, Mesh TF's 4)"),
    "capacity_at_most_tokens": ((True, False), (
        "C is clamped to S (an expert cannot take a token twice) before min_capacity")),
    "priority": (("choice_major", "token_major"), (
        "which choices take an expert's slots first: all first choices (in sequence order) "
        "before all second choices (GShard), or token by token, each token's choices in order")),
    "dropped_tokens": (("zero", "passthrough", "scaled_passthrough"), (
        "what the MoE layer outputs for a token no expert took: 0 (the residual carries it), "
        "x itself, or p·x (HF transformers' Switch before the v5 rewrite)")),
    "aux_pooling": (("per_layer_sum", "per_layer_mean", "pooled"), (
        "several layers' balance losses: one per layer, summed or averaged, or one loss on "
        "the layers' tokens pooled together (HF transformers)")),
    "mixtral_k_factor": ((False, True), (
        "top-k balance loss: f counts each of the T·k choices as 1/(T·k), so the loss is 1 "
        "at uniform routing (False), or as 1/T, so it is k (HF transformers' Mixtral)")),
}

TINYMOE = {name: choices[0] for name, (choices, _) in CONVENTIONS.items()}


def resolve(declared: dict[str, Any] | None) -> dict[str, Any]:
    """tinymoe's conventions updated with ``declared``; unknown keys or values raise."""
    conv = dict(TINYMOE)
    for name, value in (declared or {}).items():
        if name not in CONVENTIONS:
            raise KeyError(f"conformance: unknown convention {name!r}; the conventions are "
                           f"{', '.join(CONVENTIONS)}")
        choices = CONVENTIONS[name][0]
        if value not in choices and not (name == "min_capacity" and isinstance(value, int)
                                         and value >= 0):
            raise ValueError(f"conformance: convention {name}={value!r} is not one of "
                             f"{choices}")
        conv[name] = value
    return conv
