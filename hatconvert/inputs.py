"""The inputs of a converted network: which it takes, which tracing fixed, and a graph per call.

fx bakes Python branches into the graph, so an input with a ``None`` default
(``attention_mask=None``) is traced twice over: once absent and once given. Each set of such
optional inputs that a call gives has its own graph over the same converted modules (the
``VariantGraphs``); the network routes a call to the graph of the optional inputs it gives.
Inputs whose default is a Python constant (``scale=1.0``, ``is_causal=False``) are fixed at it
while tracing; the report lists them, and a call that gives another value is refused by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .errors import InputError

__all__ = ["MAX_OPTIONAL", "Signature", "VariantGraphs", "variant_key"]

MAX_OPTIONAL = 3  # optional inputs kept as inputs: 2**3 graphs at most


def variant_key(names: Any) -> tuple[str, ...]:
    """The key of the graph for the optional inputs ``names`` (sorted, so any order matches)."""
    return tuple(sorted(names))


@dataclass
class Signature:
    """The model's inputs as the converted network takes them."""

    model: str = "model"
    names: list[str] = field(default_factory=list)  # every input the graph takes, first is x
    optional: list[str] = field(default_factory=list)  # None default, one graph per set given
    fixed: dict[str, Any] = field(default_factory=dict)  # traced at this default value
    reasons: dict[str, str] = field(default_factory=dict)  # why a None default stayed fixed
    any_keyword: bool = False  # the forward takes **kwargs: unknown names pass through

    def route(self, inputs: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
        """The graph key for a call's keyword ``inputs`` and the inputs to pass it.

        Fixed inputs given at their default are dropped; another value, or an input the model
        does not take, raises an ``InputError`` that names it.
        """
        given, passed = [], {}
        for name, value in inputs.items():
            if name in self.fixed:
                if not _same(value, self.fixed[name]):
                    raise InputError(self._fixed_message(name, value))
            elif name in self.optional:
                if value is not None:
                    given.append(name)
                    passed[name] = value
            elif name in self.names[1:] or self.any_keyword:
                passed[name] = value
            else:
                takes = ", ".join(self.names[1:] + self.optional) or "none besides the first"
                raise InputError(f"{self.model} takes no input named {name!r} (its other "
                                 f"inputs: {takes})")
        return variant_key(given), passed

    def _fixed_message(self, name: str, value: Any) -> str:
        default = self.fixed[name]
        why = self.reasons.get(name, "the graph holds the branch of that value")
        shown = f"a {type(value).__name__}" if isinstance(value, torch.Tensor) else repr(value)
        return (f"input {name!r} of {self.model} was fixed at {default!r} when it was traced "
                f"({why}), so it cannot be given {shown}: call without it")

    def describe(self) -> list[str]:
        """The report's lines about inputs (none for a model with one input and no defaults)."""
        lines = []
        if len(self.names) > 1 or self.optional:
            lines.append("  inputs: " + ", ".join(self.names)
                         + "".join(f", {n}=None (optional)" for n in self.optional))
        if self.fixed:
            parts = [f"{n}={v!r}" + (f" ({self.reasons[n]})" if n in self.reasons else "")
                     for n, v in self.fixed.items()]
            lines.append(f"  inputs fixed at their default while tracing ({len(parts)}): "
                         + ", ".join(parts))
        return lines


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    return value is default or (type(value) is type(default) and value == default)


class VariantGraphs:
    """The graphs of calls that give optional inputs, run over the main graph module's modules.

    A graph module is built on demand from the main one (``fx.GraphModule(main, graph)`` shares
    its submodules) and dropped whenever the main one's tensors may have been replaced (``.to``,
    ``load_state_dict``), so a variant never runs stale weights.
    """

    def __init__(self, graphs: dict[tuple[str, ...], fx.Graph] | None = None):
        self.graphs = {k: copy.deepcopy(g) for k, g in (graphs or {}).items()}
        self._modules: dict[tuple[str, ...], fx.GraphModule] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "_modules": {}}

    def __deepcopy__(self, memo: dict) -> "VariantGraphs":
        return VariantGraphs(self.graphs)

    def keys(self) -> list[tuple[str, ...]]:
        """Every key, the main graph's ``()`` first."""
        return [()] + list(self.graphs)

    def module(self, main: fx.GraphModule, key: tuple[str, ...]) -> fx.GraphModule:
        """The graph module for ``key`` (``()``: the main one)."""
        if not key:
            return main
        built = self._modules.get(key)
        if built is None:
            built = fx.GraphModule(main, copy.deepcopy(self.graphs[key]),
                                   class_name=type(main).__name__)
            built.train(main.training)
            self._modules[key] = built
        return built

    def invalidate(self) -> None:
        """Forget the built graph modules (the main module's tensors may have changed)."""
        self._modules.clear()
