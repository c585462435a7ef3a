"""``HATCallback``: three tasks, one ``Trainer.fit`` each, on CPU, with one optimizer kept."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import hatconvert  # noqa: E402
from hatconvert.errors import HATError  # noqa: E402
from hatconvert.lightning import HATCallback  # noqa: E402
from models import ResidualConcatNet  # noqa: E402

TASKS = 3


class Module(pl.LightningModule):
    """An ordinary LightningModule around a converted network."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = hatconvert.convert(ResidualConcatNet(classes=4), num_tasks=TASKS)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=0.01, weight_decay=0.05)
        self.fail_at = fail_at
        self.scales: list[float] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("a failing batch")
        x, y = batch
        self.scales.append(self.hat_mask_scale)
        return F.cross_entropy(self.net(x, self.hat_task_id, self.hat_mask_scale), y)

    def configure_optimizers(self):
        return self.optimizer  # the same optimizer for every task


def _loader(t):
    g = torch.Generator().manual_seed(t)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 16, 16, generator=g),
                                          torch.randint(0, 4, (24,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(callback, epochs=2):
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[callback], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


def _fit(module, callback, epochs=2):
    trainer = _trainer(callback, epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, _loader(callback.task_id))
    return trainer


def test_three_tasks_keep_earlier_tasks_bit_identical():
    torch.manual_seed(0)
    module = Module()
    probe = torch.randn(5, 3, 16, 16)
    ends, capacities = {}, []
    for t in range(TASKS):
        before = len(module.scales)
        trainer = _fit(module, HATCallback(t, c=0.75))
        net = module.net
        assert net.active_task is None and bool(net.trained[t])
        scales = module.scales[before:]  # the schedule restarts each epoch: 3 batches, 2 epochs
        assert scales[:3] == scales[3:] and scales[0] < scales[2] == 400.0
        assert float(trainer.callback_metrics["hat/penalty"]) > 0
        capacities.append(float(trainer.callback_metrics["hat/capacity"]))
        net.eval()
        with torch.no_grad():
            ends[t] = net(probe, t)
            for u in range(t):
                assert torch.equal(net(probe, u), ends[u]), f"task {u} changed after task {t}"
    assert capacities == sorted(capacities, reverse=True) and capacities[-1] < 1.0
    assert "training_step" not in vars(module)  # the penalty wrapper is gone


def test_a_failing_fit_aborts_the_task_and_leaves_trained_tasks():
    torch.manual_seed(0)
    module = Module()
    _fit(module, HATCallback(0), epochs=1)
    probe = torch.randn(5, 3, 16, 16)
    module.net.eval()
    with torch.no_grad():
        before = module.net(probe, 0)
    module.fail_at = 2
    with pytest.raises(RuntimeError, match="a failing batch"):
        _fit(module, HATCallback(1), epochs=1)
    assert module.net.active_task is None and not bool(module.net.trained[1])
    module.net.eval()
    with torch.no_grad():
        assert torch.equal(module.net(probe, 0), before)


def test_the_network_is_found_or_named():
    module = Module()
    with pytest.raises(HATError, match="no submodule 'model'"):
        HATCallback(0, network="model").network_of(module)
    assert HATCallback(0, network="net").network_of(module) is module.net
    plain = pl.LightningModule()
    with pytest.raises(HATError, match="holds no HATNetwork"):
        HATCallback(0).network_of(plain)
    with pytest.raises(ValueError, match="schedule"):
        HATCallback(0, schedule="sometimes")


def test_ddp_strategy_on_two_processes():
    """``strategy=DDPStrategy(find_unused_parameters=True)`` with two spawned CPU processes: each
    fit runs in fresh processes (their networks have seen no input before the first step, which
    Lightning takes with a closure), and task 0 comes back unchanged after task 1."""
    from lightning.pytorch.strategies import DDPStrategy
    torch.manual_seed(0)
    module = Module()
    probe = torch.randn(5, 3, 16, 16)
    outputs = []
    for t in range(2):
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, max_epochs=1, callbacks=[HATCallback(t)],
            strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many).*")
            trainer.fit(module, _loader(t))
        assert module.net.trained.tolist()[:t + 1] == [True] * (t + 1)
        module.net.eval()
        with torch.no_grad():
            outputs.append(module.net(probe, 0))
    assert torch.equal(outputs[0], outputs[1])
