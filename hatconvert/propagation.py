"""Which input features of each gated layer earlier tasks use: cumulative masks through the graph.

The graph runs once (in eval mode: what earlier tasks compute) on a one-sample example while,
beside every real value, a 0/1 tensor of the same shape says which entries may be non-zero for
some earlier task. Gated layers emit their cumulative mask, a norm with a gate behind it too; how
every other op carries masks is the table in ``op_rules`` (element-wise ops by the value they
give a zero with these very arguments, structural ops by running them on the mask). A flatten
repeats each channel over the spatial positions by itself, because it is the same flatten run on
the mask. Anything the table does not cover (a norm whose output is not gated, an unknown op,
the model's input) counts as fully used: over-protecting costs capacity, under-protecting would
break earlier tasks.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .gates import HATGate, apply_gate, closed_rows_zeroed, gated_layer
from .layers import (TaskIndexed, gate_behind_norm, has_hooks, input_features, maps_zero_to_zero,
                     norm_channel_dim, train_only_types)
from .layout import Layout
from .op_rules import (ALL_DATA, CAST_METHODS, ELEMENTWISE_MODULES, MASKED_FILL, PRODUCTS,
                       QUOTIENTS, SHAPE_ONLY_OTHERS, STRUCTURAL_MODULES, SUMS, WHERE,
                       is_elementwise, is_structural, signed_interpolation, value_at_zero,
                       writes_first_argument)

__all__ = ['MaskPropagator', 'input_masks']

def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return isinstance(value, (tuple, list)) and any(_has_tensor(v) for v in value)


def _ones_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.ones_like(value, dtype=torch.float32)
    if isinstance(value, dict) and _has_tensor(value):
        return {k: _ones_like(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and _has_tensor(value):
        return [_ones_like(v) for v in value]
    return None


def _binary(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (value != 0).to(torch.float32)
    if isinstance(value, dict) and _has_tensor(value):
        return {k: _binary(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and _has_tensor(value):
        return [_binary(v) for v in value]
    return None


def _mutable(value: Any) -> Any:
    """``value`` with every list and dict (fx's immutable ones included) copied as plain ones."""
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_mutable(v) for v in value)
    return value


def _merged(real: Any, mask: Any) -> Any:
    """The mask of a value holding tensors: its recorded mask where there is one, ones for
    every other tensor (never the real value: a zero in the data is no proof of disuse)."""
    if isinstance(real, torch.Tensor):
        return mask.clone() if isinstance(mask, torch.Tensor) else _ones_like(real)
    if isinstance(real, dict):
        mask = mask if isinstance(mask, dict) else {}
        return {k: _merged(v, mask.get(k)) for k, v in real.items()}
    if isinstance(real, (tuple, list)):
        mask = mask if isinstance(mask, (tuple, list)) else [None] * len(real)
        return [_merged(r, m) for r, m in zip(real, mask)]
    return real


def _broadcast(vector: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[dim] = vector.shape[0]
    return vector.view(shape).expand(like.shape).to(torch.float32)


class MaskPropagator(fx.Interpreter):
    """Runs the HAT graph on a real example and, beside it, on masks of earlier tasks' use.

    ``placeholder_masks`` gives inputs a mask of their own (default: fully used).
    """

    def __init__(self, gm: fx.GraphModule, layout: Layout, unit_masks: dict[str, torch.Tensor],
                 placeholder_masks: dict[str, torch.Tensor] | None = None):
        super().__init__(gm)
        self.layout = layout
        self.gate_to_layer = {g.gate: path for path, g in layout.gated.items()}
        self.unit_masks = unit_masks  # cumulative mask (units,) per gated layer path
        self.placeholder_masks = placeholder_masks or {}
        self.masks: dict[fx.Node, Any] = {}
        self.input_masks: dict[str, torch.Tensor] = {}  # per gated layer: mask of its input

    # -- helpers ---------------------------------------------------------------------------
    def _mask_of(self, arg: Any) -> Any:
        """The mask of a node argument (ones for tensors without one), else the real value."""
        if isinstance(arg, fx.Node):
            real = self.env[arg]
            if _has_tensor(real):
                return _merged(real, self.masks.get(arg))
            return real
        return arg

    def _tensor_mask(self, arg: Any) -> torch.Tensor | float:
        """The mask of a tensor argument; a constant counts as used where it is non-zero."""
        if isinstance(arg, fx.Node) and isinstance(self.env[arg], torch.Tensor):
            return self._mask_of(arg)
        if isinstance(arg, (int, float, bool)):
            return float(arg != 0)
        return 1.0

    def _is_tensor(self, arg: Any) -> bool:
        """Whether an argument is, or holds, a tensor the graph computed."""
        found = []
        fx.node.map_aggregate(arg, lambda a: found.append(
            isinstance(a, fx.Node) and _has_tensor(self.env[a])))
        return any(found)

    def _real(self, arg: Any) -> Any:
        return fx.node.map_aggregate(arg, lambda a: self.env[a] if isinstance(a, fx.Node) else a)

    def _record_input(self, path: str, x: Any) -> None:
        """Note which input features of gated layer ``path`` may be non-zero (``x`` None:
        every one)."""
        if x is None:
            self.input_masks[path] = torch.ones(input_features(self.module.get_submodule(path)))
            return
        mask = self._tensor_mask(x)
        if not isinstance(mask, torch.Tensor):
            return
        g = self.layout.gated[path]
        # reduce to one value per input feature: channels (dim 1) for convs, last dim for Linear
        dims = [d for d in range(mask.ndim) if d != (mask.ndim - 1 if g.unit_dim == -1 else 1)]
        feature = mask.amax(dim=dims) if dims else mask
        previous = self.input_masks.get(path)
        self.input_masks[path] = feature if previous is None else torch.maximum(previous, feature)

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        """The node's arguments with fx's immutable lists and dicts made plain: generated code
        passes fresh lists, and functions may fill them in (torchvision's
        ``_get_window_and_shift_size`` writes into its ``window_size`` argument)."""
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    # -- the rules -------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        """Run the node for real, then give its result a mask by the op's rule."""
        result = super().run_node(n)
        if n.op == "placeholder" and isinstance(self.placeholder_masks.get(n.target),
                                                torch.Tensor):
            self.masks[n] = self.placeholder_masks[n.target].to(torch.float32)
            return result
        if n.op in ("placeholder", "get_attr", "output"):
            self.masks[n] = _ones_like(result)
            return result
        try:
            self.masks[n] = self._rule(n, result)
        except Exception:  # an op the masks cannot go through: fully used
            self.masks[n] = _ones_like(result)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if n.args and isinstance(n.args[0], fx.Node) and writes_first_argument(
                n.op, n.target, n.kwargs, module):
            self._after_write(n, n.args[0])
        return result

    def _after_write(self, n: fx.Node, written: fx.Node) -> None:
        """An op wrote ``written`` in place: every node that reads that memory gets the new
        mask (the node itself exactly, views of it conservatively: fully used)."""
        tensor = self.env.get(written)
        if not isinstance(tensor, torch.Tensor):
            return
        if n.target in (operator.setitem, "__setitem__"):
            new = self._setitem_mask(n, written, tensor)
        else:
            new = self.masks.get(n)
        storage = tensor.untyped_storage().data_ptr()
        for node, value in self.env.items():
            if node is n or not isinstance(value, torch.Tensor) or \
                    value.untyped_storage().data_ptr() != storage:
                continue
            same = isinstance(new, torch.Tensor) and value.shape == new.shape and \
                value.stride() == tensor.stride() and \
                value.storage_offset() == tensor.storage_offset()
            self.masks[node] = new.clone() if same else _ones_like(value)

    def _setitem_mask(self, n: fx.Node, written: fx.Node, tensor: torch.Tensor) -> Any:
        """``x[index] = value``: the mask of ``x`` with the value's mask (or used) there."""
        index, value = n.args[1], n.args[2]
        if self._is_tensor(index):
            return _ones_like(tensor)
        mask = self._tensor_mask(written).clone()
        value_mask = self._tensor_mask(value)
        mask[self._real(index)] = value_mask if isinstance(value_mask, torch.Tensor) \
            else float(value_mask)
        return mask

    def _rule(self, n: fx.Node, result: Any) -> Any:
        if not _has_tensor(result):
            return None
        if n.op == "call_module":
            return self._module_rule(n, self.module.get_submodule(n.target), result)
        if n.op == "call_function":
            special = self._hat_function_rule(n, result)
            if special is not None:
                return special
            return self._op_rule(n, n.target, n.target, result)
        if n.op == "call_method":
            name = n.target
            return self._op_rule(n, name, lambda self_, *a, **k: getattr(self_, name)(*a, **k),
                                 result)
        return _ones_like(result)

    def _module_rule(self, n: fx.Node, module: nn.Module, result: Any) -> Any:
        target = n.target
        if isinstance(module, HATGate):
            return None
        if target in self.layout.gated:  # a gated layer whose gate sits further on
            # a forward pre-hook may change what the layer reads: its input counts as used
            self._record_input(target, n.args[0] if not module._forward_pre_hooks else None)
            return _ones_like(result)
        if isinstance(module, TaskIndexed) and "gate" in n.kwargs:
            layer = self.gate_to_layer[n.kwargs["gate"].target]
            norm = module.copies[0]
            x = self.env[n.args[0]]
            if not gate_behind_norm(norm, x, n.kwargs.get("gate_dim", 1)):
                return _ones_like(result)  # gated before a norm that mixes its units
            return _broadcast(self.unit_masks[layer], result, norm_channel_dim(norm, x))
        if any(has_hooks(m) for m in module.modules()) and not isinstance(
                module, ELEMENTWISE_MODULES):  # a user's hook may change any value
            return _ones_like(result)
        if isinstance(module, TaskIndexed) and maps_zero_to_zero(module.copies[0]):
            # RMS norms and ``x * gamma`` scales: a zero entry stays zero
            return self._tensor_mask(n.args[0]) * torch.ones_like(result, dtype=torch.float32)
        if isinstance(module, ELEMENTWISE_MODULES + train_only_types()) and len(n.args) == 1 \
                and not n.kwargs:
            return self._elementwise(n, module, 0, result)
        if isinstance(module, STRUCTURAL_MODULES) and not signed_interpolation(module) \
                and len(n.args) == 1 and not n.kwargs:
            return _binary(module(self._mask_of(n.args[0])))
        return _ones_like(result)

    def _hat_function_rule(self, n: fx.Node, result: Any) -> Any:
        """Gates, folded layers and attention: None for any other function."""
        target = n.target
        if target is closed_rows_zeroed:  # the norm after it applies the gate
            self._record_input(n.args[1].target, n.args[0])
            return _ones_like(result)
        if target is gated_layer:
            layer = n.args[1].target
            self._record_input(layer, n.args[0])
            return _broadcast(self.unit_masks[layer], result, self.layout.gated[layer].unit_dim)
        if target is apply_gate:
            layer = self.gate_to_layer[n.args[1].target]
            return _broadcast(self.unit_masks[layer], result, n.args[2])
        if target is F.linear:  # F.linear(x, layer.weight, ...): its gate comes next
            weight = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            layer = getattr(weight, "target", "").rpartition(".")[0]
            if layer in self.layout.gated:
                self._record_input(layer, n.args[0] if n.args else n.kwargs.get("input"))
            return _ones_like(result)
        if target is F.scaled_dot_product_attention:
            value = self._tensor_mask(n.args[2])
            return value.amax(dim=-2, keepdim=True).expand(result.shape).contiguous()
        return None

    def _op_rule(self, n: fx.Node, target: Any, call: Any, result: Any) -> Any:
        """Element-wise, two-operand, ``where``/``masked_fill`` and structural ops."""
        tensors = [i for i, a in enumerate(n.args) if self._is_tensor(a)]
        tensor_kwargs = self._is_tensor(dict(n.kwargs))
        ones = torch.ones_like(result, dtype=torch.float32) \
            if isinstance(result, torch.Tensor) else None
        if target in CAST_METHODS:
            return self._tensor_mask(n.args[0]) * ones
        if target in WHERE and len(n.args) == 3:
            return torch.maximum(self._tensor_mask(n.args[1]) * ones,
                                 self._tensor_mask(n.args[2]) * ones)
        if target in MASKED_FILL and len(n.args) == 3:
            return torch.maximum(self._tensor_mask(n.args[0]) * ones,
                                 self._tensor_mask(n.args[2]) * ones)
        if len(tensors) == 2 and not tensor_kwargs and ones is not None:
            a, b = (self._tensor_mask(n.args[i]) * ones for i in tensors)
            if target in SUMS:
                return torch.maximum(a, b)
            if target in PRODUCTS:
                return torch.minimum(a, b)
            if target in QUOTIENTS and tensors[0] == 0:
                return a
        if is_elementwise(target) and len(tensors) == 1 and not tensor_kwargs:
            return self._elementwise(n, call, tensors[0], result)
        if is_structural(target):
            return self._structural(n, target, call, tensors, tensor_kwargs, result)
        return _ones_like(result)

    def _elementwise(self, n: fx.Node, call: Any, position: int, result: Any) -> Any:
        """``mask | (f(0) != 0)``: a zero entry becomes ``f(0)``, computed with these arguments."""
        if not isinstance(result, torch.Tensor):
            return _ones_like(result)
        args, kwargs = self._real(tuple(n.args)), self._real(dict(n.kwargs))
        at_zero = value_at_zero(call, args, kwargs, position, self.env[n.args[position]])
        if at_zero is None:
            return _ones_like(result)
        ones = torch.ones_like(result, dtype=torch.float32)
        made = (at_zero != 0).to(torch.float32).expand_as(ones)
        return torch.maximum(self._tensor_mask(n.args[position]) * ones, made)

    def _structural(self, n: fx.Node, target: Any, call: Any, tensors: list[int],
                    tensor_kwargs: bool, result: Any) -> Any:
        """Run the op on the masks of its data; other tensors (indices) make it fully used."""
        data = set(tensors) if target in ALL_DATA else {0}
        if target in SHAPE_ONLY_OTHERS:
            data = {0}
        elif any(i not in data for i in tensors) or tensor_kwargs:
            return _ones_like(result)
        if target is F.interpolate and signed_interpolation(self._real(dict(n.kwargs))):
            return _ones_like(result)
        args = tuple(fx.node.map_aggregate(a, self._mask_of) if i in data else self._real(a)
                     for i, a in enumerate(n.args))
        return _binary(call(*args, **self._real(dict(n.kwargs))))


def input_masks(gm: fx.GraphModule, layout: Layout, unit_masks: dict[str, torch.Tensor],
                example: torch.Tensor | tuple[Any, dict[str, Any]], task_id: int
                ) -> dict[str, torch.Tensor]:
    """For each gated layer, the cumulative mask of each input feature, given its units' masks.

    Runs the graph in eval mode under ``no_grad`` (no running statistics change) on
    ``example``: the first input and the others by name (or just the first input); inputs it
    does not give keep their defaults.
    """
    first, named = (example, {}) if isinstance(example, torch.Tensor) else example
    args = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.target == "task_id":
            args.append(task_id)
        elif node.target == "mask_scale":
            args.append(None)
        elif not args:
            args.append(first)
        elif node.target in named:
            args.append(named[node.target])
        else:
            args.append(node.args[0] if node.args else None)
    modes = {m: m.training for m in gm.modules()}
    # a graph may write buffers even in eval mode (self.seen.copy_(...)): put them back, so that
    # protection holds the values training left, not the ones this extra forward wrote
    buffers = [(b, b.clone()) for b in gm.buffers()]
    gm.eval()
    try:
        with torch.no_grad():
            propagator = MaskPropagator(gm, layout, unit_masks)
            propagator.run(*args)
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
    return propagator.input_masks
