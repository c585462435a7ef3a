"""Zero forgetting with optimizers kept across tasks, and what protection does and does not hold."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import hatconvert
from hatconvert import TaskError
from hatconvert.propagation import input_masks  # internal: propagation is the unit under test
from helpers import eval_out, train
from models import ResidualConcatNet

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw-decay": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.05),
}
MODELS = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=4), (6, 3, 32, 32)),
    # all 12 blocks of timm's vit_tiny, on 16 patches instead of 196 (the suite's time)
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=4,
                                                       img_size=64),
                             (3, 3, 64, 64)),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=4), (6, 3, 32, 32)),
    "residual-flatten": (lambda: ResidualConcatNet(classes=4), (6, 3, 16, 16)),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_earlier_task_is_bit_identical_after_later_tasks(model_name, opt_name):
    factory, shape = MODELS[model_name]
    net = hatconvert.convert(factory(), num_tasks=3)
    optimizer = OPTIMIZERS[opt_name](net.parameters())  # one optimizer for every task
    x = torch.randn(*shape)
    ys = [torch.randint(0, 4, (shape[0],)) for _ in range(3)]
    train(net, optimizer, 0, x, ys[0])
    expected = eval_out(net, x, 0)
    stats = {n: b.clone() for n, b in net.named_buffers() if "copies.0." in n}
    train(net, optimizer, 1, x, ys[1])
    train(net, optimizer, 2, x, ys[2])
    assert torch.equal(eval_out(net, x, 0), expected)
    for name, value in net.named_buffers():
        if name in stats:
            assert torch.equal(value, stats[name]), name
    assert not torch.equal(eval_out(net, x, 2), expected)


def test_protection_is_not_blanket_freezing():
    net = hatconvert.convert(timm.create_model("resnet18", num_classes=4), num_tasks=3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.05)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    assert net.capacity() == 1.0
    train(net, optimizer, 0, x, y)
    capacity = net.capacity()
    assert 0.0 < capacity < 1.0
    before = {p: net.model.get_submodule(p).weight.detach().clone() for p in net.layout.gated}
    train(net, optimizer, 1, x, y)
    moved = sum(int((net.model.get_submodule(p).weight.detach() != old).sum())
                for p, old in before.items())
    assert moved > 0, "task 1 must be able to train weights that task 0 leaves free"
    assert net.capacity() < capacity  # task 1 took some of what was free


def test_weights_task0_uses_are_exactly_the_ones_kept():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    net = hatconvert.convert(model, num_tasks=2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    train(net, optimizer, 0, x, y)
    m0, m2 = net.masks(0)["0"], net.masks(0)["2"]
    w = net.model.get_submodule("2").weight.detach().clone()
    b = net.model.get_submodule("2").bias.detach().clone()
    train(net, optimizer, 1, x, y, steps=6)
    w1 = net.model.get_submodule("2").weight.detach()
    b1 = net.model.get_submodule("2").bias.detach()
    protected = torch.minimum(m2[:, None], m0[None, :]).bool()
    assert torch.equal(w1[protected], w[protected])
    assert torch.equal(b1[m2.bool()], b[m2.bool()])
    assert not torch.equal(w1[~protected], w[~protected])


def test_without_the_guard_adamw_leaks():
    """hat_const_1 (no protection of gated weights) shows what the protection prevents."""
    net = hatconvert.convert(timm.create_model("resnet18", num_classes=4), num_tasks=2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.05)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    train(net, optimizer, 0, x, y)
    expected = eval_out(net, x, 0)
    net.train()
    net.begin_task(1, adjustment="hat_const_1")
    for b in range(3):
        loss = F.cross_entropy(net(x, 1, 10.0), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.end_task()
    assert not torch.equal(eval_out(net, x, 0), expected)


def test_embeddings_are_compensated_and_clamped():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2, mask_init="dense")
    optimizer = torch.optim.SGD(net.parameters(), lr=1000.0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    net.train()
    plain = copy.deepcopy(net)  # no task begun: no hooks, the raw gradient (same embeddings)
    s = 2.0
    raw = torch.autograd.grad(F.cross_entropy(plain(x, 0, s), y),
                              plain.gates()["stem"].embedding)[0]
    net.begin_task(0)
    gate = net.gates()["stem"]
    F.cross_entropy(net(x, 0, s), y).backward()
    e = gate.embedding.detach()
    factor = (400.0 / s) * (torch.cosh(torch.clamp(s * e, -50, 50)) + 1) / (torch.cosh(e) + 1)
    assert torch.allclose(gate.embedding.grad, raw * factor)
    optimizer.step()
    for g in net.gates().values():
        assert g.embedding[0].abs().max() <= 6.0
    net.end_task()


def test_regularization_is_the_mean_gate_for_task0_and_counts_only_free_units_later():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2)
    gates = list(net.gates().values())
    a = torch.cat([torch.sigmoid(g.embedding[0] * 3.0) for g in gates])
    assert torch.allclose(net.regularization(0, 3.0, c=1.0, keep_open=0.0), a.mean())
    net.begin_task(0)
    net.end_task()
    a1 = torch.cat([torch.sigmoid(g.embedding[1] * 3.0) for g in gates])
    used = torch.cat([g.task_masks[0] for g in gates])
    expected = (a1 * (1 - used)).sum() / (1 - used).sum()
    assert torch.allclose(net.regularization(1, 3.0, c=0.5, keep_open=0.0), 0.5 * expected)
    cross = (expected + (1 - (a1 * used).sum() / used.sum())) / 2
    assert torch.allclose(net.regularization(1, 3.0, c=1.0, mode="cross", keep_open=0.0), cross)


def test_task_lifecycle_refuses_out_of_order_use():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=3)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TaskError, match="end_task\\(\\) without begin_task"):
        net.end_task()
    net.begin_task(0)
    with pytest.raises(TaskError, match="task 0 is still active"):
        net.begin_task(1)
    net(x, 0, 1.0)
    net.end_task()
    with pytest.raises(TaskError, match="already trained"):
        net.begin_task(0)
    with pytest.raises(TaskError, match="no active task"):
        net.train()(x, 1, 1.0)
    with pytest.raises(TaskError, match="out of range"):
        net.begin_task(3)
    with pytest.raises(TaskError, match="call net.eval"):
        with torch.no_grad():  # running statistics would change even without gradients
            net.train()(x, 0)
    net.begin_task(1)
    with pytest.raises(TaskError, match="call net.eval"):
        net(x, 0)
    net.end_task()
    net.begin_task(0, retrain=True)
    net.end_task()
    assert net.trained_tasks() == [0, 1]
    with pytest.raises(ValueError, match="alpha"):
        net.begin_task(2, adjustment="hat_const_alpha")
    with pytest.raises(ValueError, match="adjustment"):
        net.begin_task(2, adjustment="ewc")
    with pytest.raises(ValueError, match="mask_init"):
        net.begin_task(2, mask_init="zeros")
    assert net.active_task is None


@pytest.mark.parametrize("mode", ["small_normal", "normal", "uniform", "U01", "U-10", "dense",
                                  "last"])
def test_begin_task_initialises_embeddings(mode):
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2)
    net.begin_task(0)
    net.end_task()
    net.begin_task(1, mask_init=mode)
    e0, e1 = net.gates()["fc"].embedding[0], net.gates()["fc"].embedding[1]
    checks = {
        "small_normal": lambda: 0.03 < e1.std() < 0.08 and e1.min() < 0 < e1.max(),
        "normal": lambda: e1.std() > 0.3,
        "uniform": lambda: e1.min() >= -1 and e1.max() <= 1 and e1.min() < 0 < e1.max(),
        "U01": lambda: e1.min() >= 0 and e1.max() <= 1,
        "U-10": lambda: e1.min() >= -1 and e1.max() <= 0,
        "dense": lambda: torch.all(e1 == 1),
        "last": lambda: torch.equal(e1, e0),
    }
    assert checks[mode]()


def test_capacity_and_mask_usage_report_per_layer():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=3)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    train(net, optimizer, 0, x, y)
    usage = net.mask_usage()
    assert set(usage) == set(net.layout.gated)
    assert usage["fc"][0] == net.masks(0)["fc"].mean().item() and usage["fc"][1] is None
    per_layer = net.layer_capacity()
    assert all(0.0 <= v <= 1.0 for v in per_layer.values())
    # the first layer reads the model input (fully used): its free share is 1 - used units
    stem_used = net.masks(0)["stem"].mean().item()
    assert per_layer["stem"] == pytest.approx(1.0 - stem_used)


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class BranchNet(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(1, 4, 1)
        self.b = nn.Conv2d(1, 4, 1)
        self.ln = nn.LayerNorm(4)
        self.shift = nn.Parameter(torch.zeros(4, 1, 1))
        self.fc = nn.Conv2d(8 if op == "cat" else 4, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.op == "add":
            h = a + b
        elif self.op == "cat":
            h = torch.cat([a, b], dim=1)
        elif self.op == "sigmoid":
            h = torch.sigmoid(a)
        elif self.op == "bias":
            h = a + self.shift
        else:  # a LayerNorm over channels whose output is not gated
            h = self.ln(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(h)


def propagated(net, unit_masks, example):
    masks = {p: torch.zeros(g.units) for p, g in net.gates().items()}
    masks.update({k: torch.tensor(v, dtype=torch.float32) for k, v in unit_masks.items()})
    return input_masks(net.model, net.layout, masks, example, 0)


def test_propagation_repeats_channels_over_positions_at_a_flatten():
    net = hatconvert.convert(FlattenNet(), num_tasks=1, head=False)
    got = propagated(net, {"conv": [1, 0, 1]}, torch.randn(1, 1, 2, 2))
    assert got["fc"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert got["conv"].tolist() == [1]  # the model input counts as used


@pytest.mark.parametrize("op,expected", [
    ("add", [1, 1, 0, 1]),                  # maximum of the two branches
    ("cat", [1, 0, 0, 1, 0, 1, 0, 1]),      # concatenated
    ("sigmoid", [1, 1, 1, 1]),              # sigmoid(0) != 0: conservative
    ("bias", [1, 1, 1, 1]),                 # adding a loose parameter: conservative
    ("norm", [1, 1, 1, 1]),                 # norm output that is not gated: conservative
])
def test_propagation_is_exact_on_known_graphs_and_conservative_elsewhere(op, expected):
    net = hatconvert.convert(BranchNet(op), num_tasks=1, head=False)
    got = propagated(net, {"a": [1, 0, 0, 1], "b": [0, 1, 0, 1]}, torch.randn(1, 1, 3, 3))
    assert got["fc"].tolist() == expected


def test_schedules():
    first, last = hatconvert.mask_scale(0, 10), hatconvert.mask_scale(9, 10)
    assert first == pytest.approx(1 / 400) and last == pytest.approx(400)
    assert all(hatconvert.mask_scale(b, 10) > 0 for b in range(10))
    cos = [hatconvert.mask_scale(b, 11, s_max=100, schedule="cosine", s_min=1.0) for b in range(11)]
    assert cos[0] == pytest.approx(100) and cos[5] == pytest.approx(1.0) and cos[10] == pytest.approx(100)
    assert hatconvert.mask_scale(3, 7, s_max=50, schedule="constant") == 50
    assert hatconvert.mask_scale(0, 1) == pytest.approx(400)
    for bad in [dict(batch=10, num_batches=10), dict(batch=0, num_batches=0),
                dict(batch=0, num_batches=5, schedule="step"), dict(batch=0, num_batches=5, s_max=0)]:
        with pytest.raises(ValueError):
            hatconvert.mask_scale(**bad)
