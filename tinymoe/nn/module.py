"""Parameter and Module: the bookkeeping that turns a pile of tensors into a model.

A :class:`Module` finds its own parameters: assigning a :class:`Parameter` or another Module
to an attribute registers it under that name, so ::

    class Tiny(tm.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = tm.nn.Linear(4, 8)        # a child module: "fc"
            self.scale = tm.nn.Parameter(np.ones(8, np.float32))

gives ``named_parameters()`` -> ``fc.weight, fc.bias, scale``: dotted paths, in the order
the attributes were first assigned (so ``state_dict`` keys are stable from run to run).
A parameter shared by two modules (tied weights) is listed once, under its first name.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from tinymoe.tensor import DEFAULT_FLOAT, Tensor


class Parameter(Tensor):
    """A leaf tensor that a Module trains: always ``requires_grad``, always floating.

    Made from an ndarray it keeps the array's dtype (and copies it); from Python numbers
    or lists it becomes float32, like ``tm.tensor``.
    """

    def __init__(self, data: Any, dtype: Any = None) -> None:
        if isinstance(data, Tensor):
            data = data.data
        from_python = not isinstance(data, (np.ndarray, np.generic))
        arr = np.array(data, dtype=dtype, copy=True)
        if dtype is None and from_python and arr.dtype == np.float64:
            arr = arr.astype(DEFAULT_FLOAT)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"Parameter: data must be floating point, got {arr.dtype}; "
                            f"convert first, e.g. Parameter(x.astype(np.float32))")
        super().__init__(arr, requires_grad=True)

    def __repr__(self) -> str:
        return f"Parameter(shape {self.shape}, {self.dtype})"


class LoadResult(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` skipped."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class of every layer and model. Subclasses call ``super().__init__()`` first,
    assign parameters and sub-modules as attributes, and define ``forward``."""

    def __init__(self) -> None:
        object.__setattr__(self, "_registry", {})  # name -> Parameter | Module, in order
        object.__setattr__(self, "training", True)

    # --- registration ---------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        registry = self.__dict__.get("_registry")
        if registry is None:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() at the start "
                                 f"of __init__, before assigning attributes")
        if isinstance(value, (Parameter, Module)):
            self.__dict__.pop(name, None)
            registry[name] = value
            return
        if name in registry:
            if value is not None:
                kind = "parameter" if isinstance(registry[name], Parameter) else "sub-module"
                raise TypeError(f"{type(self).__name__}.{name} is a {kind}; cannot replace it "
                                f"with a {type(value).__name__} (wrap arrays in Parameter, "
                                f"or assign to .{name}.data to change the values)")
            del registry[name]  # `self.bias = None` removes a registered parameter
        if isinstance(value, (list, tuple)) and any(
                isinstance(v, (Module, Parameter)) for v in value):
            raise TypeError(f"{type(self).__name__}.{name}: a plain {type(value).__name__} hides "
                            f"its modules/parameters from parameters() and state_dict(); "
                            f"use tm.nn.ModuleList([...]) instead")
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails
        registry = self.__dict__.get("_registry")
        if registry is not None and name in registry:
            return registry[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        registry = self.__dict__.get("_registry", {})
        if name in registry:
            del registry[name]
        else:
            object.__delattr__(self, name)

    # --- walking the tree -------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, v in self._registry.items():
            if isinstance(v, Module):
                yield name, v

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (named ``prefix``) and every descendant, depth first, each once."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield name, m
            kids = [(f"{name}.{k}" if name else k, c) for k, c in m.named_children()]
            stack.extend(reversed(kids))  # reversed so the first child is visited first

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, parameter)`` in assignment order; a shared parameter once."""
        seen: set[int] = set()
        for name, p in self._walk_parameters(prefix):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _walk_parameters(self, prefix: str) -> Iterator[tuple[str, Parameter]]:
        for name, v in self._registry.items():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(v, Parameter):
                yield full, v
            else:
                yield from v._walk_parameters(full)

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self) -> int:
        """How many numbers the module trains (a shared parameter counted once)."""
        return sum(p.size for p in self.parameters())

    # --- training helpers -----------------------------------------------------------------
    def zero_grad(self) -> None:
        """Forget every parameter's gradient (``.grad = None``)."""
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Module:
        """Set ``training`` on this module and all descendants (Dropout reads it)."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """``{dotted name: copy of the parameter's array}``."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Copy arrays from ``state_dict`` into the parameters of the same names.

        Everything is checked before anything is assigned: a wrong shape or dtype (always),
        or a missing or unexpected key (when ``strict``), raises ValueError listing every
        problem, and the module is left exactly as it was.
        """
        own = dict(self.named_parameters())
        given = {k: np.asarray(v.data if isinstance(v, Tensor) else v)
                 for k, v in state_dict.items()}
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        mismatched = [f"{k}: {given[k].shape} {given[k].dtype} in the state dict, "
                      f"{own[k].shape} {own[k].dtype} in the module"
                      for k in own if k in given and
                      (given[k].shape != own[k].shape or given[k].dtype != own[k].dtype)]
        problems = mismatched + ([] if not strict else
                                 [f"missing key: {k}" for k in missing] +
                                 [f"unexpected key: {k}" for k in unexpected])
        if problems:
            raise ValueError(f"load_state_dict: the state dict does not fit "
                             f"{type(self).__name__}; nothing was loaded:\n  " +
                             "\n  ".join(problems))
        for k, p in own.items():
            if k in given:
                p.data = np.array(given[k], copy=True)
        return LoadResult(missing, unexpected)

    # --- calling and printing -------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward(); define "
                                  f"forward(self, ...) in the subclass")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        """The text inside the parentheses of this module's repr (override in layers)."""
        return ""

    def __repr__(self) -> str:
        name, extra = type(self).__name__, self.extra_repr()
        if not any(True for _ in self.children()):
            return f"{name}({extra})"
        lines = [f"{name}("] + ([f"  {extra}"] if extra else [])
        for name, v in self._registry.items():
            body = repr(v).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules whose parameters are registered (named ``0``, ``1``, ...)."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        self.extend(modules)

    def append(self, module: Module) -> ModuleList:
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList: can only hold Modules, got {type(module).__name__}")
        setattr(self, str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        for m in modules:
            self.append(m)
        return self

    def __len__(self) -> int:
        return len(self._registry)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._registry.values()))

    def __getitem__(self, i: int | slice) -> Any:
        items = list(self._registry.values())
        if isinstance(i, slice):
            return ModuleList(items[i])
        if not -len(items) <= i < len(items):
            raise IndexError(f"ModuleList: index {i} is out of range for {len(items)} modules")
        return items[i]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ModuleList has no forward(); loop over it: "
                                  "`for block in self.blocks: x = block(x)`")
