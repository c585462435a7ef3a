"""How each op carries "may be non-zero" masks: the table that mask propagation reads.

A mask holds 1 where an entry may be non-zero for some earlier task and 0 where it is exactly
zero for every earlier task and every input. An op is listed here only for what is true of it
whatever its arguments; what depends on the arguments is computed, never assumed:

* element-wise ops (``ELEMENTWISE_*``): ``out[i]`` depends on ``in[i]`` alone, so a zero entry
  becomes ``f(0)`` with the same other arguments. That value is computed on the spot
  (``f(zeros)``): ``hardtanh(x, 0.5, 2)``, ``threshold(x, 1, 3)``, ``clamp(x, min=0.1)``,
  ``x + 1`` or ``x ** 0`` turn zeros into non-zeros and so count as used, while ``relu`` or
  ``x * 2`` keep them. An element-wise op whose other arguments include a tensor is not known
  to keep zeros (that tensor may differ per task), unless a rule below covers it.
* structural ops (``STRUCTURAL_*``): they move, select, pool or sum entries with non-negative
  weights, so running the op on the mask itself gives the answer; index and shape arguments
  keep their real values, and a tensor among them (a data-dependent index) counts as used.
* two-tensor rules: a sum may be non-zero where either operand may (``max``), a product only
  where both may (``min``), a quotient where its numerator may; ``where`` and ``masked_fill``
  may take either operand or the fill value.
Anything else counts as fully used: over-protecting costs capacity, under-protecting would
change an earlier task.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ELEMENTWISE_FUNCTIONS', 'ELEMENTWISE_METHODS', 'CAST_METHODS', 'ELEMENTWISE_MODULES',
           'STRUCTURAL_MODULES', 'STRUCTURAL_FUNCTIONS', 'STRUCTURAL_METHODS', 'SHAPE_ONLY_OTHERS',
           'ALL_DATA', 'SIGNED_INTERPOLATION', 'IN_PLACE_FUNCTIONS', 'IN_PLACE_METHODS', 'SUMS',
           'PRODUCTS', 'QUOTIENTS', 'WHERE', 'MASKED_FILL', 'writes_first_argument',
           'is_elementwise', 'is_structural', 'signed_interpolation', 'value_at_zero']

ELEMENTWISE_FUNCTIONS: set[Callable] = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.selu, F.celu, F.hardtanh, F.threshold, F.softplus, F.softsign, F.logsigmoid, F.sigmoid,
    F.tanh, F.softshrink, F.hardshrink, F.tanhshrink, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.relu_, F.normalize,
    torch.relu, torch.relu_, torch.tanh, torch.sigmoid, torch.abs, torch.neg, torch.sin,
    torch.cos, torch.sinh, torch.asinh, torch.atan, torch.square, torch.sign, torch.exp,
    torch.erf, torch.sqrt, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
    torch.pow, torch.nan_to_num, operator.neg, operator.pos, operator.abs,
    # arithmetic with one tensor operand and a constant: computed like any element-wise op
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.floordiv, operator.mod, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
}
ELEMENTWISE_METHODS: set[str] = {
    "relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "abs", "abs_", "neg", "neg_",
    "square", "sign", "sin", "cos", "exp", "sqrt", "erf", "clamp", "clamp_", "clamp_min",
    "clamp_max", "clip", "pow", "nan_to_num", "add", "add_", "sub", "sub_", "mul", "mul_",
    "div", "div_", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
    "__truediv__", "__rtruediv__", "__pow__", "__rpow__", "__neg__",
}
# Casts and copies: a zero stays a zero in any dtype, on any device.
CAST_METHODS: set[str] = {"clone", "contiguous", "float", "half", "bfloat16", "double", "to",
                          "type_as", "type", "detach", "cpu", "cuda"}
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Threshold, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

STRUCTURAL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Upsample,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
STRUCTURAL_FUNCTIONS: set[Callable] = {
    torch.flatten, torch.cat, torch.concat, torch.stack, torch.reshape, torch.permute,
    torch.transpose, torch.roll, torch.flip, torch.squeeze, torch.unsqueeze, torch.chunk,
    torch.split, torch.unbind, torch.narrow, torch.select, torch.movedim, torch.mean, torch.sum,
    torch.amax, torch.matmul, torch.bmm, torch.einsum, operator.getitem, operator.matmul,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pixel_shuffle,
    F.pixel_unshuffle, F.pad,
}
STRUCTURAL_METHODS: set[str] = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "unsqueeze", "squeeze",
    "expand", "expand_as", "repeat", "chunk", "split", "unbind", "mean", "sum", "amax", "roll",
    "flip", "narrow", "select", "view_as", "reshape_as", "movedim", "t", "__getitem__",
    "matmul", "bmm",
}
# Methods whose other tensor argument only lends its shape or dtype.
SHAPE_ONLY_OTHERS = {"expand_as", "view_as", "reshape_as"}
# Ops whose every tensor argument carries data (the others' tensor arguments are indices).
ALL_DATA = {torch.matmul, torch.bmm, torch.einsum, operator.matmul, "matmul", "bmm",
            torch.cat, torch.concat, torch.stack}
# Interpolation with negative weights (bicubic, antialiasing) could cancel on a mask.
SIGNED_INTERPOLATION = ("bicubic",)

# Ops that write their first argument (besides methods named ``x_`` and ``inplace=True``).
IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.setitem}
IN_PLACE_METHODS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"}

SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
        "add", "add_", "sub", "sub_", "__add__", "__radd__", "__sub__", "__rsub__"}
PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"}
QUOTIENTS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_",
             "__truediv__"}
WHERE = {torch.where}
MASKED_FILL = {torch.masked_fill, "masked_fill", "masked_fill_"}


def writes_first_argument(op: str, target: Any, kwargs: dict, module: Any = None) -> bool:
    """Whether a graph node changes its first argument in place (``x.add_(1)``, ``x += y``,
    ``x[i] = v``, ``relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``)."""
    if op == "call_method":
        return target in IN_PLACE_METHODS or (target.endswith("_") and not target.endswith("__"))
    if op == "call_function":
        return target in IN_PLACE_FUNCTIONS or kwargs.get("inplace") is True or \
            getattr(target, "__name__", "").endswith("_")
    return op == "call_module" and getattr(module, "inplace", False) is True


def is_elementwise(target: Any) -> bool:
    """Whether ``target`` (a function or method name) is listed as element-wise."""
    return target in ELEMENTWISE_FUNCTIONS or target in ELEMENTWISE_METHODS


def is_structural(target: Any) -> bool:
    """Whether ``target`` moves, selects, pools or sums entries with non-negative weights."""
    return target in STRUCTURAL_FUNCTIONS or target in STRUCTURAL_METHODS


def signed_interpolation(module_or_kwargs: Any) -> bool:
    """True when an interpolation may use negative weights (so a mask could cancel to 0)."""
    if isinstance(module_or_kwargs, nn.Module):
        mode = getattr(module_or_kwargs, "mode", "nearest")
        return mode in SIGNED_INTERPOLATION
    mode = module_or_kwargs.get("mode", "nearest")
    return mode in SIGNED_INTERPOLATION or bool(module_or_kwargs.get("antialias", False))


def value_at_zero(call: Callable[..., Any], args: tuple, kwargs: dict, position: int,
                  like: torch.Tensor) -> torch.Tensor | None:
    """``call`` with the tensor at ``args[position]`` replaced by zeros: ``f(0)`` per entry.

    None when it cannot be computed (the op refuses zeros of that shape or dtype).
    """
    zeros = torch.zeros_like(like)
    args = args[:position] + (zeros,) + args[position + 1:]
    try:
        result = call(*args, **kwargs)
    except Exception:
        return None
    return result if isinstance(result, torch.Tensor) else None
