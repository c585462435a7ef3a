"""Mixed-task batches: ``net(x, task_id=ids)`` in eval mode equals each sample run alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatconvert
from hatconvert import MixedBatchError
from models import ResidualConcatNet, SequenceNet

timm = pytest.importorskip("timm")


def scramble(net: hatconvert.HATNetwork, seed: int = 0) -> None:
    """Make every task differ: random gates, norm copies, heads and per-task parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "copies" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in net.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


class NormsMLP(nn.Module):
    """LayerNorm, BatchNorm1d and a head whose class count differs per task."""

    def __init__(self):
        super().__init__()
        self.a, self.ln = nn.Linear(8, 16), nn.LayerNorm(16)
        self.b, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.b(F.relu(self.ln(self.a(x)))))))


class AttentionLeaf(nn.Module):
    """nn.MultiheadAttention is a leaf fx keeps whole: converted inside, run per task."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.att(h, h, h)[0].mean(1))


class Recurrent(nn.Module):
    """An LSTM copied per task (``loose="task"``): its state is ``(layers, batch, hidden)``."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn = nn.Linear(8, 16), nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0][:, -1])


class TokenPrefix(nn.Module):
    """A per-task token prefix expanded over the batch and concatenated (like cls_token)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.prefix = nn.Parameter(torch.randn(1, 2, 16))
        self.scale = nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.cat([self.prefix.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        return self.head((h * self.scale.view(1, 1, -1)).mean(1))


def vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                             num_classes=5, init_values=0.1)


CASES = {
    "mlp-norms-heads": (NormsMLP, (8,), {"num_classes": [2, 4, 3]}),
    "residual-concat": (ResidualConcatNet, (3, 16, 16), {}),
    "sequence-loose-param": (SequenceNet, (2, 8), {}),
    "attention-leaf": (AttentionLeaf, (5, 8), {}),
    "lstm-per-task": (Recurrent, (5, 8), {"loose": "task"}),
    "token-prefix": (TokenPrefix, (5, 8), {}),
    "timm-vit-layerscale": (vit, (3, 32, 32), {"num_classes": 5}),
    "timm-resnet18": (lambda: timm.create_model("resnet18", num_classes=5), (3, 32, 32),
                      {"num_classes": 5}),
    "timm-convnext": (lambda: timm.create_model("convnext_atto", num_classes=5), (3, 32, 32),
                      {"num_classes": 5}),
}


def converted(name: str, batch: int = 9):
    build, shape, options = CASES[name]
    torch.manual_seed(0)
    net = hatconvert.convert(build(), num_tasks=3, **options).eval()
    x = torch.randn(batch, *shape)
    net(x[:2], 0)  # the example call
    scramble(net)
    return net, x


def alone(net, x, t):
    with torch.no_grad():
        return net(x, t)


@pytest.mark.parametrize("name", list(CASES))
def test_mixed_batch_equals_each_sample_alone(name):
    net, x = converted(name)
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1])
    with torch.no_grad():
        out = net(x, task_id=ids)
    for i, t in enumerate(ids.tolist()):
        expected = alone(net, x[i:i + 1], t)
        got = out[i:i + 1, :expected.shape[1]]
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (name, i, t)
    # the test could fail: each task computes something else for the same samples
    a, b = alone(net, x, 0), alone(net, x, 2)
    assert not torch.allclose(a, b[:, :a.shape[1]], atol=1e-3)


def test_heads_of_different_class_counts_are_padded_with_minus_inf():
    net, x = converted("mlp-norms-heads")
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    out = net(x, task_id=ids)
    assert out.shape == (9, 4)  # the widest head
    for i, t in enumerate(ids.tolist()):
        classes = [2, 4, 3][t]
        assert torch.isneginf(out[i, classes:]).all()
        assert torch.isfinite(out[i, :classes]).all()
    # argmax and cross-entropy per sample need no unpadding
    labels = torch.tensor([1, 3, 2, 0, 2, 1, 1, 0, 0])
    per_sample = torch.stack([F.cross_entropy(alone(net, x[i:i + 1], t), labels[i:i + 1])
                              for i, t in enumerate(ids.tolist())])
    assert torch.allclose(F.cross_entropy(out, labels, reduction="none"), per_sample, atol=1e-5)


def test_mixed_ids_are_refused_in_training_and_when_malformed():
    net, x = converted("residual-concat")
    ids = torch.tensor([0, 1, 2] * 3)
    stats = copy.deepcopy({k: v for k, v in net.state_dict().items() if "running" in k})
    net.train()
    with pytest.raises(hatconvert.TaskError, match="evaluation only"):
        net(x, task_id=ids)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())
    net.eval()
    with pytest.raises(hatconvert.TaskError, match="mask_scale"):
        net(x, task_id=ids, mask_scale=10.0)
    with pytest.raises(hatconvert.TaskError, match="8 entries but the batch has 9"):
        net(x, task_id=ids[:8])
    with pytest.raises(hatconvert.TaskError, match=r"task_id\[4\] is 3, out of range"):
        net(x, task_id=torch.tensor([0, 1, 2, 0, 3, 1, 0, 1, 2]))
    with pytest.raises(hatconvert.TaskError, match="integer tensor"):
        net(x, task_id=ids.float())


def test_a_closed_unit_holding_inf_gives_exactly_zero_to_its_samples():
    """A later task's diverged weights (inf) in a unit task 0 leaves closed never reach task 0's
    samples: the mask selects, it does not multiply."""
    net, x = converted("mlp-norms-heads")
    gate = net.gates()["a"]
    with torch.no_grad():
        gate.embedding[0, 3], gate.embedding[1, 3] = -1.0, 1.0
        net.model.a.weight[3] = float("inf")
    ids = torch.tensor([0, 1, 2] * 3)
    out = net(x, task_id=ids)
    rows = (ids == 0).nonzero().squeeze(1)
    assert torch.isfinite(alone(net, x[rows], 0)).all()
    assert torch.allclose(out[rows, :2], alone(net, x[rows], 0), rtol=1e-4, atol=1e-5)
    assert not torch.isfinite(out[ids == 1]).all()  # task 1 opens the unit: its samples see it


class MatmulParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)
        self.mix = nn.Parameter(torch.randn(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.fc(x) @ self.mix)


def test_a_parameter_use_without_per_sample_form_is_refused_by_name():
    torch.manual_seed(0)
    net = hatconvert.convert(MatmulParameter(), num_tasks=3).eval()
    x = torch.randn(4, 8)
    net(x, 0)
    with pytest.raises(MixedBatchError, match="'mix'"):
        net(x, task_id=torch.tensor([0, 1, 2, 0]))


class SequenceFirst(nn.Module):
    """Runs its layers on ``(length, batch, features)``: the batch is not on dim 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(x.transpose(0, 1))).transpose(0, 1).mean(1))


@pytest.mark.parametrize("length", [4, 5])
def test_a_graph_with_the_batch_elsewhere_fails_loudly(length):
    """length != batch: a shape check refuses it; length == batch: the gates would fit the
    wrong dim, and the check against per-task runs of the first such batch refuses it."""
    torch.manual_seed(0)
    net = hatconvert.convert(SequenceFirst(), num_tasks=3).eval()
    x = torch.randn(4, length, 8)
    net(x, 0)
    scramble(net)
    with pytest.raises(MixedBatchError):
        net(x, task_id=torch.tensor([0, 1, 2, 1]))


def test_a_copy_runs_mixed_batches_with_its_own_weights():
    net, x = converted("timm-vit-layerscale")
    ids = torch.tensor([0, 1, 2] * 3)
    before = net(x, task_id=ids).detach()
    twin = copy.deepcopy(net)
    scramble(twin, seed=1)
    assert torch.equal(net(x, task_id=ids), before)
    mixed = twin(x, task_id=ids)
    assert not torch.allclose(mixed, before, atol=1e-3)
    for t in range(3):
        rows = (ids == t).nonzero().squeeze(1)
        assert torch.allclose(mixed[rows], alone(twin, x[rows], t), rtol=1e-4, atol=1e-5)


def test_a_single_task_tensor_of_ids_equals_the_plain_call():
    net, x = converted("timm-resnet18")
    for t in range(3):
        ids = torch.full((9,), t)
        assert torch.allclose(net(x, task_id=ids), alone(net, x, t), rtol=1e-4, atol=1e-5)


def _agrees_with_each_task(net, x, ids, out) -> None:
    for t in torch.unique(ids).tolist():
        rows = (ids == t).nonzero().squeeze(1)
        expected = alone(net, x[rows], t)
        got = out[rows]
        assert torch.isneginf(got[:, expected.shape[1]:]).all()
        assert torch.allclose(got[:, :expected.shape[1]], expected, rtol=1e-4, atol=1e-5,
                              equal_nan=True), t


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from random_graphs import build_model  # noqa: E402
from test_fuzz_forgetting import programs  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs(), seed=st.integers(0, 1000),
       order=st.permutations([0, 1, 2, 0, 1, 2]))
def test_random_program_mixed_batches_equal_per_task_runs_or_are_refused(program, seed, order):
    """Random graphs (tests/random_graphs.py): a mixed batch either equals running each
    task's samples with its id, on the first batch and on a second one of the same shape
    (checked once, then trusted), or is refused with a MixedBatchError; never anything else."""
    model = build_model(program, seed)
    classes = program.classes
    try:
        net = hatconvert.convert(model, num_tasks=3,
                                 num_classes=classes[0] if len(set(classes)) == 1 else
                                 list(classes)).eval()
    except hatconvert.ConversionError:
        return
    g = torch.Generator().manual_seed(seed)
    x, x2 = (torch.randn((6,) + tuple(program.input_shape), generator=g) for _ in range(2))
    with torch.no_grad():
        net(x[:2], 0)
    scramble(net, seed)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        try:
            out = net(x, task_id=ids)
        except MixedBatchError:
            return
        _agrees_with_each_task(net, x, ids, out)
        ids2 = torch.tensor(order)
        _agrees_with_each_task(net, x2, ids2, net(x2, task_id=ids2))
