"""Zero forgetting and dense-mask fidelity on random small models drawn by Hypothesis.

Each example is a random program of tests/random_graphs.py (Linear/conv layers, norms over the
right and the wrong axis, element-wise ops with random arguments, some of which do not map 0 to 0,
residual adds, products, concatenations, flattening, pooling, transposes, reshapes, slices,
loose parameters, a Linear head). Checks per program:

- fidelity: ``mask_init="dense"``, head kept: every task's eval output equals the original's;
- zero forgetting: tasks 0, 1, 2 trained in turn with one optimizer (SGD with momentum, Adam or
  AdamW with weight decay); tasks 0 and 1 give bit-identical eval outputs after task 2.

A ``ConversionError`` is a fine answer (refused); any other exception fails. A failure shrinks
to a small program, printed as Python: ``check_program(Program(...), seed, optimizer)`` in
tests/random_graphs.py repeats it. ``benchmarks/fuzz_forgetting.py`` runs the same check on
hundreds of programs without Hypothesis.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from random_graphs import OPTIMIZERS, Op, Program, check_program, generate  # noqa: E402


class HypothesisChooser:
    """The chooser interface of random_graphs over Hypothesis draws (shrinks to simple)."""

    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))

    def chance(self, p: float) -> bool:  # shrinks to False
        return self.draw(st.integers(0, 99)) >= 100 - round(100 * p)


@st.composite
def programs(draw) -> Program:
    return generate(HypothesisChooser(draw))


@pytest.fixture
def one_thread():
    """The models are tiny: one thread is fastest and steadiest on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check(program: Program, seed: int, optimizer: str) -> None:
    result = check_program(program, seed=seed, optimizer=optimizer)
    assert result.ok, "\n" + result.describe()


@settings(max_examples=100, deadline=None, derandomize=True, database=None, print_blob=False,
          phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no slow "explain" phase
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(program=programs(), optimizer=st.sampled_from(list(OPTIMIZERS)),
       seed=st.integers(0, 1000))
def test_random_program_forgets_nothing_and_converts_faithfully(one_thread, program, optimizer,
                                                                seed):
    check(program, seed, optimizer)


# Small programs for the patterns a mask-propagation table or a gate placement can get wrong,
# checked every run whatever Hypothesis draws: a layer, the op, a layer after it.
def _between(shape, layer, op, after=None):
    after = after or Op("linear", 2, out=4, bias=True)
    return Program(shape, (3, 3, 3), [layer, op, after, Op("head", 3, reduce="flatten")])


_CONV = Op("conv2d", 0, out=6, kernel=3, stride=1, padding=1, groups=1, bias=True)
_CONV_AFTER = Op("conv2d", 2, out=4, kernel=1, stride=1, padding=0, groups=1, bias=True)
_LIN = Op("linear", 0, out=8, bias=True)
PATTERNS = {
    "hardtanh-min-above-0": _between((3, 4, 4), _CONV, Op("hardtanh", 1, min_val=0.2, max_val=1.0,
                                                          form="function"), _CONV_AFTER),
    "Hardtanh-max-below-0": _between((6,), _LIN, Op("hardtanh", 1, min_val=-1.0, max_val=-0.1,
                                                    form="module")),
    "threshold-value": _between((6,), _LIN, Op("threshold", 1, threshold=0.1, value=0.5,
                                               form="function")),
    "clamp-min-above-0": _between((6,), _LIN, Op("clamp", 1, min=0.2, max=1.0, form="torch")),
    "clamp_min-above-0": _between((6,), _LIN, Op("clamp_min", 1, min=0.1, form="method")),
    "clamp_max-below-0": _between((6,), _LIN, Op("clamp_max", 1, max=-0.1, form="torch")),
    "add-const": _between((6,), _LIN, Op("add_const", 1, c=0.5)),
    "rsub-const": _between((6,), _LIN, Op("rsub_const", 1, c=1.0)),
    "pow-0": _between((6,), _LIN, Op("pow", 1, p=0)),
    "where-const": _between((6,), _LIN, Op("where_gt", 1, a=0.5, c=0.1)),
    "masked_fill-const": _between((6,), _LIN, Op("masked_fill_gt", 1, a=0.5, c=0.1)),
    "pad-value": _between((3, 4, 4), _CONV, Op("pad", 1, left=1, right=1, c=0.5, dim="last"),
                          _CONV_AFTER),
    "pad-channels-value": _between((3, 4, 4), _CONV, Op("pad", 1, left=0, right=1, c=0.5,
                                                        dim="dim1"), _CONV_AFTER),
    "exp": _between((6,), _LIN, Op("exp", 1)),
    "cos": _between((6,), _LIN, Op("cos", 1)),
    "softplus": _between((6,), _LIN, Op("softplus", 1, beta=1.0, form="function")),
    "loose-param-add": _between((3, 4, 4), _CONV, Op("param_add", 1, over="dim1"), _CONV_AFTER),
    "sqrt-abs": _between((6,), _LIN, Op("sqrt_abs", 1)),  # its gradient at 0 is inf
    "inplace-add-not-rebound": _between((6,), _LIN, Op("inplace", 1, op="add_", c=0.5)),
    "inplace-clamp-not-rebound": _between((6,), _LIN, Op("inplace", 1, op="clamp_", c=0.1)),
    "shared-linear": Program((8,), (3, 3, 3), [
        Op("linear", 0, out=8, bias=True), Op("relu", 1, form="function"),
        Op("reuse", 2, of=1, n_in=8, out=8), Op("head", 3, reduce="flatten")]),
    "linear-read-by-F.linear-and-called": Program((6,), (3, 3, 3), [
        Op("linear", 0, out=6, bias=True, form="functional"), Op("relu", 1, form="function"),
        Op("reuse", 2, of=1, n_in=6, out=6), Op("head", 3, reduce="flatten")]),
    "loose-param-as-weight": _between((6,), _LIN, Op("relu", 1, form="function"),
                                      Op("param_linear", 2, out=4)),
    # a Linear on (B, L, F) followed by a norm over dim 1 (L), with L != F and L == F
    "linear3d-batchnorm1d(L)": Program((5, 3), (3, 3, 3), [
        Op("linear", 0, out=4, bias=True), Op("batchnorm", 1, affine=True),
        Op("head", 2, reduce="flatten")]),
    "linear3d-batchnorm1d(L)-L==F": Program((4, 3), (3, 3, 3), [
        Op("linear", 0, out=4, bias=True), Op("batchnorm", 1, affine=True),
        Op("head", 2, reduce="flatten")]),
    "linear3d-instancenorm1d(L)": Program((5, 3), (3, 3, 3), [
        Op("linear", 0, out=4, bias=True), Op("instancenorm", 1, running=False),
        Op("head", 2, reduce="flatten")]),
    "linear3d-instancenorm1d(L)-L==F": Program((4, 3), (3, 3, 3), [
        Op("linear", 0, out=4, bias=True), Op("instancenorm", 1, running=True),
        Op("head", 2, reduce="flatten")]),
    "linear3d-groupnorm(L,L)": Program((5, 3), (3, 3, 3), [
        Op("linear", 0, out=4, bias=True), Op("groupnorm", 1, groups=5),
        Op("head", 2, reduce="flatten")]),
    "linear4d-batchnorm2d(C)": Program((2, 3, 4), (3, 3, 3), [
        Op("linear", 0, out=5, bias=True), Op("batchnorm", 1, affine=True),
        Op("head", 2, reduce="flatten")]),
    "F.linear3d-batchnorm1d(L)-L==F": Program((4, 3), (3, 3, 3), [
        Op("linear", 0, out=4, bias=True, form="functional"), Op("batchnorm", 1, affine=True),
        Op("head", 2, reduce="flatten")]),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_known_pattern(one_thread, name, optimizer):
    check(PATTERNS[name], seed=0, optimizer=optimizer)
