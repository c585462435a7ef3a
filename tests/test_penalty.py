"""The sparsity penalty's floor: no task can shut a gated layer.

Behind a layer whose gates a later norm rescales, the loss cannot resist shrinking all of the
layer's gates together, so HAT's penalty (``keep_open=0``) shuts such a layer when trained long
enough with small embedding draws and AdamW. The floor pulls each layer's most open units open.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import hatconvert
from hatconvert.errors import OptionError
from hatconvert.gates import HATGate
from hatconvert.penalty import KEEP_OPEN, kept_open, sparsity_penalty

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import continual_digits as digits  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def train_first_task(keep_open: float, epochs: int = 20):
    """Task 0 of the digits CNN, N(0, 0.02^2) draws, AdamW: the setting that shuts ``conv1``."""
    import hatconvert.gates as gates
    default_std, gates.SMALL_NORMAL_STD = gates.SMALL_NORMAL_STD, 0.02
    try:
        return _train_first_task(keep_open, epochs)
    finally:
        gates.SMALL_NORMAL_STD = default_std


def _train_first_task(keep_open: float, epochs: int):
    torch.manual_seed(0)
    task = digits.digit_tasks(seed=0)[0]
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=2, mask_init="small_normal")
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(task.x_train, task.y_train), batch_size=32, shuffle=True,
        generator=torch.Generator().manual_seed(0))
    hatconvert.train_task(net, 0, loader, optimizer, epochs=epochs, progress=False,
                          keep_open=keep_open)
    net.eval()
    with torch.no_grad():
        accuracy = digits.accuracy(net(task.x_test, 0), task.y_test)
    return net, accuracy


def test_the_papers_penalty_shuts_a_layer_a_norm_hides_and_the_floor_keeps_it_open():
    paper, paper_accuracy = train_first_task(keep_open=0.0)
    net, accuracy = train_first_task(keep_open=KEEP_OPEN)
    assert int(paper.masks(0)["conv1"].sum()) == 0 and paper_accuracy < 0.75  # shut: near chance
    for path, mask in net.masks(0).items():
        assert mask.sum() >= math.ceil(KEEP_OPEN * mask.numel()), path
    assert accuracy > 0.95


@settings(max_examples=60, deadline=None)
@given(units=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       keep_open=st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.0]),
       scale=st.sampled_from([0.01, 1.0, 25.0]), seed=st.integers(0, 2 ** 16))
def test_the_floor_pulls_each_layers_most_open_units_open_and_the_rest_shut(units, keep_open,
                                                                              scale, seed):
    g = torch.Generator().manual_seed(seed)
    gates = [HATGate(2, n) for n in units]
    for gate in gates:
        with torch.no_grad():
            gate.embedding.copy_(torch.randn(2, gate.units, generator=g) * 0.05)
            gate.task_masks[0] = (torch.rand(gate.units, generator=g) < 0.3).float()
        gate.embedding.grad = None
    sparsity_penalty(gates, 1, [0], scale, keep_open=keep_open).backward()
    for gate in gates:
        grad, used = gate.embedding.grad[1], gate.task_masks[0]
        kept = kept_open(gate.embedding[1], keep_open).bool()
        assert int(kept.sum()) == math.ceil(keep_open * gate.units)
        if kept.any() and (~kept).any():  # the kept units are the most open ones
            assert gate.embedding[1][kept].min() >= gate.embedding[1][~kept].max()
        assert torch.all(grad[kept] <= 0)                     # descent opens them
        assert torch.all(grad[~kept & (used == 0)] >= 0)       # descent shuts free units
        assert torch.all(grad[~kept & (used == 1)] == 0)       # reusing a used unit is free
        assert torch.all(gate.embedding.grad[0] == 0)          # other tasks untouched


def test_keep_open_zero_is_the_papers_penalty_and_bad_floors_are_refused():
    gates = [HATGate(1, 8), HATGate(1, 3)]
    a = torch.cat([torch.sigmoid(g.embedding[0] * 2.0) for g in gates])
    assert torch.allclose(sparsity_penalty(gates, 0, [], 2.0, c=1.0, keep_open=0.0), a.mean())
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=2)
    for bad in (-0.1, 1.5, "all", True, float("nan")):
        with pytest.raises(OptionError, match="keep_open must be a fraction"):
            net.regularization(0, 1.0, keep_open=bad)
        with pytest.raises(OptionError, match="keep_open must be a fraction"):
            hatconvert.train_task(net, 0, [(torch.zeros(1, 1, 8, 8), torch.zeros(1).long())],
                                  torch.optim.SGD(net.parameters(), lr=0.1), keep_open=bad,
                                  progress=False)
        assert net.active_task is None


def test_total_mode_prices_a_new_unit_the_same_for_every_task():
    """``total`` divides by every unit, ``original`` by the free ones: with a third of the units
    used by an earlier task, the two differ by exactly the free share, and before any task is
    trained they agree."""
    gates = [HATGate(3, 6), HATGate(3, 9)]
    with torch.no_grad():
        for g in gates:
            g.embedding.normal_()
            g.task_masks[0] = (torch.arange(g.units) % 3 == 0).float()
    for others in ([], [0]):
        original = sparsity_penalty(gates, 1, others, 5.0, keep_open=0.0)
        total = sparsity_penalty(gates, 1, others, 5.0, mode="total", keep_open=0.0)
        free = sum(float((1 - g.cumulative(others)).sum()) for g in gates)
        assert math.isclose(float(total), float(original) * free / 15, rel_tol=1e-6)
    assert free == 10
    with pytest.raises(OptionError, match="regularization mode"):
        sparsity_penalty(gates, 1, [0], 5.0, mode="totl")
