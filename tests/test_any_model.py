"""Models from other corners of PyTorch: frozen backbones, backbones without a classifier, two
summed heads, heads inside leaves, weighted layers that are not Linear or ConvNd, graph networks.

Each converts, keeps fidelity with dense masks, trains three tasks with one AdamW (weight decay)
kept across them with earlier tasks bit-identical, and round-trips through save/load.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import hatconvert
from hatconvert.errors import ConversionError
from hatconvert.protected import weight_protection

from helpers import flat, run, train_and_check


def images(n):
    return (torch.randn(n, 3, 32, 32),), {}


def dense_matches(model, call, atol=1e-5, **options):
    model.eval()
    net = hatconvert.convert(model, 3, mask_init="dense", **options).eval()
    with torch.no_grad():
        want = flat(model(*call[0], **call[1]))
        got = flat(run(net, call, 0))
    return len(want) == len(got) and all(torch.allclose(a, b, atol=atol) for a, b in zip(want, got))


def round_trip(net, ended, call, tmp_path, model):
    path = tmp_path / "net.safetensors"
    hatconvert.save(net, path)
    loaded = hatconvert.load(path, model=model)
    with torch.no_grad():
        for t, outs in ended.items():
            assert all(torch.equal(a, b) for a, b in zip(flat(run(loaded, call, t)), outs[0]))


def test_a_frozen_backbone_is_reported_frozen_and_stays_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    call = images(4)
    assert dense_matches(model, call)
    net = hatconvert.convert(model, 3)
    report = net.report()
    assert "frozen by the model (requires_grad=False" in str(report)
    assert report.tensors["conv1.weight"] == "frozen"
    assert report.tensors["layer1.0.bn1.copies.2.weight"] == "frozen"
    assert report.tensors["fc.copies.1.weight"] == "task-indexed"
    ended = train_and_check(net, images, [call])
    assert net.capacity() == 0.0  # every gated layer is frozen: nothing is free to train
    for name, before in frozen.items():
        if name.startswith("bn") or ".bn" in name or "downsample.1" in name:
            continue  # norms are task-indexed: their copies are checked through the outputs
        assert torch.equal(net.model.get_parameter(name), before), name
    assert all(torch.equal(net.model.bn1.copies[t].weight, frozen["bn1.weight"]) for t in range(3))
    round_trip(net, ended, call, tmp_path, timm.create_model("resnet18", num_classes=4))


def test_a_features_only_backbone_gets_no_head_and_says_so(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", features_only=True, out_indices=(2, 4))
    call = images(2)
    assert dense_matches(model, call)
    net = hatconvert.convert(model, 3)
    assert net.layout.heads == [] and "layer4.1.conv2" in net.layout.gated
    assert "no head: no layer feeds the output directly" in str(net.report())
    with pytest.raises(ConversionError, match="no classifier layer to give num_classes to"):
        hatconvert.convert(model, 3, num_classes=5)
    ended = train_and_check(net, images, [call])
    round_trip(net, ended, call, tmp_path,
               timm.create_model("resnet18", features_only=True, out_indices=(2, 4)))


class SummedHeads(nn.Module):
    """Two classifiers on two resolutions, summed (the shape of torchvision's LRASPP)."""

    def __init__(self, classes=5):
        super().__init__()
        self.low = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.high = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.low_classifier = nn.Conv2d(8, classes, 1)
        self.high_classifier = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        low = self.low(x)
        high = F.interpolate(self.high(low), size=low.shape[-2:], mode="bilinear")
        return {"out": self.low_classifier(low) + self.high_classifier(high)}


def test_two_summed_classifiers_are_both_heads_with_the_class_counts_of_each_task(tmp_path):
    torch.manual_seed(0)
    call = images(2)
    assert dense_matches(SummedHeads(), call)
    net = hatconvert.convert(SummedHeads(), 3, num_classes=[2, 3, 4])
    assert sorted(net.layout.heads) == ["high_classifier", "low_classifier"]
    net.eval()
    assert [net(call[0][0], t)["out"].shape[1] for t in range(3)] == [2, 3, 4]
    ended = train_and_check(net, images, [call])
    round_trip(net, ended, call, tmp_path, SummedHeads())


def test_torchvision_lraspp_gets_both_classifiers_as_heads():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5)
    net = hatconvert.convert(model, 2, num_classes=[2, 3]).eval()
    assert sorted(net.layout.heads) == ["classifier.high_classifier", "classifier.low_classifier"]
    assert net(torch.randn(1, 3, 64, 64), 1)["out"].shape == (1, 3, 64, 64)


class Block(nn.Module):
    """A leaf (registered below) with a body layer and its own classifier."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(8, 16), nn.Linear(16, 5)

    def forward(self, x):
        if x.shape[0] > 0:  # shape-dependent Python: fx cannot trace it
            x = F.relu(self.body(x))
        return self.fc(x)


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Linear(6, 8), Block()

    def forward(self, x):
        return self.block(F.relu(self.stem(x)))


def test_a_head_inside_a_converted_leaf_can_be_named(tmp_path):
    torch.manual_seed(0)

    def call(n):
        return (torch.randn(n, 6),), {}
    fixed = call(4)
    assert dense_matches(WithLeaf(), fixed, auto_leaves=True, head="block.fc")
    net = hatconvert.convert(WithLeaf(), 3, auto_leaves=True, head="block.fc",
                             num_classes=[2, 3, 4])
    assert net.layout.heads == ["block.fc"] and "block.body" in net.layout.gated
    net.eval()
    assert [net(fixed[0][0], t).shape[1] for t in range(3)] == [2, 3, 4]
    ended = train_and_check(net, call, [fixed])
    round_trip(net, ended, fixed, tmp_path, WithLeaf())


class Transposed(nn.Module):
    """A linear map whose weight is stored (in, out), like GPT-2's Conv1D."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class TransposedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = Transposed(8, 32), Transposed(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(F.relu(self.b(F.relu(self.a(x)))))


def test_an_unregistered_weighted_layer_is_named_in_the_error():
    class Unknown(nn.Module):  # a class of its own: no other test registers it
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))

        def forward(self, x):
            return x @ self.weight

    class Lone(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Unknown(8, 4)

        def forward(self, x):
            return self.a(x)
    with pytest.raises(ConversionError, match=r"a \(Unknown\) hold weights.*register_layer"):
        hatconvert.convert(Lone(), 2)


def test_a_registered_layer_is_gated_protected_and_exported():
    hatconvert.register_layer(Transposed, unit_axis=1, input_axis=0)
    torch.manual_seed(0)

    def call(n):
        return (torch.randn(n, 8),), {}
    fixed = call(5)
    assert dense_matches(TransposedNet(), fixed)
    net = hatconvert.convert(TransposedNet(), 3)
    assert set(net.layout.gated) == {"a", "b"} and net.layout.gated["a"].units == 32
    train_and_check(net, call, [fixed])
    plain = TransposedNet()
    plain.load_state_dict(hatconvert.export(net, 1))
    assert torch.allclose(plain.eval()(fixed[0][0]), net.eval()(fixed[0][0], 1), atol=1e-5)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_a_registered_layer_protects_the_entries_a_linear_would(n_in, n_out, data):
    """Protection of an (in, out) weight is the Linear's (out, in) protection transposed."""
    hatconvert.register_layer(Transposed, unit_axis=1, input_axis=0)
    out_mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n_out, max_size=n_out)))
    in_mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n_in, max_size=n_in)))
    weight_t, bias_t = weight_protection(Transposed(n_in, n_out), out_mask.float(), in_mask.float())
    weight_l, bias_l = weight_protection(nn.Linear(n_in, n_out), out_mask.float(), in_mask.float())
    assert torch.equal(weight_t, weight_l.T) and torch.equal(bias_t, bias_l)


def test_bad_registrations_are_refused():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        hatconvert.register_layer(int)
    with pytest.raises(ValueError, match="unit_axis and input_axis are both 0"):
        hatconvert.register_layer(Transposed, unit_axis=0, input_axis=0)
    with pytest.raises(ValueError, match="feature_dim must be -1"):
        hatconvert.register_layer(Transposed, feature_dim=2)


def test_a_lazy_layer_is_refused_until_it_has_run():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConversionError, match="layer '0' .*uninitialized .*run the model once"):
        hatconvert.convert(model, 2)
    model(torch.randn(1, 5))
    assert "0" in hatconvert.convert(model, 2).layout.gated


def test_recurrent_layers_are_copied_per_task_and_reported():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rnn, self.head = nn.Linear(4, 8), nn.LSTM(8, 8, batch_first=True), \
                nn.Linear(8, 2)

        def forward(self, x):
            out, _ = self.rnn(F.relu(self.inp(x)))
            return self.head(out[:, -1])
    torch.manual_seed(0)

    def call(n):
        return (torch.randn(n, 5, 4),), {}
    fixed = call(3)
    assert dense_matches(Recurrent(), fixed)
    net = hatconvert.convert(Recurrent(), 3)
    assert "recurrent layers (1): rnn are not gated" in str(net.report())
    assert net.layout.task_leaves == ["rnn"]
    train_and_check(net, call, [fixed])


class Detector(nn.Module):
    """Detection-style: data-dependent Python in the top level (a score threshold), so no
    graph of its forward exists; the layers inside are what HAT must gate."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.scores, self.boxes = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 4, 1)

    def forward(self, images, targets=None):
        features = self.backbone(images)
        scores, boxes = self.scores(features), self.boxes(features)
        if targets is not None:  # training: a loss per head
            return {"scores": scores.pow(2).mean(), "boxes": (boxes - targets).abs().mean()}
        keep = scores[:, 1].flatten(1) > scores[:, 0].flatten(1)
        if bool(keep.any()):
            return [b.flatten(1).T[k] for b, k in zip(boxes, keep)]
        return [boxes.new_zeros(0, 4) for _ in boxes]


def test_a_model_whose_own_forward_does_not_trace_is_kept_whole(tmp_path):
    with pytest.raises(ConversionError, match=r"top-level forward of Detector, in forward\(\) at "
                                              r".*test_any_model.py.*auto_leaves=True to keep "
                                              r"the model whole"):
        hatconvert.convert(Detector(), 3)
    torch.manual_seed(0)
    call = images(2)
    assert dense_matches(Detector(), call, auto_leaves=True)
    net = hatconvert.convert(Detector(), 3, auto_leaves=True, head=["scores"])
    report = str(net.report())
    assert "the model is kept whole: its own forward does not trace" in report
    assert set(net.layout.gated) == {"backbone.0", "backbone.3", "boxes"}
    assert net.layout.heads == ["scores"] and net.layout.norms == ["backbone.1"]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    ended = {}
    for t in range(3):
        net.train()
        net.begin_task(t)
        for b in range(3):
            s = hatconvert.mask_scale(b, 3)
            losses = net(*images(2)[0], t, s, targets=torch.randn(2, 4, 32, 32))
            loss = sum(losses.values()) + net.regularization(t, s)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.end_task()
        net.eval()
        with torch.no_grad():
            ended[t] = [flat(run(net, call, t))]
            for u in range(t):
                assert all(torch.equal(a, b) for a, b in zip(flat(run(net, call, u)),
                                                             ended[u][0]))
    round_trip(net, ended, call, tmp_path, Detector())
    plain = Detector()
    plain.load_state_dict(hatconvert.export(net, 1))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(
        flat(plain.eval()(*call[0])), flat(net(*call[0], 1))))


def test_torchvision_detection_is_kept_whole_and_keeps_earlier_tasks():
    detection = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3)
    batch = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    assert dense_matches(model, ((batch,), {}), atol=1e-4, auto_leaves=True)
    net = hatconvert.convert(model, 2, auto_leaves=True)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[8.0, 2.0, 30.0, 40.0]]), "labels": torch.tensor([2])}]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    for t in range(2):
        net.train()
        net.begin_task(t)
        losses = net(batch, t, 10.0, targets=targets)
        (sum(losses.values()) + net.regularization(t, 10.0)).backward()
        opt.step()
        opt.zero_grad()
        net.end_task()
        if t == 0:
            with torch.no_grad():
                before = flat(net.eval()(batch, 0))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(flat(net.eval()(batch, 0)), before))


def test_gpt2_conv1d_is_gated_without_registration():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class GPTish(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = pytorch_utils.Conv1D(32, 8), pytorch_utils.Conv1D(8, 32)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(x + self.c_proj(F.gelu(self.c_fc(x))))
    torch.manual_seed(0)

    def call(n):
        return (torch.randn(n, 5, 8),), {}
    fixed = call(4)
    assert dense_matches(GPTish(), fixed)
    net = hatconvert.convert(GPTish(), 3)
    assert net.layout.gated["c_fc"].units == 32 and net.layout.gated["c_proj"].units == 8
    train_and_check(net, call, [fixed])


def test_a_pytorch_geometric_network_converts_without_auto_leaves(tmp_path):
    pyg = pytest.importorskip("torch_geometric.nn")

    class GNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = pyg.GCNConv(8, 16), pyg.SAGEConv(16, 16)
            self.head = pyg.Linear(16, 3)

        def forward(self, x, edge_index):
            return self.head(F.relu(self.c2(F.relu(self.c1(x, edge_index)), edge_index)))
    torch.manual_seed(0)

    def call(n):
        return (torch.randn(6, 8),), {"edge_index": torch.randint(0, 6, (2, 12))}
    fixed = call(0)
    assert dense_matches(GNN(), fixed)
    net = hatconvert.convert(GNN(), 3)
    assert {"c1.lin", "c2.lin_l", "c2.lin_r"} <= set(net.layout.gated)
    assert net.layout.heads == ["head"]
    ended = train_and_check(net, call, [fixed])
    round_trip(net, ended, fixed, tmp_path, GNN())


@pytest.mark.parametrize("dim", [0, 2, None])
def test_a_weight_normed_layer_is_gated_frozen_after_task_0_and_exported(dim):
    from torch.nn.utils.parametrizations import weight_norm

    class WeightNormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = weight_norm(nn.Conv1d(4, 8, 3, padding=1), dim=dim)
            self.c2, self.fc = nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(-1))
    torch.manual_seed(0)
    net = hatconvert.convert(WeightNormed(), 3, num_classes=3)
    assert "c1" in net.layout.gated
    assert net.report().tensors["c1.parametrizations.weight.original1"] == "frozen"

    def call(n):
        return (torch.randn(n, 4, 10),), {}
    fixed = call(4)
    train_and_check(net, call, [fixed])
    assert not bool(net.gates()["c1"].mask(1).all())  # the export has closed units to fold
    c1 = net.model.c1  # its weight is frozen after task 0: at most its bias is free
    assert net.layer_capacity()["c1"] <= c1.bias.numel() / (c1.weight.numel() + c1.bias.numel())
    assert net.layer_capacity()["c2"] > 0.1
    plain = WeightNormed().eval()
    plain.load_state_dict(hatconvert.export(net, 1))
    with torch.no_grad():
        torch.testing.assert_close(plain(fixed[0][0]), net.eval()(fixed[0][0], 1))
