"""``HATCallback``: one HAT task per ``Trainer.fit`` in PyTorch Lightning (optional dependency).

The callback owns the task's lifecycle, so the ``LightningModule`` stays ordinary: it holds the
converted network, returns its task loss from ``training_step`` and calls the network with
``self.hat_task_id`` and ``self.hat_mask_scale``, which the callback sets before every batch.
The callback

* begins the task when fitting starts (``on_fit_start``, before the sanity check) and ends it
  when fitting ends, after one pass that recomputes the task's norm statistics under its final
  masks (as ``train_task`` does); an exception aborts the task, leaving trained tasks as they
  were;
* sets the mask scale of each batch from the schedule, restarted every epoch;
* adds ``c`` times HAT's sparsity regularization to the loss ``training_step`` returns
  (automatic optimization; with manual optimization add ``net.regularization`` yourself);
* logs ``hat/penalty`` every step and ``hat/capacity`` (the share of gated weights still free)
  after every epoch and at the end.

Keep one optimizer across tasks by building it once (``configure_optimizers`` returning the
same object every fit): the protection covers any optimizer kept. Under the DDP strategy give
``DDPStrategy(find_unused_parameters=True)`` (distributed.py says why).
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import HATError, TaskError
from .network import HATNetwork
from .options import check_regularization
from .penalty import KEEP_OPEN, check_keep_open
from .schedules import mask_scale

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError("hatconvert.lightning needs PyTorch Lightning: pip install "
                          "'hatconvert[lightning]' (or pip install lightning)") from exc

__all__ = ["HATCallback"]


class HATCallback(Callback):
    """Train task ``task_id`` during one ``Trainer.fit`` of a module holding a HAT network.

    ``network``: the attribute path of the ``HATNetwork`` in the module (default: the only one
    it holds). ``schedule``, ``s_max``, ``c``, ``reg_mode``, ``keep_open`` are ``train_task``'s;
    other keyword arguments go to ``begin_task``.
    """

    def __init__(self, task_id: int, *, network: str | None = None, schedule: str = "linear",
                 s_max: float = 400.0, c: float = 0.75, reg_mode: str = "original",
                 keep_open: float = KEEP_OPEN, update_statistics: bool = True,
                 **begin_options: Any):
        mask_scale(0, 1, s_max=s_max, schedule=schedule)  # checks both before any fit
        check_regularization(c, reg_mode)
        check_keep_open(keep_open)
        self.task_id, self.network = task_id, network
        self.schedule, self.s_max, self.c = schedule, float(s_max), float(c)
        self.reg_mode, self.keep_open = reg_mode, keep_open
        self.update_statistics = update_statistics
        self.begin_options = begin_options
        self._net: HATNetwork | None = None
        self._step: Any = None  # the module's own training_step while the penalty is added

    # -- finding the network ---------------------------------------------------------------
    def network_of(self, pl_module: Any) -> HATNetwork:
        """The HAT network the module trains: at ``self.network``, or the only one it holds."""
        if self.network is not None:
            try:
                net = pl_module.get_submodule(self.network)
            except AttributeError:
                raise HATError(f"HATCallback(network={self.network!r}): "
                               f"{type(pl_module).__name__} has no submodule '{self.network}'") \
                    from None
            if not isinstance(net, HATNetwork):
                raise HATError(f"HATCallback(network={self.network!r}): '{self.network}' is a "
                               f"{type(net).__name__}, not a HATNetwork (hatconvert.convert)")
            return net
        found = [name for name, m in pl_module.named_modules() if isinstance(m, HATNetwork)]
        if len(found) != 1:
            what = "no HATNetwork" if not found else f"{len(found)} HATNetworks ({', '.join(found)})"
            raise HATError(f"HATCallback: {type(pl_module).__name__} holds {what}; convert the "
                           "model with hatconvert.convert, or name it: HATCallback(..., "
                           "network='attribute.path')")
        return pl_module.get_submodule(found[0])

    # -- the task's lifecycle --------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        net = self.network_of(pl_module)
        if not pl_module.automatic_optimization:
            raise HATError("HATCallback adds the regularization to the loss training_step "
                           "returns, which manual optimization does not use; add "
                           "net.regularization(t, s) to your loss and call begin_task/end_task "
                           "yourself, or use automatic optimization")
        net.train()
        net.begin_task(self.task_id, s_max=self.s_max, **self.begin_options)
        self._net = net
        pl_module.hat_task_id, pl_module.hat_mask_scale = self.task_id, self.s_max
        self._add_penalty(pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        batches = trainer.num_training_batches
        batches = batches if isinstance(batches, int) and batches > 0 else batch_idx + 1
        pl_module.hat_mask_scale = mask_scale(min(batch_idx, batches - 1), batches,
                                              s_max=self.s_max, schedule=self.schedule)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._net is not None and self._net.has_example():
            pl_module.log("hat/capacity", self._net.capacity(), sync_dist=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        net, t = self._net, self.task_id
        self._restore_step(pl_module)
        if net is None or net.active_task != t:
            return
        try:
            if self.update_statistics and trainer.train_dataloader is not None:
                net.update_statistics(t, trainer.train_dataloader, device=pl_module.device)
        except BaseException:
            net.abort_task()
            self._net = None
            raise
        net.end_task()
        self._net = None
        pl_module.hat_mask_scale = None  # hard gates from here on

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Training failed: abort the task (trained tasks are untouched)."""
        self._restore_step(pl_module)
        if self._net is not None and self._net.active_task == self.task_id:
            self._net.abort_task()
        self._net = None

    # -- the penalty -----------------------------------------------------------------------
    def _add_penalty(self, pl_module: Any) -> None:
        """Wrap the module's ``training_step`` so that its loss carries the regularization."""
        own = pl_module.training_step
        self._step = own

        @functools.wraps(own)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = own(*args, **kwargs)
            if out is None:  # the module skipped the batch
                return out
            penalty = self._net.regularization(self.task_id, pl_module.hat_mask_scale, self.c,
                                               self.reg_mode, self.keep_open)
            pl_module.log("hat/penalty", penalty.detach())
            if isinstance(out, dict):
                if "loss" not in out:
                    raise TaskError("training_step returned a dict without 'loss'")
                return {**out, "loss": out["loss"] + penalty}
            return out + penalty
        pl_module.training_step = training_step

    def _restore_step(self, pl_module: Any) -> None:
        if self._step is not None:
            if "training_step" in vars(pl_module):
                del pl_module.training_step
            self._step = None
