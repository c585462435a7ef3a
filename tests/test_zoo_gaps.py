"""The gaps the zoo found, each closed on a small model of the same structure.

Every test checks the three invariants where they apply: fidelity with dense masks, every
tensor accounted for in the report, and zero forgetting with one AdamW (weight decay) kept
across tasks.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import DropPath, LayerScale2d, RmsNorm2d, StdConv2d
from timm.layers.cond_conv2d import CondConv2d
from timm.layers.evo_norm import EvoNorm2dB0
from timm.layers.grn import GlobalResponseNorm
from timm.models.mlp_mixer import Affine
from timm.models.mobilevit import MobileVitBlock
from torch import nn

import hatconvert
from hatconvert import ConversionError
# internal: these tests check the propagated masks and the protected entries themselves
from hatconvert.propagation import input_masks
from hatconvert.protected import weight_protection
from helpers import eval_out, train
from models import DataDependent


# -- helpers -------------------------------------------------------------------------------------
def perturbed(model: nn.Module) -> nn.Module:
    """Noise on every parameter: zero-initialised heads and tiny layer scales hide errors."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def assert_dense_fidelity(model: nn.Module, x: torch.Tensor, **options) -> hatconvert.HATNetwork:
    model.eval()
    net = hatconvert.convert(model, num_tasks=2, mask_init="dense", **options).eval()
    with torch.no_grad():
        expected = model(x)
        scale = expected.abs().max().item()
        assert scale > 0
        for t in range(2):
            assert (net(x, t) - expected).abs().max().item() <= 1e-5 * scale
    return net


def assert_accounted(net: hatconvert.HATNetwork) -> None:
    names = {n for n, _ in net.model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in net.model.named_buffers(remove_duplicate=False)}
    assert set(net.report().tensors) == names
    assert "unaccounted 0" in str(net.report())


def assert_zero_forgetting(model: nn.Module, x: torch.Tensor, classes: int, steps: int = 3,
                           **options) -> hatconvert.HATNetwork:
    """Three tasks, one AdamW with weight decay for all: tasks 0 and 1 stay bit-identical."""
    net = hatconvert.convert(model, num_tasks=3, **options)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.05)
    expected = {}
    for task in range(3):
        train(net, optimizer, task, x, torch.randint(0, classes, (x.shape[0],)), steps)
        for earlier, out in expected.items():
            assert torch.equal(eval_out(net, x, earlier), out), f"task {earlier} changed"
        expected[task] = eval_out(net, x, task)
    assert not torch.equal(expected[2], expected[0]), "later tasks must learn something"
    return net


def propagated(net, unit_masks, example):
    masks = {p: torch.zeros(g.units) for p, g in net.gates().items()}
    masks.update({k: torch.tensor(v, dtype=torch.float32) for k, v in unit_masks.items()})
    return input_masks(net.model, net.layout, masks, example, 0)


# -- weights used through F.linear (beit, eva, swinv2) --------------------------------------------
def tiny_beit() -> nn.Module:
    return timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=4)


def test_functional_linear_is_gated_like_a_called_layer():
    x = torch.randn(3, 3, 32, 32)
    net = assert_dense_fidelity(perturbed(tiny_beit()), x)
    qkv = net.layout.gated["blocks.0.attn.qkv"]
    assert qkv.mode == "function" and qkv.units == 96
    assert "blocks.0.attn.qkv.weight" not in net.layout.task_params
    assert "blocks.0.attn.q_bias" in net.layout.task_params  # the bias F.linear adds: per task
    assert net.report().tensors["blocks.0.attn.qkv.weight"] == "gated"
    assert qkv.external_bias  # F.linear adds q_bias/v_bias, which the gate also multiplies
    assert_accounted(net)
    trained = assert_zero_forgetting(tiny_beit(), x, classes=4)
    with pytest.raises(hatconvert.ExportError, match="blocks.0.attn.qkv"):
        hatconvert.export(trained, 0)  # closed units cannot be folded into the weight alone


def tiny_torchvision_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                              num_heads=[2, 2], window_size=[2, 2],
                                              num_classes=4)


def test_weights_passed_to_an_untraced_function_get_the_gate_in_their_rows():
    """torchvision's swin passes qkv.weight and proj.weight to shifted_window_attention."""
    x = torch.randn(3, 3, 16, 16)
    net = assert_dense_fidelity(perturbed(tiny_torchvision_swin()), x)
    for layer in ("features.1.0.attn.qkv", "features.1.0.attn.proj"):
        assert net.layout.gated[layer].mode == "rows"
        assert f"{layer}.weight" not in net.layout.task_params
    assert_accounted(net)
    trained = assert_zero_forgetting(tiny_torchvision_swin(), x, classes=4)
    original = tiny_torchvision_swin().eval()
    original.load_state_dict(hatconvert.export(trained, 1))  # the rows are what the graph uses
    with torch.no_grad():
        assert torch.equal(original(x), eval_out(trained, x, 1))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.qkv = nn.Linear(6, 4, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        h = F.linear(h, self.qkv.weight, self.q_bias)
        return self.head(torch.relu(h))


def test_functional_linear_records_its_input_for_protection():
    net = hatconvert.convert(FunctionalNet(), num_tasks=1)
    got = propagated(net, {"fc": [1, 0, 1, 0, 0, 1]}, torch.randn(1, 5))
    assert got["qkv"].tolist() == [1, 0, 1, 0, 0, 1]


# -- weights hidden inside leaf modules ------------------------------------------------------------
class SmallMobileVit(nn.Module):
    """A timm MobileVitBlock (a not-traceable leaf of timm) between a stem and a head."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = MobileVitBlock(8, 8, transformer_dim=16, transformer_depth=1, patch_size=2,
                                    num_heads=2)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_leaf_module_is_converted_inside():
    x = torch.randn(4, 3, 8, 8)
    model = perturbed(SmallMobileVit())
    net = assert_dense_fidelity(model, x)
    layout = net.layout
    assert layout.converted_leaves == ["block"] and not layout.task_leaves
    inner = layout.gated["block.transformer.0.attn.qkv"]
    assert inner.mode == "leaf" and inner.leaf == "block"
    assert "block.conv_kxk.bn" in layout.norms and "block.transformer.0.norm1" in layout.norms
    # the layers keep their names: state dicts keep the original keys
    assert "block.conv_kxk.conv.weight" in dict(net.model.named_parameters())
    assert_accounted(net)
    assert_zero_forgetting(SmallMobileVit(), x, classes=4)
    loose = hatconvert.convert(SmallMobileVit(), num_tasks=2, leaves="loose")
    assert loose.layout.task_leaves == ["block"] and not loose.layout.converted_leaves
    # inside a converted leaf, a submodule with nothing to gate follows the loose policy
    mlp = "block.transformer.0.mlp"
    indexed = hatconvert.convert(SmallMobileVit(), num_tasks=2, exclude=[f"{mlp}.*"])
    assert indexed.layout.task_leaves == [mlp] and f"{mlp}.fc1" not in indexed.layout.gated
    frozen = hatconvert.convert(SmallMobileVit(), num_tasks=2, exclude=[f"{mlp}.*"],
                                loose="freeze")
    assert frozen.report().tensors[f"{mlp}.fc1.weight"] == "frozen"
    assert_accounted(indexed)
    assert_accounted(frozen)


@hatconvert.register_leaf_module
class ReadsWeight(nn.Module):
    """A leaf whose code reads its layer's weight directly and holds a loose parameter."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.full((6,), 2.0))

    def forward(self, x):
        if x.shape[-1] != 4:  # a shape branch: the reason such modules are leaves
            raise ValueError("expected 4 features")
        return F.linear(x, self.proj.weight, self.proj.bias) * self.scale


class ReadsWeightNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.leaf = ReadsWeight()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.leaf(torch.relu(self.fc(x)))))


def test_weights_read_directly_inside_a_leaf_get_the_gate_folded_in():
    torch.manual_seed(2)
    net = hatconvert.convert(ReadsWeightNet(), num_tasks=2).eval()
    assert net.layout.gated["leaf.proj"].mode == "leaf"
    assert net.report().tensors["leaf.scale"] == "frozen"
    seen = []
    net.model.leaf.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(5, 3)
    for t in range(2):
        net(x, t)
        mask = net.masks(t)["leaf.proj"]
        assert 0 < mask.sum() < mask.numel()
        assert torch.all(seen[-1][:, mask == 0] == 0) and torch.all(seen[-1][:, mask == 1] != 0)
    assert_accounted(net)
    assert_zero_forgetting(ReadsWeightNet(), torch.randn(6, 3), classes=3)


def tiny_torchvision_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2,
                                                num_heads=2, hidden_dim=16, mlp_dim=32,
                                                num_classes=4)


def test_multihead_attention_is_converted_inside():
    x = torch.randn(3, 3, 16, 16)
    net = assert_dense_fidelity(perturbed(tiny_torchvision_vit()), x)
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert attn in net.layout.converted_leaves
    assert net.layout.gated[f"{attn}.out_proj"].mode == "leaf"
    assert net.report().tensors[f"{attn}.in_proj_weight"] == "frozen"
    assert_accounted(net)
    assert_zero_forgetting(tiny_torchvision_vit(), x, classes=4)


class CondNet(nn.Module):
    """timm's CondConv2d: expert weights mixed per sample by a routing function."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.route = nn.Linear(8, 3)
        self.cond = CondConv2d(8, 12, 3, padding=1, num_experts=3, bias=True)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        routing = torch.sigmoid(self.route(x.mean((2, 3))))
        return self.head(F.relu(self.cond(x, routing)).mean((2, 3)))


def test_cond_conv_is_gated_per_output_unit_of_every_expert():
    x = torch.randn(4, 3, 8, 8)
    net = assert_dense_fidelity(perturbed(CondNet()), x)
    assert net.layout.gated["cond"].units == 12
    assert_accounted(net)
    layer = net.model.cond
    out, inp = (torch.arange(12) % 3 == 0).float(), (torch.arange(8) % 2 == 0).float()
    protect_w, protect_b = weight_protection(layer, out, inp)
    assert protect_w.shape == layer.weight.shape and protect_b.shape == layer.bias.shape
    per_expert = protect_w.view(3, 12, 8, 3, 3)
    expected = torch.minimum(out[:, None], inp[None, :])
    assert all(torch.equal(per_expert[e, :, :, 1, 1], expected) for e in range(3))
    trained = assert_zero_forgetting(CondNet(), x, classes=4)
    assert trained.capacity() < 1.0


def test_weight_standardized_conv_protects_whole_rows():
    conv = StdConv2d(4, 6, 3)
    out, inp = torch.tensor([1.0, 0, 1, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0])
    protect, _ = weight_protection(conv, out, inp)
    # standardization mixes a row's entries: a free entry would move the protected ones
    assert torch.equal(protect[:, :, 0, 0], out[:, None].expand(6, 4))


# -- norms that are not torch norms ----------------------------------------------------------------
class NormsNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.rms = RmsNorm2d(8)
        self.scale = LayerScale2d(8, init_values=0.5)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.evo = EvoNorm2dB0(8)
        self.grn = GlobalResponseNorm(8, channels_last=False)
        self.affine = Affine(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.scale(self.rms(self.conv(x)))
        x = self.grn(self.evo(self.conv2(x)))
        x = self.affine(x.flatten(2).transpose(1, 2))  # tokens (B, N, C), as in resmlp
        return self.head(x.mean(1))


def test_timm_norms_and_scales_are_task_indexed_like_torch_norms():
    x = torch.randn(4, 3, 6, 6)
    for loose in ("task", "freeze"):
        net = assert_dense_fidelity(perturbed(NormsNet()), x, loose=loose)
        assert set(net.layout.norms) == {"rms", "scale", "evo", "grn", "affine"}
        assert not net.layout.task_params and not net.layout.frozen_params
        assert_accounted(net)
    evo_stats = [c.running_var for c in net.model.evo.copies]
    assert evo_stats[0] is not evo_stats[1]  # EvoNorm's running variance: one per task
    trained = assert_zero_forgetting(NormsNet(), x, classes=3)
    # an RMS norm and an x * gamma scale map zero to zero: the mask passes through them
    got = propagated(trained, {"conv": [1, 0, 1, 0, 0, 0, 1, 1]}, torch.randn(1, 3, 6, 6))
    assert got["conv2"].tolist() == [1, 0, 1, 0, 0, 0, 1, 1]


class WritesBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.register_buffer("seen", torch.zeros(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        self.seen.copy_(self.seen * 0.5 + h.detach().mean(0))  # written in place every call
        return self.head(h + self.seen)


def test_a_buffer_the_graph_writes_is_frozen_not_constant():
    net = hatconvert.convert(WritesBuffer(), num_tasks=2)
    assert "seen" in net.layout.frozen_tensors and "seen" not in net.layout.constant_buffers
    assert net.report().tensors["seen"] == "frozen"
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    net.begin_task(0)
    net(x, 0, 1.0)
    net.end_task()
    held = net.model.seen.clone()
    net.begin_task(1)
    loss = F.cross_entropy(net(x, 1, 1.0), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    net.end_task()
    assert torch.equal(net.model.seen, held)


# -- graphs that differ between train and eval mode, optional inputs, failing submodules ----------
class AuxNet(nn.Module):
    """An auxiliary head used only in training, like googlenet's and inception_v3's."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 6, 3, padding=1)
        self.aux = nn.Linear(6, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.body(x)).mean((2, 3))
        out = self.head(h)
        if self.training:
            return out, self.aux(h)
        return out


def test_train_only_branch_is_left_out_and_reported():
    model = perturbed(AuxNet())  # in train mode, as models are created
    net = hatconvert.convert(model, num_tasks=2, mask_init="dense")
    layout = net.layout
    assert layout.mode_dependent and layout.dropped == ["aux.weight", "aux.bias"]
    assert "train-only branches" in str(net.report()) and "aux.weight" in str(net.report())
    assert net.report().original_params == sum(p.numel() for n, p in model.named_parameters()
                                               if not n.startswith("aux."))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(net.eval()(x, 1), model.eval()(x))
    assert net.model.body.training is False and model.training is False
    assert_accounted(net)


class DropPathNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = DropPath(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x + self.drop_path(torch.relu(self.fc(x))))


def test_stochastic_depth_still_acts_in_training_after_an_eval_mode_trace():
    x = torch.randn(8, 4)
    net = assert_dense_fidelity(perturbed(DropPathNet()), x)
    assert not net.layout.mode_dependent  # DropPath is kept whole, not baked in eval mode
    net.train()
    outs = [net(x, 0, 1.0) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert_zero_forgetting(DropPathNet(), x, classes=3)


class OptionalMaskNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x, mask=None, scale: float = 1.0):
        h = torch.relu(self.fc(x))
        if mask is not None:  # a proxy is never None: traced as an input, this branch is baked
            h = h * mask
        return self.head(h * scale)


def test_optional_inputs_are_traced_at_their_defaults():
    x = torch.randn(3, 4)
    assert_dense_fidelity(perturbed(OptionalMaskNet()), x)


class RouterWithWeights(nn.Module):
    """Python control flow on a tensor value around a layer with weights: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class RoutedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.router = RouterWithWeights()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.router(self.inp(x))))


def test_submodule_that_breaks_tracing_can_be_kept_whole_and_converted_inside():
    with pytest.raises(ConversionError, match="'router'.*auto_leaves=True"):
        hatconvert.convert(RoutedNet(), num_tasks=2)
    plain = hatconvert.convert(DataDependent(), num_tasks=2, head=False, auto_leaves=True)
    assert plain.layout.auto_leaves == ["router"]
    x = torch.randn(5, 3)
    net = assert_dense_fidelity(perturbed(RoutedNet()), x, auto_leaves=True)
    assert net.layout.auto_leaves == ["router"] and net.layout.converted_leaves == ["router"]
    assert net.layout.gated["router.fc"].mode == "leaf"
    assert "kept whole because tracing broke" in str(net.report())
    assert_accounted(net)
    assert_zero_forgetting(RoutedNet(), torch.randn(6, 3), classes=3, auto_leaves=True)


# -- modules under two paths, several heads --------------------------------------------------------
class SharedNet(nn.Module):
    """One module reachable under two paths and called twice (coat's shared ConvPosEnc)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.pos = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.stem = nn.Conv2d(3, 6, 1)
        self.blocks = nn.ModuleList([nn.ModuleDict({"pos": self.pos, "mix": nn.Conv2d(6, 6, 1)})
                                     for _ in range(2)])
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + F.relu(block["mix"](block["pos"](x)))
        return self.head(x.mean((2, 3)))


def test_a_module_under_two_paths_is_not_reported_dropped():
    x = torch.randn(4, 3, 5, 5)
    net = assert_dense_fidelity(perturbed(SharedNet()), x)
    assert net.layout.dropped == []
    assert_accounted(net)
    assert_zero_forgetting(SharedNet(), x, classes=3)


class TwoHeads(nn.Module):
    """One classifier per branch, averaged (crossvit); get_classifier returns the ModuleList."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.head = nn.ModuleList([nn.Linear(6, classes), nn.Linear(6, classes)])

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return (self.head[0](torch.relu(self.a(x))) + self.head[1](torch.relu(self.b(x)))) / 2


class Distilled(TwoHeads):
    """deit and levit: get_classifier returns the class and distillation heads as a tuple."""

    def get_classifier(self):
        return self.head[0], self.head[1]


@pytest.mark.parametrize("factory", [TwoHeads, Distilled])
def test_a_classifier_per_branch_gives_several_task_indexed_heads(factory):
    net = hatconvert.convert(factory(), num_tasks=2, num_classes=[2, 5]).eval()
    assert net.layout.heads == ["head.0", "head.1"]
    x = torch.randn(3, 4)
    assert [net(x, t).shape[1] for t in range(2)] == [2, 5]
    assert_accounted(net)


# -- the benchmark itself --------------------------------------------------------------------------
def test_zoo_benchmark_checks_one_model():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "zoo.py")
    spec = importlib.util.spec_from_file_location("zoo", path)
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    args = SimpleNamespace(timeout=120, real_max_params=1e6, create_unknown=False,
                           meta_forward=True, forgetting_every=1, forgetting_max_params=1e6,
                           auto_leaves=True)
    record = zoo.check_model("timm/test_vit", 0, args)
    assert record["status"] == "converted", record
    assert record["accounting"]["all_accounted"] and record["fidelity"]["passed"]
    assert record["forgetting"]["passed"] and record["forgetting"]["later_tasks_differ"]
    summary = zoo.summarize([record])
    assert summary["status"] == {"converted": 1} and summary["forgetting"]["passed"] == 1
