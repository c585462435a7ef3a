"""Property tests of propagation's op table: every claim that an entry stays zero is checked
numerically, for arguments drawn at random (hypothesis).

Soundness: wherever the propagated mask says 0, the op's real output is exactly 0 for every
input that is 0 there. Precision: ops that do keep zeros (relu, ``x * 2``) pass the mask on
rather than counting everything as used. The test reaches into ``MaskPropagator`` (not public)
because that is the unit under test.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from hatconvert import op_rules  # noqa: E402
from hatconvert.propagation import MaskPropagator  # noqa: E402
from hatconvert.layout import Layout  # noqa: E402

NUMBERS = st.one_of(st.sampled_from([-2.0, -0.5, 0.0, 0.3, 1.0, 2.5]),
                    st.floats(-3, 3, allow_nan=False, width=32))
POSITIVE = st.floats(0.0625, 3.0, width=32)


def unary(fn):
    return lambda d: fn


# Every element-wise entry of the table, with its arguments drawn: (draw -> f(x)).
FUNCTIONS = {
    F.relu: unary(F.relu), F.relu6: unary(F.relu6), F.silu: unary(F.silu),
    F.gelu: lambda d: (lambda x: F.gelu(x, approximate=d(st.sampled_from(["none", "tanh"])))),
    F.mish: unary(F.mish), F.hardswish: unary(F.hardswish), F.hardsigmoid: unary(F.hardsigmoid),
    F.leaky_relu: lambda d: (lambda x, a=d(NUMBERS): F.leaky_relu(x, a)),
    F.elu: lambda d: (lambda x, a=d(POSITIVE): F.elu(x, a)),
    F.celu: lambda d: (lambda x, a=d(POSITIVE): F.celu(x, a)), F.selu: unary(F.selu),
    F.hardtanh: lambda d: (lambda x, lo=d(NUMBERS), w=d(POSITIVE): F.hardtanh(x, lo, lo + w)),
    F.threshold: lambda d: (lambda x, t=d(NUMBERS), v=d(NUMBERS): F.threshold(x, t, v)),
    F.softplus: lambda d: (lambda x, b=d(POSITIVE): F.softplus(x, b)),
    F.softsign: unary(F.softsign), F.logsigmoid: unary(F.logsigmoid),
    F.sigmoid: unary(F.sigmoid), F.tanh: unary(F.tanh),
    F.softshrink: lambda d: (lambda x, l=d(POSITIVE): F.softshrink(x, l)),
    F.hardshrink: lambda d: (lambda x, l=d(POSITIVE): F.hardshrink(x, l)),
    F.tanhshrink: unary(F.tanhshrink),
    F.dropout: lambda d: (lambda x, p=d(st.floats(0, 0.9)), tr=d(st.booleans()):
                          F.dropout(x, p, tr)),
    F.dropout1d: lambda d: (lambda x: F.dropout1d(x.flatten(2), 0.5, d(st.booleans()))),
    F.dropout2d: lambda d: (lambda x: F.dropout2d(x, 0.5, d(st.booleans()))),
    F.dropout3d: lambda d: (lambda x: F.dropout3d(x, 0.5, d(st.booleans()))),
    F.alpha_dropout: lambda d: (lambda x: F.alpha_dropout(x, 0.5, d(st.booleans()))),
    F.feature_alpha_dropout: lambda d: (lambda x: F.feature_alpha_dropout(x, 0.5,
                                                                          d(st.booleans()))),
    F.relu_: lambda d: (lambda x: F.relu_(x.clone())),
    F.normalize: lambda d: (lambda x, dim=d(st.integers(0, 3)): F.normalize(x, dim=dim)),
    torch.relu: unary(torch.relu), torch.relu_: lambda d: (lambda x: torch.relu_(x.clone())),
    torch.tanh: unary(torch.tanh), torch.sigmoid: unary(torch.sigmoid), torch.abs: unary(torch.abs),
    torch.neg: unary(torch.neg), torch.sin: unary(torch.sin), torch.cos: unary(torch.cos),
    torch.sinh: unary(torch.sinh), torch.asinh: unary(torch.asinh), torch.atan: unary(torch.atan),
    torch.square: unary(torch.square), torch.sign: unary(torch.sign), torch.exp: unary(torch.exp),
    torch.erf: unary(torch.erf), torch.sqrt: lambda d: (lambda x: torch.sqrt(x.abs())),
    torch.clamp: lambda d: (lambda x, lo=d(st.none() | NUMBERS), hi=d(NUMBERS):
                            torch.clamp(x, lo, hi if lo is None else max(lo, hi))),
    torch.clip: lambda d: (lambda x, lo=d(NUMBERS): torch.clip(x, min=lo)),
    torch.clamp_min: lambda d: (lambda x, lo=d(NUMBERS): torch.clamp_min(x, lo)),
    torch.clamp_max: lambda d: (lambda x, hi=d(NUMBERS): torch.clamp_max(x, hi)),
    torch.pow: lambda d: (lambda x, p=d(st.sampled_from([0, 1, 2, 3, 0.5, -1])):
                          torch.pow(x.abs(), p)),
    torch.nan_to_num: lambda d: (lambda x, n=d(NUMBERS): torch.nan_to_num(x / 0.0, nan=n)),
    operator.neg: unary(operator.neg), operator.pos: unary(operator.pos),
    operator.abs: unary(operator.abs),
}
for op in (operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
           operator.truediv, operator.itruediv, operator.floordiv, operator.mod, operator.pow,
           torch.add, torch.sub, torch.mul, torch.div, torch.true_divide):
    FUNCTIONS[op] = (lambda o: lambda d: (
        lambda x, c=d(NUMBERS), left=d(st.booleans()): o(c, x.abs() + 0.1 * (x != 0))
        if left and o not in (operator.iadd, operator.isub, operator.imul, operator.itruediv)
        else o(x.clone(), c)))(op)

METHODS = {name: (lambda n: lambda d: (lambda x, c=d(NUMBERS): getattr(x.clone(), n)(c)))(name)
           for name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "__add__",
                        "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                        "__rtruediv__", "__rpow__", "clamp_min", "clamp_max")}
METHODS.update({name: (lambda n: lambda d: (lambda x: getattr(x.clone(), n)()))(name)
                for name in ("relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "abs",
                             "abs_", "neg", "neg_", "square", "sign", "sin", "cos", "exp",
                             "erf", "__neg__", "nan_to_num")})
METHODS.update({
    "sqrt": lambda d: (lambda x: x.abs().sqrt()),
    "pow": lambda d: (lambda x, p=d(st.sampled_from([0, 1, 2, 0.5])): x.abs().pow(p)),
    "__pow__": lambda d: (lambda x, p=d(st.sampled_from([0, 1, 2, -1])): x.__pow__(p)),
    "clamp": lambda d: (lambda x, lo=d(NUMBERS): x.clamp(min=lo)),
    "clamp_": lambda d: (lambda x, hi=d(NUMBERS): x.clone().clamp_(max=hi)),
    "clip": lambda d: (lambda x, lo=d(NUMBERS): x.clip(lo)),
})

MODULES = {
    nn.ReLU: lambda d: nn.ReLU(), nn.ReLU6: lambda d: nn.ReLU6(), nn.GELU: lambda d: nn.GELU(),
    nn.SiLU: lambda d: nn.SiLU(), nn.Mish: lambda d: nn.Mish(),
    nn.Hardswish: lambda d: nn.Hardswish(), nn.Hardsigmoid: lambda d: nn.Hardsigmoid(),
    nn.LeakyReLU: lambda d: nn.LeakyReLU(d(NUMBERS)), nn.ELU: lambda d: nn.ELU(d(POSITIVE)),
    nn.SELU: lambda d: nn.SELU(), nn.CELU: lambda d: nn.CELU(d(POSITIVE)),
    nn.Hardtanh: lambda d: (lambda lo: nn.Hardtanh(lo, lo + d(POSITIVE)))(d(NUMBERS)),
    nn.Threshold: lambda d: nn.Threshold(d(NUMBERS), d(NUMBERS)),
    nn.Tanh: lambda d: nn.Tanh(), nn.Sigmoid: lambda d: nn.Sigmoid(),
    nn.Softplus: lambda d: nn.Softplus(d(POSITIVE)), nn.Softsign: lambda d: nn.Softsign(),
    nn.LogSigmoid: lambda d: nn.LogSigmoid(), nn.Softshrink: lambda d: nn.Softshrink(d(POSITIVE)),
    nn.Hardshrink: lambda d: nn.Hardshrink(d(POSITIVE)), nn.Tanhshrink: lambda d: nn.Tanhshrink(),
    nn.Identity: lambda d: nn.Identity(), nn.Dropout: lambda d: nn.Dropout(0.5),
    nn.Dropout1d: lambda d: nn.Sequential(nn.Flatten(2), nn.Dropout1d(0.5)), nn.Dropout2d: lambda d: nn.Dropout2d(0.5),
    nn.Dropout3d: lambda d: nn.Dropout3d(0.5), nn.AlphaDropout: lambda d: nn.AlphaDropout(0.5),
    nn.FeatureAlphaDropout: lambda d: nn.FeatureAlphaDropout(0.5),
}

STRUCTURAL = [
    lambda d: (lambda x: x.flatten(1)), lambda d: (lambda x: x.mean((2, 3))),
    lambda d: (lambda x: torch.cat([x, x * 0.5], d(st.integers(0, 3)))),
    lambda d: (lambda x: F.max_pool2d(x, 2)), lambda d: (lambda x: F.avg_pool2d(x, 2)),
    lambda d: (lambda x, v=d(NUMBERS): F.pad(x, (1, 1), value=v)),
    lambda d: (lambda x: F.pad(x, (1, 1, 1, 1), mode=d(st.sampled_from(
        ["reflect", "replicate", "circular"])))),
    lambda d: (lambda x: F.interpolate(x, scale_factor=2, mode=d(st.sampled_from(
        ["nearest", "bilinear", "bicubic"])))),
    lambda d: (lambda x: x[:, 1:3]), lambda d: (lambda x: x.permute(0, 2, 3, 1).reshape(2, -1)),
    lambda d: (lambda x: x @ x.transpose(-1, -2)),
    lambda d: (lambda x: torch.where(x > d(NUMBERS), x, d(NUMBERS))),
    lambda d: (lambda x, v=d(NUMBERS): x.masked_fill(x > 0.2, v)),
    lambda d: (lambda x: x.chunk(2, dim=1)[d(st.integers(0, 1))]),
    lambda d: (lambda x: x + x.flip(1)), lambda d: (lambda x: x * x.roll(1, 2)),
    lambda d: (lambda x: x / (x.abs() + 1)), lambda d: (lambda x: x.float().type_as(x)),
    lambda d: (lambda x: x[:, torch.tensor([0, 2])]), lambda d: (lambda x: x.sum(1, keepdim=True)),
]


class Op(nn.Module):
    """One op as a traceable module: a submodule (call_module) or a function."""

    def __init__(self, op):
        super().__init__()
        if isinstance(op, nn.Module):
            self.op = op
        else:
            self.fn = op

    def forward(self, x):
        return self.op(x) if hasattr(self, "op") else self.fn(x)


def propagate(op, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's real output on ``x`` and the mask propagation gives it from ``mask``."""
    gm = fx.symbolic_trace(Op(op)).eval()
    propagator = MaskPropagator(gm, Layout(), {}, placeholder_masks={"x": mask})
    with torch.no_grad():
        out = propagator.run(x)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return out, propagator.masks[output.args[0]]


@st.composite
def inputs(draw):
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=4, max_size=4)), dtype=torch.float32)
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return x * mask.view(1, 4, 1, 1), mask.view(1, 4, 1, 1).expand(2, 4, 4, 4).contiguous()


def assert_sound(op, x, mask):
    out, out_mask = propagate(op, x, mask)
    if isinstance(out, (tuple, list)):
        return
    nonzero = (out != 0) | out.isnan()
    assert out_mask.shape == out.shape
    assert not bool((nonzero & (out_mask == 0)).any()), \
        f"{op}: the mask says 0 where the output is {out[nonzero & (out_mask == 0)][:4]}"


def test_every_table_entry_has_a_generator_here():
    assert op_rules.ELEMENTWISE_FUNCTIONS <= set(FUNCTIONS)
    assert op_rules.ELEMENTWISE_METHODS <= set(METHODS)
    assert set(op_rules.ELEMENTWISE_MODULES) <= set(MODULES)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data(), inputs())
def test_elementwise_claims_hold_for_drawn_arguments(data, x_mask):
    kind = data.draw(st.sampled_from(["function", "method", "module"]))
    table = {"function": FUNCTIONS, "method": METHODS, "module": MODULES}[kind]
    key = data.draw(st.sampled_from(sorted(table, key=str)))
    op = table[key](data.draw)
    assert_sound(op, *x_mask)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data(), inputs())
def test_structural_and_two_operand_claims_hold(data, x_mask):
    op = data.draw(st.sampled_from(STRUCTURAL))(data.draw)
    assert_sound(op, *x_mask)


@pytest.mark.parametrize("op", [F.relu, nn.ReLU(), nn.Hardtanh(-1, 1), lambda x: x * 2,
                                lambda x: F.hardtanh(x, -0.5, 0.5), lambda x: x.clamp(max=0.3),
                                lambda x: F.threshold(x, 0.1, 0.0), lambda x: F.pad(x, (1, 1)),
                                lambda x: x.masked_fill(x > 0, 0.0), torch.tanh])
def test_ops_that_keep_zeros_pass_the_mask_on(op):
    x = torch.randn(2, 4, 4, 4)
    mask = torch.zeros(2, 4, 4, 4)
    mask[:, 1] = 1
    _, out_mask = propagate(op, x * mask, mask)
    assert float(out_mask.sum()) < out_mask.numel()  # not everything counts as used


@pytest.mark.parametrize("op", [nn.Hardtanh(0.5, 2.0), lambda x: F.hardtanh(x, 0.5, 2.0),
                                lambda x: F.threshold(x, 1.0, 3.0), lambda x: x.clamp(min=0.1),
                                lambda x: x + 1, lambda x: x ** 0, torch.exp,
                                lambda x: x.masked_fill(x > 0, 2.0),
                                lambda x: torch.where(x > 0, x, 0.5)])
def test_ops_that_make_zeros_non_zero_count_as_used(op):
    x = torch.zeros(2, 4, 4, 4)
    _, out_mask = propagate(op, x, torch.zeros(2, 4, 4, 4))
    assert bool((out_mask == 1).all())
