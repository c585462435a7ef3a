"""Mixed-task batches: ``net(x, task_id=ids)`` in eval mode, each sample with its own task.

A graph pass turns the HAT graph into its mixed twin over the same modules (``mixed_twin``):
gate calls give per-sample masks, the functions that apply them apply those, task-indexed
norms, heads and leaves take the id tensor, and the uses of per-task parameters get
per-sample values (mixed_ops.py). The layers themselves run once on the whole batch. A twin
is checked against one run per task the first time it meets a batch of a new shape with
several tasks in it (``MixedRunner``), so a graph it misreads fails loudly, never silently.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from . import mixed_ops as ops
from .errors import MixedBatchError, TaskError
from .gates import HATGate, apply_gate, closed_rows_zeroed, gated_layer, scale_rows
from .layers import TaskIndexed, TaskParameter
from .layout import Layout
from .leaves import ScopedLeaf

__all__ = ['mixed_twin', 'check_task_ids', 'MixedRunner', 'mixed_forward']

_LAYER_FUNCTIONS = {F.linear: -1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1}  # -> the unit dim
_SAMPLE_FUNCTIONS = {apply_gate: ops.apply_sample_gate, gated_layer: ops.gated_layer_mixed,
                     closed_rows_zeroed: ops.closed_rows_zeroed_mixed}
_VIEW_METHODS = {"reshape", "view", "unsqueeze", "squeeze", "flatten", "permute", "transpose",
                 "to", "type", "type_as", "float", "half", "bfloat16", "contiguous", "clone"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze,
                   torch.flatten, torch.permute, torch.transpose}
_BINARY_METHODS = {"add", "mul", "sub", "div"}
_BINARY_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add,
                     torch.mul, torch.sub, torch.div}


def mixed_twin(gm: fx.GraphModule, layout: Layout) -> fx.GraphModule:
    """The mixed-task twin of ``gm``: same modules, every per-task choice made per sample."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    task = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "task_id")
    names = {path: original for original, path in layout.task_params.items()}
    origin: dict[fx.Node, str] = {}  # per-sample nodes -> the parameter they come from
    rows: set[fx.Node] = set()  # weights and biases with a gate folded into their rows
    for node in list(graph.nodes):
        if node.op == "call_module":
            _rewrite_call(gm, graph, node, task, layout, names, origin)
        elif node.op == "call_function" and node.target in _LAYER_FUNCTIONS \
                and _arg(node, 1, "weight") in rows:
            _gate_layer_function(graph, node, rows)
        elif node.op == "call_function" and node.target is scale_rows:
            rows.add(node)
        elif node.op == "call_function" and node.target in _SAMPLE_FUNCTIONS:
            node.target = _SAMPLE_FUNCTIONS[node.target]
        elif any(a in origin for a in node.all_input_nodes):
            _rewrite_parameter_use(graph, node, origin)
    for node in rows:
        if node.users:
            raise MixedBatchError(f"'{node.args[0].target}' is read by a function hatconvert "
                                  "cannot follow, with its gate folded into the rows, which "
                                  "differ per sample: run one task per call")
        graph.erase_node(node)
    for user in task.users:
        if not (user.op == "call_function" and user.target.__module__ == ops.__name__):
            raise MixedBatchError(f"the graph passes the task id to {_describe(user)}, which "
                                  "mixed-task batches do not know: run one task per call")
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"Mixed{type(gm).__name__}")


def _arg(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _gate_layer_function(graph: fx.Graph, node: fx.Node, rows: set[fx.Node]) -> None:
    """``F.conv2d(x, w * gate_rows, b * gate)`` (a layer the graph runs by its weight): the
    function on the plain weight and bias, then each sample's gate on its output."""
    weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    gate = weight.args[1]
    if bias is not None and not (bias in rows and _same_gate(bias.args[1], gate)):
        return  # a bias from elsewhere: left folded, refused below
    args, kwargs = list(node.args), dict(node.kwargs)
    for index, name, value in ((1, "weight", weight), (2, "bias", bias)):
        if value is None:
            continue
        if len(args) > index:
            args[index] = value.args[0]
        else:
            kwargs[name] = value.args[0]
    node.args, node.kwargs = tuple(args), kwargs
    with graph.inserting_after(node):
        gated = graph.call_function(ops.apply_sample_gate, (node, gate, _LAYER_FUNCTIONS[
            node.target]))
    node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)


def _same_gate(a: fx.Node, b: fx.Node) -> bool:
    """Two calls of one gate (each read of a weight or bias has its own)."""
    return a is b or a.args[0].target == b.args[0].target


def _rewrite_call(gm: fx.GraphModule, graph: fx.Graph, node: fx.Node, task: fx.Node,
                  layout: Layout, names: dict[str, str], origin: dict[fx.Node, str]) -> None:
    """Swap one module call that takes the task id for its mixed form."""
    module = gm.get_submodule(node.target)
    kwargs = dict(node.kwargs)
    if isinstance(module, HATGate):
        target, args = ops.sample_gates, (task,)
    elif isinstance(module, TaskParameter):
        target, args = ops.sample_parameter, (task,)
    elif isinstance(module, TaskIndexed):
        kwargs.pop("task_id")
        target, args = ops.task_indexed_mixed, (task, *node.args)
        if node.target in layout.heads:
            kwargs["pad_to"] = max(head_width(c) for c in module.copies)
    elif isinstance(module, ScopedLeaf) and "hat_task_id" in kwargs:
        target, args = ops.leaf_mixed, (task, *node.args)
    else:
        return
    with graph.inserting_before(node):
        owner = graph.get_attr(node.target)
        new = graph.call_function(target, (owner, *args), kwargs)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if target is ops.sample_parameter:
        origin[new] = names.get(node.target, node.target)


def head_width(head: torch.nn.Module) -> int:
    """A head's class count (its output units), for padding; 0 when unknown."""
    return getattr(head, "out_features", None) or getattr(head, "out_channels", None) or 0


def _rewrite_parameter_use(graph: fx.Graph, node: fx.Node, origin: dict[fx.Node, str]) -> None:
    """A use of per-sample parameter values: a view or cast stays per sample, an elementwise
    op with a batch tensor gives an ordinary tensor, and so does an expand over the batch."""
    name = next(origin[a] for a in node.all_input_nodes if a in origin)
    method = node.op == "call_method"
    fn = ops.op_name(node.target, method)
    first, *rest = node.args or (None,)
    only_first = first in origin and not any(a in origin for a in rest) and \
        not any(a in origin for a in node.kwargs.values())
    carried = [a in origin for a in node.args[:2]]
    if node.op not in ("call_method", "call_function"):
        pass
    elif node.target is F.linear and len(node.args) >= 2 and carried == [False, True] \
            and set(node.kwargs) <= {"bias"}:
        bias = _arg(node, 2, "bias")
        node.target, node.args = ops.per_sample_linear, (node.args[0], node.args[1], bias)
        node.kwargs = {"per_sample_bias": bias in origin}
        return
    elif method and node.target == "expand" and only_first:
        node.op, node.target = "call_function", ops.expand_over_batch
        return
    elif only_first and node.target in (_VIEW_METHODS if method else _VIEW_FUNCTIONS):
        node.op, node.target, node.args = "call_function", ops.per_sample_map, (fn, *node.args)
        origin[node] = name
        return
    elif node.target in (_BINARY_METHODS if method else _BINARY_FUNCTIONS) \
            and len(node.args) == 2 and not node.kwargs:
        if all(carried):
            node.op, node.target, node.args = "call_function", ops.per_sample_pair, (fn,
                                                                                     *node.args)
            origin[node] = name
        else:
            node.op, node.target = "call_function", ops.per_sample_binary
            node.args = (fn, *node.args, carried.index(True))
        return
    raise MixedBatchError(f"task-indexed parameter '{name}' is used by {_describe(node)}, which "
                          "mixed-task batches cannot give per-sample values to: run one task "
                          "per call")


def _describe(node: fx.Node) -> str:
    """A graph node as a user reads it: ``operator.matmul (node 'matmul')``."""
    if node.op == "call_function":
        what = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}"
    elif node.op == "call_method":
        what = f"the method .{node.target}()"
    elif node.op == "call_module":
        what = f"module '{node.target}'"
    else:
        what = node.op
    return f"{what} (graph node '{node.name}')"


def check_task_ids(ids: torch.Tensor, num_tasks: int, batch: int) -> torch.Tensor:
    """``ids`` as a long tensor, or an error naming what is wrong with it."""
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
        raise TaskError(f"task_id for a mixed batch must be an integer tensor of shape "
                        f"(batch,), got dtype {ids.dtype}")
    if ids.shape[0] != batch:
        raise TaskError(f"task_id has {ids.shape[0]} entries but the batch has {batch} "
                        "samples: give one task id per sample")
    bad = ((ids < 0) | (ids >= num_tasks)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise TaskError(f"task_id[{i}] is {int(ids[i])}, out of range: this network has "
                        f"{num_tasks} tasks (0 to {num_tasks - 1})")
    return ids.long()


class MixedRunner:
    """Runs mixed batches for one network: twins by graph, checked once per input shape."""

    def __init__(self) -> None:
        self._twins: dict[int, tuple[fx.GraphModule, fx.GraphModule]] = {}
        self._checked: set[tuple] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"_twins": {}, "_checked": set()}  # a copy builds its own over its own modules

    def __deepcopy__(self, memo: dict) -> "MixedRunner":
        return MixedRunner()

    def invalidate(self) -> None:
        """Forget twins and checks (the modules' tensors may have been replaced)."""
        self._twins.clear()
        self._checked.clear()

    def twin(self, gm: fx.GraphModule, layout: Layout) -> fx.GraphModule:
        """The mixed twin of ``gm``, built on first use."""
        entry = self._twins.get(id(gm))
        if entry is None or entry[0] is not gm:
            entry = self._twins[id(gm)] = (gm, mixed_twin(gm, layout))
        return entry[1]

    def needs_check(self, gm: fx.GraphModule, tasks: int, x: Any, inputs: dict) -> tuple:
        """The key of this kind of batch if it has several ``tasks`` and was not checked yet."""
        if tasks < 2:
            return ()
        shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                       for v in pytree.tree_leaves((x, inputs)))
        key = (id(gm), shapes)
        return key if key not in self._checked else ()

    def check(self, key: tuple, out: Any, reference: dict[int, tuple[torch.Tensor, Any]]) -> None:
        """Compare a mixed output with one run per task; remember the kind of batch if equal."""
        got, _ = pytree.tree_flatten(out)
        for t, (rows, expected) in reference.items():
            want, _ = pytree.tree_flatten(expected)
            if len(want) != len(got) or not all(map(lambda g, w: _agrees(g, w, rows), got, want)):
                raise MixedBatchError(
                    f"the mixed-task output for the samples of task {t} differs from running "
                    f"them alone with task_id={t}: this model's graph does something mixed "
                    "batches misread; run one task per call (and please report the model)")
        self._checked.add(key)


def _agrees(got: Any, want: Any, rows: torch.Tensor) -> bool:
    if not isinstance(got, torch.Tensor):
        return got == want
    if not isinstance(want, torch.Tensor) or got.ndim != want.ndim or got.ndim == 0:
        return False
    mine = got.detach().index_select(0, rows)
    for d in range(1, mine.ndim):
        if mine.shape[d] > want.shape[d]:  # a head padded with -inf to the widest head
            if not torch.isneginf(mine.narrow(d, want.shape[d], mine.shape[d] - want.shape[d])
                                  ).all():
                return False
            mine = mine.narrow(d, 0, want.shape[d])
    return mine.shape == want.shape and torch.allclose(mine, want.detach(), rtol=1e-4,
                                                       atol=1e-5, equal_nan=True)


def mixed_forward(net: Any, x: Any, ids: torch.Tensor, mask_scale: Any,
                  inputs: dict[str, Any]) -> Any:
    """``net(x, task_id=ids)`` for a batch whose samples belong to different tasks (eval)."""
    if net.training:
        raise TaskError("a task_id per sample (a mixed batch) is for evaluation only: one "
                        "task trains at a time; call net.eval() first, or give one task id")
    if mask_scale is not None:
        raise TaskError("a task_id per sample (a mixed batch) runs hard gates: give no "
                        "mask_scale")
    if net.layout.top_level is not None:
        raise MixedBatchError(f"{net.layout.signature.model} is kept whole (its forward does not "
                              "trace), so no graph can run its samples per task: run one task "
                              "per call")
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise MixedBatchError("a mixed batch needs its first input to be a tensor with the "
                              f"batch on dim 0, got {type(x).__name__}")
    ids = check_task_ids(ids.to(x.device), net.num_tasks, x.shape[0])
    present = torch.unique(ids).tolist()
    for t in present:
        if bool(net.trained[t]) and t != net.active_task:
            net._check_statistics_kept(t)
    if net._guard is not None:
        net._guard.restore()  # as for one task: undo changes made outside a hooked step
    graph, passed = net._route(x, inputs)
    if net._needs_arming:
        net._arm_or_abort()
    out = net._mixed.twin(graph, net.layout)(x, **passed, task_id=ids, mask_scale=None)
    key = net._mixed.needs_check(graph, len(present), x, passed)
    if key:
        net._mixed.check(key, out, _per_task(net, x, ids, inputs, present))
    return out


@torch.no_grad()
def _per_task(net: Any, x: torch.Tensor, ids: torch.Tensor, inputs: dict[str, Any],
              present: list[int]) -> dict[int, tuple[torch.Tensor, Any]]:
    """Each task's samples run alone with its id: what the mixed output must equal."""
    batch = x.shape[0]
    reference = {}
    for t in present:
        rows = (ids == t).nonzero().squeeze(1)
        take = (lambda v: v.index_select(0, rows)
                if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v)
        reference[t] = (rows, net(take(x), t, None, **pytree.tree_map(take, inputs)))
    return reference
