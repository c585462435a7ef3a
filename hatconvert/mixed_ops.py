"""What a mixed-task graph runs: per-sample gates, norms, parameters, and per-task groups.

Every function takes ``ids``, the task id of each sample (a ``(batch,)`` integer tensor), or
tensors already selected by it. Gates, exact BatchNorm/LayerNorm/GroupNorm copies and per-task
parameters have a batched form: one computation over the whole batch with per-sample values.
What has none (heads, other task-indexed modules, converted leaves) runs once per task present,
on that task's samples, and the pieces are put back in batch order (``grouped``).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .errors import MixedBatchError
from .layers import TaskIndexed, gate_behind_norm, norm_channel_dim

__all__ = ['sample_gates', 'apply_sample_gate', 'gated_layer_mixed',
           'closed_rows_zeroed_mixed', 'task_indexed_mixed', 'leaf_mixed', 'grouped',
           'sample_parameter', 'op_name', 'per_sample_map', 'per_sample_pair', 'per_sample_binary',
           'expand_over_batch', 'per_sample_linear']

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _check_batch(x: torch.Tensor, batch: int, what: str) -> None:
    if x.ndim == 0 or x.shape[0] != batch:
        raise MixedBatchError(f"{what} has shape {tuple(x.shape)}, whose dim 0 is not the batch "
                              f"of {batch} samples: mixed-task batches need the batch on dim 0 "
                              "wherever a task's gates or copies apply; run one task per call")


def sample_gates(gate: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each sample's hard gate: ``(batch, units)``, True where its task's unit is open."""
    return gate.embedding[ids] > 0


def _sample_view(values: torch.Tensor, ndim: int, dim: int, what: str) -> torch.Tensor:
    dim = dim % ndim
    if dim == 0:
        raise MixedBatchError(f"the units of {what} are on dim 0, the batch dim")
    shape = [1] * ndim
    shape[0], shape[dim] = values.shape[0], values.shape[1]
    return values.reshape(shape)


def apply_sample_gate(x: torch.Tensor, gates: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """``x`` with each sample's closed units exactly 0 along ``unit_dim``.

    On CPU a product with the 0/1 mask is several times faster than ``torch.where``, and exact
    wherever ``x`` is finite. A finite sum of the product shows that it is (an inf or NaN
    anywhere makes the sum inf or NaN); otherwise, as when a closed unit holds a later task's
    inf, the mask selects."""
    _check_batch(x, gates.shape[0], "a gated output")
    mask = _sample_view(gates, x.ndim, unit_dim, "a gated output")
    if x.device.type == "cpu" and x.is_floating_point():
        product = x * mask.to(x.dtype)
        if bool(torch.isfinite(product.sum())):
            return product
    return torch.where(mask, x, 0.0)


def gated_layer_mixed(x: torch.Tensor, layer: nn.Module, gates: torch.Tensor) -> torch.Tensor:
    """The layer on the whole batch, then each sample's gate on its output (no folding: the
    rows differ per sample)."""
    if isinstance(layer, nn.Linear):
        return apply_sample_gate(F.linear(x, layer.weight, layer.bias), gates, -1)
    return apply_sample_gate(layer._conv_forward(x, layer.weight, layer.bias), gates, 1)


def closed_rows_zeroed_mixed(x: torch.Tensor, layer: nn.Module, gates: torch.Tensor
                             ) -> torch.Tensor:
    """A layer whose task-indexed norm applies the gate: the norm's mixed form always selects
    closed units to exactly 0 (``task_indexed_mixed``), so nothing is zeroed before it."""
    return layer(x)


def _stacked(copies: list[nn.Module], name: str, ids: torch.Tensor) -> torch.Tensor | None:
    values = [getattr(c, name) for c in copies]
    if any(v is None for v in values):
        return None
    return torch.stack(values)[ids]


# Norm classes with a batched form here, by what they compute in eval mode; timm's subclasses
# compute what their torch parents do (LayerNorm2d over the channels of NCHW; BatchNormAct2d
# with its activation after).
_TIMM_FORMS = {"timm.layers.norm.LayerNorm": "layer", "timm.layers.norm.LayerNorm2d": "layer2d",
               "timm.layers.norm.GroupNorm": "group", "timm.layers.norm.GroupNorm1": "group",
               "timm.layers.norm_act.BatchNormAct2d": "batch"}


def norm_form(module: nn.Module) -> str | None:
    """``batch``, ``layer``, ``layer2d`` or ``group``: how copies of ``module`` run batched;
    None when they have no batched form here."""
    kind = type(module)
    if kind in _BATCH_NORMS:
        return "batch"
    if kind is nn.LayerNorm:
        return "layer"
    if kind is nn.GroupNorm:
        return "group"
    form = _TIMM_FORMS.get(f"{kind.__module__}.{kind.__qualname__}")
    if form == "batch" and any(True for m in _after(module) for _ in m.parameters()):
        return None  # an activation with weights of its own: run per task
    return form


def _after(norm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """What timm's BatchNormAct2d applies after the norm: its dropout and activation."""
    return getattr(norm, "drop", nn.Identity()), getattr(norm, "act", nn.Identity())


def batched_norm(copies: list[nn.Module], ids: torch.Tensor, x: torch.Tensor
                 ) -> torch.Tensor | None:
    """Each sample normalised by its task's copy in one computation; None when the copies
    have no batched form here (another class, training mode, no running statistics)."""
    first = copies[0]
    form = norm_form(first)
    if form is None or x.ndim < 2 or any(type(c) is not type(first) or c.training
                                         for c in copies):
        return None
    if form == "batch" and first.running_mean is None:
        return None
    _check_batch(x, ids.shape[0], f"the input of a task-indexed {type(first).__name__}")
    if form == "batch":
        drop, act = _after(first)
        return act(drop(_batch_norm(copies, ids, x)))
    if form == "layer2d":
        y = F.layer_norm(x.permute(0, 2, 3, 1), first.normalized_shape, None, None, first.eps)
        return _affine(copies, ids, y.permute(0, 3, 1, 2), 1)
    if form == "layer":
        y = F.layer_norm(x, first.normalized_shape, None, None, first.eps)
        return _affine(copies, ids, y, x.ndim - len(first.normalized_shape))
    return _affine(copies, ids, F.group_norm(x, first.num_groups, None, None, first.eps), 1)


def _batch_norm(copies: list[nn.Module], ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sample b's channel c as channel ``b * C + c`` of one sample: torch's own eval kernel."""
    batch = ids.shape[0]
    stats = [_stacked(copies, name, ids) for name in ("running_mean", "running_var", "weight",
                                                      "bias")]
    stats = [None if v is None else v.reshape(-1) for v in stats]
    y = F.batch_norm(x.reshape(1, batch * x.shape[1], *x.shape[2:]), stats[0], stats[1],
                     stats[2], stats[3], False, 0.0, copies[0].eps)
    return y.reshape(x.shape)


def _affine(copies: list[nn.Module], ids: torch.Tensor, y: torch.Tensor, start: int
            ) -> torch.Tensor:
    """Each sample's weight and bias (shape ``y.shape[start:...]``) applied from dim ``start``."""
    weight, bias = _stacked(copies, "weight", ids), _stacked(copies, "bias", ids)
    if weight is None and bias is None:
        return y
    units = (weight if weight is not None else bias).shape[1:]
    view = [ids.shape[0]] + [1] * (start - 1) + list(units) + \
        [1] * (y.ndim - start - len(units))
    if weight is not None:
        y = y * weight.reshape(view)
    return y if bias is None else y + bias.reshape(view)


def task_indexed_mixed(module: TaskIndexed, ids: torch.Tensor, *args: Any,
                       gate: torch.Tensor | None = None, gate_dim: int = 1,
                       pad_to: int | None = None, **kwargs: Any) -> Any:
    """``TaskIndexed.forward`` for a mixed batch: the norm batched where it can be, else run per
    task on its samples; the gate of the layer before, per sample, on the same side of it.
    ``pad_to``: a head's largest class count (outputs padded with -inf to it)."""
    copies = list(module.copies)
    x = args[0] if args else None
    if gate is not None and not gate_behind_norm(copies[0], x, gate_dim):
        args = (apply_sample_gate(x, gate, gate_dim),) + tuple(args[1:])
    out = batched_norm(copies, ids, args[0]) if len(args) == 1 and not kwargs else None
    if out is None:
        out = grouped(lambda t, a, k: copies[t](*a, **k), ids, args, kwargs, pad_to)
    if gate is not None and gate_behind_norm(copies[0], x, gate_dim):
        out = apply_sample_gate(out, gate, norm_channel_dim(copies[0], x))
    return out


def leaf_mixed(leaf: nn.Module, ids: torch.Tensor, *args: Any, hat_task_id: Any,
               hat_gates: tuple[torch.Tensor, ...], **kwargs: Any) -> Any:
    """A converted leaf runs once per task present, with that task's id and gates in scope."""
    def run(t: int, a: tuple, k: dict, rows: torch.Tensor) -> Any:
        return leaf(*a, hat_task_id=t, hat_gates=tuple(g[rows[0]] for g in hat_gates), **k)
    return grouped(run, ids, args, kwargs, with_rows=True)


def grouped(run: Callable[..., Any], ids: torch.Tensor, args: tuple, kwargs: dict,
            pad_to: int | None = None, with_rows: bool = False) -> Any:
    """``run(t, args, kwargs)`` on the samples of each task present; outputs in batch order.

    Tensors whose dim 0 is the batch are split; everything else is passed whole. Outputs that
    differ in one dim between tasks (heads of different class counts) are padded with -inf
    to ``pad_to`` (or the widest)."""
    batch = ids.shape[0]
    pieces, order = [], []
    for t in torch.unique(ids).tolist():
        rows = (ids == t).nonzero().squeeze(1)
        take = (lambda v: v.index_select(0, rows)
                if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v)
        a, k = pytree.tree_map(take, (tuple(args), dict(kwargs)))
        pieces.append(run(t, a, k, rows) if with_rows else run(t, a, k))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))
    flat = [pytree.tree_flatten(p) for p in pieces]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise MixedBatchError("a task-indexed module returns outputs of different structure "
                              "for different tasks: run one task per call")
    counts = [len(rows) for rows in order]
    leaves = [_combine([f[0][i] for f in flat], counts, inverse, pad_to)
              for i in range(len(flat[0][0]))]
    return pytree.tree_unflatten(leaves, spec)


def _combine(values: list[Any], counts: list[int], inverse: torch.Tensor, pad_to: int | None
             ) -> Any:
    """One output of every task's group, put back in batch order along its batch dim (0, or
    the one dim that holds each group's sample count, as in an LSTM's ``(layers, B, H)``)."""
    if not isinstance(values[0], torch.Tensor):
        if any(v != values[0] for v in values[1:]):
            raise MixedBatchError(f"a task-indexed module returns {values[0]!r} for one task and "
                                  f"{values[1]!r} for another: run one task per call")
        return values[0]
    ndim = values[0].ndim
    dims = [d for d in range(ndim) if all(v.ndim == ndim and v.shape[d] == n
                                          for v, n in zip(values, counts))]
    if not dims:
        raise MixedBatchError(f"a task-indexed module returns outputs of shapes "
                              f"{[tuple(v.shape) for v in values]} for groups of {counts} "
                              "samples: no batch dim; run one task per call")
    d = 0 if 0 in dims else dims[0]
    if len({tuple(v.shape[:d] + v.shape[d + 1:]) for v in values}) > 1:
        values = _padded(values, d, pad_to)
    return torch.cat(values, d).index_select(d, inverse)


def _padded(values: list[torch.Tensor], batch_dim: int, pad_to: int | None
            ) -> list[torch.Tensor]:
    """Pad the one dim in which outputs differ with -inf (logits of absent classes)."""
    differing = {d for d in range(values[0].ndim)
                 if d != batch_dim and len({v.shape[d] for v in values}) > 1}
    if len(differing) != 1:
        raise MixedBatchError("a task-indexed module returns outputs of different shapes for "
                              f"different tasks ({[tuple(v.shape) for v in values]}): run one "
                              "task per call")
    d = differing.pop()
    width = max([v.shape[d] for v in values] + ([pad_to] if pad_to else []))
    out = []
    for v in values:
        pad = [0, 0] * (v.ndim - 1 - d) + [0, width - v.shape[d]]
        out.append(F.pad(v, pad, value=-math.inf))
    return out


def sample_parameter(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each sample's copy of a task-indexed parameter: ``(batch, *shape)``."""
    return torch.stack(list(module.copies))[ids]


_FUNCTIONS = {f"{f.__module__}.{f.__name__}": f for f in (
    operator.getitem, operator.add, operator.mul, operator.sub, operator.truediv, torch.reshape,
    torch.unsqueeze, torch.squeeze, torch.flatten, torch.permute, torch.transpose, torch.add,
    torch.mul, torch.sub, torch.div)}


def op_name(op: Any, method: bool) -> str:
    """How a graph names an op for the functions below: ``Tensor.mul`` or ``operator.add``."""
    return f"Tensor.{op}" if method else f"{op.__module__}.{op.__name__}"


def _op(name: str) -> Callable[..., Any]:
    if name.startswith("Tensor."):
        return getattr(torch.Tensor, name[len("Tensor."):])
    return _FUNCTIONS[name]


def per_sample_map(op: str, values: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Op ``op`` applied to each sample's value (a view, a cast, a slice of a parameter)."""
    fn = _op(op)
    return torch.vmap(lambda v: fn(v, *args, **kwargs))(values)


def per_sample_binary(op: str, first: Any, second: Any, which: int) -> Any:
    """``op(first, second)`` where argument ``which`` holds per-sample values ``(batch, *s)``
    and the other is an ordinary tensor with the batch on dim 0 (or a number): each sample's
    value is broadcast against its own row, as in a run of that sample alone."""
    fn = _op(op)
    values, other = (first, second) if which == 0 else (second, first)
    if not isinstance(other, torch.Tensor) or other.ndim == 0:
        return torch.vmap(lambda v: fn(v, other) if which == 0 else fn(other, v))(values)
    batch, shape = values.shape[0], values.shape[1:]
    _check_batch(other, batch, "a tensor combined with a task-indexed parameter")
    if len(shape) < other.ndim:
        aligned = values.reshape(batch, *[1] * (other.ndim - 1 - len(shape)), *shape)
    elif len(shape) == other.ndim and shape[0] == 1:
        aligned = values.reshape(batch, *shape[1:])
    else:
        raise MixedBatchError(f"a task-indexed parameter of shape {tuple(shape)} is combined "
                              f"with a tensor of shape {tuple(other.shape)}: its batch dim is "
                              "not dim 0; run one task per call")
    return fn(aligned, other) if which == 0 else fn(other, aligned)


def per_sample_pair(op: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Op ``op`` on two per-sample values, sample by sample."""
    return torch.vmap(_op(op))(first, second)


def expand_over_batch(values: torch.Tensor, *sizes: Any) -> torch.Tensor:
    """``cls_token.expand(batch, -1, -1)``: a parameter whose dim 0 is 1 broadcast over the
    batch; with per-sample values each sample gets its own task's row."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    batch = values.shape[0]
    if not sizes or sizes[0] != batch or values.ndim < 2 or values.shape[1] != 1:
        raise MixedBatchError(f"a task-indexed parameter of shape {tuple(values.shape[1:])} is "
                              f"expanded to {tuple(sizes)}, not over the batch of {batch} "
                              "samples: run one task per call")
    return values.reshape(batch, *values.shape[2:]).expand(batch, *sizes[1:])


def per_sample_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      per_sample_bias: bool = False) -> torch.Tensor:
    """``F.linear`` with a task-indexed parameter as its weight: each sample's own weight
    ``(batch, out, in)`` (and bias), one batched product."""
    batch = weight.shape[0]
    _check_batch(x, batch, "the input of F.linear with a task-indexed weight")
    y = torch.einsum("b...i,boi->b...o", x, weight)
    if bias is None:
        return y
    if per_sample_bias:
        bias = bias.reshape(batch, *[1] * (y.ndim - 2), bias.shape[-1])
    return y + bias
