"""The classroom task registry: one entry per solution region family.

Every ``### BEGIN SOLUTION taskN_M`` region in ``tinymoe/`` and ``lessons/`` names a task
declared here, and every test of that task carries the pytest marker of the same name
(``@pytest.mark.taskN_M``; markers are strict, see ``tests/conftest.py``).

Task ``N_M`` is taught in lesson ``0N``. Points are what ``tinymoe classroom grade`` awards
when all of the task's tests pass.

Rule that keeps grading honest: a test that runs the code of a solution region carries that
region's task marker (it may carry several). Regions therefore sit in functions with few
callers (a loss, an estimator, the NumPy reference of a kernel), never in the autograd engine
that every test runs; the foundation's exercises live in lesson 00 itself.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    title: str
    lesson: str
    points: int


TASKS: dict[str, Task] = {
    # --- lesson 00: the autograd core (exercises in the notebook) -----------------------
    "task0_1": Task("backward by hand through a small graph", "lessons/00_autograd.ipynb", 2),
    "task0_2": Task("a new op: forward and backward of a Function", "lessons/00_autograd.ipynb", 2),
    "task0_3": Task("a central-difference check of your own", "lessons/00_autograd.ipynb", 2),
    # --- lesson 01: adaptive mixtures of local experts (Jacobs et al. 1991) --------------
    "task1_1": Task("the mixture negative log-likelihood of eq. (3), with logsumexp",
                    "lessons/01_adaptive_mixtures_1991.ipynb", 3),
    "task1_2": Task("the posterior responsibilities h of the experts",
                    "lessons/01_adaptive_mixtures_1991.ipynb", 2),
    "task1_3": Task("the gate's gradient p - h, by hand",
                    "lessons/01_adaptive_mixtures_1991.ipynb", 2),
    # --- lesson 02: hierarchical mixtures of experts and EM (Jordan & Jacobs 1994) -------
    "task2_1": Task("the E-step: posteriors h_i, h_j|i and h_ij (eqs. 2.10-2.12)",
                    "lessons/02_hierarchical_mixtures_1994.ipynb", 3),
    "task2_2": Task("the M-step of a Gaussian expert: weighted least squares",
                    "lessons/02_hierarchical_mixtures_1994.ipynb", 2),
    "task2_3": Task("one IRLS (Newton) step of a softmax gate with soft targets",
                    "lessons/02_hierarchical_mixtures_1994.ipynb", 3),
    "task2_4": Task("Algorithm 1 from its pieces: one EM iteration, hme.em_step",
                    "lessons/02_hierarchical_mixtures_1994.ipynb", 2),
    # --- lesson 02b: deep mixtures and conditional computation (2013-2015) ----------------
    "task2b_1": Task("the stochastic-times-smooth unit h = b·sqrt(sigm(a)) (Bengio et al. 2013)",
                     "lessons/02b_deep_and_conditional_2013.ipynb", 2),
    "task2b_2": Task("the REINFORCE surrogate (cost - baseline)·log P(b)",
                     "lessons/02b_deep_and_conditional_2013.ipynb", 3),
    "task2b_3": Task("the sparsity regularisers L_b, L_e, L_v (Bengio et al. 2015)",
                     "lessons/02b_deep_and_conditional_2013.ipynb", 2),
    # --- lesson 03: the sparsely-gated MoE (Shazeer et al. 2017) -------------------------
    "task3_1": Task("noisy top-k gating: H(x) and the softmax over the k kept logits",
                    "lessons/03_sparsely_gated_moe_2017.ipynb", 3),
    "task3_2": Task("kth_excluding for every expert with the top-(k+1) trick",
                    "lessons/03_sparsely_gated_moe_2017.ipynb", 2),
    "task3_3": Task("the smooth load estimator P(x, i)",
                    "lessons/03_sparsely_gated_moe_2017.ipynb", 3),
    # --- lesson 04: GShard (Lepikhin et al. 2020) and Switch (Fedus et al. 2021) ---------
    "task4_1": Task("expert capacity ceil(k·S/E·cf) in [1, S] and choice-major slots per group",
                    "lessons/04_gshard_and_switch_2021.ipynb", 3),
    "task4_2": Task("the Switch load-balancing loss N·Σ f_i·P_i (eqs. 4-6)",
                    "lessons/04_gshard_and_switch_2021.ipynb", 2),
    "task4_3": Task("the router z-loss: mean logsumexp² (ST-MoE eq. 5)",
                    "lessons/04_gshard_and_switch_2021.ipynb", 2),
    # --- lesson 05: token dispatch with Numba ---------------------------------------------
    "task5_1": Task("positions in parallel, pass 1: every block of choices counts its own "
                    "(block_counts, NumPy and Numba)", "lessons/05_numba_dispatch.ipynb", 2),
    "task5_2": Task("positions in parallel, pass 2: the exclusive prefix sum of the block counts "
                    "(block_starts, NumPy and Numba)", "lessons/05_numba_dispatch.ipynb", 3),
    # --- lesson 06: modern routers (Mixtral, expert choice, DeepSeek) ----------------------
    "task6_1": Task("Mixtral's router: softmax, top-k, renormalise the kept probabilities",
                    "lessons/06_modern_routers.ipynb", 2),
    "task6_2": Task("expert choice: every expert takes its top-C tokens",
                    "lessons/06_modern_routers.ipynb", 3),
    "task6_3": Task("auxiliary-loss-free balancing: the bias update b += γ·sign(mean - load)",
                    "lessons/06_modern_routers.ipynb", 2),
    # --- lesson 07: experts across machines ----------------------------------------------
    "task7_1": Task("expert parallelism: the all-to-all that carries tokens to their experts",
                    "lessons/07_expert_parallelism.ipynb", 3),
    "task7_2": Task("the dropless all-to-all's plan: rows and displacements (exclusive prefix "
                    "sums) from the exchanged counts, and the expert-major regrouping",
                    "lessons/07_expert_parallelism.ipynb", 2),
    # --- lesson 08: MoEs in practice (Mixtral's block, inference) ------------------------
    "task8_1": Task("RMSNorm: x / sqrt(mean(x²) + eps) · weight",
                    "lessons/08_moes_in_practice.ipynb", 1),
    "task8_2": Task("the SwiGLU gate: SiLU(x W_gate) ⊙ x W_up, in every SwiGLU expert",
                    "lessons/08_moes_in_practice.ipynb", 2),
    "task8_3": Task("a KV-cache attention step: append k, v, attend over the cached prefix",
                    "lessons/08_moes_in_practice.ipynb", 3),
}
