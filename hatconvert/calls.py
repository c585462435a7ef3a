"""How a HAT network takes a call: its graph, and the example calls propagation runs on.

``CallRouting`` is a mixin of ``HATNetwork``. A call goes to the graph of the optional inputs it
gives (``inputs.VariantGraphs``). The first call of each kind is kept as an example
(``example.ExampleCall``), and propagation runs every kept example through its graph and takes
the union, so protection covers every kind of call the network has seen. A kind of call first
seen after trained tasks were protected without it is refused: its reads were never protected,
so hatconvert could not promise that the trained tasks still compute what they did for it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .errors import HATError, TaskError
from .example import Call, ExampleCall, check_spec, spec_of, zeros_of
from .layers import input_features
from .propagation import input_masks

__all__ = ["CallRouting"]


class CallRouting:
    """Routing of calls to graphs, and the example calls kept per graph."""

    def _route(self, x: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The graph module for this call and the keyword inputs to pass it; the call is kept
        as the example of its kind if it is the first."""
        key, passed = self.layout.signature.route(inputs)
        if key not in self._examples:
            self._check_new_kind(key)
            self._examples[key] = ExampleCall(x, passed)
        return self._variants.module(self.model, key), passed

    def _check_new_kind(self, key: tuple[str, ...]) -> None:
        if not self._protected_once:
            return
        given = f"with {', '.join(key)} given" if key else \
            f"without {', '.join(self.layout.signature.optional)}"
        raise TaskError(
            f"this network has not been called {given} before, and trained tasks "
            f"{self.trained_tasks()} were already protected without such calls: what they "
            "compute for them is not guaranteed. Make such a call (net.eval(); "
            "net(x, task_id, ...)) before the second task begins")

    def has_example(self) -> bool:
        """Whether the network has seen an input (propagation can run)."""
        return bool(self._examples)

    def example_spec(self) -> tuple[tuple[int, ...], torch.dtype] | None:
        """Shape and dtype of the first example call's first tensor; None before a forward."""
        for example in self._examples.values():
            first = example.call[0]
            if isinstance(first, torch.Tensor):
                return tuple(first.shape), first.dtype
        return None

    def example_input(self) -> Call | None:
        """The main example call on the network's device, floats in its float dtype."""
        if not self._examples:
            return None
        example = next(iter(self._examples.values()))
        return example.on(example.call, self._float_parameter())

    def _float_parameter(self) -> torch.Tensor | None:
        return next((p for p in self.parameters() if p.is_floating_point()), None)

    def example_calls_spec(self) -> list[dict[str, Any]]:
        """Every example call as plain values, for a checkpoint (``set_example_calls``)."""
        return [{"given": list(key), "input": spec_of(ex.call[0]),
                 "inputs": spec_of(ex.call[1])} for key, ex in self._examples.items()]

    def set_example_calls(self, specs: list[dict[str, Any]]) -> None:
        """Use zeros of these shapes as the example calls (a reloaded network has seen none).

        Propagation reads only shapes from an example, never values, so zeros protect exactly
        what the original call did. Raises ``ValueError`` on a spec that does not fit.
        """
        param = self._float_parameter()
        device = param.device if param is not None else None
        examples = {}
        for spec in specs:
            key = tuple(spec["given"])
            if key and key not in self._variants.graphs:
                raise ValueError(f"the network has no graph for calls given {list(key)}")
            check_spec(spec["input"]), check_spec(spec["inputs"])
            call = (zeros_of(spec["input"], device), zeros_of(spec["inputs"], device))
            examples[key] = ExampleCall.of(call)
        self._examples = examples

    def set_example(self, shape: tuple[int, ...] | list[int],
                    dtype: torch.dtype = torch.float32) -> None:
        """Use zeros of ``shape`` as the example input of a one-input call."""
        self.set_example_calls([{"given": [], "inputs": {"dict": {}},
                                 "input": {"shape": [int(n) for n in shape],
                                           "dtype": str(dtype).removeprefix("torch.")}}])

    def input_masks(self, out_masks: dict[str, torch.Tensor], task_id: int
                    ) -> dict[str, torch.Tensor]:
        """Per gated layer, which input features use units in ``out_masks``: the union over
        every kind of call seen (propagation)."""
        if not self._examples:
            raise HATError("the network has not seen an input yet: run one forward pass so "
                           "that masks can be propagated through the graph")
        masks: dict[str, torch.Tensor] = {}
        for key, example in self._examples.items():
            found = self._propagate(key, example, out_masks, task_id)
            for path, mask in found.items():
                masks[path] = mask if path not in masks else torch.maximum(masks[path], mask)
        for path in self.layout.gated:  # a layer the propagation never reached: fully used
            if path not in masks:
                masks[path] = torch.ones(input_features(self.model.get_submodule(path)))
        return masks

    def _propagate(self, key: tuple[str, ...], example: ExampleCall,
                   out_masks: dict[str, torch.Tensor], task_id: int) -> dict[str, torch.Tensor]:
        """Propagation on the cut example call, else on the whole one (kept from then on)."""
        gm = self._variants.module(self.model, key)
        if not isinstance(gm, fx.GraphModule):  # a model kept whole: no graph to see into
            return {}
        like = self._float_parameter()
        error: Exception | None = None
        for call in example.candidates():
            try:
                found = input_masks(gm, self.layout, out_masks, example.on(call, like), task_id)
            except Exception as exc:  # the cut call may not fit the graph: try the whole one
                error = exc
                continue
            example.settle(call)
            return found
        assert error is not None
        raise error
