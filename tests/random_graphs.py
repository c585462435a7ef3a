"""Random small models for fuzzing the zero-forgetting invariant and the dense-mask fidelity.

A model is a :class:`Program`: an input shape, the class counts of the three tasks and a list of
:class:`Op`. Tensor ``t0`` is the input and op ``k`` (counting from 1) produces ``t<k>``; every op
reads the newest tensor (binary ops also read an earlier one of a matching shape), so nothing is
dead code and every layer is on the path to the output. :class:`ProgramNet` runs a program with a
Python loop over the fixed op list, which ``torch.fx`` traces into a flat graph; its modules and
loose parameters are named ``op<k>`` after the tensor they produce, the classifier is ``head``.

The vocabulary aims at what a mask-propagation table or a gate placement can get wrong:

- weighted layers: Linear on 2D, 3D and 4D inputs, Conv1d, plain / grouped / depthwise Conv2d,
  ConvTranspose2d; called as modules or read by ``F.linear`` / ``F.conv*``; a Linear called a
  second time (shared weights); a loose parameter used as a weight (``F.linear(x, p)``);
- norms over the right and the wrong axis: BatchNorm1d/2d, InstanceNorm1d/2d (affine), GroupNorm
  (one channel per group and grouped), LayerNorm (last dim, whole sample, channels-last), RMSNorm;
  e.g. BatchNorm1d(L) or InstanceNorm1d(L) after a Linear on (B, L, F), with L == F and L != F;
- element-wise ops with random arguments, several of which do not map 0 to 0: hardtanh with
  min_val > 0 or max_val < 0, threshold with a value, clamp / clamp_min / clamp_max, ``x + c``,
  ``c - x``, ``x ** 0``, ``where``, ``masked_fill``, padding with a value, exp, cos, sigmoid,
  softplus, softmax, cumsum, centering; ``sqrt(abs(x))`` (infinite gradient at 0); in-place ops
  whose result is not rebound (``x.add_(c)`` then ``x`` is read on);
- structure: residual adds, products and maxima of two tensors, ``x @ y.T``, concatenation on
  dim 1, chunks, flattening, mean and max pooling, nearest upsampling, transposes, reshapes,
  flips, slices, loose parameters added or multiplied; a Linear head at the end.

Programs are drawn through a *chooser* (``integer``, ``choice``, ``chance``): :class:`RandomChooser`
wraps ``random.Random`` (the benchmark), the test wraps Hypothesis' ``draw`` so that failures
shrink. Every choice is made so that shapes are valid by construction; ``chance`` shrinks to
False and ``choice`` to the first option, so the options are listed simplest first.

:func:`check_program` converts a program's model and checks (1) fidelity: with
``mask_init="dense"`` and the head kept, every task's eval output equals the original model's;
(2) zero forgetting: after tasks 0, 1 and 2 are trained in turn with one optimizer, the eval
outputs of tasks 0 and 1 are bit-identical to those recorded when each ended (half the seeds
begin every task with ``reinit_free=True``: the free units are drawn again).
"""

from __future__ import annotations

import math
import random
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import hatconvert
from helpers import eval_out, train  # the tests' HAT loop (tests/ is on the path)

MAX_NUMEL = 384       # entries per sample of any tensor
MAX_CHANNELS = 12     # size of dim 1 after a layer or a concatenation
BATCH = 4
STEPS = 3
NUM_TASKS = 3

Shape = tuple  # a tensor's shape without the batch dimension


# -- programs ---------------------------------------------------------------------------------

class Op:
    """One step: ``kind`` applied to tensors ``src`` (indices; the first is the newest)."""

    __slots__ = ("kind", "src", "args")

    def __init__(self, kind: str, src: int | Sequence[int], **args: Any):
        self.kind = kind
        self.src = (src,) if isinstance(src, int) else tuple(src)
        self.args = args

    def __repr__(self) -> str:
        src = self.src[0] if len(self.src) == 1 else self.src
        args = "".join(f", {k}={v!r}" for k, v in self.args.items())
        return f"Op({self.kind!r}, {src!r}{args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and (self.kind, self.src, self.args) == \
            (other.kind, other.src, other.args)

    def __hash__(self) -> int:
        return hash((self.kind, self.src, tuple(sorted(self.args.items()))))


@dataclass(eq=True)
class Program:
    """A model as data; its ``repr`` is Python that rebuilds it, one op a line, shapes beside."""

    input_shape: Shape
    classes: tuple        # classes of tasks 0, 1, 2; the original head has classes[0] outputs
    ops: list = field(default_factory=list)

    def shapes(self) -> list[Shape]:
        """The shape (without batch) of t0, t1, ...; raises ``ValueError`` on an invalid op."""
        shapes = [tuple(self.input_shape)]
        for k, op in enumerate(self.ops, start=1):
            if op.kind == "reuse":  # the layer called again must be an earlier Linear that fits
                of = op.args["of"]
                layer = self.ops[of - 1] if 1 <= of < k else None
                if layer is None or layer.kind != "linear" or layer.args["out"] != op.args["out"] \
                        or shapes[layer.src[0]][-1] != op.args["n_in"]:
                    raise ValueError(op)
            if any(not 0 <= i < k for i in op.src):
                raise ValueError(op)
            shapes.append(out_shape(op, [shapes[i] for i in op.src], self.classes[0]))
        return shapes

    def __repr__(self) -> str:
        try:
            shapes = self.shapes()
        except Exception:  # an invalid program still prints
            shapes = [None] * (len(self.ops) + 1)
        lines = [f"Program(input_shape={tuple(self.input_shape)!r}, "
                 f"classes={tuple(self.classes)!r}, ops=["]
        width = max([len(repr(op)) for op in self.ops] + [0]) + 1
        for k, op in enumerate(self.ops, start=1):
            lines.append(f"    {repr(op) + ',':<{width}}  # t{k}: {shapes[k]}")
        lines.append("])")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.ops)


def numel(shape: Shape) -> int:
    return math.prod(shape)


def _conv_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def out_shape(op: Op, ins: list[Shape], head_classes: int) -> Shape:
    """Shape of ``op``'s output given its inputs' shapes, or ``ValueError``."""
    x, a = ins[0], op.args
    k = op.kind
    if k in ("linear", "param_linear"):
        return x[:-1] + (a["out"],)
    if k == "reuse":  # an earlier Linear called again (shared weights)
        if x[-1] != a["n_in"]:
            raise ValueError(op)
        return x[:-1] + (a["out"],)
    if k == "conv2d":
        if len(x) != 3 or x[0] % a["groups"] or a["out"] % a["groups"]:
            raise ValueError(op)
        return (a["out"], _conv_size(x[1], a["kernel"], a["stride"], a["padding"]),
                _conv_size(x[2], a["kernel"], a["stride"], a["padding"]))
    if k == "conv1d":
        if len(x) != 2 or x[0] % a["groups"] or a["out"] % a["groups"]:
            raise ValueError(op)
        return (a["out"], _conv_size(x[1], a["kernel"], 1, a["padding"]))
    if k == "conv_transpose2d":
        if len(x) != 3 or x[0] % a["groups"] or a["out"] % a["groups"]:
            raise ValueError(op)
        s, kk, p = a["stride"], a["kernel"], a["padding"]
        return (a["out"], (x[1] - 1) * s - 2 * p + kk, (x[2] - 1) * s - 2 * p + kk)
    if k in NORMS:
        if (k == "layernorm_channels" and len(x) != 3) or \
                (k == "groupnorm" and (x[0] % a["groups"]
                                       or x[0] // a["groups"] * numel(x[1:]) < 2)) or \
                (k == "instancenorm" and (len(x) == 1 or numel(x[1:]) < 2)):
            raise ValueError(op)
        return x
    if k in ELEMENTWISE:
        if k == "pad":  # on the last dim or on dim 1 (channels)
            d = len(x) - 1 if a.get("dim", "last") == "last" else 0
            return x[:d] + (x[d] + a["left"] + a["right"],) + x[d + 1:]
        return x
    if k in ("add", "mul", "maximum"):
        if ins[0] != ins[1]:
            raise ValueError(op)
        return x
    if k == "cat":
        y = ins[1]
        if len(x) != len(y) or x[1:] != y[1:]:
            raise ValueError(op)
        return (x[0] + y[0],) + x[1:]
    if k == "matmul":  # x @ y.transpose(-1, -2) of two (B, A, D) tensors
        y = ins[1]
        if len(x) != 2 or len(y) != 2 or x[1] != y[1]:
            raise ValueError(op)
        return (x[0], y[0])
    if k == "flatten":
        return (numel(x),)
    if k == "flip":
        if not 1 <= a["dim"] <= len(x):
            raise ValueError(op)
        return x
    if k == "chunk":  # one of two halves along dim 1
        if x[0] % 2:
            raise ValueError(op)
        return (x[0] // 2,) + x[1:]
    if k == "interpolate":  # nearest, scale 2, over the trailing dims
        if len(x) not in (2, 3):
            raise ValueError(op)
        return x[:1] + tuple(2 * n for n in x[1:])
    if k in ("meanpool", "maxpool"):
        m = a["mode"]
        if len(x) < 2:
            raise ValueError(op)
        if m == "global":      # mean/amax over every dim after dim 1
            return x[:1]
        if m == "dim1":        # over dim 1
            return x[1:]
        if m == "window2":     # avg/max pool with a window of 2 over the trailing dims
            if len(x) not in (2, 3) or min(x[1:]) < 2:
                raise ValueError(op)
            return x[:1] + tuple(n // 2 for n in x[1:])
        if m == "adaptive1" and len(x) in (2, 3):
            return x[:1] + (1,) * (len(x) - 1)
        raise ValueError(op)
    if k == "permute":
        if sorted(a["dims"]) != list(range(1, len(x) + 1)):
            raise ValueError(op)
        return tuple(x[d - 1] for d in a["dims"])
    if k == "reshape":
        if numel(a["to"]) != numel(x):
            raise ValueError(op)
        return tuple(a["to"])
    if k == "slice":
        if a["dim"] not in (1, len(x)) or not 1 <= a["stop"] < x[a["dim"] - 1]:
            raise ValueError(op)
        return x[:a["dim"] - 1] + (a["stop"],) + x[a["dim"]:]
    if k in ("param_add", "param_mul"):
        return x
    if k == "head":
        return (head_classes,)
    raise ValueError(f"unknown op {k!r}")


# -- the model ------------------------------------------------------------------------------

NORMS = ("batchnorm", "instancenorm", "groupnorm", "layernorm", "layernorm_channels", "rmsnorm")
ELEMENTWISE = (
    "relu", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "elu", "exp", "softplus", "abs",
    "sign", "cos", "hardtanh", "threshold", "clamp", "clamp_min", "clamp_max", "add_const",
    "mul_const", "sub_const", "rsub_const", "div_const", "pow", "where_gt", "masked_fill_gt",
    "pad", "softmax", "sqrt_abs", "cumsum", "center", "dropout", "inplace",
)
WEIGHTED = ("linear", "conv2d", "conv1d", "conv_transpose2d", "reuse", "param_linear")


def make_module(op: Op, ins: list[Shape]) -> nn.Module | nn.Parameter | None:
    """The module (or loose parameter) op ``op`` holds, if any."""
    x, a, k = ins[0], op.args, op.kind
    if k == "linear":
        return nn.Linear(x[-1], a["out"], bias=a["bias"])
    if k == "conv2d":
        return nn.Conv2d(x[0], a["out"], a["kernel"], stride=a["stride"], padding=a["padding"],
                         groups=a["groups"], bias=a["bias"])
    if k == "conv1d":
        return nn.Conv1d(x[0], a["out"], a["kernel"], padding=a["padding"], groups=a["groups"],
                         bias=a["bias"])
    if k == "conv_transpose2d":
        return nn.ConvTranspose2d(x[0], a["out"], a["kernel"], stride=a["stride"],
                                  padding=a["padding"], groups=a["groups"], bias=a["bias"])
    if k == "batchnorm":
        return (nn.BatchNorm2d if len(x) == 3 else nn.BatchNorm1d)(x[0], affine=a["affine"])
    if k == "instancenorm":
        cls = nn.InstanceNorm2d if len(x) == 3 else nn.InstanceNorm1d
        return cls(x[0], affine=True, track_running_stats=a["running"])
    if k == "groupnorm":
        return nn.GroupNorm(a["groups"], x[0])
    if k == "layernorm":
        return nn.LayerNorm(x[-1] if a["span"] == "last" else x, bias=a["bias"])
    if k == "layernorm_channels":
        return nn.LayerNorm(x[0])
    if k == "rmsnorm":
        return nn.RMSNorm(x[-1])
    if k == "param_linear":  # a loose parameter used as a Linear weight: F.linear(x, p)
        return nn.Parameter(torch.randn(a["out"], x[-1]) / math.sqrt(x[-1]))
    if k == "dropout":
        return nn.Dropout(a["p"])
    if k in ("param_add", "param_mul"):
        shape = {"dim1": (x[0],) + (1,) * (len(x) - 1), "last": (x[-1],), "full": x}[a["over"]]
        value = torch.randn(shape) * 0.5 + (1.0 if k == "param_mul" else 0.0)
        return nn.Parameter(value)
    if k == "maxpool" and a["mode"] == "window2" and a.get("form") == "module":
        return (nn.MaxPool2d if len(x) == 3 else nn.MaxPool1d)(2)
    if a.get("form") == "module":
        return {
            "relu": lambda: nn.ReLU(), "gelu": lambda: nn.GELU(), "silu": lambda: nn.SiLU(),
            "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(),
            "leaky_relu": lambda: nn.LeakyReLU(a.get("slope", 0.01)),
            "elu": lambda: nn.ELU(a.get("alpha", 1.0)),
            "softplus": lambda: nn.Softplus(a.get("beta", 1.0)),
            "hardtanh": lambda: nn.Hardtanh(a.get("min_val", -1.0), a.get("max_val", 1.0)),
            "threshold": lambda: nn.Threshold(a.get("threshold", 0.0), a.get("value", 0.0)),
        }[k]()
    return None


class ProgramNet(nn.Module):
    """Runs a :class:`Program`; its repr is the program's."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        shapes = program.shapes()
        self.shapes = shapes
        for k, op in enumerate(program.ops, start=1):
            x = shapes[op.src[0]]
            held = make_module(op, [shapes[i] for i in op.src])
            if op.kind == "head":  # the classifier, after a flatten or a mean over positions
                features = x[0] if len(x) > 1 and op.args["reduce"] == "mean" else numel(x)
                self.head = nn.Linear(features, program.classes[0])
            elif isinstance(held, nn.Parameter):
                self.register_parameter(f"op{k}", held)
            elif held is not None:
                self.add_module(f"op{k}", held)

    def __repr__(self) -> str:
        return f"ProgramNet({self.program!r})"

    def forward(self, x):
        ts = [x]
        for k, op in enumerate(self.program.ops, start=1):
            ts.append(self._step(k, op, [ts[i] for i in op.src]))
        return ts[-1]

    def _step(self, k: int, op: Op, ins: list) -> Any:  # noqa: C901 - one branch per op
        x, a, kind = ins[0], op.args, op.kind
        ndim = len(self.shapes[op.src[0]]) + 1  # static: fx must not branch on tensor values
        held = getattr(self, f"op{k}", None)
        form = a.get("form")
        if form == "module" and kind in ELEMENTWISE:
            return held(x)
        if form == "functional" and kind == "linear":  # the layer's weight read by a function
            return F.linear(x, held.weight, held.bias)
        if form == "functional" and kind in ("conv1d", "conv2d"):
            conv = F.conv1d if kind == "conv1d" else F.conv2d
            return conv(x, held.weight, held.bias, held.stride, held.padding, held.dilation,
                        held.groups)
        if kind in ("linear", "conv2d", "conv1d", "conv_transpose2d", "batchnorm",
                    "instancenorm", "groupnorm", "layernorm", "rmsnorm", "dropout"):
            return held(x)
        if kind == "reuse":
            return getattr(self, f"op{a['of']}")(x)
        if kind == "param_linear":
            return F.linear(x, held)
        if kind == "layernorm_channels":
            return held(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # element-wise
        if kind == "relu":
            return {"function": F.relu, "torch": torch.relu}[form](x) if form != "method" \
                else x.relu()
        if kind == "gelu":
            return F.gelu(x)
        if kind == "silu":
            return F.silu(x)
        if kind == "sigmoid":
            return torch.sigmoid(x) if form != "method" else x.sigmoid()
        if kind == "tanh":
            return torch.tanh(x) if form != "method" else x.tanh()
        if kind == "leaky_relu":
            return F.leaky_relu(x, a["slope"])
        if kind == "elu":
            return F.elu(x, a["alpha"])
        if kind == "exp":
            return torch.exp(x)
        if kind == "softplus":
            return F.softplus(x, beta=a["beta"])
        if kind == "abs":
            return torch.abs(x) if form != "method" else x.abs()
        if kind == "sign":
            return torch.sign(x)
        if kind == "cos":
            return torch.cos(x)
        if kind == "hardtanh":
            return F.hardtanh(x, a["min_val"], a["max_val"])
        if kind == "threshold":
            return F.threshold(x, a["threshold"], a["value"])
        if kind == "clamp":
            return torch.clamp(x, min=a["min"], max=a["max"]) if form != "method" \
                else x.clamp(a["min"], a["max"])
        if kind == "clamp_min":
            return torch.clamp_min(x, a["min"]) if form != "method" else x.clamp_min(a["min"])
        if kind == "clamp_max":
            return torch.clamp_max(x, a["max"]) if form != "method" else x.clamp_max(a["max"])
        if kind == "add_const":
            return x + a["c"]
        if kind == "mul_const":
            return x * a["c"]
        if kind == "sub_const":
            return x - a["c"]
        if kind == "rsub_const":
            return a["c"] - x
        if kind == "div_const":
            return x / a["c"]
        if kind == "pow":
            return x ** a["p"]
        if kind == "where_gt":
            return torch.where(x > a["a"], x, a["c"])
        if kind == "masked_fill_gt":
            return x.masked_fill(x > a["a"], a["c"])
        if kind == "softmax":
            return torch.softmax(x, -1) if form != "method" else x.softmax(dim=-1)
        if kind == "sqrt_abs":  # sqrt(0) = 0 but its gradient at 0 is inf
            return torch.sqrt(torch.abs(x))
        if kind == "cumsum":
            return torch.cumsum(x, -1)
        if kind == "center":
            return x - x.mean(-1, keepdim=True)
        if kind == "inplace":  # mutates x and, like code that does not rebind, returns x itself
            if a["op"] == "add_":
                x.add_(a["c"])
            elif a["op"] == "mul_":
                x.mul_(a["c"])
            else:
                x.clamp_(min=a["c"])
            return x
        if kind == "pad":
            pad = (a["left"], a["right"])
            if a.get("dim", "last") == "dim1":
                pad = (0, 0) * (ndim - 2) + pad
            return F.pad(x, pad, value=a["c"])
        # structure
        if kind == "add":
            return x + ins[1]
        if kind == "mul":
            return x * ins[1]
        if kind == "maximum":
            return torch.maximum(x, ins[1])
        if kind == "matmul":
            return x @ ins[1].transpose(-1, -2)
        if kind == "flip":
            return x.flip(a["dim"])
        if kind == "chunk":
            return x.chunk(2, dim=1)[a["part"]] if form != "torch" else \
                torch.chunk(x, 2, 1)[a["part"]]
        if kind == "interpolate":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if kind == "cat":
            return torch.cat([x, ins[1]], dim=1)
        if kind == "flatten":
            if form == "method":
                return x.flatten(1)
            if form == "reshape":
                return x.reshape(x.shape[0], -1)
            return torch.flatten(x, 1)
        if kind in ("meanpool", "maxpool"):
            mode, trailing = a["mode"], tuple(range(2, ndim))
            if kind == "meanpool":
                if mode == "global":
                    return x.mean(trailing)
                if mode == "dim1":
                    return x.mean(1)
                if mode == "window2":
                    return F.avg_pool2d(x, 2) if ndim == 4 else F.avg_pool1d(x, 2)
                return F.adaptive_avg_pool2d(x, 1) if ndim == 4 else F.adaptive_avg_pool1d(x, 1)
            if mode == "global":
                return x.amax(trailing)
            if mode == "dim1":
                return x.amax(1)
            if mode == "window2":
                if held is not None:
                    return held(x)
                return F.max_pool2d(x, 2) if ndim == 4 else F.max_pool1d(x, 2)
            return F.adaptive_max_pool2d(x, 1) if ndim == 4 else F.adaptive_max_pool1d(x, 1)
        if kind == "permute":
            dims = a["dims"]
            if len(dims) == 2:
                return x.transpose(1, 2)
            return x.permute(0, *dims)
        if kind == "reshape":
            return x.reshape(x.shape[0], *a["to"])
        if kind == "slice":
            if a["dim"] == 1:
                return x[:, :a["stop"]]
            return x[..., :a["stop"]]
        if kind == "param_add":
            return x + held
        if kind == "param_mul":
            return x * held
        if kind == "head":
            if ndim > 2:
                x = x.mean(tuple(range(2, ndim))) if a["reduce"] == "mean" \
                    else torch.flatten(x, 1)
            return self.head(x)
        raise ValueError(f"unknown op {kind!r}")


def perturb_(model: nn.Module) -> None:
    """Norm statistics and affines away from their defaults, so fidelity errors show."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d,
                              nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, 0.3)


def build_model(program: Program, seed: int = 0) -> ProgramNet:
    torch.manual_seed(seed)
    model = ProgramNet(program)
    perturb_(model)
    return model.eval()


# -- generation -------------------------------------------------------------------------------

class RandomChooser:
    """The chooser interface over ``random.Random``."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence) -> Any:
        return options[self.rng.randrange(len(options))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


CONSTANTS = (0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 0.1, -0.3)
NONZERO = (1.0, 0.5, -0.5, 2.0, -1.0, 0.3)


def _fits(shape: Shape) -> bool:
    return all(n >= 1 for n in shape) and numel(shape) <= MAX_NUMEL


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def draw_weighted(ch, shapes: list[Shape], ops: list[Op]) -> Op | None:
    """A Linear or convolution that fits the newest tensor."""
    src = len(shapes) - 1
    x = shapes[src]
    kinds = ["linear"]
    if len(x) == 2:
        kinds.append("conv1d")
    if len(x) == 3:
        kinds = ["conv2d", "linear", "conv_transpose2d"]
    shared = [k for k, o in enumerate(ops, start=1)
              if o.kind == "linear" and shapes[o.src[0]][-1] == x[-1]]
    gated = any(o.kind in ("linear", "conv2d", "conv1d", "conv_transpose2d") for o in ops)
    if gated and ch.chance(0.2):  # a loose parameter as a weight, or a layer called again
        kind = ch.choice(["param_linear"] + (["reuse"] if shared else []))
    else:
        kind = ch.choice(kinds)
    if kind == "reuse":
        of = ch.choice(shared[::-1])
        return Op("reuse", src, of=of, n_in=x[-1], out=ops[of - 1].args["out"])
    bias = not ch.chance(0.2)
    if kind in ("linear", "param_linear"):
        options = [2, 3, 4, 5, 6, 8]
        if len(x) >= 2:  # out == size of dim 1: L == F after a Linear on (B, L, F)
            options = [x[0]] + [n for n in options if n != x[0]]
        out = ch.choice(options)
        if kind == "param_linear":
            return Op(kind, src, out=out)
        op = Op("linear", src, out=out, bias=bias, form=ch.choice(["module", "functional"]))
    elif kind in ("conv2d", "conv1d"):
        style = ch.choice(["plain", "grouped", "depthwise"])
        groups, c = 1, x[0]
        if style == "grouped" and len(_divisors(c)) > 2:
            groups = ch.choice([d for d in _divisors(c) if 1 < d < c])
        elif style == "depthwise" and c > 1:
            groups = c
        if groups == c:
            out = c * ch.choice([1, 2] if 2 * c <= MAX_CHANNELS else [1])
        else:
            out = groups * ch.choice([m for m in range(1, 9) if groups * m <= max(8, groups)])
        kernel = ch.choice([1, 3])
        padding = kernel // 2 if not ch.chance(0.2) else 0
        form = ch.choice(["module", "functional"])
        if kind == "conv1d":
            op = Op("conv1d", src, out=out, kernel=kernel, padding=padding, groups=groups,
                    bias=bias, form=form)
        else:
            stride = 2 if min(x[1:]) >= 4 and ch.chance(0.3) else 1
            op = Op("conv2d", src, out=out, kernel=kernel, stride=stride, padding=padding,
                    groups=groups, bias=bias, form=form)
    else:
        groups = 1
        if x[0] > 1 and ch.chance(0.3):
            groups = ch.choice([d for d in _divisors(x[0]) if d > 1])
        out = groups * ch.choice([m for m in range(1, 9) if groups * m <= max(8, groups)])
        if max(x[1:]) <= 4 and ch.chance(0.5):
            kernel, stride, padding = 2, 2, 0
        else:
            kernel, stride, padding = 3, 1, 1
        op = Op("conv_transpose2d", src, out=out, kernel=kernel, stride=stride, padding=padding,
                groups=groups, bias=bias)
    return op


def draw_norm(ch, x: Shape, src: int) -> Op:
    if len(x) == 1:
        kind = ch.choice(["batchnorm", "layernorm", "rmsnorm"])
    else:
        kinds = ["batchnorm", "groupnorm", "layernorm", "rmsnorm"]
        if numel(x[1:]) > 1:
            kinds.insert(1, "instancenorm")
        if len(x) == 3:
            kinds.append("layernorm_channels")
        kind = ch.choice(kinds)
    if kind == "batchnorm":
        return Op(kind, src, affine=not ch.chance(0.2))
    if kind == "instancenorm":
        return Op(kind, src, running=ch.chance(0.3))
    if kind == "groupnorm":  # one channel per group first; torch refuses a single value per group
        groups = [d for d in [x[0]] + _divisors(x[0])[-2::-1] if x[0] // d * numel(x[1:]) >= 2]
        if not groups:
            return Op("layernorm", src, span="last", bias=True)
        return Op(kind, src, groups=ch.choice(groups))
    if kind == "layernorm":
        return Op(kind, src, span="last" if len(x) == 1 or not ch.chance(0.3) else "all",
                  bias=not ch.chance(0.2))
    return Op(kind, src)


def draw_elementwise(ch, x: Shape, src: int, after: str | None = None) -> Op:
    """An element-wise op (or nearly: softmax, cumsum, centering) on tensor ``src``."""
    kind = ch.choice(list(ELEMENTWISE))
    c = lambda: ch.choice(CONSTANTS)  # noqa: E731
    if kind in ("relu",):
        return Op(kind, src, form=ch.choice(["function", "torch", "method", "module"]))
    if kind in ("gelu", "silu"):
        return Op(kind, src, form=ch.choice(["function", "module"]))
    if kind in ("sigmoid", "tanh", "abs"):
        return Op(kind, src, form=ch.choice(["torch", "method"] +
                                            (["module"] if kind != "abs" else [])))
    function_or_module = lambda: ch.choice(["function", "module"])  # noqa: E731
    torch_or_method = lambda: ch.choice(["torch", "method"])  # noqa: E731
    if kind == "leaky_relu":
        return Op(kind, src, slope=ch.choice([0.01, 0.2, -0.5, 1.5]), form=function_or_module())
    if kind == "elu":
        return Op(kind, src, alpha=ch.choice([1.0, 0.5, 2.0]), form=function_or_module())
    if kind == "softplus":
        return Op(kind, src, beta=ch.choice([1.0, 2.0, 0.5]), form=function_or_module())
    if kind == "hardtanh":  # min_val > 0 or max_val < 0: 0 does not map to 0
        lo = ch.choice([-1.0, 0.0, 0.5, -0.5, 0.2, -2.0, -0.2])
        hi = ch.choice([v for v in (1.0, 0.5, 2.0, -0.1, 0.3, 0.0) if v > lo] or [lo + 1.0])
        return Op(kind, src, min_val=lo, max_val=hi, form=function_or_module())
    if kind == "threshold":  # x if x > threshold else value
        return Op(kind, src, threshold=ch.choice([0.0, 0.1, -0.5, 0.5]),
                  value=ch.choice([0.0, 0.5, -1.0, 0.2]), form=function_or_module())
    if kind == "clamp":
        lo = ch.choice([-1.0, 0.0, 0.2, -0.5, 0.5])
        hi = ch.choice([v for v in (1.0, 0.5, 2.0, -0.2, 0.0) if v > lo] or [lo + 1.0])
        return Op(kind, src, min=lo, max=hi, form=torch_or_method())
    if kind == "clamp_min":
        return Op(kind, src, min=ch.choice([0.0, 0.1, -0.5, 0.5]), form=torch_or_method())
    if kind == "clamp_max":
        return Op(kind, src, max=ch.choice([0.0, 1.0, -0.1, 0.5]), form=torch_or_method())
    if kind in ("add_const", "mul_const", "sub_const", "rsub_const"):
        return Op(kind, src, c=c())
    if kind == "div_const":
        return Op(kind, src, c=ch.choice(NONZERO))
    if kind == "pow":
        return Op(kind, src, p=ch.choice([2, 3, 1, 0]))
    if kind in ("where_gt", "masked_fill_gt"):
        return Op(kind, src, a=ch.choice([0.0, 0.5, -0.5]), c=c())
    if kind == "softmax":
        return Op(kind, src, form=ch.choice(["torch", "method"]))
    if kind == "dropout":
        return Op(kind, src, p=ch.choice([0.5, 0.2]))
    if kind == "inplace":
        # right after a layer or a norm, whose backward does not need its output
        if after not in WEIGHTED + NORMS:
            return Op("relu", src, form="function")
        return Op(kind, src, op=ch.choice(["add_", "mul_", "clamp_"]), c=c())
    if kind == "pad":
        left, right = ch.choice([(1, 1), (0, 1), (2, 0)])
        dim = "dim1" if len(x) > 1 and ch.chance(0.4) else "last"
        op = Op(kind, src, left=left, right=right, c=c(), dim=dim)
        if not _fits(out_shape(op, [x], 1)):
            return Op("relu", src, form="function")
        return op
    return Op(kind, src)


def draw_structure(ch, shapes: list[Shape]) -> Op | None:
    """An op that moves, mixes or combines entries; ``None`` when the drawn one does not fit."""
    src = len(shapes) - 1
    x = shapes[src]
    kind = ch.choice(["add", "flatten", "meanpool", "maxpool", "permute", "reshape", "slice",
                      "param_add", "param_mul", "mul", "cat", "maximum", "matmul", "flip",
                      "chunk", "interpolate"])
    if kind in ("add", "mul", "maximum"):
        partners = [i for i, s in enumerate(shapes) if s == x]
        return Op(kind, (src, ch.choice(partners[::-1])))
    if kind == "matmul":
        partners = [i for i, s in enumerate(shapes) if len(s) == 2 and len(x) == 2 and s[1] == x[1]
                    and _fits((x[0], s[0]))]
        return Op(kind, (src, ch.choice(partners[::-1]))) if partners else None
    if kind == "flip":
        return Op(kind, src, dim=ch.integer(1, len(x)))
    if kind == "chunk":
        if x[0] % 2:
            return None
        return Op(kind, src, part=ch.choice([0, 1]), form=ch.choice(["method", "torch"]))
    if kind == "interpolate":
        return Op(kind, src) if len(x) in (2, 3) and _fits(x[:1] + tuple(2 * n for n in x[1:])) \
            else None
    if kind == "cat":
        partners = [i for i, s in enumerate(shapes)
                    if len(s) == len(x) and s[1:] == x[1:] and s[0] + x[0] <= MAX_CHANNELS
                    and _fits((s[0] + x[0],) + x[1:])]
        return Op(kind, (src, ch.choice(partners[::-1]))) if partners else None
    if kind == "flatten":
        return Op(kind, src, form=ch.choice(["torch", "method", "reshape"])) if len(x) > 1 else None
    if kind in ("meanpool", "maxpool"):
        if len(x) == 1:
            return None
        modes = ["global", "dim1"]
        if min(x[1:]) >= 2 and len(x) in (2, 3):
            modes.append("window2")
        if len(x) in (2, 3):
            modes.append("adaptive1")
        mode = ch.choice(modes)
        if kind == "maxpool" and mode == "window2":
            return Op(kind, src, mode=mode, form=ch.choice(["function", "module"]))
        return Op(kind, src, mode=mode)
    if kind == "permute":
        if len(x) == 2:
            return Op(kind, src, dims=(2, 1))
        if len(x) == 3:
            return Op(kind, src, dims=ch.choice([(2, 3, 1), (3, 1, 2), (1, 3, 2), (2, 1, 3)]))
        return None
    if kind == "reshape":
        options = []
        if len(x) == 1:
            options = [(1, x[0])] + [(d, x[0] // d) for d in _divisors(x[0]) if 1 < d < x[0]]
        elif len(x) == 2:
            options = [(x[0] * x[1],)] + [(x[0], d, x[1] // d) for d in _divisors(x[1])
                                          if 1 < d < x[1]]
        elif len(x) == 3:
            options = [(x[0], x[1] * x[2]), (x[0] * x[1], x[2])]
        return Op(kind, src, to=ch.choice(options)) if options else None
    if kind == "slice":
        dims = [d for d in (1, len(x)) if x[d - 1] >= 2]
        if not dims:
            return None
        dim = ch.choice(sorted(set(dims)))
        return Op(kind, src, dim=dim, stop=ch.integer(1, x[dim - 1] - 1))
    if kind in ("param_add", "param_mul"):
        return Op(kind, src, over=ch.choice(["dim1", "last", "full"]))
    return None


def _push(shapes: list[Shape], op: Op | None, classes: int, ops: list[Op]) -> bool:
    if op is None:
        return False
    try:
        shape = out_shape(op, [shapes[i] for i in op.src], classes)
    except ValueError:
        return False
    if not _fits(shape):
        return False
    ops.append(op)
    shapes.append(shape)
    return True


def generate(ch, max_blocks: int = 4) -> Program:
    """A random valid program: 1 to ``max_blocks`` blocks, then a Linear head.

    A block is a weighted layer (always in the first block), maybe a norm, up to two
    element-wise ops and maybe a structural op; so most element-wise and structural ops sit
    between two weighted layers, where a propagation error would show.
    """
    if ch.choice(["image", "sequence"]) == "image":
        side = ch.integer(3, 6)
        input_shape = (ch.integer(1, 3), side, side if not ch.chance(0.3) else ch.integer(3, 6))
    else:
        input_shape = (ch.integer(2, 6), ch.integer(2, 6))
    classes = (ch.integer(2, 4),) * NUM_TASKS
    if ch.chance(0.3):
        classes = tuple(ch.integer(2, 4) for _ in range(NUM_TASKS))
    shapes: list[Shape] = [input_shape]
    ops: list[Op] = []
    blocks = ch.integer(1, max_blocks)
    for b in range(blocks):
        if b == 0 or not ch.chance(0.2):
            _push(shapes, draw_weighted(ch, shapes, ops), classes[0], ops)
        if ch.chance(0.4):
            _push(shapes, draw_norm(ch, shapes[-1], len(shapes) - 1), classes[0], ops)
        for _ in range(ch.integer(0, 2)):
            after = ops[-1].kind if ops else None
            _push(shapes, draw_elementwise(ch, shapes[-1], len(shapes) - 1, after), classes[0],
                  ops)
        if ch.chance(0.5):
            _push(shapes, draw_structure(ch, shapes), classes[0], ops)
    reduce = "flatten" if len(shapes[-1]) == 1 or not ch.chance(0.5) else "mean"
    if reduce == "flatten" and numel(shapes[-1]) > MAX_NUMEL:
        reduce = "mean"
    ops.append(Op("head", len(shapes) - 1, reduce=reduce))
    return Program(input_shape, classes, ops)


def random_program(seed: int) -> Program:
    return generate(RandomChooser(random.Random(seed)))


# -- the checks -------------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


@dataclass
class Result:
    program: Program
    seed: int
    optimizer: str
    refused: str | None = None          # ConversionError message (fine)
    error: str | None = None            # any other exception: a failure
    invalid: str | None = None          # the generated model itself does not run: generator bug
    forgetting: list = field(default_factory=list)   # (task, max |diff|, where it first moved)
    fidelity: list = field(default_factory=list)     # (task, max relative diff)
    nonfinite: bool = False             # some recorded output was inf/nan (compared NaN-aware)
    warnings: list = field(default_factory=list)     # warnings hatconvert gave (distinct)

    @property
    def ok(self) -> bool:
        return not (self.error or self.invalid or self.forgetting or self.fidelity)

    @property
    def kind(self) -> str:
        if self.invalid:
            return "invalid"
        if self.error:
            return "error"
        if self.forgetting or self.fidelity:
            return "+".join(k for k, v in (("forgetting", self.forgetting),
                                           ("fidelity", self.fidelity)) if v)
        return "refused" if self.refused else "ok"

    def describe(self) -> str:
        lines = [f"{self.kind}: check_program(program, seed={self.seed}, "
                 f"optimizer={self.optimizer!r}) with the program below"]
        for t, diff, where in self.forgetting:
            lines.append(f"  task {t} changed after later tasks: max |diff| {diff:.3g}"
                         f" (first seen {where})")
        for t, diff in self.fidelity:
            lines.append(f"  dense fidelity, task {t}: max relative diff {diff:.3g}")
        if self.error:
            lines.append("  " + self.error.rstrip().replace("\n", "\n  "))
        if self.invalid:
            lines.append("  generated model does not run: " + self.invalid)
        if self.refused:
            lines.append(f"  refused: {self.refused}")
        if self.nonfinite:
            lines.append("  (some outputs are inf/NaN; compared with NaN equal to NaN)")
        for w in self.warnings[:3]:
            lines.append(f"  warned: {w[:200]}")
        lines.append("program = " + repr(self.program))
        return "\n".join(lines)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN counting as equal to NaN at the same place."""
    if a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a - b).abs()
    d = d[~d.isnan()]
    return float(d.max()) if d.numel() else float("nan")


def param_groups(net, fixed_gates: bool) -> list[dict]:
    """One optimizer for every task. With ``fixed_gates`` the task embeddings keep their N(0, 1)
    draw (lr 0): each task then uses about half the units, where a few steps of HAT's schedule
    often close nearly all of them in these tiny models, and a task that uses no unit cannot
    show a leak."""
    gates = [p for n, p in net.named_parameters() if ".hat_gates." in f".{n}"]
    ids = {id(p) for p in gates}
    rest = [p for p in net.parameters() if id(p) not in ids]
    if not fixed_gates:
        return [{"params": rest + gates}]
    return [{"params": rest}, {"params": gates, "lr": 0.0, "weight_decay": 0.0}]


def reinit_free(seed: int) -> bool:
    """Whether the tasks begin with ``reinit_free=True`` (half the seeds, across both kinds
    of ``param_groups``): redrawing the free units must move no trained task either."""
    return (seed // 2) % 2 == 1


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


def check_program(program: Program, seed: int = 0, optimizer: str = "adamw",
                  steps: int = STEPS, batch: int = BATCH, fidelity: bool = True,
                  forgetting: bool = True) -> Result:
    """Convert ``program``'s model and check fidelity (dense masks) and zero forgetting.

    Warnings are recorded in ``result.warnings`` (hatconvert warns when training diverges).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _check(program, seed, optimizer, steps, batch, fidelity, forgetting)
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
        if text not in result.warnings:
            result.warnings.append(text)
    return result


def _check(program: Program, seed: int, optimizer: str, steps: int, batch: int,
           fidelity: bool, forgetting: bool) -> Result:
    result = Result(program, seed, optimizer)
    try:
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn((batch,) + tuple(program.input_shape), generator=gen)
        # the model trains as it is (batch statistics, in-place ops and autograd agree)
        build_model(program, seed).train()(x).sum().backward()
        model = build_model(program, seed)  # in eval mode, running statistics untouched
        with torch.no_grad():
            expected = model(x)
            model(x[:1])  # one sample runs too (hatconvert propagates masks on one)
    except Exception as exc:
        result.invalid = _short(exc)
        return result

    if fidelity:
        try:
            net = hatconvert.convert(model, num_tasks=NUM_TASKS, mask_init="dense")
            net.eval()
            with torch.no_grad():
                for t in range(NUM_TASKS):
                    got = net(x, t)
                    if got.shape != expected.shape:
                        result.fidelity.append((t, float("inf")))
                    elif not torch.allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True):
                        rel = (got - expected).abs() / expected.abs().clamp_min(1e-6)
                        result.fidelity.append((t, float(rel.nan_to_num(float("inf")).max())))
        except hatconvert.ConversionError as exc:
            result.refused = _short(exc)
            return result
        except Exception:
            result.error = "fidelity: " + traceback.format_exc(limit=-4)
            return result

    if forgetting:
        try:
            torch.manual_seed(seed + 2)
            classes = program.classes
            num_classes = classes[0] if len(set(classes)) == 1 else list(classes)
            net = hatconvert.convert(model, num_tasks=NUM_TASKS, num_classes=num_classes)
            opt = OPTIMIZERS[optimizer](param_groups(net, fixed_gates=seed % 2 == 0))
            xs = [torch.randn((batch,) + tuple(program.input_shape), generator=gen)
                  for _ in range(NUM_TASKS)]
            ys = [torch.randint(0, classes[t], (batch,), generator=gen) for t in range(NUM_TASKS)]
            probe = torch.cat([x, xs[0][:2]])
            recorded: dict[int, torch.Tensor] = {}
            moved: dict[int, str] = {}
            for t in range(NUM_TASKS):
                train(net, opt, t, xs[t], ys[t], steps, reinit_free=reinit_free(seed))
                for old, out in recorded.items():  # where an earlier task first moved
                    if old not in moved and not same(eval_out(net, probe, old), out):
                        moved[old] = f"after task {t}"
                recorded[t] = eval_out(net, probe, t)
                result.nonfinite |= not bool(recorded[t].isfinite().all())
            for t in range(NUM_TASKS - 1):
                now = eval_out(net, probe, t)
                if not same(now, recorded[t]):
                    where = moved.get(t, "?")
                    if bool(recorded[t].isfinite().all()) and not bool(now.isfinite().all()):
                        where += "; its output now holds inf/NaN (training diverged)"
                    result.forgetting.append((t, _max_diff(now, recorded[t]), where))
        except hatconvert.ConversionError as exc:
            result.refused = _short(exc)
        except Exception:
            result.error = "forgetting: " + traceback.format_exc(limit=-4)
    return result


def refusal_key(message: str) -> str:
    """A refusal message with module paths and numbers blanked, to group reasons."""
    message = re.sub(r"\bop\d+\b", "opN", message)
    return re.sub(r"\b\d+\b", "N", message)


# -- shrinking (the benchmark; the test lets Hypothesis shrink) --------------------------------

def without_op(program: Program, j: int) -> Program | None:
    """``program`` without ``ops[j]``: readers of its output read its first input instead."""
    op = program.ops[j]
    if op.kind == "head":
        return None
    k, repl = j + 1, op.src[0]

    def renumber(o: Op) -> Op:
        args = dict(o.args)
        if "of" in args:  # a shared layer: the op that holds it moves down too
            args["of"] = args["of"] - 1 if args["of"] > k else -1 if args["of"] == k else args["of"]
        return Op(o.kind, tuple(repl if s == k else s - 1 if s > k else s for s in o.src), **args)

    ops = [renumber(o) for i, o in enumerate(program.ops) if i != j]
    candidate = Program(program.input_shape, program.classes, ops)
    try:
        if not all(_fits(s) for s in candidate.shapes()):
            return None
    except (ValueError, KeyError, IndexError):
        return None
    return candidate


def error_line(error: str) -> str:
    """The ``SomeError: message`` line of a formatted traceback."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    found = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Warning)\b", ln)]
    return (found or lines)[-1]


def failure_signature(result: Result) -> str:
    """What kind of failure ``result`` is, for keeping it while shrinking."""
    if result.error:
        return "error:" + error_line(result.error).split(":")[0]
    return result.kind


def shrink(result: Result, budget: int = 200) -> Result:
    """Greedily drop ops (and set every task's classes to 2) while the failure stays the same."""
    target = failure_signature(result)
    best, tries = result, 0

    def attempt(candidate: Program | None) -> bool:
        nonlocal best, tries
        if candidate is None or tries >= budget:
            return False
        tries += 1
        r = check_program(candidate, seed=best.seed, optimizer=best.optimizer)
        if not r.ok and failure_signature(r) == target:
            best = r
            return True
        return False

    if tuple(best.program.classes) != (2,) * NUM_TASKS:
        attempt(Program(best.program.input_shape, (2,) * NUM_TASKS, list(best.program.ops)))
    progress = True
    while progress and tries < budget:
        progress = False
        for j in reversed(range(len(best.program.ops))):
            if j < len(best.program.ops) and attempt(without_op(best.program, j)):
                progress = True
    return best
