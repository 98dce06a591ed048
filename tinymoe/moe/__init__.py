"""``tm.moe``: the history of gating, one home per idea, in historical order.

Every router returns one :class:`Routing` (the chosen experts, their weights, their slots,
the router's probabilities, logits, auxiliary losses and statistics), and one
:class:`MoELayer` runs any router with any experts: ``y, aux_losses = layer(x)``.

The papers:

- 1991 adaptive mixture of local experts (Jacobs, Jordan, Nowlan & Hinton): ``mixture``
- 1994 hierarchical mixture of experts, gradient and EM (Jordan & Jacobs): ``hme``
- 2013 deep mixture of experts, one gate per layer (Eigen, Ranzato & Sutskever): ``deep_moe``
- 2013-2015 conditional computation, stochastic binary gates and their gradient estimators
  (Bengio, Léonard & Courville 2013), block-gated layers with sparsity regularisers
  (Bengio, Bacon, Pineau & Precup 2015): ``conditional``
- 2017 sparsely-gated MoE (Shazeer et al.): noisy top-k gate ``noisy_topk``, balancing
  losses ``balance``, experts that are MoEs ``hierarchical``
- 2020 GShard top-2 with capacity (Lepikhin et al.): ``gshard``
- 2021 Switch Transformer top-1 (Fedus et al.): ``switch``
- 2022 expert choice (Zhou et al.): ``expert_choice``
- 2024 Mixtral's and DeepSeekMoE's top-k ``topk_router``; DeepSeek-V3's
  auxiliary-loss-free balancing ``aux_free``

The shared pieces, named for what they are: ``layer`` (the one MoE layer), ``experts``
(stacked FFN experts, a list of any Modules), ``swiglu`` (Mixtral's gated experts),
``capacity`` (slots per expert, positions), ``router_weight`` (a router's weight, logits,
initialisation), ``precision`` (selective precision, emulated bfloat16), ``aux_losses``
(load balancing and z-loss).
"""
from tinymoe.dispatch.routing import Routing, route, sum_losses  # noqa: F401
from tinymoe.moe.aux_free import AuxFreeRouter, bias_update, sequence_balance_loss  # noqa: F401
from tinymoe.moe.aux_losses import (  # noqa: F401
    gshard_aux_loss,
    load_balancing_loss,
    router_z_loss,
)
from tinymoe.moe.balance import (  # noqa: F401
    balance_loss,
    cv_squared,
    hierarchical_importance,
    hierarchical_load,
    importance,
    load,
)
from tinymoe.moe.capacity import capacity_positions, expert_capacity  # noqa: F401
from tinymoe.moe.conditional import (  # noqa: F401
    ESTIMATORS,
    BlockGatedNet,
    GatedBlocks,
    EstimatorMoments,
    bernoulli_log_prob,
    block_fraction,
    estimator_study,
    expected_over_gates,
    gate_configurations,
    reinforce_surrogate,
    sparsity_regularisers,
    stochastic_times_smooth,
    straight_through,
)
from tinymoe.moe.deep_moe import (  # noqa: F401
    AssignmentConstraint,
    DeepMoE,
    DeepMoEOutput,
    GatingNetwork,
    ReLUExpert,
    gate_mutual_information,
    gate_table,
    mixture_layer,
)
from tinymoe.moe.expert_choice import (  # noqa: F401
    ExpertChoiceRouter,
    expert_choice_positions,
    experts_per_token,
    unrouted_fraction,
)
from tinymoe.moe.experts import ExpertList, StackedExperts, grouped_linear  # noqa: F401
from tinymoe.moe.gshard import Top2Gate, gshard_layer  # noqa: F401
from tinymoe.moe.hierarchical import HierarchicalGate, hierarchical_moe  # noqa: F401
from tinymoe.moe.hme import HME, fit_em, fit_gradient  # noqa: F401
from tinymoe.moe.layer import MoELayer, moe_layer  # noqa: F401
from tinymoe.moe.mixture import (  # noqa: F401
    AdaptiveMixture,
    LinearExpert,
    MixtureOutput,
    blend,
    categorical_log_likelihood,
    competitive_loss,
    cooperative_loss,
    dense_routing,
    gaussian_log_likelihood,
    mixture_classification_nll,
    mixture_nll,
    posterior_responsibilities,
    softmax_routing,
)
from tinymoe.moe.noisy_topk import (  # noqa: F401
    NoisyTopKGate,
    kth_excluding,
    kth_excluding_top,
    noisy_top_k_gating,
    prob_in_top_k,
    sparse_moe_layer,
)
from tinymoe.moe.switch import SwitchRouter, switch_layer  # noqa: F401
from tinymoe.moe.swiglu import SwiGLUExperts  # noqa: F401
from tinymoe.moe.topk_router import (  # noqa: F401
    TopKRouter,
    mixtral_layer,
    topk_balance_loss,
    topk_gates,
)
