"""Graph passes that turn a traced model into a HAT graph.

Each pass is a small function over the ``fx.GraphModule``: add the task inputs, task-index norms,
heads and leaves, gate the weighted layers, task-index or freeze loose parameters. The passes
record what they did in a ``Layout`` that the report, protection and checkpoints read.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .gates import (GATE_IN_NORM, GATE_IN_WEIGHT, GATE_ON_OUTPUT, HATGate, apply_gate,
                    can_fold_into_norm, can_fold_into_weight, gated_layer)
from .layers import (TaskIndexed, TaskParameter, is_gatable, is_norm, normalizes_each_unit,
                     output_units, unit_dim)

GATES = "hat_gates"
PARAMS = "hat_params"


@dataclass
class GatedLayer:
    """One gated layer: where it is, its gate, and the norm (if any) the gate sits behind."""

    path: str
    gate: str
    units: int
    unit_dim: int
    norm: str | None = None
    mode: str = "output"


@dataclass
class Layout:
    """What the conversion did, by module or parameter path in the converted graph module."""

    gated: dict[str, GatedLayer] = field(default_factory=dict)
    norms: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    task_leaves: list[str] = field(default_factory=list)
    frozen_leaves: list[str] = field(default_factory=list)
    task_params: dict[str, str] = field(default_factory=dict)  # original name -> new module path
    frozen_params: list[str] = field(default_factory=list)
    constant_buffers: list[str] = field(default_factory=list)
    frozen_in_gated: list[str] = field(default_factory=list)  # extra params of gated layers


def add_task_inputs(graph: fx.Graph) -> tuple[fx.Node, fx.Node]:
    """Add ``task_id`` and ``mask_scale`` placeholders after the model's own inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    taken = {n.target for n in placeholders}
    for name in ("task_id", "mask_scale"):
        if name in taken:
            raise ConversionError(f"the model already has an input named {name!r}; "
                                  "hatconvert adds that input itself")
    with graph.inserting_after(placeholders[-1] if placeholders else None):
        scale = graph.placeholder("mask_scale", default_value=None)
    with graph.inserting_before(scale):
        task = graph.placeholder("task_id", default_value=None)
    return task, scale


def calls_by_target(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def modules_read_directly(graph: fx.Graph) -> set[str]:
    """Module paths whose parameters the graph reads with get_attr (e.g. ``F.linear(x, m.weight)``)."""
    owners = set()
    for node in graph.nodes:
        if node.op == "get_attr" and "." in node.target:
            owners.add(node.target.rsplit(".", 1)[0])
    return owners


def find_output_layer(gm: fx.GraphModule) -> str | None:
    """The last gatable layer on the way back from the output: the default classifier."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    seen, frontier = set(), list(output.all_input_nodes)
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and is_gatable(gm.get_submodule(node.target)):
            return node.target
        frontier.extend(node.all_input_nodes)
    return None


def selected(path: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(path, p) for p in exclude))


def unique_name(prefix_module: nn.Module, path: str) -> str:
    base = path.replace(".", "_") or "root"
    name, k = base, 1
    while hasattr(prefix_module, name):
        k += 1
        name = f"{base}_{k}"
    return name


def has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def resized_head(head: nn.Module, classes: int, path: str) -> nn.Module:
    """A fresh head like ``head`` with ``classes`` outputs (Linear and plain ConvNd only)."""
    if output_units(head) == classes:
        return copy.deepcopy(head)
    weight = head.weight
    kw = dict(device=weight.device, dtype=weight.dtype)
    if type(head) is nn.Linear:
        return nn.Linear(head.in_features, classes, bias=head.bias is not None, **kw)
    if type(head) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and head.groups == 1:
        return type(head)(head.in_channels, classes, head.kernel_size, head.stride, head.padding,
                          head.dilation, 1, head.bias is not None, head.padding_mode, **kw)
    raise ConversionError(
        f"cannot give head '{path}' ({type(head).__name__}) {classes} classes: only nn.Linear "
        "and plain ConvNd heads can be resized; create the model with the right num_classes")


def task_index_calls(gm: fx.GraphModule, target: str, module: nn.Module, task: fx.Node) -> None:
    """Swap ``target`` for ``module`` and pass ``task_id`` to each of its calls."""
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
    for node in calls_by_target(gm.graph).get(target, []):
        node.kwargs = {**node.kwargs, "task_id": task}


def following_norm(node: fx.Node, norms: set[str], calls: dict[str, list[fx.Node]]) -> fx.Node | None:
    """The per-unit norm call that alone consumes this layer call's output, if there is one.

    The gate then goes behind the norm: a norm turns a zeroed channel back into a constant, and
    only a zero that stays zero lets later tasks reuse the next layer's weights. Norms that mix
    units (LayerNorm, grouped GroupNorm) come after the gate instead, and their output counts
    as used by every task.
    """
    users = list(node.users)
    if len(users) == 1:
        user = users[0]
        if (user.op == "call_module" and user.target in norms and len(calls[user.target]) == 1
                and user.args and user.args[0] is node
                and normalizes_each_unit(node.graph.owning_module.get_submodule(user.target))):
            return user
    return None


def gate_output(graph: fx.Graph, site: fx.Node, gate: fx.Node, dim: int) -> None:
    """Multiply the output of ``site`` by ``gate`` and make every user read the product."""
    with graph.inserting_after(site):
        gated = graph.call_function(apply_gate, (site, gate, dim))
    site.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)


def gate_call(gm: fx.GraphModule, node: fx.Node, gate_path: str, dim: int, norms: set[str],
              calls: dict[str, list[fx.Node]], task: fx.Node, scale: fx.Node) -> tuple[str, str | None]:
    """Gate one call of a layer; return how (a ``GATE_*`` mode) and behind which norm."""
    graph = gm.graph
    with graph.inserting_before(node):
        gate = graph.call_module(gate_path, (task, scale))
    norm = following_norm(node, norms, calls)
    if norm is not None:
        if can_fold_into_norm(gm.get_submodule(norm.target)):
            norm.kwargs = {**norm.kwargs, "gate": gate}
            return GATE_IN_NORM, norm.target
        gate_output(graph, norm, gate, dim)
        return GATE_ON_OUTPUT, norm.target
    if can_fold_into_weight(gm.get_submodule(node.target)) and len(node.args) == 1 \
            and not node.kwargs:
        with graph.inserting_before(node):
            layer = graph.get_attr(node.target)
            folded = graph.call_function(gated_layer, (node.args[0], layer, gate))
        node.replace_all_uses_with(folded)
        graph.erase_node(node)
        return GATE_IN_WEIGHT, None
    gate_output(graph, node, gate, dim)
    return GATE_ON_OUTPUT, None


def rewrite(gm: fx.GraphModule, num_tasks: int, *, head: str | None,
            head_classes: list[int] | None, mask_init: str, loose: str,
            include: list[str] | None, exclude: list[str] | None) -> Layout:
    """Rewrite ``gm`` in place into a HAT graph and return what was done."""
    layout = Layout()
    graph = gm.graph
    task, scale = add_task_inputs(graph)
    calls = calls_by_target(graph)
    read_directly = modules_read_directly(graph)
    if head is not None and head not in calls:
        raise ConversionError(f"head '{head}' is not called by the traced model; "
                              f"name a module the forward pass calls")

    gated_targets, norm_targets = [], []
    for target in calls:
        module = gm.get_submodule(target)
        if target == head or not has_state(module):
            continue
        if target in read_directly:
            task_index_or_freeze_leaf(gm, target, module, num_tasks, loose, task, layout)
        elif is_gatable(module) and selected(target, include, exclude):
            gated_targets.append(target)
        elif is_norm(module):
            norm_targets.append(target)
        else:
            task_index_or_freeze_leaf(gm, target, module, num_tasks, loose, task, layout)

    if head is not None:
        original = gm.get_submodule(head)
        copies = None
        if head_classes is not None:
            copies = [resized_head(original, c, head) for c in head_classes]
        task_index_calls(gm, head, TaskIndexed(original, num_tasks, copies), task)
        layout.heads.append(head)

    # Loose parameters first: the gating below adds get_attr nodes of its own.
    index_loose_attributes(gm, num_tasks, loose, task, layout)
    norm_set = set(norm_targets)
    gates_root = nn.Module()
    gm.add_module(GATES, gates_root)
    for target in gated_targets:
        module = gm.get_submodule(target)
        name = unique_name(gates_root, target)
        gates_root.add_module(name, HATGate(num_tasks, output_units(module), mask_init,
                                            device=module.weight.device))
        dim = unit_dim(module)
        for node in calls[target]:
            mode, norm = gate_call(gm, node, f"{GATES}.{name}", dim, norm_set, calls, task, scale)
        layout.gated[target] = GatedLayer(target, f"{GATES}.{name}", output_units(module), dim,
                                          norm, mode)
        layout.frozen_in_gated += [f"{target}.{n}" for n, _ in module.named_parameters()
                                   if n not in ("weight", "bias")]

    for target in norm_targets:
        task_index_calls(gm, target, TaskIndexed(gm.get_submodule(target), num_tasks), task)
        layout.norms.append(target)

    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return layout


def task_index_or_freeze_leaf(gm: fx.GraphModule, target: str, module: nn.Module, num_tasks: int,
                              loose: str, task: fx.Node, layout: Layout) -> None:
    """A leaf with weights hatconvert cannot gate: one copy per task, or frozen after task 0."""
    if loose == "task":
        task_index_calls(gm, target, TaskIndexed(module, num_tasks), task)
        layout.task_leaves.append(target)
    else:
        layout.frozen_leaves.append(target)


def index_loose_attributes(gm: fx.GraphModule, num_tasks: int, loose: str, task: fx.Node,
                           layout: Layout) -> None:
    """Parameters the graph reads directly: one copy per task, or frozen; buffers are constants."""
    params_root = nn.Module()
    gm.add_module(PARAMS, params_root)
    replaced: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, name)
        if not isinstance(value, nn.Parameter):
            if isinstance(value, torch.Tensor) and node.target not in layout.constant_buffers:
                layout.constant_buffers.append(node.target)
            continue
        if loose != "task":
            if node.target not in layout.frozen_params:
                layout.frozen_params.append(node.target)
            continue
        if node.target not in replaced:
            new = unique_name(params_root, node.target)
            params_root.add_module(new, TaskParameter(value, num_tasks))
            replaced[node.target] = f"{PARAMS}.{new}"
        with gm.graph.inserting_after(node):
            indexed = gm.graph.call_module(replaced[node.target], (task,))
        node.replace_all_uses_with(indexed)
        gm.graph.erase_node(node)
    for target, new_path in replaced.items():
        owner_path, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner_path) if owner_path else gm, name)
        layout.task_params[target] = new_path
