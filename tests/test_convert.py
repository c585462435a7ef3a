"""hatconvert.convert: fidelity, gating, task-indexed copies, reports and errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import hatconvert
from hatconvert import ConversionError, TaskError
from hatconvert.gates import GATE_FLOOR, soft_gate  # internal: the subnormal flush under test
from models import DataDependent, ResidualConcatNet, SequenceNet

TIMM_MODELS = {
    "resnet18": 64, "resnet50": 64, "efficientnet_b0": 64, "mobilenetv3_small_100": 64,
    "convnext_atto": 64, "vit_tiny_patch16_224": 224, "swin_tiny_patch4_window7_224": 224,
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_dense_masks_reproduce_timm_model_for_every_task(name):
    model = timm.create_model(name, num_classes=7).eval()
    net = hatconvert.convert(model, num_tasks=3, mask_init="dense").eval()
    x = torch.randn(2, 3, TIMM_MODELS[name], TIMM_MODELS[name])
    with torch.no_grad():
        expected = model(x)
        for t in range(3):
            assert max_diff(net(x, task_id=t), expected) <= 1e-5
    assert net.layout.gated, "a timm model must have gated layers"
    # A training forward with soft gates runs backward into weights and embeddings.
    net.train()
    net(x, task_id=1, mask_scale=10.0).square().mean().backward()
    gated = next(iter(net.layout.gated.values()))
    assert net.model.get_submodule(gated.path).weight.grad is not None
    assert net.model.get_submodule(gated.gate).embedding.grad[1].abs().sum() > 0


@pytest.mark.parametrize("factory,shape", [(ResidualConcatNet, (3, 3, 16, 16)),
                                           (SequenceNet, (3, 2, 8))])
def test_dense_masks_reproduce_hand_written_models(factory, shape):
    model = factory().eval()
    net = hatconvert.convert(model, num_tasks=2, mask_init="dense").eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        for t in range(2):
            assert max_diff(net(x, t), model(x)) <= 1e-5


def test_every_gate_mode_is_used_and_exact():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2)
    modes = {g.path: g.mode for g in net.layout.gated.values()}
    assert modes["stem"] == "norm"          # folded into the following BatchNorm's affine
    assert modes["branch_a"] == "weight"    # folded into the weight rows
    # GroupNorm(2, 4) mixes channels: the gate goes before it, folded into the conv
    assert modes["branch_b"] == "weight" and net.layout.gated["branch_b"].norm is None
    assert modes["fc"] == "weight" and net.layout.gated["fc"].norm is None  # before LayerNorm
    seq = hatconvert.convert(SequenceNet(), num_tasks=2)
    assert seq.layout.gated["up"].mode == "output"  # ConvTranspose: output gate
    # InstanceNorm normalizes each channel on its own: the gate multiplies its output
    assert seq.layout.gated["conv"].norm == "inorm" and seq.layout.gated["conv"].mode == "output"


def test_hard_gates_are_binary_and_zero_the_units_they_close():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16))
    net = hatconvert.convert(model, num_tasks=3, head=False).eval()
    x = torch.randn(5, 6)
    for t in range(3):
        mask = net.masks(t)["2"]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        out = net(x, t)
        assert torch.all(out[:, mask == 0] == 0)
        assert torch.all(out[:, mask == 1] != 0)
    assert not torch.equal(net(x, 0), net(x, 1))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_normal_init_gives_each_task_its_own_function(name):
    net = hatconvert.convert(name, num_tasks=3, num_classes=4).eval()
    x = torch.randn(2, 3, 224 if "vit" in name else 64, 224 if "vit" in name else 64)
    with torch.no_grad():
        outs = [net(x, t) for t in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    for mask in net.masks(0).values():
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_the_callers_model_is_not_changed():
    model = timm.create_model("resnet18", num_classes=3)
    before = copy.deepcopy(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    net = hatconvert.convert(model, num_tasks=2)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    net.model.conv1.weight.data.add_(1.0)
    assert torch.equal(model.conv1.weight, before["conv1.weight"])


def test_task_indexed_norms_keep_separate_statistics():
    net = hatconvert.convert("resnet18", num_tasks=3, num_classes=2).train()
    bn = net.model.get_submodule("bn1")
    before = [c.running_mean.clone() for c in bn.copies]
    net(torch.randn(4, 3, 32, 32), task_id=1, mask_scale=5.0)
    assert torch.equal(bn.copies[0].running_mean, before[0])
    assert torch.equal(bn.copies[2].running_mean, before[2])
    assert not torch.equal(bn.copies[1].running_mean, before[1])
    assert bn.copies[1].num_batches_tracked.item() == 1


def test_subclass_behaviour_is_kept():
    net = hatconvert.convert("efficientnet_b0", num_tasks=2, num_classes=2)
    norm = net.model.get_submodule("bn1")
    assert type(norm.copies[0]).__name__ == "BatchNormAct2d"  # activation inside is kept
    convnext = hatconvert.convert("convnext_atto", num_tasks=2, num_classes=2)
    assert type(convnext.model.get_submodule("stem.1").copies[1]).__name__ == "LayerNorm2d"


def test_heads_get_one_copy_per_task_with_their_own_classes():
    net = hatconvert.convert("resnet18", num_tasks=3, num_classes=[2, 5, 3]).eval()
    assert net.layout.heads == ["fc"]
    x = torch.randn(2, 3, 32, 32)
    assert [net(x, t).shape[1] for t in range(3)] == [2, 5, 3]
    assert "fc" not in net.layout.gated


def test_head_can_be_named_or_found_without_timm():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2, num_classes=4)
    assert net.layout.heads == ["out"]
    named = hatconvert.convert(ResidualConcatNet(), num_tasks=2, head="fc")
    assert named.layout.heads == ["fc"] and "out" in named.layout.gated


def test_loose_parameters_are_task_indexed_or_frozen():
    vit = hatconvert.convert("vit_tiny_patch16_224", num_tasks=2, num_classes=2)
    assert set(vit.layout.task_params) == {"cls_token", "pos_embed"}
    frozen = hatconvert.convert("vit_tiny_patch16_224", num_tasks=2, num_classes=2,
                                loose="freeze")
    assert set(frozen.layout.frozen_params) == {"cls_token", "pos_embed"}
    assert frozen.report().count("frozen") == 2


def test_report_accounts_for_every_parameter_and_buffer():
    net = hatconvert.convert("convnext_atto", num_tasks=2, num_classes=3)
    report = net.report()
    names = {n for n, _ in net.model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in net.model.named_buffers(remove_duplicate=False)}
    assert set(report.tensors) == names
    assert report.count("gated") == 2 * len(net.layout.gated)  # every convnext layer has a bias
    assert report.overhead_percent > 0
    text = str(report)
    assert "stages.0.blocks.0.conv_dw" in text and "unaccounted 0" in text
    assert "stages.0.blocks.0.gamma" in text


def test_leaf_modules_with_hidden_weights_are_task_indexed():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.embed(x).mean(1))

    # the table is most of this model: embeddings="auto" would freeze it (test_transformers.py)
    net = hatconvert.convert(WithEmbedding(), num_tasks=2, head=False, embeddings="loose")
    assert net.layout.task_leaves == ["embed"]
    frozen = hatconvert.convert(WithEmbedding(), num_tasks=2, head=False, loose="freeze",
                                embeddings="loose")
    assert frozen.layout.frozen_leaves == ["embed"]
    assert "frozen leaves" in str(frozen.report())


def test_include_and_exclude_choose_gated_layers():
    net = hatconvert.convert("resnet18", num_tasks=2, num_classes=2, include=["layer4.*"])
    assert net.layout.gated and all(p.startswith("layer4.") for p in net.layout.gated)
    assert "conv1" in net.layout.task_leaves  # not gated, so one copy per task
    net = hatconvert.convert("resnet18", num_tasks=2, num_classes=2, exclude=["layer1.*"])
    assert not any(p.startswith("layer1.") for p in net.layout.gated)
    with pytest.raises(ConversionError, match="nothing matched"):
        hatconvert.convert("resnet18", num_tasks=2, include=["nope.*"])


def test_soft_gates_never_produce_subnormals_and_keep_their_gradient():
    e = torch.linspace(-6, 6, 1001, requires_grad=True)
    a = soft_gate(e, 400.0)
    tiny = torch.finfo(torch.float32).tiny
    assert not torch.any((a > 0) & (a < tiny))
    assert torch.all((a == 0) | (a >= GATE_FLOOR))
    a.sum().backward()
    assert torch.all(e.grad >= 0) and e.grad[(a == 0).nonzero()[-1]] > 0


def test_training_forward_at_large_mask_scale_has_no_subnormal_activations():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=2).train()
    tiny = torch.finfo(torch.float32).tiny
    seen = []
    for module in net.model.modules():
        module.register_forward_hook(lambda m, i, o: seen.append(o) if torch.is_tensor(o) else None)
    net(torch.randn(4, 3, 16, 16), task_id=0, mask_scale=400.0)
    for out in seen:
        assert not torch.any((out != 0) & (out.abs() < tiny))


def test_weights_load_from_a_local_file(tmp_path):
    from safetensors.torch import save_file
    source = timm.create_model("resnet18")
    with torch.no_grad():
        source.conv1.weight.mul_(3.0)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    net = hatconvert.convert("resnet18", num_tasks=2, mask_init="dense", weights=path).eval()
    assert torch.equal(net.model.conv1.weight, source.conv1.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(net(x, 1), source.eval()(x)) <= 1e-5
    with pytest.raises(ConversionError, match="does not exist"):
        hatconvert.convert("resnet18", num_tasks=2, weights=tmp_path / "missing.safetensors")


@pytest.mark.parametrize("task_id", [3, -1, 1.0, "0", True, torch.tensor([0, 1]), torch.tensor(1.0)])
def test_bad_task_ids_are_refused(task_id):
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=3)
    with pytest.raises(TaskError, match="task_id"):
        net(torch.randn(1, 3, 16, 16), task_id)


def test_tensor_task_id_and_bad_mask_scale():
    net = hatconvert.convert(ResidualConcatNet(), num_tasks=3).eval()
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(net(x, torch.tensor(2)), net(x, 2))
    for bad in (0.0, -1.0, float("nan"), "50"):
        with pytest.raises(ValueError, match="mask_scale"):
            net(x, 0, mask_scale=bad)


def test_untraceable_model_names_the_module_and_what_to_register():
    with pytest.raises(ConversionError) as info:
        hatconvert.convert(DataDependent(), num_tasks=2)
    message = str(info.value)
    assert "'router'" in message and "Router" in message
    assert "register_leaf_module" in message


def test_registered_leaf_module_gets_past_a_tracing_failure():
    @hatconvert.register_leaf_module
    class LeafRouter(DataDependent.Router):  # a subclass, so other tests still see the failure
        pass

    model = DataDependent()
    model.router = LeafRouter()
    net = hatconvert.convert(model, num_tasks=2, head=False)
    assert "fc" in net.layout.gated
    net(torch.randn(2, 4), 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_tasks=0), "num_tasks"),
    (dict(num_tasks=2.0), "num_tasks"),
    (dict(num_tasks=3, num_classes=[2, 2]), "one class count per task"),
    (dict(num_tasks=2, num_classes=[2, 0]), "num_classes"),
    (dict(num_tasks=2, mask_init="zeros"), "mask_init"),
    (dict(num_tasks=2, loose="share"), "loose"),
    (dict(num_tasks=2, head="nope"), "head 'nope'"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ConversionError, match=match):
        hatconvert.convert(ResidualConcatNet(), **kwargs)


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ConversionError, match="resnet18"):
        hatconvert.convert("resnet19", num_tasks=2)


def test_head_subclasses_are_resized_keeping_their_class():
    net = hatconvert.convert("mobilenetv3_small_100", num_tasks=2, num_classes=[3, 4]).eval()
    head = net.model.get_submodule("classifier")
    original = timm.create_model("mobilenetv3_small_100", num_classes=3).classifier
    assert all(type(c) is type(original) for c in head.copies)  # timm's Linear subclass
    x = torch.randn(1, 3, 64, 64)
    assert [net(x, t).shape[1] for t in range(2)] == [3, 4]
