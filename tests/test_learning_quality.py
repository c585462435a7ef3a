"""``small_normal`` lets training, not the initial draw, decide which units a task takes.

Adaptive optimizers move an embedding by about the learning rate per step, so the paper's
N(0, 1) draw keeps its signs: every task took about half of every layer (issue 14). These
tests train the digits CNN with AdamW and compare the two draws.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import hatconvert
from hatconvert.errors import OptionError
from hatconvert.gates import HATGate, soft_gate, straight_through

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import continual_digits as digits  # noqa: E402
from continual import unit_usage  # noqa: E402


def run_two_tasks(mask_init):
    torch.manual_seed(0)
    tasks = digits.digit_tasks(seed=0)[:2]
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=2, mask_init=mask_init)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    for t, task in enumerate(tasks):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(task.x_train, task.y_train), batch_size=32,
            shuffle=True, generator=torch.Generator().manual_seed(t))
        hatconvert.train_task(net, t, loader, optimizer, epochs=3, progress=False)
    net.eval()
    with torch.no_grad():
        accuracies = [digits.accuracy(net(task.x_test, t), task.y_test)
                      for t, task in enumerate(tasks)]
    return net, accuracies


def test_small_normal_lets_training_choose_few_units_and_keeps_accuracy():
    net, accuracies = run_two_tasks("small_normal")
    paper, paper_accuracies = run_two_tasks("normal")
    assert min(accuracies) > 0.9 and min(paper_accuracies) > 0.9
    assert all(0.4 < unit_usage(paper, t) < 0.6 for t in range(2))  # the N(0, 1) draw chose
    assert all(unit_usage(net, t) < unit_usage(paper, t) - 0.05 for t in range(2))  # training
    assert net.capacity() > paper.capacity() + 0.1


def test_straight_through_gives_exact_masks_forward_and_soft_gradients_backward():
    e = torch.tensor([-0.002, -0.0, 0.0, 0.001, 0.3], requires_grad=True)
    soft = soft_gate(e, 400.0)
    out = straight_through(e, soft)
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    (grad_st,) = torch.autograd.grad((out * torch.arange(5.0)).sum(), e)
    e2 = e.detach().clone().requires_grad_(True)
    (grad_soft,) = torch.autograd.grad((soft_gate(e2, 400.0) * torch.arange(5.0)).sum(), e2)
    assert torch.equal(grad_st, grad_soft)


def test_hard_from_applies_only_while_a_task_trains_and_from_its_fraction_of_s_max():
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=2)
    gates = list(net.gates().values())
    assert all(g.hard_from is None for g in gates)
    net.begin_task(0, s_max=100.0, hard_from=0.25)
    assert all(g.hard_from == 25.0 for g in gates)
    gate: HATGate = gates[0]
    with torch.no_grad():
        gate.embedding[0].copy_(torch.linspace(-0.01, 0.01, gate.units))
    below, above = gate(0, 24.0), gate(0, 25.0)
    assert not set(below.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(above, (gate.embedding[0] > 0).float())
    net.abort_task()
    assert all(g.hard_from is None for g in gates)
    net.begin_task(0, hard_from=None)
    assert all(g.hard_from is None for g in gates)
    net.abort_task()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True, float("nan")])
def test_a_bad_hard_from_is_refused_before_the_task_begins(bad):
    net = hatconvert.convert(digits.DigitsNet(), num_tasks=2)
    with pytest.raises(OptionError, match="hard_from must be a fraction of s_max"):
        net.begin_task(0, hard_from=bad)
    assert net.active_task is None
    assert all(g.hard_from is None for g in net.gates().values())


def test_a_tensor_mask_scale_switches_to_exact_masks_like_a_float():
    gate = HATGate(1, 6)
    gate.hard_from = 200.0
    with torch.no_grad():
        gate.embedding[0].copy_(torch.tensor([-0.003, -0.001, 0.0, 0.0005, 0.002, 0.1]))
    for scale in (50.0, 200.0, 400.0):
        assert torch.equal(gate(0, torch.tensor(scale)), gate(0, scale))
