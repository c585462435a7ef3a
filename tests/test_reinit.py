"""``begin_task(t, reinit_free=True)``: the units no trained task uses get fresh weights.

Task 0 trains with its embeddings fixed at their N(0, 1) draw, so each layer keeps about half its
units. Beginning task 1 with ``reinit_free`` must redraw exactly the weights and biases of the
other half (in trainable gated parameters), leave every other entry of every tensor bit-equal,
and leave task 0's eval output bit-identical, then and after task 1 trains. The random programs
of test_fuzz_forgetting.py begin half their tasks with ``reinit_free`` as well.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatconvert
from hatconvert.errors import OptionError, TaskError
from hatconvert.registry import register_layer
from hatconvert.reinit import free_entries
from helpers import eval_out, train
from models import ResidualConcatNet, SequenceNet


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=2)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.depthwise(x)))
        x = self.up(F.relu(self.grouped(x)))
        return self.head(x.mean((2, 3)))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16),
                         nn.ReLU(), nn.Linear(16, 4))


MODELS = {
    "mlp": (mlp, (12,), 4),
    "residual-concat-cnn": (lambda: ResidualConcatNet(classes=4), (3, 16, 16), 4),
    "sequence-net": (SequenceNet, (2, 8), 3),
    "depthwise-separable": (DepthwiseSeparable, (3, 8, 8), 4),
}


def fixed_gate_optimizer(net):
    """Embeddings keep their N(0, 1) draw (about half the units used), weights train."""
    gates = {id(p) for n, p in net.named_parameters() if ".hat_gates." in f".{n}"}
    rest = [p for p in net.parameters() if id(p) not in gates]
    return torch.optim.AdamW(rest, lr=0.01, weight_decay=0.05)


def tensors(net):
    return {name: t.detach().clone() for name, t in
            list(net.named_parameters()) + list(net.named_buffers())}


def after_one_task(name):
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    net = hatconvert.convert(build(), num_tasks=3, num_classes=classes, mask_init="normal")
    opt = fixed_gate_optimizer(net)
    x, y = torch.randn(8, *shape), torch.randint(0, classes, (8,))
    train(net, opt, 0, x, y, steps=3)
    return net, opt, x, y


@pytest.mark.parametrize("name", list(MODELS))
def test_reinit_free_draws_only_what_no_trained_task_uses(name):
    net, opt, x, y = after_one_task(name)
    end_of_task_0 = eval_out(net, x, 0)
    before = tensors(net)
    redrawn, counts = set(), torch.zeros(2)
    net.train()
    net.begin_task(1, reinit_free=True)
    after = tensors(net)
    for path in net.layout.gated:
        layer = net.model.get_submodule(path)
        used = net.gates()[path].task_masks[0]
        counts += torch.stack([used.sum(), (used == 0).sum()])
        free = free_entries(layer, used)
        for param in ("weight", "bias"):
            key = f"model.{path}.{param}"
            if key not in before:
                continue
            where = free.get(param, torch.zeros_like(before[key], dtype=torch.bool))
            assert torch.equal(after[key][~where], before[key][~where]), f"{key}: a used entry moved"
            if bool(where.any()):
                changed = (after[key] != before[key])[where]
                assert changed.float().mean() > 0.9, f"{key}: its free entries stayed"
                redrawn.add(key)
    assert bool((counts > 0).all()), "the test needs both used and free units"
    for key in before.keys() - redrawn:
        if ".hat_gates." in key:  # task 1's embedding row is drawn by begin_task
            assert torch.equal(after[key][[0, 2]], before[key][[0, 2]]), key
        else:
            assert torch.equal(after[key], before[key]), f"{key} moved"
    net.eval()
    assert torch.equal(eval_out(net, x, 0), end_of_task_0)
    net.train()
    net.abort_task()
    train(net, opt, 1, x, y, steps=3, reinit_free=True)
    train(net, opt, 2, x, y, steps=3, reinit_free=True)
    assert torch.equal(eval_out(net, x, 0), end_of_task_0)


def test_reinit_free_draws_from_the_layers_own_initialisation():
    net, _, _, _ = after_one_task("mlp")
    net.train()
    torch.manual_seed(5)
    net.begin_task(1, reinit_free=True)
    path = next(iter(net.layout.gated))
    layer = net.model.get_submodule(path)
    free = free_entries(layer, net.gates()[path].task_masks[0])["weight"]
    bound = 1 / layer.in_features ** 0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
    drawn = layer.weight.detach()[free]
    assert float(drawn.abs().max()) <= bound
    assert float(drawn.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.2)


@register_layer(unit_axis=0, input_axis=1)
class PlainScale(nn.Module):
    """A registered layer with a weight and no reset_parameters()."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)

    def forward(self, x):
        return x @ self.weight.t()


class WithPlainScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.scale = PlainScale(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.scale(torch.relu(self.fc(x)))))


def test_a_layer_without_reset_parameters_is_refused_by_name_and_nothing_changes():
    torch.manual_seed(0)
    net = hatconvert.convert(WithPlainScale(), num_tasks=2, num_classes=3, mask_init="normal")
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    train(net, fixed_gate_optimizer(net), 0, x, y, steps=2)
    before = tensors(net)
    net.train()
    with pytest.raises(TaskError, match=r"'scale' \(PlainScale\) has no reset_parameters"):
        net.begin_task(1, reinit_free=True)
    assert net.active_task is None
    after = tensors(net)
    assert all(torch.equal(after[k], before[k]) for k in before)
    net.begin_task(1)  # without the option it begins (a registered layer with no bias)
    assert net.active_task == 1
    net.abort_task()
    end_of_task_0 = eval_out(net, x, 0)
    train(net, torch.optim.AdamW(net.parameters(), lr=0.01), 1, x, y, steps=2)
    assert torch.equal(eval_out(net, x, 0), end_of_task_0)
    assert 0.0 < net.capacity() < 1.0


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_reinit_free_must_be_a_bool(bad):
    net, _, _, _ = after_one_task("mlp")
    net.train()
    with pytest.raises(OptionError, match="reinit_free must be True or False"):
        net.begin_task(1, reinit_free=bad)
    assert net.active_task is None


def test_frozen_gated_weights_are_not_drawn_again():
    net, _, _, _ = after_one_task("mlp")
    path = next(iter(net.layout.gated))
    first = net.model.get_submodule(path)
    first.weight.requires_grad_(False)
    weight, bias = first.weight.detach().clone(), first.bias.detach().clone()
    free_bias = net.gates()[path].task_masks[0] == 0
    net.train()
    net.begin_task(1, reinit_free=True)
    assert torch.equal(first.weight, weight)
    assert bool((first.bias != bias)[free_bias].all())  # the trainable bias is drawn again
    assert torch.equal(first.bias[~free_bias], bias[~free_bias])
