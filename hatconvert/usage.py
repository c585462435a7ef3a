"""How much of the network the tasks use: capacity, mask usage, ``inspect``'s table and heatmap."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torch import nn

from .errors import HATError
from .protected import weight_protection

if TYPE_CHECKING:
    from .network import HATNetwork

__all__ = ['free_per_layer', 'gated_sizes', 'layer_capacity', 'overall_capacity', 'mask_usage',
           'usage_table', 'usage_heatmap']


def free_per_layer(net: "HATNetwork") -> dict[str, float] | None:
    """``layer_capacity()``, or None when it cannot be computed (no example input known)."""
    try:
        return net.layer_capacity()
    except HATError:
        return None


def gated_sizes(net: "HATNetwork") -> dict[str, int]:
    """Number of weight and bias entries of each gated layer."""
    sizes = {}
    for path in net.layout.gated:
        layer = net.model.get_submodule(path)
        bias = getattr(layer, "bias", None)  # a registered layer may have none
        sizes[path] = layer.weight.numel() + (0 if bias is None else bias.numel())
    return sizes


def layer_capacity(net: "HATNetwork", tasks: list[int]) -> dict[str, float]:
    """Per gated layer, the fraction of weights and biases ``tasks`` leave free to train;
    a frozen weight (``requires_grad=False``, weight norm) counts as used once a task ended."""
    sizes = gated_sizes(net)
    if not tasks:
        return {path: 1.0 for path in sizes}
    out = {path: gate.cumulative(tasks) for path, gate in net.gates().items()}
    inputs = net.input_masks(out, tasks[-1])
    result = {}
    for path in net.layout.gated:
        layer = net.model.get_submodule(path)
        protect_w, protect_b = weight_protection(layer, out[path], inputs[path])
        used = layer.weight.numel() if _frozen_weight(layer) else protect_w.sum()
        bias = getattr(layer, "bias", None)
        if bias is not None:
            used = used + (bias.numel() if not bias.requires_grad else protect_b.sum())
        result[path] = 1.0 - float(used) / sizes[path]
    return result


def _frozen_weight(layer: nn.Module) -> bool:
    """A weight no later task can train: frozen by the model, or computed by a
    parametrization (weight norm) whose tensors are frozen once task 0 ends."""
    weight = layer._parameters.get("weight")
    return not isinstance(weight, nn.Parameter) or not weight.requires_grad


def overall_capacity(net: "HATNetwork", free: dict[str, float]) -> float:
    """``net.capacity()`` from per-layer values already computed (propagation is the slow part)."""
    sizes = gated_sizes(net)
    return sum(free[p] * sizes[p] for p in sizes) / sum(sizes.values())


def mask_usage(net: "HATNetwork") -> dict[str, list[float | None]]:
    """Per gated layer and task, the fraction of units the task's stored mask uses."""
    return {path: [float(gate.task_masks[t].mean()) if bool(net.trained[t]) else None
                   for t in range(net.num_tasks)] for path, gate in net.gates().items()}


def usage_table(net: "HATNetwork", free: dict[str, float] | None = None) -> str:
    """Per gated layer: units, gate mode, share of units each trained task uses, share free."""
    tasks = net.trained_tasks()
    usage = net.mask_usage()
    free = free_per_layer(net) if free is None else free
    headers = ["layer", "units", "gate"] + [f"task {t}" for t in tasks] + ["free"]
    rows = []
    for path, info in net.layout.gated.items():
        mode = str(info.mode) if info.norm is None else f"{info.mode}:{info.norm}"
        rows.append([path, str(info.units), mode]
                    + [f"{100 * usage[path][t]:.1f}%" for t in tasks]
                    + ["n/a" if free is None else f"{100 * free[path]:.1f}%"])
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 or i == 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def usage_heatmap(net: "HATNetwork", path: str | os.PathLike,
                  free: dict[str, float] | None = None) -> None:
    """Write a PNG heatmap: one row per gated layer, one column per trained task, then "free".

    Blue: the share of the layer's units the task uses; green: the share of weights still free.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .checkpoint import write_atomic
    tasks = net.trained_tasks()
    usage = net.mask_usage()
    free = free_per_layer(net) if free is None else free
    layers = list(net.layout.gated)
    columns = [f"task {t}" for t in tasks] + (["free"] if free is not None else [])
    values = [[usage[p][t] for t in tasks] + ([free[p]] if free is not None else [])
              for p in layers]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str) -> int:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0]
    cell_w, cell_h, pad = max([52] + [width(c) + 8 for c in columns]), 16, 6
    left = max([width(p) for p in layers] + [40]) + 2 * pad
    top = 2 * cell_h + pad
    image = Image.new("RGB", (left + cell_w * max(len(columns), 1) + pad,
                              top + cell_h * len(layers) + pad), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), f"mask usage per layer and task ({len(tasks)} trained)",
              fill="black", font=font)
    for j, name in enumerate(columns):
        draw.text((left + j * cell_w + 4, cell_h + 2), name, fill="black", font=font)
    for i, layer in enumerate(layers):
        y = top + i * cell_h
        draw.text((pad, y + 2), layer, fill="black", font=font)
        for j, value in enumerate(values[i]):
            x = left + j * cell_w
            shade = int(255 * (1 - value))  # white (0) to dark blue or green (1)
            dark = 255 - int(120 * value)
            colour = (shade, dark, shade) if j == len(tasks) else (shade, shade, dark)
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=colour, outline="white")
            draw.text((x + 4, y + 2), f"{100 * value:.0f}%",
                      fill="white" if value > 0.5 else "black", font=font)

    def write(tmp: str) -> None:
        image.save(tmp, format="PNG")
    write_atomic(path, write)
