"""``tinymoe.conformance``: check your MoE components against tinymoe's references.

Write an adapter (a module or object with any of the methods below; arrays in, arrays out)
and run the suite with pytest::

    python -m pytest -p tinymoe.conformance.plugin --pyargs tinymoe.conformance \
        --moe-impl mypkg.adapter

(``--moe-impl module`` or ``module:attribute``; a class is instantiated). Methods the adapter
lacks are skipped. Its ``conventions`` dict chooses among the documented conventions
(:data:`CONVENTIONS`); a ``tolerance`` dict (``rtol``, ``atol``) loosens the float
comparisons (default 1e-5 / 1e-6, float32 arithmetic passes).

===================  =====================================================================
method               arguments -> outputs
===================  =====================================================================
top1_router          logits (T, E) -> expert (T,), gate (T,)
topk_router          logits (T, E), k -> expert (T, k), weight (T, k)
noisy_topk_router    clean (T, E), noise_stddev (T, E), noise (T, E), k -> gates (T, E),
                     load (E,)
expert_choice        scores (T, E), capacity C -> token (E, C), gate (E, C)
bias_update          bias (E,), load (E,), speed -> new bias (E,)
expert_capacity      num_tokens, num_experts, capacity_factor, k -> capacity (int)
capacity_positions   expert_index (T, k), num_experts, capacity -> position (T, k)
dispatch             x (T, d), expert_index, position, num_experts, capacity -> (E, C, d)
combine              expert_out (E, C, d), expert_index, position, weight (T, k) -> (T, d)
switch_aux_loss      [probs (T, E) per layer], [expert (T,) per layer] -> float
gshard_aux_loss      gates (S, E), first_choice (S,) -> float
mixtral_aux_loss     [logits (T, E) per layer], k -> float
z_loss               logits (T, E) -> float
switch_layer         x (T, d), router_weight (d, E), w_in (E, d, f), w_out (E, f, d),
                     capacity -> y (T, d)  (ReLU experts, no biases, no residual)
mixtral_layer        x (T, d), router_weight (d, E), w_gate (E, d, f), w_up (E, d, f),
                     w_down (E, f, d), k -> y (T, d)  (SwiGLU experts)
===================  =====================================================================

Without pytest: :func:`check` (one component and case), :func:`run` (everything) and
:func:`detect_conventions` (which convention values explain an adapter's outputs).
"""
from tinymoe.conformance.cases import CATALOGUE, is_bfloat16  # noqa: F401
from tinymoe.conformance.checks import (  # noqa: F401
    ConformanceError,
    check,
    components,
    detect_conventions,
    inputs_for,
    run,
)
from tinymoe.conformance.conventions import CONVENTIONS, TINYMOE, resolve  # noqa: F401
