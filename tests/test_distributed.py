"""DistributedDataParallel: two gloo ranks on CPU train three tasks with one AdamW per rank.

Each rank is seeded apart (as users seed data augmentation) and sees its own half of every
batch; the CNN's tasks begin with ``reinit_free`` (free units drawn per rank, then rank 0's). After every task, every earlier task's eval output is bit-identical on both ranks,
parameters and buffers are equal across ranks, and the result matches one process training on
the whole batch (the gradient hooks and the compensation acted once per step, not per rank).
Wrappers set up so that ranks could drift (no ``find_unused_parameters``, ``static_graph``)
and sharded parameters (``fully_shard``) are refused by name.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hatconvert
from hatconvert.errors import DistributedError

WORLD, TASKS, STEPS = 2, 3, 4


class HeadsMLP(nn.Module):
    """No batch statistics (so one process on the whole batch is the same computation)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(12, 32), nn.LayerNorm(32), nn.Linear(32, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.ln(self.fc1(x))))))


def _data(shape, classes):
    g = torch.Generator().manual_seed(100)
    xs = [torch.randn(8, *shape, generator=g) for _ in range(TASKS)]
    ys = [torch.randint(0, classes, (8,), generator=g) for _ in range(TASKS)]
    return xs, ys, torch.randn(4, *shape, generator=g)


def _train(net, forward, xs, ys, probe, part, via_module=None, **begin_options):
    """Three tasks; returns the eval outputs at each task's end and checks them after each."""
    opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.05)
    ends = {}
    for t in range(TASKS):
        net.train()
        (via_module if via_module is not None and t % 2 else net).begin_task(t, **begin_options)
        x, y = xs[t][part], ys[t][part]
        for b in range(STEPS):
            s = hatconvert.mask_scale(b, STEPS)
            loss = F.cross_entropy(forward(x, t, s), y) + net.regularization(t, s)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.update_statistics(t, [x])
        net.end_task()
        net.eval()
        with torch.no_grad():
            ends[t] = net(probe, t)
            for u in range(t):
                assert torch.equal(net(probe, u), ends[u]), f"task {u} changed after task {t}"
    return ends


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]
                     + [b.detach().float().reshape(-1) for b in net.buffers()])


def _equal_across_ranks(tensor):
    gathered = [torch.zeros_like(tensor) for _ in range(WORLD)]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _rank(rank, port):
    from models import ResidualConcatNet
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        # a CNN with BatchNorm, GroupNorm, LayerNorm and a head per task
        torch.manual_seed(rank)  # ranks seeded apart: begin_task's draws differ per rank
        net = hatconvert.convert(ResidualConcatNet(classes=4), num_tasks=TASKS)
        ddp = DistributedDataParallel(net, find_unused_parameters=True)
        xs, ys, probe = _data((3, 16, 16), 4)
        _train(net, ddp, xs, ys, probe, slice(rank, None, WORLD), via_module=ddp.module,
               reinit_free=True)  # the free units too are drawn per rank
        assert _equal_across_ranks(_flat(net)), "ranks differ after three tasks"

        # the same computation in one process on the whole batch
        torch.manual_seed(0)
        mlp = hatconvert.convert(HeadsMLP(), num_tasks=TASKS, head="head")
        single = hatconvert.convert(HeadsMLP(), num_tasks=TASKS, head="head")
        single.load_state_dict(mlp.state_dict())
        xs, ys, probe = _data((12,), 3)
        torch.manual_seed(rank)
        _train(mlp, DistributedDataParallel(mlp, find_unused_parameters=True), xs, ys, probe,
               slice(rank * 4, rank * 4 + 4))
        torch.manual_seed(0)
        _train(single, single, xs, ys, probe, slice(None))
        assert torch.allclose(_flat(mlp), _flat(single), atol=1e-5), "DDP != one process"

        for options, named in (({}, "find_unused_parameters=True"),
                               (dict(find_unused_parameters=True, static_graph=True),
                                "static_graph=True")):
            other = hatconvert.convert(HeadsMLP(), num_tasks=TASKS, head="head")
            wrapped = DistributedDataParallel(other, **options)
            other.train()
            other.begin_task(0)
            with pytest.raises(DistributedError, match=named):
                wrapped(xs[0], 0, 1.0)
            other.abort_task()

        # sharded parameters are refused before the task begins
        from torch.distributed.fsdp import fully_shard
        sharded = hatconvert.convert(HeadsMLP(), num_tasks=TASKS, head="head")
        fully_shard(sharded)
        with pytest.raises(DistributedError, match="fc1.weight' is sharded"):
            sharded.begin_task(0)
        assert sharded.active_task is None
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_two_ranks_keep_tasks_fixed_and_ranks_equal():
    mp.start_processes(_rank, args=(_free_port(),), nprocs=WORLD, start_method="spawn",
                       join=True)


def _accelerate_rank(rank, port):
    """The README's Accelerate recipe, launched on two processes (as `accelerate launch` sets
    the environment)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from models import ResidualConcatNet
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), ACCELERATE_USE_CPU="1")
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True)])
    try:
        net = hatconvert.convert(ResidualConcatNet(classes=4), num_tasks=TASKS)
        opt = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.05)
        model, opt = accelerator.prepare(net, opt)
        assert isinstance(model, DistributedDataParallel)
        xs, ys, probe = _data((3, 16, 16), 4)
        ends = {}
        for t in range(TASKS):
            loader = accelerator.prepare(torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(xs[t], ys[t]), batch_size=4))
            net.train()
            net.begin_task(t)
            for b, (x, y) in enumerate(loader):
                s = hatconvert.mask_scale(b, len(loader))
                loss = F.cross_entropy(model(x, t, s), y) + net.regularization(t, s)
                opt.zero_grad()
                accelerator.backward(loss)
                opt.step()
            net.update_statistics(t, loader)
            net.end_task()
            net.eval()
            with torch.no_grad():
                ends[t] = net(probe, t)
                for u in range(t):
                    assert torch.equal(net(probe, u), ends[u]), f"task {u} changed after {t}"
        assert _equal_across_ranks(_flat(net)), "ranks differ after three tasks"
    finally:
        accelerator.end_training()
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_accelerate_recipe_on_two_processes():
    pytest.importorskip("accelerate")
    mp.start_processes(_accelerate_rank, args=(_free_port(),), nprocs=WORLD,
                       start_method="spawn", join=True)
