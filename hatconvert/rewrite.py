"""Graph passes that turn a traced model into a HAT graph.

Each pass is a small function over the ``fx.GraphModule``: add the task inputs, task-index norms,
heads and leaves, gate the weighted layers, task-index or freeze loose parameters. The passes
record what they did in a ``Layout`` that the report, protection and checkpoints read.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .embeddings import EmbeddingPolicy
from .errors import ConversionError
from .gates import (HATGate, apply_gate, can_fold_into_norm, can_fold_into_weight,
                    closed_rows_zeroed, gated_layer, scale_rows)
from .layers import (TaskIndexed, TaskParameter, gate_node, has_hooks, is_gatable, is_norm,
                     normalizes_each_unit, output_units, rows_are_units, unit_dim)
from .layout import GATES, PARAMS, GatedLayer, GatePlacement, Layout
from .leaves import apply_plan, plan_leaf, route_calls
from .op_rules import IN_PLACE_FUNCTIONS, IN_PLACE_METHODS

__all__ = ['add_task_inputs', 'calls_by_target', 'modules_read_directly', 'functional_layers',
           'rows_read_directly', 'mutated_buffers', 'output_layers', 'find_output_layer',
           'selected', 'unique_name', 'final_layers', 'has_state', 'resized_head', 'task_index_calls',
           'following_norm', 'gate_output', 'gate_call', 'Pass', 'rewrite', 'sort_calls',
           'index_heads', 'gate_called_layer', 'extra_parameters', 'add_gate', 'gate_functional',
           'gate_rows', 'convert_leaf', 'check_initialized', 'task_index_or_freeze_leaf', 'index_loose_attributes']

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
    """The ``call_module`` nodes of ``graph``, by module path."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def modules_read_directly(graph: fx.Graph) -> set[str]:
    """Module paths whose tensors the graph reads with get_attr (``F.linear(x, m.weight)``)."""
    owners = set()
    for node in graph.nodes:
        if node.op == "get_attr" and "." in node.target:
            owners.add(node.target.rsplit(".", 1)[0])
    return owners


def _arg(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def functional_layers(gm: fx.GraphModule, calls: dict[str, list[fx.Node]]
                      ) -> dict[str, list[fx.Node]]:
    """Linear layers used only as ``F.linear(x, layer.weight, bias)`` (beit, eva, swinv2).

    Such a layer is gated like a called one, on the output of each ``F.linear``. Only when every
    read of its weight and bias is an argument of such a call: any other use of them is unknown.
    """
    reads: dict[str, list[fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        owner, _, name = node.target.rpartition(".")
        if name in ("weight", "bias") and owner:
            reads.setdefault(owner, []).append(node)
    found: dict[str, list[fx.Node]] = {}
    for owner, nodes in reads.items():
        if owner in calls or not isinstance(gm.get_submodule(owner), nn.Linear):
            continue
        users = {u for n in nodes for u in n.users}
        ok = all(u.op == "call_function" and u.target is F.linear for u in users)
        for u in users if ok else ():
            weight = _arg(u, 1, "weight")
            ok &= isinstance(weight, fx.Node) and weight.target == f"{owner}.weight"
            ok &= _arg(u, 0, "input") not in nodes
        if ok and users:
            found[owner] = sorted(users, key=lambda n: list(gm.graph.nodes).index(n))
    return found


def rows_read_directly(gm: fx.GraphModule, calls: dict[str, list[fx.Node]],
                       skip: set[str]) -> dict[str, list[fx.Node]]:
    """Layers never called whose weight and bias the graph reads for other uses (a function fx
    does not trace, such as torchvision's ``shifted_window_attention(x, qkv.weight, ...)``).

    Each read gets the gate folded into the rows: row ``o`` belongs to unit ``o``, so whatever
    the function does with it, a closed unit's row is zero. Protection cannot follow the use,
    so the whole row of a unit an earlier task uses is kept.
    """
    reads: dict[str, list[fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        owner, _, name = node.target.rpartition(".")
        if owner and owner not in skip and owner not in calls:
            reads.setdefault(owner, []).append(node)
    found = {}
    for owner, nodes in reads.items():
        module = gm.get_submodule(owner)
        names = {n.target.rpartition(".")[2] for n in nodes}
        if rows_are_units(module) and names <= {"weight", "bias"}:
            found[owner] = nodes
    return found




def mutated_buffers(graph: fx.Graph) -> set[str]:
    """Buffers the graph writes in place (``self.running_var.copy_(...)``): not constants."""
    out = set()
    for node in graph.find_nodes(op="get_attr"):
        for user in node.users:
            name = str(user.target)
            writes = (user.op == "call_method" and (name.endswith("_") and not name.endswith("__")
                                                    or name in IN_PLACE_METHODS)
                      or user.op == "call_function" and user.target in IN_PLACE_FUNCTIONS)
            if writes and user.args and user.args[0] is node:
                out.add(node.target)
    return out


def output_layers(gm: fx.GraphModule) -> list[str]:
    """Every gatable layer that reaches the output without passing another gatable layer."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    seen, found, frontier = set(), [], list(output.all_input_nodes)
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and is_gatable(gm.get_submodule(node.target)):
            if node.target not in found:
                found.append(node.target)
            continue
        frontier.extend(node.all_input_nodes)
    return found


def final_layers(gm: fx.GraphModule) -> list[str]:
    """The output layers that are classifiers: each feeds the output through stateless ops
    only (no norm, no other layer, no module with weights), so its units are the outputs.

    A ``features_only`` backbone ends in norms and activations: it has none. Two classifiers
    summed into the output (torchvision's LRASPP) are both final.
    """
    found = []
    for path in output_layers(gm):
        starts = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
        seen, frontier, final = set(), [u for n in starts for u in n.users], True
        while frontier and final:
            node = frontier.pop()
            if node in seen or node.op == "output":
                continue
            seen.add(node)
            if node.op == "call_module" and has_state(gm.get_submodule(node.target)):
                final = False
            frontier.extend(node.users)
        if final:
            found.append(path)
    return found


def find_output_layer(gm: fx.GraphModule) -> str | None:
    """The last gatable layer on the way back from the output: the default classifier."""
    layers = output_layers(gm)
    return layers[0] if layers else None


def selected(path: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether ``path`` passes the ``include``/``exclude`` patterns."""
    if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(path, p) for p in exclude))


def unique_name(prefix_module: nn.Module, path: str) -> str:
    """A child name for ``path`` that ``prefix_module`` does not hold yet."""
    base = path.replace(".", "_") or "root"
    name, k = base, 1
    while hasattr(prefix_module, name):
        k += 1
        name = f"{base}_{k}"
    return name


def has_state(module: nn.Module) -> bool:
    """Whether ``module`` holds any parameter or buffer."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def resized_head(head: nn.Module, classes: int, path: str) -> nn.Module:
    """A copy of ``head`` with ``classes`` outputs, freshly initialised when the size changes.

    Works for Linear and ungrouped ConvNd and their subclasses (timm's ``Linear``): the copy
    keeps the class and its forward, with new weight and bias of the new size.
    """
    new = copy.deepcopy(head)
    if output_units(head) == classes:
        return new
    grouped = getattr(head, "groups", 1) != 1 or getattr(head, "transposed", False)
    if not isinstance(head, (nn.Linear, _ConvNd)) or grouped:
        raise ConversionError(
            f"cannot give head '{path}' ({type(head).__name__}) {classes} classes: only Linear "
            "and ungrouped ConvNd heads can be resized; create the model with the right "
            "num_classes")
    weight = head.weight
    new.weight = nn.Parameter(weight.new_empty((classes, *weight.shape[1:])))
    if head.bias is not None:
        new.bias = nn.Parameter(head.bias.new_empty(classes))
    if isinstance(head, nn.Linear):
        new.out_features = classes
    else:
        new.out_channels = classes
    new.reset_parameters()
    return new


def task_index_calls(gm: fx.GraphModule, target: str, module: nn.Module, task: fx.Node) -> None:
    """Swap ``target`` for ``module`` and pass ``task_id`` to each of its calls."""
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
    for node in calls_by_target(gm.graph).get(target, []):
        node.kwargs = {**node.kwargs, "task_id": task}


def following_norm(node: fx.Node, norms: set[str], calls: dict[str, list[fx.Node]]
                   ) -> fx.Node | None:
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


def replace_call(graph: fx.Graph, node: fx.Node, function: Any, gate: fx.Node) -> fx.Node:
    """Replace the layer call ``node`` by ``function(x, layer, gate)``."""
    with graph.inserting_before(node):
        layer = graph.get_attr(node.target)
        call = graph.call_function(function, (node.args[0], layer, gate))
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call


def gate_output(graph: fx.Graph, site: fx.Node, gate: fx.Node, dim: int) -> None:
    """Multiply the output of ``site`` by ``gate`` and make every user read the product."""
    with graph.inserting_after(site):
        gated = graph.call_function(apply_gate, (site, gate, dim))
    site.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)


def gate_call(gm: fx.GraphModule, node: fx.Node, gate_path: str, dim: int, norms: set[str],
              calls: dict[str, list[fx.Node]], task: fx.Node, scale: fx.Node
              ) -> tuple[GatePlacement, str | None]:
    """Gate one call of a layer; return how (a ``GatePlacement``) and behind which norm."""
    graph = gm.graph
    with graph.inserting_before(node):
        gate = gate_node(graph, gate_path, task, scale)
    norm = following_norm(node, norms, calls)
    layer = gm.get_submodule(node.target)
    foldable_rows = can_fold_into_weight(layer) and not has_hooks(layer) and \
        len(node.args) == 1 and not node.kwargs
    if norm is not None:  # the task-indexed norm applies the gate (layers.TaskIndexed)
        norm.kwargs = {**norm.kwargs, "gate": gate, "gate_dim": dim}
        if foldable_rows:  # hard gates also zero the closed rows: the norm then sees zeros
            replace_call(graph, node, closed_rows_zeroed, gate)
        module = gm.get_submodule(norm.target)
        foldable = can_fold_into_norm(module) and not has_hooks(module)
        return (GatePlacement.NORM if foldable else GatePlacement.OUTPUT), norm.target
    if foldable_rows:
        replace_call(graph, node, gated_layer, gate)
        return GatePlacement.WEIGHT, None
    gate_output(graph, node, gate, dim)
    return GatePlacement.OUTPUT, None


@dataclass
class Pass:
    """What every step of one rewrite shares: the graph, the options, the task inputs."""

    gm: fx.GraphModule
    num_tasks: int
    mask_init: str
    loose: str
    include: list[str] | None
    exclude: list[str] | None
    leaves: str
    task: fx.Node
    scale: fx.Node
    layout: Layout
    calls: dict[str, list[fx.Node]]
    leaf_heads: dict[str, list[nn.Module]] | None = None  # heads inside leaves: their copies
    embeddings: EmbeddingPolicy = field(default_factory=EmbeddingPolicy)

    def selected(self, path: str) -> bool:
        """Whether ``path`` passes the ``include``/``exclude`` patterns."""
        return selected(path, self.include, self.exclude)


def rewrite(gm: fx.GraphModule, num_tasks: int, *, head: str | list[str] | None,
            head_classes: list[int] | None, mask_init: str, loose: str,
            include: list[str] | None, exclude: list[str] | None,
            leaves: str = "convert", embeddings: str = "loose") -> Layout:
    """Rewrite ``gm`` in place into a HAT graph and return what was done.

    ``head`` is one module path or several (models with one classifier per branch).
    ``leaves``: ``convert`` gates the layers inside leaf modules (see leaves.py); ``loose``
    treats every leaf with weights by the ``loose`` policy. ``embeddings``: which embedding
    tables are frozen instead (embeddings.py).
    """
    policy = EmbeddingPolicy.for_model(embeddings, gm)
    task, scale = add_task_inputs(gm.graph)
    p = Pass(gm, num_tasks, mask_init, loose, include, exclude, leaves, task, scale, Layout(),
             calls_by_target(gm.graph), embeddings=policy)
    heads = [] if head is None else [head] if isinstance(head, str) else list(head)
    for path in heads:
        if path not in p.calls and not any(path.startswith(f"{c}.") for c in p.calls):
            raise ConversionError(f"head '{path}' is not called by the traced model; "
                                  f"name a module the forward pass calls")
    functional = {path: nodes for path, nodes in functional_layers(gm, p.calls).items()
                  if path not in heads and p.selected(path)}
    row_reads = {path: nodes for path, nodes in
                 rows_read_directly(gm, p.calls, set(functional) | set(heads)).items()
                 if p.selected(path)}
    gm.add_module(GATES, nn.Module())
    p.leaf_heads = {h: head_copies(gm.get_submodule(h), h, num_tasks, head_classes)
                    for h in heads if h not in p.calls}
    gated_targets, norm_targets = sort_calls(p, heads)
    index_heads(p, [h for h in heads if h in p.calls], head_classes)
    for h in p.leaf_heads:
        if h not in p.layout.heads:
            raise ConversionError(f"head '{h}' sits inside leaf module that is not converted "
                                  "(leaves='loose', or no layer to gate beside it): name the "
                                  "leaf itself as the head")
    # Loose parameters first: the gating below adds get_attr nodes of its own.
    skip = {f"{path}.{name}" for path in [*functional, *row_reads]
            for name in ("weight", "bias")}
    skip |= {node.target for node in gm.graph.find_nodes(op="get_attr")
             if node.target.rpartition(".")[0] in p.layout.frozen_leaves}
    index_loose_attributes(gm, num_tasks, loose, task, p.layout, skip, mutated_buffers(gm.graph))
    for target in gated_targets:
        gate_called_layer(p, target, set(norm_targets))
    for target, nodes in functional.items():
        gate_functional(gm, target, nodes, num_tasks, mask_init, task, scale, p.layout)
    for target, nodes in row_reads.items():
        gate_rows(gm, target, nodes, num_tasks, mask_init, task, scale, p.layout)
    for target in norm_targets:
        task_index_calls(gm, target, TaskIndexed(gm.get_submodule(target), num_tasks), task)
        p.layout.norms.append(target)
    p.layout.frozen_embeddings = dict(policy.frozen)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return p.layout


def sort_calls(p: Pass, heads: list[str]) -> tuple[list[str], list[str]]:
    """Layers to gate and norms to task-index; leaves are converted or indexed on the way."""
    gated, norms = [], []
    read_directly = modules_read_directly(p.gm.graph)
    for target in p.calls:
        module = p.gm.get_submodule(target)
        if target in heads or not has_state(module):
            continue
        if target in read_directly:  # called, and its tensors read too: one frozen copy
            p.layout.frozen_leaves.append(target)
        elif p.embeddings.freezes(module):
            p.embeddings.record(target, module)
            p.layout.frozen_leaves.append(target)
        elif is_gatable(module) and p.selected(target):
            check_initialized(module, target)
            gated.append(target)
        elif is_norm(module):
            norms.append(target)
        elif not (p.leaves == "convert" and convert_leaf(p, target)):
            task_index_or_freeze_leaf(p.gm, target, module, p.num_tasks, p.loose, p.task,
                                      p.layout)
    return gated, norms


def check_initialized(layer: nn.Module, path: str) -> None:
    """Refuse a lazy layer whose weight has no shape yet (``nn.LazyLinear``, PyG's
    ``Linear(-1, n)``): its units are unknown until it has run."""
    if any(isinstance(t, nn.parameter.UninitializedParameter) for t in layer.parameters()):
        raise ConversionError(f"layer '{path}' ({type(layer).__name__}) has uninitialized "
                              "(lazy) parameters: run the model once on an input before "
                              "converting it, so that their shapes are known")


def head_copies(head: nn.Module, path: str, num_tasks: int, head_classes: list[int] | None
                ) -> list[nn.Module]:
    """One copy of the head per task, resized to each task's class count."""
    if head_classes is None:
        return [copy.deepcopy(head) for _ in range(num_tasks)]
    return [resized_head(head, c, path) for c in head_classes]


def index_heads(p: Pass, heads: list[str], head_classes: list[int] | None) -> None:
    """One copy of each head per task, resized to each task's class count."""
    for path in heads:
        original = p.gm.get_submodule(path)
        copies = head_copies(original, path, p.num_tasks, head_classes)
        task_index_calls(p.gm, path, TaskIndexed(original, p.num_tasks, copies), p.task)
        p.layout.heads.append(path)


def gate_called_layer(p: Pass, target: str, norms: set[str]) -> None:
    """Gate every call of the layer ``target`` and record how."""
    module = p.gm.get_submodule(target)
    gate_path = add_gate(p.gm.get_submodule(GATES), target, module, p.num_tasks, p.mask_init)
    dim = unit_dim(module)
    for node in p.calls[target]:
        mode, norm = gate_call(p.gm, node, gate_path, dim, norms, p.calls, p.task, p.scale)
    p.layout.gated[target] = GatedLayer(target, gate_path, output_units(module), dim, norm, mode)
    p.layout.frozen_in_gated += extra_parameters(module, target)


def extra_parameters(module: nn.Module, path: str) -> list[str]:
    """Parameters of a gated layer besides its weight and bias: frozen after task 0."""
    return [f"{path}.{n}" for n, _ in module.named_parameters() if n not in ("weight", "bias")]


def add_gate(gates_root: nn.Module, target: str, layer: nn.Module, num_tasks: int,
             mask_init: str) -> str:
    """Create the gate of layer ``target`` under ``hat_gates``; return the gate's path."""
    name = unique_name(gates_root, target)
    gates_root.add_module(name, HATGate(num_tasks, output_units(layer), mask_init,
                                        device=layer.weight.device))
    return f"{GATES}.{name}"


def gate_functional(gm: fx.GraphModule, target: str, nodes: list[fx.Node], num_tasks: int,
                    mask_init: str, task: fx.Node, scale: fx.Node, layout: Layout) -> None:
    """Gate each ``F.linear(x, target.weight, bias)`` on its output, as if the layer were called."""
    module = gm.get_submodule(target)
    gate_path = add_gate(gm.get_submodule(GATES), target, module, num_tasks, mask_init)
    external = False
    for node in nodes:
        bias = _arg(node, 2, "bias")
        external |= bias is not None and getattr(bias, "target", None) != f"{target}.bias"
        with gm.graph.inserting_before(node):
            gate = gate_node(gm.graph, gate_path, task, scale)
        gate_output(gm.graph, node, gate, -1)
    layout.gated[target] = GatedLayer(target, gate_path, output_units(module), -1, None,
                                      GatePlacement.FUNCTION, external_bias=external)
    layout.frozen_in_gated += extra_parameters(module, target)


def gate_rows(gm: fx.GraphModule, target: str, reads: list[fx.Node], num_tasks: int,
              mask_init: str, task: fx.Node, scale: fx.Node, layout: Layout) -> None:
    """Give every read of ``target``'s weight and bias the gate folded into the rows."""
    module = gm.get_submodule(target)
    gate_path = add_gate(gm.get_submodule(GATES), target, module, num_tasks, mask_init)
    graph = gm.graph
    for node in reads:
        with graph.inserting_after(node):
            gate = gate_node(graph, gate_path, task, scale)
        with graph.inserting_after(gate):
            folded = graph.call_function(scale_rows, (node, gate))
        node.replace_all_uses_with(folded, delete_user_cb=lambda user: user is not folded)
    layout.gated[target] = GatedLayer(target, gate_path, output_units(module), unit_dim(module),
                                      None, GatePlacement.ROWS)
    layout.frozen_in_gated += extra_parameters(module, target)


def convert_leaf(p: Pass, target: str) -> bool:
    """Convert inside the leaf ``target`` (leaves.py); False when it holds no layer to gate.

    Heads inside the leaf (``head='leaf.fc'``) get one copy per task, never a gate.
    """
    module = p.gm.get_submodule(target)
    inside = {h: c for h, c in (p.leaf_heads or {}).items() if h.startswith(f"{target}.")}
    plan = plan_leaf(module, target, lambda path: p.selected(path) and path not in inside,
                     p.loose, heads=inside, embeddings=p.embeddings)
    if not plan.layers:  # nothing to gate inside: the loose policy decides
        if inside:
            raise ConversionError(f"head {', '.join(inside)} sits in leaf '{target}', which "
                                  "holds no other layer to gate: name the leaf as the head")
        return False
    gates_root = p.gm.get_submodule(GATES)
    gate_paths = [add_gate(gates_root, path, layer, p.num_tasks, p.mask_init)
                  for path, layer in plan.layers]
    apply_plan(p.gm, target, plan, p.num_tasks)
    route_calls(p.gm.graph, p.calls[target], p.task, p.scale, gate_paths)
    for (path, layer), gate_path in zip(plan.layers, gate_paths):
        p.layout.gated[path] = GatedLayer(path, gate_path, output_units(layer), unit_dim(layer),
                                          None, GatePlacement.LEAF, leaf=target)
    p.layout.norms += [path for path, _ in plan.norms]
    p.layout.task_leaves += [path for path, _ in plan.indexed if path not in inside]
    p.layout.heads += [path for path, _ in plan.indexed if path in inside]
    p.layout.frozen_tensors += plan.frozen
    p.layout.converted_leaves.append(target)
    return True


def task_index_or_freeze_leaf(gm: fx.GraphModule, target: str, module: nn.Module, num_tasks: int,
                              loose: str, task: fx.Node, layout: Layout) -> None:
    """A leaf with weights hatconvert cannot gate: one copy per task, or frozen after task 0.

    Recurrent layers are such leaves: a closed unit would still feed the recurrence, so no
    gate on their output is exact."""
    if isinstance(module, nn.RNNBase):
        layout.recurrent.append(target)
    if loose == "task":
        task_index_calls(gm, target, TaskIndexed(module, num_tasks), task)
        layout.task_leaves.append(target)
    else:
        layout.frozen_leaves.append(target)


def index_loose_attributes(gm: fx.GraphModule, num_tasks: int, loose: str, task: fx.Node,
                           layout: Layout, skip: set[str] = frozenset(),
                           mutated: set[str] = frozenset()) -> None:
    """Parameters the graph reads directly: one copy per task, or frozen; buffers are constants.

    ``skip``: parameters of gated layers. ``mutated``: buffers the graph writes in place; they
    are frozen (held once task 0 ends) rather than constants.
    """
    params_root = nn.Module()
    gm.add_module(PARAMS, params_root)
    replaced: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target in skip:
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, name)
        if not isinstance(value, nn.Parameter):
            if isinstance(value, torch.Tensor) and node.target in mutated:
                if node.target not in layout.frozen_tensors:
                    layout.frozen_tensors.append(node.target)
            elif isinstance(value, torch.Tensor) and node.target not in layout.constant_buffers:
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
