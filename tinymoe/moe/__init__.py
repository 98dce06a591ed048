"""``tm.moe``: the history of gating, one home per idea.

- 1991 adaptive mixture of local experts (Jacobs, Jordan, Nowlan & Hinton): ``mixture``
- 1994 hierarchical mixture of experts, gradient and EM (Jordan & Jacobs): ``hme``
- 2017 sparsely-gated MoE (Shazeer et al.): noisy top-k gate ``noisy_topk``, balancing
  losses ``balance``, stacked FFN experts ``experts``, the layer ``layer``
- 2020 GShard top-2 with capacity (Lepikhin et al.): ``gshard``, ``capacity``
- 2021 Switch Transformer top-1 (Fedus et al.): ``switch``; both end in the capacity-mode
  layer ``capacity_layer``, with the balancing and z-losses in ``aux_losses``
- 2022-2024 modern routers, all run by the layer ``routed_layer`` (with shared experts):
  Mixtral's top-k ``topk_router``, expert choice ``expert_choice`` (Zhou et al.),
  DeepSeek-V3's auxiliary-loss-free balancing ``aux_free``
"""
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
from tinymoe.moe.capacity_layer import CapacityMoELayer  # noqa: F401
from tinymoe.moe.experts import StackedExperts, grouped_linear  # noqa: F401
from tinymoe.moe.hme import HME, fit_em, fit_gradient  # noqa: F401
from tinymoe.moe.layer import MoELayer, hierarchical_moe  # noqa: F401
from tinymoe.moe.mixture import (  # noqa: F401
    AdaptiveMixture,
    LinearExpert,
    MixtureOutput,
    categorical_log_likelihood,
    competitive_loss,
    cooperative_loss,
    gaussian_log_likelihood,
    mixture_classification_nll,
    mixture_nll,
    posterior_responsibilities,
)
from tinymoe.moe.noisy_topk import (  # noqa: F401
    GateOutput,
    NoisyTopKGate,
    kth_excluding,
    kth_excluding_top,
    noisy_top_k_gating,
    prob_in_top_k,
)
from tinymoe.moe.gshard import Top2Gate  # noqa: F401,E402
from tinymoe.moe.switch import SwitchGate, SwitchRouter  # noqa: F401,E402
from tinymoe.moe.routed_layer import RoutedMoELayer, RouterOutput  # noqa: F401,E402
from tinymoe.moe.topk_router import TopKRouter, topk_balance_loss, topk_gates  # noqa: F401,E402
from tinymoe.moe.expert_choice import (  # noqa: F401,E402
    ExpertChoiceRouter,
    expert_choice_positions,
    experts_per_token,
    unrouted_fraction,
)
from tinymoe.moe.aux_free import AuxFreeRouter, bias_update  # noqa: F401,E402
