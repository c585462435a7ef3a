"""Which input features of each gated layer earlier tasks use: cumulative masks through the graph.

The graph runs once on a one-sample example while, beside every real value, a 0/1 tensor of the
same shape says which entries may be non-zero for some earlier task. Gated layers emit their
cumulative mask; ops that map zero to zero pass masks on (activations, dropout, pooling, shape
ops, products); residual adds take the maximum, concatenation concatenates, and a flatten repeats
each channel over the spatial positions by itself, because it is the same flatten run on the mask.
Everything else (sigmoid, adding a constant or a loose parameter, a norm whose output is not
gated, an op not listed, the model's input) counts as fully used: over-protecting costs capacity,
under-protecting would break earlier tasks.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .gates import HATGate, apply_gate, gated_layer
from .layers import TaskIndexed, maps_zero_to_zero, train_only_types
from .rewrite import Layout

# Element-wise functions f with f(0) == 0: a zero entry stays zero.
ZERO_PRESERVING_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.leaky_relu, F.elu, F.selu, F.celu,
    F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.softshrink, F.hardshrink,
    F.tanhshrink, torch.relu, torch.tanh, torch.abs, torch.neg, torch.sin, torch.sinh,
    torch.asinh, torch.atan, torch.square, torch.sign, torch.nn.functional.relu_, torch.relu_,
    operator.neg, F.normalize,
}
ZERO_PRESERVING_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "abs", "neg", "square", "sign", "clone", "contiguous",
    "float", "half", "bfloat16", "double", "to", "type_as", "detach",
}
ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardtanh, nn.Tanh, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
# Ops that move, select, pool or reduce entries: running them on the mask gives the answer.
STRUCTURAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Upsample,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle,
)
STRUCTURAL_FUNCTIONS = {
    torch.flatten, torch.cat, torch.concat, torch.stack, torch.reshape, torch.permute,
    torch.transpose, torch.roll, torch.flip, torch.squeeze, torch.unsqueeze, torch.chunk,
    torch.split, torch.unbind, torch.narrow, torch.select, torch.movedim, torch.mean, torch.sum,
    torch.amax, torch.matmul, torch.bmm, torch.einsum, operator.getitem, operator.matmul,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pixel_shuffle,
    F.pixel_unshuffle, torch.nn.functional.pad,
}
STRUCTURAL_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "unsqueeze", "squeeze",
    "expand", "expand_as", "repeat", "chunk", "split", "unbind", "mean", "sum", "amax", "roll",
    "flip", "narrow", "select", "view_as", "reshape_as", "movedim", "t", "__getitem__",
    "matmul", "bmm", "masked_fill",
}
MAXIMUM = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
MAXIMUM_METHODS = {"add", "add_", "sub", "sub_"}
MINIMUM = {operator.mul, operator.imul, torch.mul}
MINIMUM_METHODS = {"mul", "mul_"}
NUMERATOR = {operator.truediv, operator.itruediv, torch.div}
NUMERATOR_METHODS = {"div", "div_"}


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(_has_tensor(v) for v in value)


def _ones_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.ones_like(value, dtype=torch.float32)
    if isinstance(value, (tuple, list)) and _has_tensor(value):
        return [_ones_like(v) for v in value]
    return None


def _binary(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (value != 0).to(torch.float32)
    if isinstance(value, (tuple, list)) and _has_tensor(value):
        return [_binary(v) for v in value]
    return None


def _broadcast(vector: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[dim] = vector.shape[0]
    return vector.view(shape).expand(like.shape).to(torch.float32)


class MaskPropagator(fx.Interpreter):
    """Runs the HAT graph on a real example and, beside it, on masks of earlier tasks' use."""

    def __init__(self, gm: fx.GraphModule, layout: Layout, unit_masks: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.layout = layout
        self.gate_to_layer = {g.gate: path for path, g in layout.gated.items()}
        self.unit_masks = unit_masks  # cumulative mask (units,) per gated layer path
        self.masks: dict[fx.Node, Any] = {}
        self.input_masks: dict[str, torch.Tensor] = {}  # per gated layer: mask of its input

    # -- helpers ---------------------------------------------------------------------------
    def _mask_of(self, arg: Any) -> Any:
        """The mask of a node argument (ones for tensors without one), else the real value."""
        if isinstance(arg, fx.Node):
            real = self.env[arg]
            mask = self.masks.get(arg)
            if isinstance(real, torch.Tensor):
                return mask.clone() if isinstance(mask, torch.Tensor) else _ones_like(real)
            if isinstance(real, (tuple, list)) and mask is not None:
                return [m.clone() if isinstance(m, torch.Tensor) else r for m, r in zip(mask, real)]
            return real
        return arg

    def _mask_args(self, node: fx.Node) -> tuple[tuple, dict]:
        return (fx.node.map_aggregate(node.args, self._mask_of),
                fx.node.map_aggregate(node.kwargs, self._mask_of))

    def _tensor_mask(self, arg: Any) -> torch.Tensor | float:
        if isinstance(arg, fx.Node) and isinstance(self.env[arg], torch.Tensor):
            return self._mask_of(arg)
        return 1.0  # python numbers and constants count as non-zero

    def _record_input(self, path: str, x: Any) -> None:
        mask = self._tensor_mask(x)
        if not isinstance(mask, torch.Tensor):
            return
        g = self.layout.gated[path]
        # reduce to one value per input feature: channels (dim 1) for convs, last dim for Linear
        dims = [d for d in range(mask.ndim) if d != (mask.ndim - 1 if g.unit_dim == -1 else 1)]
        feature = mask.amax(dim=dims) if dims else mask
        previous = self.input_masks.get(path)
        self.input_masks[path] = feature if previous is None else torch.maximum(previous, feature)

    # -- the rules -------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op in ("placeholder", "get_attr", "output"):
            self.masks[n] = _ones_like(result)
            return result
        try:
            self.masks[n] = self._rule(n, result)
        except Exception:  # an op the masks cannot go through: fully used
            self.masks[n] = _ones_like(result)
        return result

    def _rule(self, n: fx.Node, result: Any) -> Any:
        if not _has_tensor(result):
            return None
        target = n.target
        if n.op == "call_module":
            module = self.module.get_submodule(target)
            if isinstance(module, HATGate):
                return None
            if target in self.layout.gated:  # a gated layer whose gate sits further on
                self._record_input(target, n.args[0])
                return _ones_like(result)
            if isinstance(module, TaskIndexed) and "gate" in n.kwargs:
                gate = n.kwargs["gate"]
                layer = self.gate_to_layer[gate.target]
                return _broadcast(self.unit_masks[layer], result, 1)
            if isinstance(module, TaskIndexed) and maps_zero_to_zero(module.copies[0]):
                # RMS norms and ``x * gamma`` scales: a zero entry stays zero
                return self._tensor_mask(n.args[0]) * torch.ones_like(result, dtype=torch.float32)
            if isinstance(module, ZERO_PRESERVING_MODULES + train_only_types()):
                return self._tensor_mask(n.args[0]) * torch.ones_like(result, dtype=torch.float32)
            if isinstance(module, STRUCTURAL_MODULES):
                args, kwargs = self._mask_args(n)
                return _binary(module(*args, **kwargs))
            return _ones_like(result)
        if n.op == "call_function":
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
            return self._elementwise_or_structural(n, target, result, ZERO_PRESERVING_FUNCTIONS,
                                                   STRUCTURAL_FUNCTIONS, MAXIMUM, MINIMUM,
                                                   NUMERATOR, call=target)
        if n.op == "call_method":
            return self._elementwise_or_structural(
                n, target, result, ZERO_PRESERVING_METHODS, STRUCTURAL_METHODS, MAXIMUM_METHODS,
                MINIMUM_METHODS, NUMERATOR_METHODS,
                call=lambda self_, *a, **k: getattr(self_, target)(*a, **k))
        return _ones_like(result)

    def _elementwise_or_structural(self, n, target, result, zero_preserving, structural, maximum,
                                   minimum, numerator, call) -> Any:
        if target in zero_preserving:
            return self._tensor_mask(n.args[0]) * torch.ones_like(result, dtype=torch.float32)
        if target in maximum or target in minimum or target in numerator:
            a, b = self._tensor_mask(n.args[0]), self._tensor_mask(n.args[1])
            ones = torch.ones_like(result, dtype=torch.float32)
            if target in numerator:
                return a * ones
            if target in minimum:
                return torch.minimum(a * ones, b * ones)
            return torch.maximum(a * ones, b * ones)
        if target in structural:
            args, kwargs = self._mask_args(n)
            return _binary(call(*args, **kwargs))
        return _ones_like(result)


def input_masks(gm: fx.GraphModule, layout: Layout, unit_masks: dict[str, torch.Tensor],
                example: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
    """For each gated layer, the cumulative mask of each input feature, given its units' masks.

    Runs the graph in eval mode under ``no_grad`` (no running statistics change) on ``example``.
    """
    args = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.target == "task_id":
            args.append(task_id)
        elif node.target == "mask_scale":
            args.append(None)
        elif not args:
            args.append(example)
        else:  # the model's other inputs keep their defaults
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
