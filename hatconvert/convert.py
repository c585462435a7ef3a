"""``hatconvert.convert``: check the arguments, build or copy the model, trace, rewrite, report."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import difflib
import os
from typing import Any, Sequence

import torch.fx as fx
from torch import nn

from .errors import ConversionError, one_line
from .gates import HATGate
from .layers import is_gatable
from .network import HATNetwork
from .report import ConversionReport, classify_tensors
from .layout import Layout
from .options import DEFAULT_MASK_INIT, ConversionOptions
from .rewrite import final_layers, output_layers, rewrite
from .huggingface import (KEPT_WHOLE_REASON, check_convertible, is_pretrained_model,
                          source_of, task_heads)
from .inputs import Signature
from .toplevel import convert_top_level
from .tracing import TopLevelUntraceable, Traced, trace_model

__all__ = ['WEIGHT_KWARGS', 'check_weights_file', 'create_timm_model', 'classifier_path',
           'convert', 'convert_with_options', 'source_model', 'find_head', 'check_not_converted',
           'nothing_gated', 'unused_tensors', 'rewrite_variants', 'unregistered_layers', 'convert_kept_whole']



# timm.create_model keywords that load weights rather than shape the architecture: not stored
# in a checkpoint's source (and dropped on rebuild), since every value comes from the file.
# pretrained_cfg and pretrained_cfg_overlay stay: they can set num_classes and the input size.
WEIGHT_KWARGS = ("pretrained", "checkpoint_path", "cache_dir", "pretrained_strict")


def check_weights_file(weights: str | os.PathLike) -> str:
    """``weights`` as a path to a file of pretrained weights; a ``ConversionError`` if it is not."""
    try:
        path = os.fspath(weights)
    except TypeError:
        raise ConversionError(f"weights must be a file path, got {type(weights).__name__}") \
            from None
    if not isinstance(path, str):
        raise ConversionError(f"weights must be a file path, got {path!r}")
    if os.path.isdir(path):
        raise ConversionError(f"weights {path!r} is a directory, not a file of pretrained weights")
    if not os.path.isfile(path):
        raise ConversionError(f"weights file {path!r} does not exist")
    from .checkpoint import is_checkpoint
    if is_checkpoint(path):
        raise ConversionError(f"weights file {path!r} is a hatconvert checkpoint, not pretrained "
                              "weights of the model; use hatconvert.load to read it")
    return path


def create_timm_model(name: str, num_classes: int | None = None,
                      weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """A timm model by name; ``weights`` is a local file of pretrained weights (no download)."""
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ConversionError("converting a model by name needs timm: pip install timm") from exc
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConversionError(f"timm has no model named {name!r}{hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is not None:
        weights = check_weights_file(weights)
        given = kwargs.get("pretrained_cfg_overlay") or {}
        if not isinstance(given, dict):
            raise ConversionError(f"pretrained_cfg_overlay must be a dict, got {given!r}")
        overlay = dict(given, file=weights)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        return timm.create_model(name, **kwargs)
    except Exception as exc:
        source = f" with weights {weights!r}" if weights is not None else ""
        raise ConversionError(f"timm could not create {name!r}{source}: {one_line(exc)}") from exc


def classifier_path(model: nn.Module, traced_default: str | None,
                    called: set[str] | None = None, outputs: list[str] | None = None
                    ) -> str | list[str] | None:
    """timm's ``get_classifier()`` if the model has one with weights, else the output layer.

    A classifier the graph does not call as one module (an MLP head, one head per branch in a
    ModuleList) gives the layers inside it that feed the output without another layer between.
    """
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        try:
            classifier = getter()
        except Exception:  # some models' get_classifier needs arguments or fails; fall back
            classifier = None
        # distilled models (deit, levit) return their two classifiers as a tuple
        parts = classifier if isinstance(classifier, (tuple, list)) else [classifier]
        found = []
        for part in parts:
            if not (isinstance(part, nn.Module) and any(True for _ in part.parameters())):
                continue
            path = next((p for p, m in model.named_modules() if m is part), None)
            if path is None:
                continue
            if called is None or path in called:
                found.append(path)
            else:
                found += [p for p in outputs or [] if p.startswith(f"{path}.")]
        if found:
            return found[0] if len(found) == 1 else found
    return traced_default


def convert(model: nn.Module | str, num_tasks: int, *,
            num_classes: int | Sequence[int] | None = None,
            mask_init: str = DEFAULT_MASK_INIT, head: str | Sequence[str] | bool | None = None,
            loose: str = "task", include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, leaves: str = "convert",
            auto_leaves: bool = False, embeddings: str = "auto",
            weights: str | os.PathLike | None = None, **timm_kwargs: Any) -> HATNetwork:
    """Convert ``model`` (an ``nn.Module`` or a timm model name) into a HAT network.

    Args:
        num_tasks: how many tasks the network will learn (one gate row and copy per task).
        num_classes: classes of the head, an int or one per task (task-incremental heads).
        mask_init: task embedding initialisation: ``normal`` N(0,1) (the paper's),
            ``small_normal`` N(0, 0.05^2) (training, not the draw, decides which units a task
            opens: far more capacity left under Adam-type optimizers), ``uniform`` U(-1,1) or
            ``dense`` (every unit open: the converted model computes what the original did).
        head: module path of the classifier (or a list, one per branch); ``None`` finds it
            (timm's ``get_classifier()``, else the last weighted layer before the output);
            ``False``: no task-indexed head.
        loose: ``task`` gives parameters the graph reads directly (``pos_embed``, ``cls_token``,
            layer-scale ``gamma``) and leaves with hidden weights one copy per task; ``freeze``
            keeps one copy that is frozen once task 0 ends.
        include, exclude: module-path patterns (fnmatch) choosing which layers are gated; one
            string is one pattern.
        leaves: ``convert`` gates the Linear/conv layers inside leaf modules that fx does not
            trace (timm's not-traceable blocks, ``nn.MultiheadAttention``), task-indexes their
            norms and freezes the rest of them; ``loose`` treats such leaves by ``loose``.
        auto_leaves: when tracing breaks inside a submodule, keep it whole as a leaf (and
            convert inside it) instead of raising.
        embeddings: ``auto`` freezes after task 0 every embedding table holding a hundredth of
            the parameters or more (a word embedding) and gives smaller ones the ``loose``
            policy; ``loose``: every table by ``loose``; ``freeze``: every table frozen.
        weights: local file of pretrained weights for a timm model name.
        timm_kwargs: passed to ``timm.create_model`` when ``model`` is a name.

    The caller's model is never modified; the conversion works on a copy.
    """
    check_not_converted(model)
    options = ConversionOptions(num_tasks, num_classes, mask_init, head, loose, include, exclude,
                                leaves, auto_leaves, embeddings)
    return convert_with_options(model, options, weights=weights, **timm_kwargs)


def convert_with_options(model: nn.Module | str, options: ConversionOptions, *,
                         weights: str | os.PathLike | None = None,
                         **timm_kwargs: Any) -> HATNetwork:
    """``convert`` with options already checked (``load`` rebuilds a network this way)."""
    check_not_converted(model)
    model, name, source = source_model(model, options, weights, timm_kwargs)
    if is_pretrained_model(model):  # never traced: see huggingface.py
        return convert_kept_whole(model, options, name, source, KEPT_WHOLE_REASON)
    try:
        traced = trace_model(model, name, auto_leaves=options.auto_leaves)
    except TopLevelUntraceable as exc:
        if not options.auto_leaves:
            raise
        return convert_kept_whole(model, options, name, source,
                                  f"its own forward does not trace ({exc.reason})")
    gm = traced.gm
    head_path = find_head(model, gm, options, name)
    original_keys = list(model.state_dict())
    layout = _rewrite(gm, options, head_path)
    variants = rewrite_variants(traced, layout, options, head_path)
    layout.record_source(original_keys, traced.mode_dependent, traced.auto_leaves,
                         unused_tensors(model, gm, layout))
    layout.signature = traced.signature
    if head_path is None and options.head is None:
        layout.head_note = ("no head: no layer feeds the output directly (a backbone, or "
                            "norms after the last layer), so every layer is gated and no "
                            "copy per task is made; name one with head='module.path'")
    dropped = set(layout.dropped)  # the overhead compares what the network holds
    original_params = sum(p.numel() for n, p in model.named_parameters() if n not in dropped)
    if not layout.gated:
        raise nothing_gated(model, name, head_path, options.include, options.exclude)
    report = ConversionReport(layout, options.num_tasks, original_params,
                              sum(p.numel() for p in gm.parameters()),
                              classify_tensors(gm, layout),
                              [n for n, p in gm.named_parameters() if not p.requires_grad])
    found = dataclasses.replace(options, head=head_path)  # None: no head was found
    return HATNetwork(gm, layout, report, found, source, variants)


def convert_kept_whole(model: nn.Module, options: ConversionOptions, name: str,
                       source: dict[str, Any], reason: str) -> HATNetwork:
    """A model converted inside and kept whole (``toplevel.py``), because its own forward
    does not trace or is a transformers model's (``reason``); the head is the one given, else
    the transformers task head or timm's classifier, else none."""
    transformers_model = is_pretrained_model(model)
    if options.head is False:
        heads = []
    elif options.head is not None:
        heads = [options.head] if isinstance(options.head, str) else list(options.head)
    elif transformers_model:
        heads = task_heads(model)
    else:
        found = classifier_path(model, None)
        heads = [] if found is None else [found] if isinstance(found, str) else found
    if transformers_model:
        check_convertible(model, heads, options.num_classes)
    if options.num_classes is not None and not heads:
        raise ConversionError(f"{name} is kept whole, and no classifier layer to give "
                              "num_classes to was found; name one with head='module.path'")
    root, layout = convert_top_level(
        model, options.num_tasks, heads=heads, head_classes=options.num_classes,
        mask_init=options.mask_init, loose=options.loose, include=options.include,
        exclude=options.exclude, reason=reason, embeddings=options.embeddings)
    layout.record_source(list(model.state_dict()), False, [], unused_tensors(model, root, layout))
    layout.signature = Signature(model=name, names=_input_names(model), any_keyword=True)
    if not heads and options.head is None:
        layout.head_note = (f"no head: {name} has no classifier layer hatconvert could find (a "
                            "backbone, or an output layer tied to the word embeddings), so no "
                            "copy per task is made; name one with head='module.path'")
    dropped = set(layout.dropped)
    original_params = sum(p.numel() for n, p in model.named_parameters() if n not in dropped)
    report = ConversionReport(layout, options.num_tasks, original_params,
                              sum(p.numel() for p in root.parameters()),
                              classify_tensors(root, layout),
                              [n for n, p in root.named_parameters() if not p.requires_grad])
    head = None if not heads else heads[0] if len(heads) == 1 else heads
    return HATNetwork(root, layout, report, dataclasses.replace(options, head=head), source)


def _input_names(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def _rewrite(gm: fx.GraphModule, options: ConversionOptions, head: str | list[str] | None
             ) -> Layout:
    return rewrite(gm, options.num_tasks, head=head, head_classes=options.num_classes,
                   mask_init=options.mask_init, loose=options.loose, include=options.include,
                   exclude=options.exclude, leaves=options.leaves,
                   embeddings=options.embeddings)


def rewrite_variants(traced: Traced, layout: Layout, options: ConversionOptions,
                     head: str | list[str] | None) -> dict[tuple[str, ...], fx.Graph]:
    """Rewrite the graph of each set of optional inputs as the main graph was rewritten.

    A variant must gate, index and freeze exactly what the main graph does, so that it runs
    over the main graph's modules; an optional input whose graph differs (it calls a layer the
    default call does not) stays fixed at ``None`` and the report says why.
    """
    signature, graphs = traced.signature, {}
    for key in sorted(traced.variants, key=len):
        if not set(key) <= set(signature.optional):
            continue
        gm = traced.variants[key]
        try:
            same = _rewrite(gm, options, head).structure() == layout.structure()
        except ConversionError:
            same = False
        if not same:
            name = key[-1]
            signature.optional.remove(name)
            signature.fixed[name] = None
            signature.reasons[name] = ("given, the model uses layers or tensors the call "
                                       "without it does not")
            continue
        graphs[key] = copy.deepcopy(gm.graph)
    return {k: g for k, g in graphs.items() if set(k) <= set(signature.optional)}


def source_model(model: nn.Module | str, options: ConversionOptions,
                 weights: str | os.PathLike | None, timm_kwargs: dict[str, Any]
                 ) -> tuple[nn.Module, str, dict[str, Any]]:
    """The model to trace, its name, and the source a checkpoint records to rebuild it."""
    if isinstance(model, str):
        classes = options.num_classes
        built = create_timm_model(model, num_classes=classes[0] if classes else None,
                                  weights=weights, **timm_kwargs)
        kept = {k: v for k, v in timm_kwargs.items() if k not in WEIGHT_KWARGS}
        return built, model, {"kind": "timm", "name": model, "kwargs": kept}
    if isinstance(model, nn.Module):
        if weights is not None or timm_kwargs:
            raise ConversionError("weights and timm keyword arguments apply to a timm model name; "
                                  "for an nn.Module, load its weights before converting")
        name = type(model).__name__
        if is_pretrained_model(model):
            return model, name, source_of(model)
        return model, name, {"kind": "custom", "class": name}
    raise ConversionError(f"convert expects an nn.Module or a timm model name, "
                          f"got {type(model).__name__}")


def find_head(model: nn.Module, gm: Any, options: ConversionOptions, name: str
              ) -> str | list[str] | None:
    """The head path(s): as given, or found (timm's classifier, else the output layer)."""
    if options.head is False:
        return None
    if options.head is not None:
        return options.head
    called = {n.target for n in gm.graph.find_nodes(op="call_module")}
    finals = final_layers(gm)
    traced = None if not finals else finals[0] if len(finals) == 1 else finals
    head = classifier_path(model, traced, called, output_layers(gm))
    if options.num_classes is not None and head is None:
        raise ConversionError(f"{name} has no classifier layer to give num_classes to (no "
                              "layer feeds its output directly); name one with "
                              "head='module.path' or head=['a', 'b']")
    return head


def check_not_converted(model: Any) -> None:
    """Refuse a network that is already a HAT network (converting it again would nest gates)."""
    if isinstance(model, HATNetwork) or (isinstance(model, nn.Module) and any(
            isinstance(m, HATGate) for m in model.modules())):
        raise ConversionError(f"{type(model).__name__} is already a HAT network (it holds HAT "
                              "gates): convert the original model, or keep training this one")


def nothing_gated(model: nn.Module, name: str, heads: str | list[str] | None,
                  include: list[str] | None, exclude: list[str] | None) -> ConversionError:
    """Why no layer was gated: the model is one layer, every layer is a head, or the patterns."""
    if is_gatable(model):
        return ConversionError(
            f"the model is a single {type(model).__name__} layer, and hatconvert gates the "
            "layers inside a model: wrap it (nn.Sequential(layer)) and pass head=False to gate it")
    layers = [p for p, m in model.named_modules() if p and is_gatable(m)]
    heads = [] if heads is None else [heads] if isinstance(heads, str) else list(heads)
    others = unregistered_layers(model)
    hint = "" if not others else (
        f"; its modules {', '.join(others[:5])} hold weights but are not a layer hatconvert "
        "knows: hatconvert.register_layer(cls, unit_axis=..., input_axis=...) gates a class "
        "whose weight is a linear map")
    if not layers:
        return ConversionError(f"{name} has no Linear or convolution layer to gate{hint}")
    if all(p in heads for p in layers):
        which = ", ".join(f"'{p}'" for p in layers[:5])
        its = f"its only weighted layer {which} is" if len(layers) == 1 else \
            f"its weighted layers {which} are all"
        return ConversionError(f"no layer of {name} was gated: {its} the head (one copy per "
                               "task, never gated); pass head=False to gate it instead")
    if not include and not exclude:
        return ConversionError(f"no layer of {name} was gated: the traced forward calls none "
                               f"of its Linear/conv layers outside its head{hint}")
    return ConversionError(f"no layer of {name} was gated: nothing matched include="
                           f"{include or []} exclude={exclude or []} among its Linear/Conv layers")


def unregistered_layers(model: nn.Module) -> list[str]:
    """Modules holding a weight matrix of their own that no rule gates, as 'path (Class)'."""
    found = []
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if path and weight is not None and weight.ndim >= 2 and not is_gatable(module) \
                and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            found.append(f"{path} ({type(module).__name__})")
    return found


def unused_tensors(model: nn.Module, gm: nn.Module, layout: Layout) -> list[str]:
    """The model's parameters and buffers that the converted network does not hold.

    Tracing keeps only what the (eval-mode) forward uses: unused modules and train-only branches
    (googlenet's auxiliary heads) are left out. Parameters moved to ``hat_params`` are not lost.
    """
    kept = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    kept |= {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    moved = set(layout.task_params)

    def held(name: str) -> bool:
        parts = name.split(".")  # is task 0's copy of some module above it held?
        return name in kept or name in moved or any(
            Layout.copy_key(".".join(parts[:k]), 0, ".".join(parts[k:])) in kept
            for k in range(1, len(parts)))

    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}  # a module shared under two paths holds one tensor
    for name, tensor in named:
        aliases.setdefault(id(tensor), []).append(name)
    return [name for name, tensor in named if not any(held(a) for a in aliases[id(tensor)])]
