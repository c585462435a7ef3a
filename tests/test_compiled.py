"""Compiled graphs: ``torch.compile`` of a training step with the protection armed, and
``torch.export`` of eval mode, for a CNN and a ViT (issue 12, part 3).

``aot_eager`` runs what matters here, dynamo's capture and AOTAutograd's joint graph (the
gradient hooks sit on the parameters, the step guard outside the graph), without compiling
kernels, so the suite stays fast on two cores.
"""

from __future__ import annotations

import pytest
import torch

import hatconvert

from helpers import eval_out, train
from models import ResidualConcatNet

timm = pytest.importorskip("timm")
if not torch._dynamo.is_dynamo_supported():  # pragma: no cover - platform without dynamo
    pytest.skip("torch.compile is not supported on this platform", allow_module_level=True)


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=3)


MODELS = {"cnn": (lambda: ResidualConcatNet(classes=3), (3, 16, 16)),
          "vit": (tiny_vit, (3, 16, 16))}


def converted(name: str) -> tuple[hatconvert.HATNetwork, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = MODELS[name]
    net = hatconvert.convert(build(), num_tasks=3)
    return net, torch.randn((8,) + shape)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_compiled_training_step_keeps_earlier_tasks_bit_identical(name):
    net, x = converted(name)
    y = torch.randint(0, 3, (8,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05)
    train(net, opt, 0, x, y)  # eager
    before = eval_out(net, x, 0)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager")
    for t in (1, 2):
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        train(net, opt, t, x, y, forward=compiled)
        moved = [k for k, v in net.state_dict().items() if not torch.equal(v, weights[k])]
        assert moved  # the compiled steps trained task t
        assert torch.equal(eval_out(net, x, 0), before)
    net.eval()
    with torch.no_grad():
        for t in range(3):  # the compiled eval forward computes what the eager one does
            torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-5, atol=1e-6)


class OneTask(torch.nn.Module):
    """Task ``t`` of a converted graph with hard gates, taking the model's input alone. (The
    graph itself also lists the inputs tracing fixed, ``attn_mask=None`` for a ViT, which
    ``torch.export`` would make inputs that must stay None.)"""

    def __init__(self, graph: torch.nn.Module, t: int):
        super().__init__()
        self.converted, self.t = graph, t

    def forward(self, x):
        return self.converted(x, task_id=self.t)


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_mode_exports_and_loads_as_a_plain_program(name, tmp_path):
    net, x = converted(name)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for t in range(2):
        train(net, opt, t, x, torch.randint(0, 3, (8,)))
    net.eval()
    for t in range(2):
        program = torch.export.export(OneTask(net.model, t), (x,))
        path = tmp_path / f"{name}-task{t}.pt2"
        torch.export.save(program, path)
        loaded = torch.export.load(path).module()
        other = torch.randn_like(x)
        with torch.no_grad():
            torch.testing.assert_close(loaded(other), net(other, t), rtol=1e-5, atol=1e-6)
