"""Token dispatch: send tokens to their experts and add the experts' outputs back.

``routing`` defines :class:`Routing`, what every router returns; ``reference`` is the
specification in vectorised NumPy, ``kernels`` the same contract as Numba kernels (the
default backend), ``functions`` wraps the active backend as autograd Functions::

    import tinymoe as tm
    r = tm.dispatch.route(expert_index, gate_values, num_experts=8, capacity=64)
    buf = tm.dispatch.dispatch(x, r)          # (E, C, d)
    y = tm.dispatch.combine(expert_out, r)    # (T, d)

Backends: ``set_backend("numpy" | "numba")``, ``get_backend()``, ``with use_backend(...)``,
or the environment variable ``TINYMOE_DISPATCH=numpy``. Numba loads on first use.
"""
from tinymoe.dispatch import reference
from tinymoe.dispatch.backend import (BACKENDS, backend_module, get_backend, set_backend,
                                      use_backend)
from tinymoe.dispatch.functions import (Combine, CombineSorted, Dispatch, DispatchSorted,
                                        as_dtype, combine, combine_sorted, dispatch,
                                        dispatch_sorted, kernel_dtype)
from tinymoe.dispatch.routing import Routing, route, sum_losses

__all__ = ["BACKENDS", "backend_module", "get_backend", "set_backend", "use_backend",
           "Dispatch", "Combine", "DispatchSorted", "CombineSorted", "Routing", "route",
           "dispatch", "combine", "dispatch_sorted", "combine_sorted", "reference", "as_dtype",
           "kernel_dtype", "sum_losses"]
