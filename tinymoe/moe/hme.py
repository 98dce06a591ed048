"""The 1994 hierarchical mixture of experts (Jordan & Jacobs), trained by gradient or by EM.

A two-level tree. Every node sees ``x`` with a constant 1 appended (so ``x`` has ``d+1``
entries and biases are ordinary weights, as in the paper)::

    top gate       g_i     = softmax_i(v_i^T x)                          (2.2)-(2.3)
    lower gates    g_{j|i} = softmax_j(v_ij^T x)                         (2.4)-(2.5)
    experts        mu_ij   = f(U_ij x)    f = identity or logistic       (2.1)
    likelihood     P(y|x)  = sum_i g_i sum_j g_{j|i} P_ij(y)             (2.8)

``P_ij`` is a Gaussian ``N(mu_ij, sigma_ij^2 I)`` (regression; ``sigma_ij^2`` is learned) or
a Bernoulli with mean ``mu_ij`` for each output (classification, targets in {0, 1}).

**E-step** (eqs. 2.10-2.12): the posteriors of the branches and experts given ``(x, y)``::

    h_i     = g_i sum_j g_{j|i} P_ij / sum_k g_k sum_l g_{l|k} P_kl
    h_{j|i} = g_{j|i} P_ij / sum_l g_{l|i} P_il
    h_ij    = h_i h_{j|i}

**M-step** (Algorithm 1): decoupled weighted fits, one GLIM each.

- expert ij: maximise ``sum_t h_ij log P_ij(y)`` -- weighted least squares (Gaussian; exact in
  one solve, then ``sigma^2 = sum_t h_ij ||y - mu_ij||^2 / (D sum_t h_ij)``, the weighted mean
  squared residual per output dimension, since the covariance is ``sigma^2 I``) or IRLS
  (logistic);
- top gate: maximise ``sum_t sum_i h_i log g_i`` -- a multinomial logit with soft targets,
  fitted by IRLS (Newton's method; Fisher scoring is the same for the canonical link);
- lower gate i: maximise ``sum_t h_i sum_j h_{j|i} log g_{j|i}`` -- the same with
  observation weights ``h_i``.

EM never lowers the likelihood (Dempster, Laird & Rubin 1977). Our M-step keeps that
guarantee exactly: the least-squares solves are exact maximisers, and every Newton step of
an IRLS fit is halved until it does not lower its objective. Two safeguards are part of the
objective, documented here because they change it (negligibly):

- a tiny **ridge** ``lambda/2 ||w||^2`` on every gate and expert weight (default
  ``lambda = 1e-4`` on a log-likelihood summed over the cases). It makes every Newton system
  positive definite -- a softmax gate's Hessian is singular along ``v_k += c`` for all k, and
  a near-separable fit would otherwise run its weights off to infinity. What EM then never
  lowers is the *penalised* log-likelihood ``sum_t log P(y_t|x_t) - lambda/2 ||w||^2``.
- a **variance floor** ``sigma_ij^2 >= min_variance`` (default 1e-6), so an expert that
  owns a handful of cases cannot shrink its variance to zero and the likelihood to infinity.
  The floored update is still the exact maximiser under that constraint.

The M-step is plain NumPy linear algebra (it is not autograd); the gradient method
(:func:`fit_gradient`) backpropagates through :meth:`HME.log_likelihood` instead.

The two levels of gates together are one dense gate over the ``I*J`` experts (the leaves,
numbered ``i*J + j``): :meth:`HME.route` returns the
:class:`~tinymoe.dispatch.routing.Routing` that sends every case to every leaf with weight
``g_i g_{j|i}``, the product of the gates on its path, and the prediction
``sum_i g_i sum_j g_{j|i} mu_ij`` is ``combine`` with it (:func:`~tinymoe.moe.mixture.blend`),
as in the 1991 mixture. The likelihood and the posteriors need every expert's own
``P_ij(y)``, and stay in log space.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

import tinymoe as tm
from tinymoe import ops, validate
from tinymoe.dispatch.routing import Routing
from tinymoe.losses import apply_reduction
from tinymoe.moe.mixture import blend, dense_routing
from tinymoe.nn import Module, Parameter, as_rng
from tinymoe.nn.init import lecun_normal
from tinymoe.ops.softmax import logsumexp_array, softmax_array
from tinymoe.tensor import Tensor

EXPERTS = ("gaussian", "logistic")
LOG_2PI = math.log(2.0 * math.pi)


def augment(X: np.ndarray) -> np.ndarray:
    """``[x, 1]``: the inputs with a constant 1 appended for the bias: (n, d+1)."""
    return np.concatenate([X, np.ones((X.shape[0], 1), dtype=X.dtype)], axis=1)


class Posteriors(NamedTuple):
    """The E-step quantities (arrays): rows of ``h_top`` and of ``h`` sum to one."""

    h_top: np.ndarray  # (n, I)     h_i      (2.10)
    h_low: np.ndarray  # (n, I, J)  h_{j|i}  (2.11)
    h: np.ndarray  # (n, I, J)      h_ij     (2.12)


class HME(Module):
    """A two-level hierarchical mixture of experts: ``n_branches`` x ``n_experts`` GLIMs.

    Parameters (names from the paper; the last input row of each is the bias):

    - ``v_top`` (d+1, I): the top gate, ``xi_i = v_i^T x``;
    - ``v_low`` (I, d+1, J): the lower gates, ``xi_ij = v_ij^T x``;
    - ``U`` (I, J, d+1, D): the experts, ``mu_ij = f(U_ij^T x)``;
    - ``log_var`` (I, J): Gaussian experts' log variance (absent for logistic experts).

    Gates start near zero (nearly equal proportions), experts at LeCun-normal scale.
    """

    def __init__(self, in_features: int, out_features: int = 1, n_branches: int = 2,
                 n_experts: int = 2, *, expert: str = "gaussian", variance: float = 1.0,
                 rng: Any = None, dtype: Any = np.float64, gate_scale: float = 0.1,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        in_features = validate.positive_int(in_features, "in_features", "HME")
        D = validate.positive_int(out_features, "out_features", "HME")
        I = validate.positive_int(n_branches, "n_branches", "HME")
        J = validate.positive_int(n_experts, "n_experts", "HME")
        if expert not in EXPERTS:
            raise ValueError(f"HME: expert={expert!r}; choose one of {EXPERTS}")
        if not variance > 0:
            raise ValueError(f"HME: variance={variance} must be > 0")
        rng = as_rng(rng)
        d = in_features + 1  # the inputs with the constant 1 appended
        self.in_features, self.out_features = in_features, D
        self.n_branches, self.n_experts, self.expert = I, J, expert
        self.v_top = Parameter(lecun_normal(rng, d, (d, I), np.dtype(dtype), gate_scale))
        self.v_low = Parameter(lecun_normal(rng, d, (I, d, J), np.dtype(dtype), gate_scale))
        self.U = Parameter(lecun_normal(rng, d, (I, J, d, D), np.dtype(dtype), init_scale))
        if expert == "gaussian":
            self.log_var = Parameter(np.full((I, J), math.log(variance), dtype=dtype))

    # --- checks ------------------------------------------------------------------------------
    def check_inputs(self, X: Any, Y: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``X`` (n, in_features) finite, ``Y`` (n, D) (or (n,) when D = 1) as float arrays."""
        X = np.asarray(X.data if isinstance(X, Tensor) else X, dtype=self.U.dtype)
        validate.tokens(X, self.in_features, "HME")
        if not np.isfinite(X).all():  # bad data, not a diverged model: a ValueError
            rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
            raise ValueError(f"HME: inputs have NaN or inf features in rows "
                             f"{rows[:5].tolist()}; clean or drop them first")
        if Y is None:
            return X, None
        Y = np.asarray(Y.data if isinstance(Y, Tensor) else Y, dtype=self.U.dtype)
        if Y.ndim == 1 and self.out_features == 1:
            Y = Y[:, None]  # (n, 1)
        if Y.shape != (X.shape[0], self.out_features):
            raise ValueError(f"HME: expected targets ({X.shape[0]}, {self.out_features}), got "
                             f"shape {Y.shape}")
        if not np.isfinite(Y).all():
            raise ValueError("HME: targets contain NaN or inf")
        if self.expert == "logistic" and not np.isin(Y, (0.0, 1.0)).all():
            raise ValueError("HME: logistic experts need targets in {0, 1}")
        return X, Y

    # --- the forward pass (autograd) -------------------------------------------------------
    def gates(self, X: Any) -> tuple[Tensor, Tensor]:
        """``(log g_i (n, I), log g_{j|i} (n, I, J))`` as tensors."""
        X, _ = self.check_inputs(X)
        xa = tm.tensor(augment(X))  # (n, d+1)
        log_g = ops.log_softmax(xa @ self.v_top, axis=-1)  # (n, I)
        xi_low = ops.transpose(xa @ self.v_low, (1, 0, 2))  # (I, n, J) -> (n, I, J)
        return log_g, ops.log_softmax(xi_low, axis=-1)  # (n, I), (n, I, J)

    def expert_eta(self, X: Any) -> Tensor:
        """The experts' linear predictors ``eta_ij = U_ij^T x``: (n, I, J, D)."""
        X, _ = self.check_inputs(X)
        xa = tm.tensor(augment(X))  # (n, d+1)
        return ops.transpose(xa @ self.U, (2, 0, 1, 3))  # (I, J, n, D) -> (n, I, J, D)

    def expert_log_likelihood(self, X: Any, Y: Any) -> Tensor:
        """``log P_ij(y|x)`` for every case and expert: (n, I, J)."""
        X, Y = self.check_inputs(X, Y)
        eta = self.expert_eta(X)  # (n, I, J, D)
        y = tm.tensor(Y[:, None, None, :])  # (n, 1, 1, D)
        if self.expert == "gaussian":
            var = ops.unsqueeze(self.log_var.exp(), -1)  # (I, J, 1)
            r = y - eta  # (n, I, J, D)
            per_dim = (r * r) / var + ops.unsqueeze(self.log_var, -1) + LOG_2PI  # (n, I, J, D)
            return per_dim.sum(axis=-1) * -0.5  # (n, I, J)
        return (y * eta - ops.softplus(eta)).sum(axis=-1)  # Bernoulli, (n, I, J)

    def joint_log(self, X: Any, Y: Any) -> Tensor:
        """``log g_i + log g_{j|i} + log P_ij(y)``: (n, I, J)."""
        log_g, log_g_low = self.gates(X)
        return ops.unsqueeze(log_g, -1) + log_g_low + self.expert_log_likelihood(X, Y)

    def log_likelihood(self, X: Any, Y: Any, reduction: str = "mean") -> Tensor:
        """``log P(y|x) = log sum_ij g_i g_{j|i} P_ij(y)`` (2.8), via logsumexp."""
        a = self.joint_log(X, Y)  # (n, I, J)
        per_case = ops.logsumexp(ops.reshape(a, (a.shape[0], a.shape[1] * a.shape[2])),
                                 axis=-1)  # (n,)
        return apply_reduction("HME.log_likelihood", per_case, reduction)

    def route(self, X: Any) -> Routing:
        """Both levels of gates as one dense routing over the ``I*J`` experts (leaf
        ``i*J + j``): every case goes to every leaf, weighted by ``g_i g_{j|i}``. The
        routing's ``stats`` keep the two levels, ``log_g`` (n, I) and ``log_g_low`` (n, I, J).
        """
        log_g, log_g_low = self.gates(X)
        w = ops.exp(ops.unsqueeze(log_g, -1) + log_g_low)  # (n, I, J) g_i g_{j|i}
        w = ops.reshape(w, (w.shape[0], w.shape[1] * w.shape[2]))  # (n, I*J) leaf i*J + j
        return dense_routing(w, stats={"log_g": log_g, "log_g_low": log_g_low})

    def forward(self, X: Any) -> Tensor:
        """The tree's prediction ``mu = sum_i g_i sum_j g_{j|i} mu_ij``: (n, D), the
        experts' means combined with the gates' routing."""
        routing = self.route(X)  # (n, I*J) weights g_i g_{j|i}
        eta = self.expert_eta(X)  # (n, I, J, D)
        mu = eta if self.expert == "gaussian" else eta.sigmoid()  # (n, I, J, D) (2.1)
        n, I, J, D = mu.shape
        return blend(ops.reshape(mu, (n, I * J, D)), routing)  # (n, D)

    # --- arrays for the E-step and for plots ----------------------------------------------------
    def predict(self, X: Any) -> np.ndarray:
        with tm.no_grad():
            return self.forward(X).data

    def gate_probs(self, X: Any) -> np.ndarray:
        """``g_i g_{j|i}``, the prior weight of every expert: (n, I*J), experts in row order."""
        with tm.no_grad():
            return self.route(X).probs.data  # (n, I*J)

    def posteriors(self, X: Any, Y: Any) -> Posteriors:
        """The E-step: ``h_i``, ``h_{j|i}`` and ``h_ij`` (eqs. 2.10-2.12) as arrays."""
        with tm.no_grad():
            log_g, log_g_low = self.gates(X)
            log_P = self.expert_log_likelihood(X, Y)
        log_g, log_g_low, log_P = log_g.data, log_g_low.data, log_P.data  # (n,I) (n,I,J) x2
        ### BEGIN SOLUTION task2_1
        a = log_g_low + log_P  # (n, I, J)  log g_{j|i} P_ij
        log_branch = logsumexp_array(a, axis=-1)  # (n, I, 1)  log sum_j g_{j|i} P_ij
        h_low = np.exp(a - log_branch)  # (n, I, J)  (2.11)
        b = log_g + log_branch[..., 0]  # (n, I)  log g_i sum_j g_{j|i} P_ij
        h_top = np.exp(b - logsumexp_array(b, axis=-1))  # (n, I)  (2.10)
        h = h_top[:, :, None] * h_low  # (n, I, J)  (2.12)
        ### END SOLUTION
        return Posteriors(h_top, h_low, h)

    def penalty(self, ridge: float) -> float:
        """``ridge/2 ||w||^2`` over the gate and expert weights (not the variances)."""
        return 0.5 * ridge * sum(float(np.sum(p.data ** 2))
                                 for p in (self.v_top, self.v_low, self.U))


# --- the M-step: weighted GLIM fits in NumPy ------------------------------------------------------
def weighted_least_squares(X: np.ndarray, Y: np.ndarray, w: np.ndarray,
                           ridge: float = 0.0) -> np.ndarray:
    """``argmin_B sum_t w_t ||y_t - B^T x_t||^2 + ridge ||B||^2``: (d, D).

    The M-step of a Gaussian expert with weights ``w = h_ij`` (2.22): the normal equations
    ``(X^T W X + ridge I) B = X^T W Y``. ``X`` (n, d) already holds the bias column.
    """
    ### BEGIN SOLUTION task2_2
    XtW = X.T * w  # (d, n)  X^T W
    A = XtW @ X + ridge * np.eye(X.shape[1])  # (d, d)
    B = np.linalg.solve(A, XtW @ Y)  # (d, D)
    ### END SOLUTION
    return B


def softmax_objective(X: np.ndarray, T: np.ndarray, w: np.ndarray, V: np.ndarray,
                      ridge: float = 0.0) -> float:
    """``sum_t w_t sum_k T_tk log softmax(X V)_tk - ridge/2 ||V||^2``: what a gate's IRLS
    maximises (soft targets ``T`` (n, K), observation weights ``w`` (n,))."""
    xi = X @ V  # (n, K)
    log_g = xi - logsumexp_array(xi, axis=-1)  # (n, K)
    return float(np.sum(w[:, None] * T * log_g) - 0.5 * ridge * np.sum(V ** 2))


def irls_softmax_step(X: np.ndarray, T: np.ndarray, w: np.ndarray, V: np.ndarray,
                      ridge: float = 0.0) -> np.ndarray:
    """One IRLS (Newton-Raphson) step for a multinomial-logit gate: the new ``V`` (d, K).

    Maximises :func:`softmax_objective`. With ``g_t = softmax(V^T x_t)``::

        gradient  G = X^T (w * (T - g * sum_k T_k)) - ridge V                  (d, K)
        Hessian   -H,  H[(a,k),(b,l)] = sum_t w_t x_ta x_tb (g_tk d_kl - g_tk g_tl)
                                        + ridge d_ab d_kl
        V_new     = V + H^{-1} G

    For the canonical link this is Fisher scoring, i.e. IRLS (Appendix A of the paper).
    """
    d, K = V.shape
    ### BEGIN SOLUTION task2_3
    g = softmax_array(X @ V, axis=-1)  # (n, K)
    G = X.T @ (w[:, None] * (T - g * T.sum(axis=1, keepdims=True))) - ridge * V  # (d, K)
    S = w[:, None, None] * (np.eye(K) * g[:, :, None] - g[:, :, None] * g[:, None, :])  # (n,K,K)
    H = np.einsum("ta,tkl,tb->akbl", X, S, X, optimize=True).reshape(d * K, d * K)
    H += ridge * np.eye(d * K)  # (dK, dK), positive definite
    V_new = V + np.linalg.solve(H, G.reshape(-1)).reshape(d, K)
    ### END SOLUTION
    return V_new


def logistic_objective(X: np.ndarray, Y: np.ndarray, w: np.ndarray, B: np.ndarray,
                       ridge: float = 0.0) -> float:
    """``sum_t w_t sum_k [y_tk eta_tk - log(1 + e^eta_tk)] - ridge/2 ||B||^2``, eta = X B."""
    eta = X @ B  # (n, D)
    return float(np.sum(w[:, None] * (Y * eta - np.logaddexp(0.0, eta)))
                 - 0.5 * ridge * np.sum(B ** 2))


def irls_logistic_step(X: np.ndarray, Y: np.ndarray, w: np.ndarray, B: np.ndarray,
                       ridge: float = 0.0) -> np.ndarray:
    """One IRLS step for a logistic expert with case weights ``w``: the new ``B`` (d, D).

    Each output is its own Bernoulli GLIM: ``B_k += (X^T W_k X + ridge I)^{-1} g_k`` with
    ``W_k = diag(w pi_k (1 - pi_k))`` and ``g_k = X^T (w (y_k - pi_k)) - ridge B_k``.
    """
    pi = 1.0 / (1.0 + np.exp(-(X @ B)))  # (n, D)
    B_new = B.copy()
    for k in range(B.shape[1]):
        grad = X.T @ (w * (Y[:, k] - pi[:, k])) - ridge * B[:, k]  # (d,)
        A = (X.T * (w * pi[:, k] * (1 - pi[:, k]))) @ X + ridge * np.eye(X.shape[1])  # (d, d)
        B_new[:, k] = B[:, k] + np.linalg.solve(A, grad)
    return B_new


def fit_irls(objective: Callable[[np.ndarray], float], step: Callable[[np.ndarray], np.ndarray],
             P: np.ndarray, max_steps: int = 5, tol: float = 1e-8) -> tuple[np.ndarray, int]:
    """Newton steps from ``P`` until the objective gains less than ``tol`` (relative), each
    step halved (up to 30 times) until the objective does not fall. Returns (P, steps)."""
    f = objective(P)
    for s in range(max_steps):
        P_full = step(P)
        t, accepted = 1.0, False
        for _ in range(30):
            P_try = P + t * (P_full - P)
            f_try = objective(P_try)
            if f_try >= f:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            return P, s
        gain, P, f = f_try - f, P_try, f_try
        if gain <= tol * (1.0 + abs(f)):
            return P, s + 1
    return P, max_steps


# --- training ------------------------------------------------------------------------------------
@dataclass
class FitHistory:
    """Per-epoch mean log-likelihood (per case); EM also records the penalised objective
    (summed over cases) that it provably never lowers."""

    method: str
    log_likelihood: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    irls_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _mean_ll(model: HME, X: np.ndarray, Y: np.ndarray) -> float:
    with tm.no_grad():
        return float(model.log_likelihood(X, Y).item())


def em_step(model: HME, X: np.ndarray, Y: np.ndarray, *, ridge: float = 1e-4,
            min_variance: float = 1e-6, irls_steps: int = 5) -> int:
    """One iteration of Algorithm 1, in place: E-step, then the M-step fits.

    (1) posteriors h_i, h_j|i, h_ij; (2) every expert (i, j): a GLIM fit weighted by h_ij
    (Gaussian: weighted least squares with the ridge scaled by sigma_ij^2, then
    sigma_ij^2 = sum_t h_ij ||y - mu_ij||^2 / (D sum_t h_ij), floored at ``min_variance``;
    logistic: IRLS); (3) the top gate: IRLS with targets h_i, weights 1; (4) each lower gate
    i: IRLS with targets h_j|i, weights h_i. Returns the number of Newton steps the IRLS
    fits took (task 2_4)."""
    X, Y = model.check_inputs(X, Y)
    xa = augment(X)  # (n, d+1)
    I, J = model.n_branches, model.n_experts
    steps = 0  # Newton steps of the IRLS fits, added up
    ### BEGIN SOLUTION task2_4
    post = model.posteriors(X, Y)  # (1) E-step
    for i in range(I):  # (2) experts: weighted GLIM fits with weights h_ij
        for j in range(J):
            w = post.h[:, i, j]  # (n,)
            B = model.U.data[i, j]  # (d+1, D)
            if model.expert == "gaussian":
                var = math.exp(model.log_var.data[i, j])
                B = weighted_least_squares(xa, Y, w, ridge * var)
                r2 = np.sum((Y - xa @ B) ** 2, axis=1)  # (n,)
                var = max(float(w @ r2) / (Y.shape[1] * max(w.sum(), 1e-300)), min_variance)
                model.log_var.data[i, j] = math.log(var)
            else:
                B, s = fit_irls(lambda P, w=w: logistic_objective(xa, Y, w, P, ridge),
                                lambda P, w=w: irls_logistic_step(xa, Y, w, P, ridge), B,
                                irls_steps)
                steps += s
            model.U.data[i, j] = B
    ones = np.ones(len(X))
    V, s = fit_irls(lambda P: softmax_objective(xa, post.h_top, ones, P, ridge),  # (3) top gate
                    lambda P: irls_softmax_step(xa, post.h_top, ones, P, ridge),
                    model.v_top.data, irls_steps)
    model.v_top.data[...] = V
    steps += s
    for i in range(I):  # (4) lower gates: targets h_{j|i}, weights h_i
        T, w = post.h_low[:, i, :], post.h_top[:, i]
        V, s = fit_irls(lambda P, T=T, w=w: softmax_objective(xa, T, w, P, ridge),
                        lambda P, T=T, w=w: irls_softmax_step(xa, T, w, P, ridge),
                        model.v_low.data[i], irls_steps)
        model.v_low.data[i] = V
        steps += s
    ### END SOLUTION
    return steps


def fit_em(model: HME, X: Any, Y: Any, iters: int = 50, *, ridge: float = 1e-4,
           min_variance: float = 1e-6, irls_steps: int = 5, tol: float | None = None,
           check_monotone: bool = True, progress: bool = False) -> FitHistory:
    """Batch EM (Algorithm 1) for ``iters`` iterations (epochs), in place.

    Entry 0 of the history is the starting point. With ``check_monotone`` a drop of the
    penalised log-likelihood beyond round-off raises RuntimeError (it would be a bug).
    ``tol``: stop early once the mean log-likelihood gains less than ``tol`` per epoch.
    """
    X, Y = model.check_inputs(X, Y)
    hist = FitHistory("em")
    start = time.perf_counter()

    def record() -> None:
        ll = _mean_ll(model, X, Y)
        hist.log_likelihood.append(ll)
        hist.objective.append(ll * len(X) - model.penalty(ridge))

    record()
    it = range(iters)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="HME by EM", leave=False)
    for _ in it:
        hist.irls_steps.append(em_step(model, X, Y, ridge=ridge, min_variance=min_variance,
                                       irls_steps=irls_steps))
        record()
        prev, now = hist.objective[-2], hist.objective[-1]
        if check_monotone and now < prev - 1e-9 * (1.0 + abs(prev)):
            raise RuntimeError(f"fit_em: the penalised log-likelihood fell from {prev:.10g} "
                               f"to {now:.10g} at iteration {len(hist.objective) - 1}")
        if tol is not None and hist.log_likelihood[-1] - hist.log_likelihood[-2] < tol:
            break
    hist.seconds = time.perf_counter() - start
    return hist


def fit_gradient(model: HME, X: Any, Y: Any, epochs: int = 1000, lr: float = 0.1, *,
                 momentum: float = 0.0, progress: bool = False) -> FitHistory:
    """Batch gradient ascent on the mean log-likelihood (the 1992 rules 2.14-2.16 are its
    gradient for Gaussian experts), one update per epoch, in place. Entry 0 of the history
    is the starting point."""
    X, Y = model.check_inputs(X, Y)
    hist = FitHistory("gradient")
    opt = tm.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    start = time.perf_counter()
    it = range(epochs + 1)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="HME by gradient", leave=False)
    for epoch in it:
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
            ll = model.log_likelihood(X, Y)
        value = float(ll.item())
        if not math.isfinite(value):
            raise FloatingPointError(f"fit_gradient: the log-likelihood became {value} at "
                                     f"epoch {epoch}; lower lr (now {lr})")
        hist.log_likelihood.append(value)
        if epoch == epochs:
            break
        model.zero_grad()
        with np.errstate(over="ignore", invalid="ignore"):
            (-ll).backward()
        opt.step()
    hist.seconds = time.perf_counter() - start
    return hist
