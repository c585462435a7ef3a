"""Tracing a model with torch.fx, with the leaves hatconvert needs.

Layers that hatconvert rewrites (gated layers, norms) must stay whole in the graph, so the tracer
treats them as leaves by ``isinstance`` (timm's ``Conv2dSame`` or ``BatchNormAct2d`` count).
timm's own not-traceable modules and functions, and those a user registers, are leaves too.
When tracing fails, the error names the innermost module being traced and what to register.
"""

from __future__ import annotations

import copy
import traceback
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .layers import is_gatable, is_norm

_user_leaf_modules: set[type] = set()
_user_leaf_functions: set[Callable] = set()


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

    def __init__(self) -> None:
        timm_modules, timm_functions = _timm_leaves()
        super().__init__(autowrap_functions=timm_functions + tuple(_user_leaf_functions))
        self._leaf_classes = timm_modules + tuple(_user_leaf_modules)
        self.module_stack_paths: list[str] = []
        self.failed_in: str | None = None  # innermost module path when tracing raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_gatable(m) or is_norm(m) or isinstance(m, self._leaf_classes):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        # Remember where we are, so that a failure can name the module it happened in.
        self.module_stack_paths.append(self.path_of_module(m))
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


def trace(model: nn.Module, model_name: str = "model") -> fx.GraphModule:
    """Trace a deep copy of ``model``; the caller's model is never touched."""
    root = copy.deepcopy(model)
    tracer = HATTracer()
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # fx raises many kinds; all become one clear error
        path = tracer.failed_in or ""
        if path:
            cls_name = type(root.get_submodule(path)).__name__
            where = f"module '{path}' ({cls_name})"
            hint = (f"hatconvert.register_leaf_module({cls_name}) to keep that module whole, or "
                    f"hatconvert.register_leaf_function(fn) for the function that breaks")
        else:
            where = f"the top-level forward of {type(root).__name__}"
            hint = "hatconvert.register_leaf_function(fn) for the function that breaks"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConversionError(
            f"cannot trace {model_name}: tracing broke inside {where}, in {_user_frame(exc)}: "
            f"{type(exc).__name__}: {detail}. Register {hint}.") from exc
    return fx.GraphModule(root, graph, class_name=type(root).__name__)
