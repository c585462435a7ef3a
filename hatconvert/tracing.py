"""Tracing a model with torch.fx, with the leaves hatconvert needs.

Layers that hatconvert rewrites (gated layers, norms) must stay whole in the graph, so the tracer
treats them as leaves by ``isinstance`` (timm's ``Conv2dSame`` or ``BatchNormAct2d`` count).
timm's own not-traceable modules and functions, and those a user registers, are leaves too.
When tracing fails, the error names the innermost module being traced and what to register;
with ``auto_leaves`` that module becomes a leaf instead and tracing starts again.

Tracing bakes Python branches on ``self.training`` into the graph, so the model is traced in
eval mode, where fidelity is judged, and once more in train mode to tell whether the two differ.
Stochastic depth and the like stay whole (leaves), so that they keep acting in training.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .errors import ConversionError, one_line
from .example import CONSTANTS
from .inputs import MAX_OPTIONAL, Signature, variant_key
from .gates import apply_gate, closed_rows_zeroed, gated_layer, scale_rows
from .layers import has_hooks, is_gatable, is_norm, train_only_types

__all__ = ['TopLevelUntraceable', 'MAX_AUTO_LEAVES', 'register_leaf_module', 'register_leaf_function', 'HATTracer',
           'Traced', 'trace_model', 'HOOK_DICTS', 'check_hooks_kept', 'move_root_hooks',
           'keep_layers_read_directly', 'signature_of', 'trace_variants']

class TopLevelUntraceable(ConversionError):
    """Tracing broke in the model's own forward; ``reason`` says where (for the report)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


_user_leaf_modules: set[type] = set()
_user_leaf_functions: set[Callable] = set()
MAX_AUTO_LEAVES = 64  # failing submodules made leaves before giving up


def register_leaf_module(cls: type) -> type:
    """Trace through no module of this class: it appears as one call in the graph.

    Usable as a class decorator, like timm's ``register_notrace_module``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    _user_leaf_modules.add(cls)
    return cls


def register_leaf_function(fn: Callable) -> Callable:
    """Record calls to this module-level function as one graph node instead of tracing it."""
    if not callable(fn):
        raise TypeError(f"register_leaf_function expects a function, got {fn!r}")
    _user_leaf_functions.add(fn)
    return fn


# Modules of other libraries known not to trace, kept whole (and converted inside) by name,
# looked up only where the library is imported: PyG's message passing checks its inputs.
KNOWN_LEAF_CLASSES = (("torch_geometric.nn.conv.message_passing", "MessagePassing"),)


def _known_leaves() -> tuple[type, ...]:
    found = []
    for module_name, name in KNOWN_LEAF_CLASSES:
        cls = getattr(sys.modules.get(module_name), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _timm_leaves() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm is optional for plain torch models
        return (), ()
    modules = tuple(m for m in timm_fx.get_notrace_modules() if isinstance(m, type))
    functions = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return modules, functions


class HATTracer(fx.Tracer):
    """torch.fx tracer whose leaves are rewritable layers plus timm's and the user's leaves."""

    def __init__(self, leaf_paths: set[str] | None = None) -> None:
        timm_modules, timm_functions = _timm_leaves()
        # hatconvert's own graph functions too: unpickling a converted graph traces its code
        # again with this tracer (torch.fx keeps the tracer class), and must not enter them
        super().__init__(autowrap_functions=timm_functions + tuple(_user_leaf_functions)
                         + (apply_gate, gated_layer, scale_rows, closed_rows_zeroed))
        self._leaf_classes = timm_modules + tuple(_user_leaf_modules) + train_only_types() \
            + _known_leaves()
        self._leaf_paths = leaf_paths or set()  # submodules made leaves after tracing failed
        self.module_stack_paths: list[str] = []
        self.failed_in: str | None = None  # innermost module path when tracing raised
        self.traced_through: set[str] = set()  # modules whose forward became graph nodes

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Layers, norms, registered and timm's not-traceable modules stay whole."""
        if is_gatable(m) or is_norm(m) or isinstance(m, self._leaf_classes) \
                or module_qualified_name in self._leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        # Remember where we are, so that a failure can name the module it happened in.
        """Trace a module call, remembering where a failure happened."""
        path = self.path_of_module(m)
        self.module_stack_paths.append(path)
        if not self.is_leaf_module(m, path):
            self.traced_through.add(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.module_stack_paths[-1]
            raise
        finally:
            self.module_stack_paths.pop()


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch: the line of model code that broke tracing."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and "/hatconvert/" not in name:
            return f"{frame.name}() at {frame.filename}:{frame.lineno}"
    return "unknown location"


@dataclass
class Traced:
    """A traced model and what tracing had to decide on the way."""

    gm: fx.GraphModule
    mode_dependent: bool = False  # the train-mode graph differs (or fails); the eval one is kept
    auto_leaves: list[str] = field(default_factory=list)  # submodules made leaves to trace
    signature: Signature = field(default_factory=Signature)
    # per set of optional inputs given: its graph over a copy of the model of its own
    variants: dict[tuple[str, ...], fx.GraphModule] = field(default_factory=dict)


def trace_model(model: nn.Module, model_name: str = "model", auto_leaves: bool = False) -> Traced:
    """Trace a deep copy of ``model`` in eval mode; its modules keep their own modes afterwards.

    ``auto_leaves``: when tracing breaks inside a submodule, keep that submodule whole (a leaf
    called as it is) and trace again, instead of raising.
    """
    root = copy.deepcopy(model)
    modes = {m: m.training for m in root.modules()}
    leaves: list[str] = []
    signature, concrete = signature_of(root, model_name)
    root.eval()
    try:
        while True:
            tracer = HATTracer(set(leaves))
            try:
                graph = tracer.trace(root, concrete_args=concrete)
                break
            except Exception as exc:
                path = tracer.failed_in
                if auto_leaves and path and path not in leaves and len(leaves) < MAX_AUTO_LEAVES:
                    leaves.append(path)
                    continue
                raise _trace_error(root, tracer, exc, model_name) from exc
        mode_dependent = _train_graph_differs(root, leaves, graph, concrete)
        graphs = trace_variants(root, leaves, concrete, signature)
    finally:
        for module, mode in modes.items():
            module.training = mode
    check_hooks_kept(root, tracer.traced_through, model_name)
    variants = {key: _graph_module(copy.deepcopy(root), g) for key, g in graphs.items()}
    gm = _graph_module(root, graph)
    return Traced(gm, mode_dependent, leaves, signature, variants)


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    move_root_hooks(root, gm)
    keep_layers_read_directly(gm, root)
    return gm


HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
              "_backward_pre_hooks")


def check_hooks_kept(root: nn.Module, traced_through: set[str], model_name: str) -> None:
    """Refuse hooks on a submodule that tracing dissolves into graph nodes: it is never called
    again, so its hooks would silently stop running. Hooks on leaves (gated layers, norms,
    heads) keep running, and the root's move to the converted graph."""
    for path, module in root.named_modules():
        if path and path in traced_through and has_hooks(module):
            raise TopLevelUntraceable(
                f"module '{path}' ({type(module).__name__}) of {model_name} has forward or "
                "backward hooks, but tracing turns its forward into graph nodes, so they would "
                f"never run again: remove them before converting{_leaf_hint(module)}, or "
                "convert with auto_leaves=True to keep the model whole (its hooks then run)",
                f"hooks on module '{path}' would not run in a graph")


def _leaf_hint(module: nn.Module) -> str:
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return ""
    return (f", or keep every {type(module).__name__} whole with "
            f"hatconvert.register_leaf_module({type(module).__name__})")


def move_root_hooks(root: nn.Module, gm: fx.GraphModule) -> None:
    """The graph module replaces the root: it runs the root's hooks (on the same inputs)."""
    for name in HOOK_DICTS:
        hooks = getattr(root, name, None)
        if hooks:
            getattr(gm, name).update(hooks)
    if getattr(root, "_is_full_backward_hook", None) is not None:
        gm._is_full_backward_hook = root._is_full_backward_hook


def keep_layers_read_directly(gm: fx.GraphModule, root: nn.Module) -> None:
    """Put back whole the Linear/conv layers whose weights the graph reads (``F.linear(x,
    self.qkv.weight)``): fx copies only the tensors, into bare modules, and the rewrite needs to
    know that they belong to a layer."""
    for node in gm.graph.find_nodes(op="get_attr"):
        owner = node.target.rpartition(".")[0]
        if not owner:
            continue
        try:
            layer, copied = root.get_submodule(owner), gm.get_submodule(owner)
        except AttributeError:
            continue
        if is_gatable(layer) and type(copied) is nn.Module and not any(copied.children()):
            parent, _, name = owner.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, layer)


def signature_of(root: nn.Module, model_name: str) -> tuple[Signature, dict[str, Any] | None]:
    """The model's inputs, and those after the first whose default is a Python constant: those
    are traced at that value (``concrete_args``), as the model is called (``model(x)``).

    A proxy is never ``None``, so tracing ``attn_mask=None`` as an input would bake the branch
    that assumes it was given; a flag such as ``is_causal=False`` would break tracing. Inputs
    with a ``None`` default are then tried as inputs one by one (``trace_variants``).
    """
    signature = Signature(model=model_name)
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return signature, None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    concrete = {}
    for i, p in enumerate(params):
        if p.kind == inspect.Parameter.VAR_KEYWORD:
            signature.any_keyword = True
        elif p.kind in kinds and i and type(p.default) in CONSTANTS \
                and p.kind != inspect.Parameter.POSITIONAL_ONLY:
            concrete[p.name] = p.default
        elif p.kind in kinds:
            signature.names.append(p.name)
    signature.fixed = dict(concrete)
    return signature, concrete or None


def _try_trace(root: nn.Module, leaves: list[str], concrete: dict[str, Any]
               ) -> fx.Graph | Exception:
    try:
        return HATTracer(set(leaves)).trace(root, concrete_args=concrete or None)
    except Exception as exc:  # the reason is reported
        return exc


def trace_variants(root: nn.Module, leaves: list[str], concrete: dict[str, Any] | None,
                   signature: Signature) -> dict[tuple[str, ...], fx.Graph]:
    """A graph for every non-empty set of the inputs with a ``None`` default that trace as
    tensors and that the eval-mode forward reads (at most ``MAX_OPTIONAL`` of them); the others
    stay fixed at ``None`` with the reason in ``signature.reasons``. Fills ``signature``."""
    concrete = concrete or {}
    kept: list[str] = []
    for name in [n for n, v in concrete.items() if v is None]:
        if len(kept) == MAX_OPTIONAL:
            signature.reasons[name] = f"more than {MAX_OPTIONAL} optional inputs"
            continue
        trial = _try_trace(root, leaves, {k: v for k, v in concrete.items() if k != name})
        if isinstance(trial, Exception):
            signature.reasons[name] = f"given, the forward does not trace: {one_line(trial)[:80]}"
        elif not any(n.target == name and n.users for n in trial.find_nodes(op="placeholder")):
            signature.reasons[name] = "the eval-mode forward does not read it"
        else:
            kept.append(name)
    graphs: dict[tuple[str, ...], fx.Graph] = {}
    for size in range(1, len(kept) + 1):
        for names in itertools.combinations(kept, size):
            if not set(names) <= set(kept):
                continue
            graph = _try_trace(root, leaves, {k: v for k, v in concrete.items()
                                              if k not in names})
            if isinstance(graph, Exception):  # this combination does not trace: keep fewer
                dropped = names[-1]
                kept.remove(dropped)
                signature.reasons[dropped] = (f"given with {', '.join(names[:-1])}, the "
                                              f"forward does not trace: {one_line(graph)[:80]}")
                graphs = {k: g for k, g in graphs.items() if dropped not in k}
                continue
            graphs[variant_key(names)] = graph
    signature.optional = kept
    for name in kept:
        signature.fixed.pop(name, None)
    return graphs


def _train_graph_differs(root: nn.Module, leaves: list[str], eval_graph: fx.Graph,
                         concrete: dict[str, Any] | None) -> bool:
    """Trace ``root`` in train mode too: do branches on ``self.training`` change the graph?"""
    root.train()
    try:
        train_graph = HATTracer(set(leaves)).trace(root, concrete_args=concrete)
    except Exception:  # the train-mode forward does not even trace: it differs
        return True
    finally:
        root.eval()
    return _code(train_graph) != _code(eval_graph)


def _code(graph: fx.Graph) -> str:
    """The graph's code, with the numbering of tensor constants (which goes on across traces of
    one module) left out."""
    return re.sub(r"_tensor_constant\d+", "_tensor_constant", graph.python_code("self").src)


def _trace_error(root: nn.Module, tracer: HATTracer, exc: Exception, model_name: str
                 ) -> ConversionError:
    """One clear error for any tracing failure: where it broke and what can help.

    ``auto_leaves`` keeps failing submodules whole; it cannot help when the model's own
    forward breaks, so it is suggested only for a failure inside a submodule.
    """
    path = tracer.failed_in or ""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    broke = f"{_user_frame(exc)}: {type(exc).__name__}: {detail}"
    if path:
        cls_name = type(root.get_submodule(path)).__name__
        return ConversionError(
            f"cannot trace {model_name}: tracing broke inside module '{path}' ({cls_name}), in "
            f"{broke}. Register hatconvert.register_leaf_module({cls_name}) to keep that module "
            "whole, or hatconvert.register_leaf_function(fn) for the function that breaks, or "
            "convert with auto_leaves=True to keep failing submodules whole.")
    return TopLevelUntraceable(
        f"cannot trace {model_name}: tracing broke in the top-level forward of "
        f"{type(root).__name__}, in {broke}. Register hatconvert.register_leaf_function(fn) "
        "for the function that breaks, or convert with auto_leaves=True to keep the model "
        "whole and gate the layers inside it (every input of every layer then counts as used "
        "by every task).", f"{_user_frame(exc)}: {type(exc).__name__}")
