"""The example calls propagation runs the graph on: every input of one call, cut to one sample.

Propagation needs inputs of the right shapes for every input the model takes (tensors, tuples,
lists and dicts of them, integer token ids); the values never decide a mask. The network keeps
the first call of each kind (each set of optional inputs given), cut to its first sample where
every tensor in it has the batch size of the first tensor. A graph that needs the whole call (a
graph network's nodes and edges, an adjacency matrix) gets the whole call back the first time
the cut one fails to run. Checkpoints store the calls' shapes and dtypes (``spec_of``) and a
reloaded network runs on zeros of them (``zeros_of``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

__all__ = ["Call", "ExampleCall", "tensors_of", "spec_of", "zeros_of", "check_spec",
           "MAX_EXAMPLE_ELEMENTS", "INDEX_DTYPES", "CONSTANTS"]

Call = tuple[Any, dict[str, Any]]  # the first input, and the others by name
MAX_EXAMPLE_ELEMENTS = 2 ** 28  # one example call; more is a damaged or edited header
INDEX_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
CONSTANTS = (type(None), bool, int, float, str)  # plain values an input may hold


def _map(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``tree`` with ``fn`` applied to every tensor in it (tuples, lists and dicts kept)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(_map(v, fn) for v in tree)
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return tree


def tensors_of(tree: Any) -> list[torch.Tensor]:
    """Every tensor in ``tree``, in order."""
    found: list[torch.Tensor] = []
    _map(tree, found.append)
    return found


class ExampleCall:
    """One call the network saw: cut to one sample where that is safe, and the whole call
    (references, not copies) until the cut one is known to run."""

    def __init__(self, x: Any, inputs: dict[str, Any]):
        call: Call = (x, dict(inputs))
        tensors = tensors_of(call)
        batch = tensors[0].shape[0] if tensors and tensors[0].ndim else None
        cuttable = batch is not None and batch > 1 and all(
            t.ndim and t.shape[0] == batch for t in tensors)
        self.call: Call = _map(call, lambda t: (t[:1] if cuttable else t).detach().clone())
        self.whole: Call | None = _map(call, lambda t: t.detach()) if cuttable else None

    @classmethod
    def of(cls, call: Call) -> "ExampleCall":
        """A call already in the form to keep (a reloaded network's zeros)."""
        example = cls.__new__(cls)
        example.call, example.whole = call, None
        return example

    def candidates(self) -> list[Call]:
        """The calls to try, the cut one first."""
        return [self.call] if self.whole is None else [self.call, self.whole]

    def settle(self, call: Call) -> None:
        """``call`` ran: keep it (a copy), and drop the other."""
        if call is not self.call:
            self.call = _map(call, lambda t: t.clone())
        self.whole = None

    def on(self, call: Call, like: torch.Tensor | None) -> Call:
        """``call`` on the device of ``like``, float tensors in its float dtype (``.half()``)."""
        if like is None:
            return call

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point() and like.is_floating_point():
                return t.to(device=like.device, dtype=like.dtype)
            return t.to(device=like.device)
        return _map(call, move)


def spec_of(tree: Any) -> Any:
    """``tree`` as plain JSON values: tensors by shape and dtype, constants as they are."""
    if isinstance(tree, torch.Tensor):
        return {"shape": list(tree.shape), "dtype": str(tree.dtype).removeprefix("torch.")}
    if isinstance(tree, tuple):
        return {"tuple": [spec_of(v) for v in tree]}
    if isinstance(tree, list):
        return {"list": [spec_of(v) for v in tree]}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise ValueError(f"a dict input with keys that are not strings ({list(tree)[:3]})")
        return {"dict": {k: spec_of(v) for k, v in tree.items()}}
    if type(tree) in CONSTANTS and not (isinstance(tree, float) and not math.isfinite(tree)):
        return {"value": tree}
    raise ValueError(f"an input of type {type(tree).__name__}, which cannot be stored")


def check_spec(spec: Any) -> int:
    """Raise ``ValueError`` saying what is wrong with a stored spec; return its elements."""
    if not isinstance(spec, dict) or len(spec) not in (1, 2):
        raise ValueError(f"{_shown(spec)} is not an input spec")
    if "shape" in spec:
        shape, name = spec.get("shape"), spec.get("dtype")
        if not isinstance(shape, list):
            raise ValueError("expected a shape list and a dtype name")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError("every dimension must be an int >= 0")
        if max(shape, default=0) > MAX_EXAMPLE_ELEMENTS or math.prod(shape) > MAX_EXAMPLE_ELEMENTS:
            raise ValueError(f"more elements than one input sample can hold (at most "
                             f"{MAX_EXAMPLE_ELEMENTS})")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not (isinstance(dtype, torch.dtype) and (dtype.is_floating_point
                                                    or dtype in INDEX_DTYPES)):
            raise ValueError(f"dtype {name!r} is not a floating, integer or bool torch dtype")
        return math.prod(shape)
    (kind, value), = spec.items()
    if kind in ("tuple", "list") and isinstance(value, list):
        total = sum(check_spec(v) for v in value)
    elif kind == "dict" and isinstance(value, dict):
        total = sum(check_spec(v) for v in value.values())
    elif kind == "value" and type(value) in CONSTANTS:
        return 0
    else:
        raise ValueError(f"{_shown(spec)} is not an input spec")
    if total > MAX_EXAMPLE_ELEMENTS:
        raise ValueError(f"more elements than one example call can hold (at most "
                         f"{MAX_EXAMPLE_ELEMENTS})")
    return total


def zeros_of(spec: Any, device: torch.device | None = None) -> Any:
    """The inputs a checked ``spec`` describes, every tensor zeros (propagation reads shapes)."""
    if "shape" in spec:
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
    (kind, value), = spec.items()
    if kind == "tuple":
        return tuple(zeros_of(v, device) for v in value)
    if kind == "list":
        return [zeros_of(v, device) for v in value]
    if kind == "dict":
        return {k: zeros_of(v, device) for k, v in value.items()}
    return value


def _shown(spec: Any) -> str:
    text = repr(spec)
    return text if len(text) <= 120 else text[:120] + "..."
