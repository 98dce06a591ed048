"""Run one component of an adapter on one case, compare with the reference, explain failures.

:func:`check` calls the adapter's method on the case's inputs, computes the expected outputs
with :mod:`tinymoe.conformance.reference` under the declared conventions, and raises
:class:`ConformanceError` at the first output that differs. The message names the component,
the case, the output, the first differing element (index, expected, got), the conventions
the answer depends on, what the output means, and, when your output matches another value
of one of those conventions, that value (so a convention difference is told apart from a
bug).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe.conformance import reference as ref
from tinymoe.conformance.cases import CATALOGUE
from tinymoe.conformance.conventions import CONVENTIONS, resolve

DEFAULT_TOLERANCE = dict(rtol=1e-5, atol=1e-6)   # float32 arithmetic passes
HALF_TOLERANCE = dict(rtol=2e-2, atol=2e-3)      # router_precision="input", float16/bfloat16

# component -> (the conventions its answer depends on, what each output is)
SPEC: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "top1_router": (("tie_breaking", "router_precision"), {
        "expert": "argmax_i p_i(x), p = softmax(logits) (Switch eq. 2)",
        "gate": "the raw probability p_{i*} of the chosen expert, not renormalised"}),
    "topk_router": (("tie_breaking", "router_precision"), {
        "expert": "the k most probable experts, most probable first",
        "weight": "their probabilities divided by their sum (Mixtral)"}),
    "noisy_topk_router": ((), {
        "gates": "softmax over the k largest H = clean + noise·σ, 0 elsewhere (Shazeer et al. "
                 "2017, eqs. 3-5)",
        "load": "Σ_t Φ((clean_i − kth_excluding(H, k, i)) / σ_i) (eqs. 8-10): the threshold is "
                "the k-th largest of the OTHER experts' noisy logits, i.e. the (k+1)-th "
                "largest of H when expert i is in the top k, else the k-th largest; "
                "k = E: the hard count"}),
    "expert_choice": (("tie_breaking",), {
        "token": "expert e's C best tokens by score, best first (Zhou et al. 2022, §3.2)",
        "gate": "their scores S[t, e]"}),
    "bias_update": ((), {
        "bias": "b + γ·sign(mean(load) − load): overloaded experts go down by γ, "
                "underloaded up, exactly-at-mean unchanged (DeepSeek-V3 §2.1.2)"}),
    "expert_capacity": (("capacity_rounding", "capacity_counts_k", "min_capacity",
                         "capacity_at_most_tokens"), {
        "capacity": "slots per expert, (k·)S·cf/E rounded (Switch eq. 3)"}),
    "capacity_positions": (("priority",), {
        "position": "the slot (0-based) of each choice in its expert's buffer, -1 when the "
                    "expert already holds C choices (kept iff position < C)"}),
    "dispatch": ((), {"buffer": "(E, C, d): slot position[t, j] of expert "
                                "expert_index[t, j] holds x[t]; other slots 0"}),
    "combine": ((), {"y": "(T, d): y_t = Σ_j w_tj · expert_out[e_tj, p_tj] over the kept "
                          "choices (position >= 0)"}),
    "switch_aux_loss": (("aux_pooling",), {
        "loss": "N · Σ_i f_i P_i without α (Switch eqs. 4-6), f_i the fraction of tokens "
                "whose argmax is i, P_i the mean probability; 1 at uniform routing"}),
    "gshard_aux_loss": ((), {
        "loss": "E · Σ_e (c_e/S) m_e (GShard §2.2 times E²), c_e counting first choices; 1 "
                "at uniform routing"}),
    "mixtral_aux_loss": (("aux_pooling", "mixtral_k_factor"), {
        "loss": "E · Σ_i f_i P_i with f_i the share of the T·k top-k choices (× k with "
                "mixtral_k_factor=True)"}),
    "z_loss": ((), {"loss": "mean over tokens of logsumexp(logits)² (ST-MoE eq. 5)"}),
    "switch_layer": (("priority", "dropped_tokens", "tie_breaking"), {
        "y": "(T, d): p_{i*} · relu(x W_in[i*]) W_out[i*] for a kept token; the first C tokens "
             "of each expert in sequence order are kept"}),
    "mixtral_layer": (("tie_breaking",), {
        "y": "(T, d): Σ_j w_j (silu(x W_gate[e_j]) ⊙ x W_up[e_j]) W_down[e_j], top-k "
             "renormalised gates, no capacity"}),
}


class ConformanceError(AssertionError):
    """An adapter's output differs from the reference; the message says where and why."""


def _expected(component: str, args: tuple, dtype: str, conv: dict) -> dict[str, Any]:
    """The reference outputs of ``component`` on ``args``, by output name."""
    if component == "top1_router":
        e, g = ref.top1_router(args[0], conv, dtype)
        return {"expert": e, "gate": g}
    if component == "topk_router":
        e, w = ref.topk_router(args[0], args[1], conv, dtype)
        return {"expert": e, "weight": w}
    if component == "noisy_topk_router":
        g, load = ref.noisy_topk_router(*args)
        return {"gates": g, "load": load}
    if component == "expert_choice":
        t, g = ref.expert_choice(*args)
        return {"token": t, "gate": g}
    if component == "bias_update":
        return {"bias": ref.bias_update(*args)}
    if component == "expert_capacity":
        return {"capacity": np.int64(ref.expert_capacity(*args, conv))}
    if component == "capacity_positions":
        return {"position": ref.capacity_positions(*args, conv)}
    if component == "dispatch":
        return {"buffer": ref.dispatch(*args)}
    if component == "combine":
        return {"y": ref.combine(*args)}
    if component == "switch_aux_loss":
        return {"loss": np.float64(ref.switch_aux_loss(*args, conv))}
    if component == "gshard_aux_loss":
        return {"loss": np.float64(ref.switch_aux_loss([args[0]], [args[1]],
                                                       {"aux_pooling": "per_layer_sum"}))}
    if component == "mixtral_aux_loss":
        return {"loss": np.float64(ref.mixtral_aux_loss(*args, conv))}
    if component == "z_loss":
        return {"loss": np.float64(ref.z_loss(args[0]))}
    if component == "switch_layer":
        return {"y": ref.switch_layer(*args, conv)}
    if component == "mixtral_layer":
        return {"y": ref.mixtral_layer(*args, conv)}
    raise KeyError(component)


def _accept_ties(component: str, args: tuple, dtype: str, conv: dict, got: dict,
                 expected: dict) -> dict:
    """``tie_breaking='any'``: where the adapter chose an index whose score equals the
    expected one's, take its choice as the expected one (and its gate)."""
    out = dict(expected)
    if component in ("top1_router", "topk_router"):
        p = ref.softmax(args[0], conv, dtype)
        e_got, e_exp = np.asarray(got["expert"]), expected["expert"]
        if e_got.size != e_exp.size or not np.issubdtype(e_got.dtype, np.integer):
            return out  # the comparison reports the shape or dtype
        e_got = e_got.reshape(e_exp.shape)
        if e_got.size == 0 or e_got.min() < 0 or e_got.max() >= p.shape[1]:
            return out
        rows = np.arange(p.shape[0])[:, None] if e_exp.ndim == 2 else np.arange(p.shape[0])
        same = p[rows, e_got] == p[rows, e_exp]
        out["expert"] = np.where(same, e_got, e_exp)
    elif component == "expert_choice":
        s = np.asarray(args[0], dtype=np.float64)
        t_got = np.asarray(got["token"])
        if t_got.size != expected["token"].size or not np.issubdtype(t_got.dtype, np.integer):
            return out
        t_got = t_got.reshape(expected["token"].shape)
        if t_got.size == 0 or t_got.min() < 0 or t_got.max() >= s.shape[0]:
            return out
        cols = np.arange(s.shape[1])[:, None]
        same = s[t_got, cols] == s[expected["token"], cols]
        out["token"] = np.where(same, t_got, expected["token"])
    return out


def _first_difference(got: np.ndarray, expected: np.ndarray, exact: bool, tol: dict
                      ) -> tuple[tuple[int, ...], int] | None:
    """(index of the first differing element, number differing), or None if all agree."""
    if exact:
        bad = got != expected
    else:
        g, e = got.astype(np.float64), expected.astype(np.float64)
        bad = ~np.isclose(g, e, rtol=tol["rtol"], atol=tol["atol"])
        bad |= np.isnan(g) & ~np.isnan(e)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.argwhere(bad)[0]), int(bad.sum())


def _compare(component: str, case: str, got: dict, expected: dict, tol: dict) -> str | None:
    """The first mismatch as a sentence, or None."""
    for name, exp in expected.items():
        exp = np.asarray(exp)
        g = got.get(name)
        if g is None:
            return f"output '{name}' is missing"
        g = np.asarray(g)
        if g.shape != exp.shape and g.size == exp.size:
            g = g.reshape(exp.shape)
        if g.shape != exp.shape:
            return (f"output '{name}' has shape {g.shape}, expected {exp.shape}")
        exact = np.issubdtype(exp.dtype, np.integer)
        if exact and not np.issubdtype(g.dtype, np.integer):
            if not np.all(np.isfinite(g)) or not np.all(g == np.round(g)):
                return f"output '{name}' should hold integers, got dtype {g.dtype}"
        diff = _first_difference(g, exp, exact, tol)
        if diff is not None:
            idx, n = diff
            where = f"index {idx}" if idx else "the value"
            return (f"output '{name}' differs at {where}: expected {exp[idx].item()!r}, got "
                    f"{g[idx].item()!r} ({n} of {exp.size} elements differ)")
    return None


def _outputs(component: str, result: Any) -> dict:
    names = list(SPEC[component][1])
    values = result if isinstance(result, (tuple, list)) and len(names) > 1 else (result,)
    if len(values) != len(names):
        raise ConformanceError(f"{component}: the adapter returned {len(values)} values, "
                               f"expected {len(names)}: {', '.join(names)}")
    return dict(zip(names, values))


def _tolerance(adapter: Any, dtype: str, conv: dict) -> dict:
    tol = dict(DEFAULT_TOLERANCE)
    if dtype in ("float16", "bfloat16") and conv["router_precision"] == "input":
        tol = dict(HALF_TOLERANCE)
    for key, value in (getattr(adapter, "tolerance", None) or {}).items():
        tol[key] = max(tol[key], float(value))  # an adapter may loosen, never tighten
    return tol


def _mismatch(component: str, case: str, result: Any, inputs: dict, conv: dict,
              adapter: Any) -> str | None:
    got = _outputs(component, result)
    expected = _expected(component, inputs["args"], inputs["dtype"], conv)
    if conv["tie_breaking"] == "any":
        expected = _accept_ties(component, inputs["args"], inputs["dtype"], conv, got, expected)
    return _compare(component, case, got, expected, _tolerance(adapter, inputs["dtype"], conv))


def inputs_for(component: str, case: str, seed: int = 0) -> dict:
    """The case's inputs: ``{"args": (...), "dtype": ...}`` (fresh arrays each call)."""
    make, cases = CATALOGUE[component]
    if case not in cases:
        raise KeyError(f"conformance: {component} has no case {case!r}; its cases are "
                       f"{', '.join(cases)}")
    return make(case, np.random.default_rng(seed))


def check(adapter: Any, component: str, case: str, conventions: dict | None = None,
          seed: int = 0, explain: bool = True) -> None:
    """Run ``adapter.<component>`` on ``case``; raise :class:`ConformanceError` on a mismatch.

    ``conventions`` defaults to the adapter's ``conventions`` attribute (missing keys take
    tinymoe's values). ``explain=False`` skips trying the other conventions' values for
    the message (faster when only pass/fail matters).
    """
    method = getattr(adapter, component, None)
    if method is None:
        raise AttributeError(f"conformance: the adapter has no method {component}")
    declared = getattr(adapter, "conventions", None) if conventions is None else conventions
    conv = resolve(declared)
    inputs = inputs_for(component, case, seed)
    result = method(*inputs["args"])
    problem = _mismatch(component, case, result, inputs, conv, adapter)
    if problem is None:
        return
    if not explain:
        raise ConformanceError(f"{component} [case {case}]: {problem}")
    uses, meaning = SPEC[component]
    lines = [f"{component} [case {case}]: {problem}"]
    if uses:
        lines.append("  conventions: " + ", ".join(f"{u}={conv[u]!r}" for u in uses))
    lines.append("  " + "; ".join(f"{k} = {v}" for k, v in meaning.items()))
    for u in uses:  # does another value of a convention explain the difference?
        for value in CONVENTIONS[u][0]:
            if value == conv[u]:
                continue
            alt = dict(conv, **{u: value})
            fresh = inputs_for(component, case, seed)
            if _mismatch(component, case, method(*fresh["args"]), fresh, alt, adapter) is None:
                lines.append(f"  your output matches the convention {u}={value!r}: declare "
                             f"it in the adapter's conventions if that is what you follow")
    args = inputs_for(component, case, seed)["args"]
    shapes = ", ".join(f"{np.shape(a)}" if isinstance(a, np.ndarray) else
                       (f"[{len(a)} arrays]" if isinstance(a, list) else repr(a)) for a in args)
    lines.append(f"  inputs: {shapes} (reproduce with tinymoe.conformance.inputs_for("
                 f"{component!r}, {case!r}))")
    raise ConformanceError("\n".join(lines))


def components(adapter: Any) -> list[str]:
    """The components the adapter implements, in catalogue order."""
    return [c for c in CATALOGUE if callable(getattr(adapter, c, None))]


def run(adapter: Any, conventions: dict | None = None) -> dict[tuple[str, str], str | None]:
    """Every (component, case) the adapter implements -> None (passed), the failure, or
    ``"skipped: ..."`` when the method raised NotImplementedError for that case."""
    results = {}
    for component in components(adapter):
        for case in CATALOGUE[component][1]:
            try:
                check(adapter, component, case, conventions)
                results[component, case] = None
            except NotImplementedError as err:
                results[component, case] = f"skipped: {err}"
            except Exception as err:  # noqa: BLE001 - a crash is a failure to report
                results[component, case] = f"{type(err).__name__}: {err}"
    return results


def detect_conventions(adapter: Any, names: tuple[str, ...] | None = None
                       ) -> dict[str, list[Any]]:
    """For each convention, the values under which the adapter passes every check that
    depends on it (the other conventions as the adapter declares them). Cases that fail
    under every value (a bug, or something no convention models, such as a NaN loss on an
    empty batch) are left out, so they do not hide the convention. An empty list: no value
    explains the outputs. The looser values ('any' tie-breaking, 'input' precision) pass
    whenever the stricter ones do."""
    declared = resolve(getattr(adapter, "conventions", None))
    found = {}
    for name in names or tuple(CONVENTIONS):
        deps = [c for c in components(adapter) if name in SPEC[c][0]]
        if not deps:
            continue
        results = {value: _run_some(adapter, deps, dict(declared, **{name: value}))
                   for value in CONVENTIONS[name][0]}
        cases = set().union(*(r.keys() for r in results.values()))
        relevant = [c for c in cases if any(r[c] is None for r in results.values())]
        found[name] = [value for value, r in results.items()
                       if all(r[c] is None for c in relevant)]
    return found


def _run_some(adapter: Any, comps: list[str], conv: dict) -> dict:
    out = {}
    for component in comps:
        for case in CATALOGUE[component][1]:
            try:
                check(adapter, component, case, conv, explain=False)
                out[component, case] = None
            except NotImplementedError:
                out[component, case] = None  # the adapter cannot express this case
            except Exception as err:  # noqa: BLE001
                out[component, case] = str(err)
    return out
