"""One safetensors file per HAT network: ``save`` writes it atomically, ``load`` checks it first.

The file holds ``net.state_dict()`` (weights, task embeddings, stored masks, task-indexed copies,
running statistics, the ``trained`` flags) and string metadata that says how to rebuild the
network: the source model (a timm name and its keyword arguments, a transformers class and its
config, or a custom model the caller passes again), the conversion options, the tasks trained
and the example input's shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
import uuid
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn

from .example import INDEX_DTYPES, MAX_EXAMPLE_ELEMENTS, check_spec
from .errors import CheckpointError, HATError, one_line
from .layers import output_units
from .gates import closed_rows_zeroed, gated_layer
from .network import HATNetwork
from .options import ConversionOptions

__all__ = ['FORMAT', 'FORMAT_VERSION', 'MAX_HEADER_BYTES', 'DTYPE_SIZES', 'REQUIRED', 'as_path',
           'check_target', 'write_atomic', 'unshared', 'classes_per_task', 'to_json', 'metadata',
           'save', 'write_safetensors', 'read_header', 'parse_metadata', 'describe',
           'is_checkpoint', 'rebuild', 'check_architecture', 'MAX_EXAMPLE_ELEMENTS',
           'INDEX_DTYPES', 'parse_example', 'example_dtype', 'check_device', 'load',
           'load_tensors']

FORMAT = "hatconvert"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# safetensors dtype names -> bytes per element (the header is checked before any tensor is read)
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
               "C64": 8}
REQUIRED = ("format_version", "hatconvert_version", "source", "num_tasks", "tasks_trained",
            "config", "classes_per_task", "example", "gated", "aliases")


# -- writing -------------------------------------------------------------------------------
def as_path(path: str | os.PathLike) -> str:
    """``path`` as a string; a ``CheckpointError`` for anything that is not a file path."""
    try:
        name = os.fspath(path)
    except TypeError:
        name = None
    if not isinstance(name, str):
        raise CheckpointError(f"a file path must be a str or os.PathLike, got "
                              f"{type(path).__name__}")
    return name


def check_target(path: str | os.PathLike) -> str:
    """``path`` as a string if a file can be written there; else a ``CheckpointError``.

    Checked before any work so that a long conversion or load does not end in a refusal. A file
    without any write permission bit counts as read-only even for root, whom ``os.access``
    always lets write: the owner made it read-only to keep it.
    """
    path = as_path(path)
    if not path:
        raise CheckpointError("cannot write a file with an empty name: name the file to write")
    if path.endswith(("/", os.sep)):
        raise CheckpointError(f"cannot write {path!r}: it names a directory, not a file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot write {path!r}: directory {directory!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot write {path!r}: it is a directory")
    if os.path.exists(path) and (not os.access(path, os.W_OK)
                                 or not stat.S_IMODE(os.stat(path).st_mode) & 0o222):
        raise CheckpointError(f"cannot write {path!r}: the file is read-only (make it writable "
                              "or write elsewhere)")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then move it into place.

    A crash or an error leaves the target as it was: either the old file or none. The new file
    gets the old file's mode, or for a new file the mode the umask gives (writers such as
    safetensors create their own file with mode 0600).
    """
    path = check_target(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb"):  # created here so that it gets the usual permissions (umask)
            pass
        mode = stat.S_IMODE(os.stat(path if os.path.exists(path) else tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write {path!r}: {exc.strerror or exc}") from exc
        raise


def unshared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors accepts (no shared storage, contiguous) and ``alias -> stored name``.

    A tensor stored under two names (tied weights) is written once and re-tied on load; other
    tensors that share memory are written as copies.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.numel() > 0:
            view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in views:
                aliases[name] = views[view]
                continue
            views[view] = name
        tensors[name] = tensor
    storages = Counter((t.device, t.untyped_storage().data_ptr()) for t in tensors.values()
                       if t.numel() > 0)
    for name, tensor in tensors.items():
        shared = tensor.numel() > 0 and storages[(tensor.device,
                                                  tensor.untyped_storage().data_ptr())] > 1
        if shared or not tensor.is_contiguous():
            tensors[name] = tensor.contiguous().clone()
    return tensors, aliases


def classes_per_task(net: HATNetwork) -> list[int] | None:
    """Output count of each task's head copy (None without a task-indexed head)."""
    if not net.layout.heads:
        return None
    copies = net.model.get_submodule(net.layout.heads[0]).copies
    counts = []
    for t in range(net.num_tasks):
        try:
            counts.append(output_units(copies[t]))
        except AttributeError:  # a head that is not a Linear or conv
            counts.append(None)
    return counts


def to_json(value: Any, what: str, path: str) -> str:
    """``value`` as JSON, or a ``CheckpointError`` naming what cannot be stored."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save {path!r}: {what} is not JSON-serializable ({exc}); "
                              "only plain values can be stored in a checkpoint") from exc


def metadata(net: HATNetwork, aliases: dict[str, str], path: str) -> dict[str, str]:
    """The string metadata a checkpoint stores beside the tensors (how to rebuild the network)."""
    from . import __version__
    calls = net.example_calls_spec()
    example = None if not calls else {"calls": calls}
    if len(calls) == 1 and not calls[0]["given"] and "shape" in calls[0]["input"] \
            and calls[0]["inputs"] == {"dict": {}}:
        example = calls[0]["input"]  # one tensor input: the form every version reads
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "hatconvert_version": __version__,
        "source": to_json(net.config.get("source", {"kind": "custom"}), "the model source", path),
        "num_tasks": str(net.num_tasks),
        "tasks_trained": json.dumps(net.trained_tasks()),
        "config": to_json(net.config, "the conversion config", path),
        "classes_per_task": json.dumps(classes_per_task(net)),
        "example": to_json(example, "the example input", path),
        "protected": json.dumps(net._protected_once),
        "gated": json.dumps(net.layout.modes()),
        "aliases": json.dumps(aliases, sort_keys=True),
    }


def save(net: HATNetwork, path: str | os.PathLike) -> None:
    """Write ``net`` to one safetensors file at ``path``, atomically.

    Refused while a task is being trained: a checkpoint holds trained tasks only; and for a
    read-only file or a missing directory, before any tensor is gathered.
    """
    path = check_target(path)
    if not isinstance(net, HATNetwork):
        raise CheckpointError(f"cannot save {path!r}: expected a HATNetwork from "
                              f"hatconvert.convert, got {type(net).__name__}")
    if net.active_task is not None:
        raise CheckpointError(f"cannot save {path!r} while task {net.active_task} is being "
                              "trained: call end_task() first")
    tensors, aliases = unshared(net.state_dict())
    meta = metadata(net, aliases, path)
    write_atomic(path, lambda tmp: write_safetensors(tensors, tmp, meta, path))


def write_safetensors(tensors: dict[str, torch.Tensor], tmp: str, meta: dict[str, str],
                      path: str) -> None:
    """``safetensors.torch.save_file`` with its errors named after the target file."""
    from safetensors.torch import save_file
    try:
        save_file(tensors, tmp, metadata=meta)
    except OSError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot write {path!r}: {exc}") from exc


# -- reading -------------------------------------------------------------------------------
def read_header(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and metadata of a safetensors file, checked against the file size."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path!r} is not a safetensors file: it is only "
                                      f"{size} bytes long")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8 or length < 2:
                raise CheckpointError(
                    f"{path!r} is not a safetensors file (or is truncated): its first 8 bytes "
                    f"announce a {length}-byte header but the file has {size} bytes")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path!r} has a damaged header: it is not valid JSON "
                              f"({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r} has a damaged header: expected a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path!r} has a damaged header: metadata must map strings")
    data_size = size - 8 - length
    end_max = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for n in shape:
                if not isinstance(n, int) or n < 0:
                    raise ValueError(f"bad shape {shape}")
                numel *= n
            if dtype not in DTYPE_SIZES:
                raise ValueError(f"unknown dtype {dtype}")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                    and end - begin == numel * DTYPE_SIZES[dtype]):
                raise ValueError(f"data offsets {[begin, end]} do not fit shape {shape} {dtype}")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path!r} has a damaged header: entry {name!r}: "
                                  f"{exc}") from exc
        end_max = max(end_max, end)
    if end_max > data_size:
        raise CheckpointError(f"{path!r} is truncated: its header describes {end_max} bytes "
                              f"of tensor data but only {data_size} follow it")
    return header, meta


def parse_metadata(path: str, meta: dict[str, str]) -> dict[str, Any]:
    """The hatconvert metadata as Python values; an error for foreign or newer files."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is a safetensors file but not a hatconvert checkpoint "
                              "(no hatconvert metadata): write one with hatconvert.save")
    version = meta.get("format_version", "")
    if not version.isdigit():
        raise CheckpointError(f"{path!r} has a damaged header: format version {version!r}")
    if int(version) != FORMAT_VERSION:
        newer = " (written by a newer hatconvert?)" if int(version) > FORMAT_VERSION else ""
        raise CheckpointError(f"{path!r} has checkpoint format version {version}{newer}; "
                              f"this hatconvert reads version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path!r} has a damaged header: metadata lacks "
                              f"{', '.join(missing)}")
    out: dict[str, Any] = {"hatconvert_version": meta["hatconvert_version"]}
    try:
        for key in REQUIRED[2:]:
            out[key] = json.loads(meta[key])
        if "protected" in meta:  # older files lack it: load() infers it from the tasks
            out["protected"] = json.loads(meta["protected"]) is True
        kinds = {"config": dict, "source": dict, "gated": dict, "aliases": dict,
                 "tasks_trained": list, "num_tasks": int}
        for key, kind in kinds.items():
            if not isinstance(out[key], kind):
                raise ValueError(f"{key} must be a JSON {kind.__name__}, got {meta[key]!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in out["aliases"].items()):
            raise ValueError("aliases must map names to names")
    except (json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path!r} has a damaged header: metadata: {exc}") from exc
    return out


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's metadata (source, tasks trained, classes, ...) without loading tensors."""
    path = as_path(path)
    _, meta = read_header(path)
    return parse_metadata(path, meta)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file with hatconvert metadata (never raises).

    Lets ``convert(weights=...)`` say that a checkpoint is not pretrained weights.
    """
    try:
        _, meta = read_header(os.fspath(path))
    except (CheckpointError, TypeError):
        return False
    return meta.get("format") == FORMAT


def rebuild(path: str, info: dict[str, Any], model: nn.Module | None) -> HATNetwork:
    """A fresh network converted like the saved one (its values are overwritten by the load).

    timm's weight-loading keywords (``pretrained``, ``checkpoint_path``) are dropped: every value
    comes from the file, so loading never reads or downloads pretrained weights.
    """
    from .convert import WEIGHT_KWARGS, convert_with_options
    config, source = info["config"], info["source"]
    timm_kwargs: dict[str, Any] = {}
    given = model is not None
    if model is None and source.get("kind") == "transformers":
        from .huggingface import build_from_source
        with torch.random.fork_rng(devices=[]):  # its random init must not move the caller's RNG
            model = build_from_source(path, source)
    if model is None:
        if source.get("kind") != "timm":
            raise CheckpointError(
                f"{path!r} holds a custom model ({source.get('class', 'unknown class')}): pass "
                "the original, untrained architecture with hatconvert.load(path, model=...)")
        target: nn.Module | str = source["name"]
        kwargs = source.get("kwargs") or {}  # older files may hold pretrained=True
        timm_kwargs = {k: v for k, v in kwargs.items() if k not in WEIGHT_KWARGS}
        for name in {f.name for f in dataclasses.fields(ConversionOptions)} & set(kwargs):
            config = {**config, name: timm_kwargs.pop(name)}  # older files kept them there
    else:
        target = model
    try:
        options = ConversionOptions.from_config({**config, "num_tasks": int(info["num_tasks"])})
        with torch.random.fork_rng(devices=[]):  # rebuilding must not move the caller's RNG
            return convert_with_options(target, options, **timm_kwargs)
    except HATError as exc:
        if given:
            saved_from = source.get("name") or source.get("class") or "unknown"
            raise CheckpointError(f"{path!r} does not fit this architecture: saved from "
                                  f"{saved_from}, {type(model).__name__} given: {exc}") from exc
        raise CheckpointError(f"cannot rebuild the network of {path!r} from {target}: "
                              f"{exc}") from exc


def check_architecture(path: str, net: HATNetwork, header: dict[str, dict], info: dict[str, Any],
                       model: nn.Module | None) -> None:
    """The rebuilt network must have exactly the file's tensors, shapes and gating."""
    source = info["source"]
    saved_from = source.get("name") or source.get("class") or "unknown"
    given = f", {type(model).__name__} given" if model is not None else ""
    wrong = f"{path!r} does not fit this architecture: saved from {saved_from}{given}"
    expected = net.state_dict()
    stored = set(header) | set(info["aliases"])
    missing = [k for k in expected if k not in stored]
    unexpected = sorted(k for k in stored if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])}"
                         f"{', ...' if len(unexpected) > 5 else ''})")
        raise CheckpointError(f"{wrong}: {'; '.join(parts)}")
    for alias, name in info["aliases"].items():
        if name not in header:
            raise CheckpointError(f"{path!r} has a damaged header: alias {alias!r} names "
                                  f"{name!r}, which the file does not hold")
    for name, entry in header.items():
        if list(expected[name].shape) != list(entry["shape"]):
            raise CheckpointError(f"{wrong}: {name!r} has shape {tuple(entry['shape'])} in the "
                                  f"file but {tuple(expected[name].shape)} in the network")
    gated = net.layout.modes()
    if gated != info["gated"]:
        diff = sorted(set(gated.items()) ^ set(info["gated"].items()))
        raise CheckpointError(f"{wrong}: its layers are gated differently "
                              f"(first difference: {diff[0][0]!r})")


def parse_example(path: str, example: Any) -> list[dict[str, Any]] | None:
    """The example calls from the metadata, checked before anything is built.

    Each call gives its first input and its other inputs as specs (``example.check_spec``):
    tensors by shape (ints >= 0, at most ``MAX_EXAMPLE_ELEMENTS`` elements) and a floating,
    integer or bool dtype; tuples, lists and dicts of them; plain constants. A file with one
    tensor input stores just that tensor's spec.
    """
    if example is None:
        return None
    shown = repr(example) if len(repr(example)) <= 120 else repr(example)[:120] + "..."
    damaged = f"{path!r} has a damaged header: example input {shown}"
    if isinstance(example, dict) and "shape" in example:
        example = {"calls": [{"given": [], "input": example, "inputs": {"dict": {}}}]}
    calls = example.get("calls") if isinstance(example, dict) else None
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and set(c) == {"given", "input", "inputs"}
            and isinstance(c["given"], list) and all(isinstance(n, str) for n in c["given"])
            for c in calls):
        raise CheckpointError(f"{damaged} (expected a shape list and a dtype name)")
    for call in calls:
        try:
            check_spec(call["input"]), check_spec(call["inputs"])
        except ValueError as exc:
            raise CheckpointError(f"{damaged}: {exc}") from None
        if "dict" not in call["inputs"]:
            raise CheckpointError(f"{damaged}: the named inputs must be a dict")
    return calls


def example_dtype(path: str, net: HATNetwork, dtype: torch.dtype) -> torch.dtype:
    """The dtype to restore the example in: a float example follows the network's float dtype.

    A network saved after ``.half()`` may hold a float32 example from an earlier forward; the
    graph it propagates masks through needs its input in the weights' dtype. An integer example
    must feed an index-taking layer: one that goes straight into a Linear/conv is refused.
    """
    floats = [p.dtype for p in net.parameters() if p.is_floating_point()]
    if dtype.is_floating_point:
        return floats[0] if floats else dtype
    graph = getattr(net.model, "graph", None)
    if graph is None:  # a model kept whole (toplevel.py): its forward takes what it takes
        return dtype
    inputs = [n for n in graph.find_nodes(op="placeholder")
              if n.target not in ("task_id", "mask_scale")]
    for user in inputs[0].users if inputs else ():
        path_of_layer = user.target if user.op == "call_module" else \
            user.args[1].target if user.target in (gated_layer, closed_rows_zeroed) else None
        if path_of_layer is None:
            continue
        layer = net.model.get_submodule(path_of_layer)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and \
                isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
            raise CheckpointError(
                f"{path!r} has a damaged header: its example input is {dtype} but the "
                f"network's first layer '{path_of_layer}' takes floating-point input")
    return dtype


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a torch.device that can hold tensors here; a ``CheckpointError`` if not."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CheckpointError(f"unknown device {device!r}: expected e.g. 'cpu' or 'cuda:0'") \
            from None
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise CheckpointError(f"device {device!r} is not available here: "
                              f"{one_line(exc)}") from None
    return parsed


def load(path: str | os.PathLike, model: nn.Module | None = None, *,
         device: torch.device | str | None = None) -> HATNetwork:
    """Rebuild a saved HAT network, in eval mode, from ``path``.

    A timm source is rebuilt from the name in the file; for a custom model pass the original
    architecture as ``model`` (its weights do not matter: every value comes from the file).
    The file and ``device`` are checked before anything is built; any fault is a
    ``CheckpointError``.
    """
    path = as_path(path)
    if model is not None and not isinstance(model, nn.Module):
        raise CheckpointError(f"model= must be the original architecture as an nn.Module, got "
                              f"{type(model).__name__} (a timm checkpoint needs no model=)")
    target_device = check_device(device)
    header, meta = read_header(path)
    info = parse_metadata(path, meta)
    example = parse_example(path, info["example"])
    net = rebuild(path, info, model)
    if target_device is not None:
        net.to(target_device)
    check_architecture(path, net, header, info, model)
    load_tensors(path, net, info, target_device)
    if example is not None:
        restore_examples(path, net, example)
    net._protected_once = info.get("protected", len(net.trained_tasks()) > 1)
    return net.eval()


def restore_examples(path: str, net: HATNetwork, calls: list[dict[str, Any]]) -> None:
    """The example calls of the file, as zeros, a float first input in the network's dtype."""
    for call in calls:
        spec = call["input"]
        if "shape" in spec:
            dtype = example_dtype(path, net, getattr(torch, spec["dtype"]))
            call["input"] = dict(spec, dtype=str(dtype).removeprefix("torch."))
    try:
        net.set_example_calls(calls)
    except ValueError as exc:
        raise CheckpointError(f"{path!r} does not fit the network: {exc}") from None


def load_tensors(path: str, net: HATNetwork, info: dict[str, Any],
                 device: torch.device | None) -> None:
    """Read the file's tensors into ``net``; a network saved in another float dtype keeps it."""
    from safetensors.torch import load_file
    try:
        state = load_file(path, device=str(device) if device is not None else "cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read the tensors of {path!r}: {one_line(exc)}") from exc
    for alias, name in info["aliases"].items():
        state[alias] = state[name]
    current = net.state_dict(keep_vars=True)
    for name, value in state.items():
        target = current[name]
        if target.dtype != value.dtype:
            if not (target.is_floating_point() and value.is_floating_point()):
                raise CheckpointError(f"{path!r}: {name!r} is {value.dtype} in the file but "
                                      f"{target.dtype} in the network")
            target.data = target.data.to(value.dtype)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path!r} does not fit the network: {one_line(exc)}") from exc
