"""The task lifecycle of a HAT network: begin, abort, end and forget a task, atomically.

``TaskLifecycle`` is a mixin of ``HATNetwork``: it keeps the network's task state (the active
task, its options, its armed guard) consistent. A call that fails leaves the network as it was;
a task is never left active without protection (``protection.arm_task`` decides what to hold).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .errors import OptionError, TaskError
from .gates import init_embedding_
from .options import MASK_INITS, check_choice, check_s_max
from .distributed import on_end_task, refuse_sharded
from .protected import ADJUSTMENTS
from .protection import arm_task
from .reinit import redraw_free_units

__all__ = ['TaskLifecycle', 'check_begin_options']


class TaskLifecycle:
    """``begin_task`` / ``abort_task`` / ``end_task`` / ``forget`` for ``HATNetwork``."""

    def begin_task(self, task_id: int, *, mask_init: str | None = None, adjustment: str = "hat",
                   alpha: float | None = None, s_max: float = 400.0, retrain: bool = False,
                   hard_from: float | None = 0.5, reinit_free: bool = False) -> None:
        """Start training ``task_id``: initialise its embeddings and protect every trained task.

        ``mask_init``: ``normal``, ``small_normal``, ``uniform``, ``U01``, ``U-10``, ``last``
        (copy the previous task's) or ``dense``; default: the conversion's. ``adjustment``:
        ``hat`` (default), ``hat_random``, ``hat_const_alpha`` (needs ``alpha``) or
        ``hat_const_1`` (no protection of gated weights). ``s_max`` is the one the mask-scale
        schedule uses.
        ``hard_from``: from ``hard_from * s_max`` on, training forwards apply the exact 0/1
        masks inference applies, with the soft gates' gradient (``gates.straight_through``);
        ``None`` keeps soft gates at every scale (the paper's).
        ``reinit_free``: draw the weights of every unit no trained task uses again, with its
        layer's ``reset_parameters()`` (reinit.py): for networks trained from random
        initialisation, where earlier tasks' soft phases leave the free units drifted.
        """
        t = self.check_task_id(task_id)
        if self.active_task is not None:
            raise TaskError(f"task {self.active_task} is still active: call end_task() "
                            f"before begin_task({t})")
        if bool(self.trained[t]) and not retrain:
            raise TaskError(f"task {t} is already trained; begin_task({t}, retrain=True) trains "
                            "it again and replaces what it learned")
        mode = mask_init or self.options.mask_init
        check_begin_options(mode, adjustment, alpha, s_max, hard_from)
        if not isinstance(reinit_free, bool):
            raise OptionError(f"reinit_free must be True or False, got {reinit_free!r}")
        gates = self.gates()
        refuse_sharded(self)
        self._task_start = {path: gate.embedding[t].detach().clone()
                            for path, gate in gates.items()}
        self._task_trained_on = False
        self._distributed_task = self._sharding_checked = None  # forwards look for a DDP again
        self._redrawn = False
        try:
            for gate in gates.values():
                previous = gate.embedding[t - 1].detach() if t > 0 else None
                init_embedding_(gate.embedding[t], mode, previous)
            self.active_task = t
            self._options = dict(adjustment=adjustment, alpha=alpha, s_max=float(s_max))
            self._set_hard_from(None if hard_from is None else float(hard_from) * s_max)
            self._needs_arming = True
            if self.has_example():
                self._arm_or_abort()
            if reinit_free:
                self._reinit_free(t)
        except BaseException:
            self.abort_task()
            raise

    def _reinit_free(self, t: int) -> None:
        """Redraw the free units; the guard then puts back anything a trained task holds."""
        redraw_free_units(self, self.trained_tasks(excluding=t))
        if self._guard is not None:
            self._guard.restore()
        self._redrawn = True  # under DDP the first training forward gives all ranks rank 0's

    def abort_task(self) -> None:
        """Abandon the active task: its embeddings go back to what they were before
        ``begin_task`` and it is not marked trained. Trained tasks are untouched (the free
        weights the task changed belong to no trained task). Aborting a task begun with
        ``retrain=True`` after it trained forgets it: its own weights have moved."""
        self._disarm()
        t, start = self.active_task, self._task_start
        if t is not None and start is not None:
            with torch.no_grad():
                for path, gate in self.gates().items():
                    gate.embedding[t].copy_(start[path])
                if bool(self.trained[t]) and self._task_trained_on:
                    for gate in self.gates().values():
                        gate.task_masks[t].zero_()
                    self.trained[t] = False
                    warnings.warn(f"task {t} was being retrained: aborting it leaves its own "
                                  "weights changed, so it is forgotten (no longer trained)",
                                  RuntimeWarning, stacklevel=2)
        self.active_task = None
        self._options = {}
        self._set_hard_from(None)
        self._needs_arming = False
        self._task_start = None

    def _arm_or_abort(self) -> None:
        """Arm protection for the active task; if that fails, the task is not begun."""
        t = self.active_task
        try:
            self._arm()
        except Exception as exc:
            self.abort_task()
            raise TaskError(f"could not protect the trained tasks {self.trained_tasks()} for "
                            f"task {t}, so task {t} was not begun (the network is as before "
                            f"begin_task({t})): {exc}") from exc

    def end_task(self) -> None:
        """Store the active task's binary masks, mark it trained and lift its protection."""
        if self.active_task is None:
            raise TaskError("end_task() without begin_task(): no task is being trained")
        t = self.active_task
        if not self._task_trained_on:
            warnings.warn(f"task {t} ran no training forward since begin_task({t}): its stored "
                          "masks are its initial embeddings' signs (call abort_task() instead "
                          "of end_task() to abandon a task)", RuntimeWarning, stacklevel=2)
        on_end_task(self, t)  # under DDP: the ranks' statistics of task t, averaged
        with torch.no_grad():
            for gate in self.gates().values():
                gate.task_masks[t] = (gate.embedding[t] > 0).to(gate.task_masks.dtype)
            self.trained[t] = True
        self._disarm()
        self._set_hard_from(None)
        self.active_task = None
        self._task_start = None
        self.train(self.training)  # frozen leaves go to eval mode once a task is trained

    def forget(self, task_id: int) -> float:
        """Release the units only task ``task_id`` used and return the capacity gained.

        Its stored masks are zeroed and it is marked untrained, so later tasks may train what
        it alone held. Nothing another trained task reads changes: their outputs stay bit-exact.
        """
        t = self.check_task_id(task_id)
        if self.active_task is not None:
            raise TaskError(f"task {self.active_task} is being trained: call end_task() "
                            f"before forget({t})")
        if not bool(self.trained[t]):
            raise TaskError(f"task {t} is not trained, so there is nothing to forget "
                            f"(trained tasks: {self.trained_tasks()})")
        before = self.capacity()  # raises before anything changes if no input was seen yet
        with torch.no_grad():
            for gate in self.gates().values():
                gate.task_masks[t].zero_()
            self.trained[t] = False
        self.train(self.training)  # frozen leaves thaw once no task is trained
        return self.capacity() - before

    def _set_hard_from(self, scale: float | None) -> None:
        for gate in self.gates().values():
            gate.hard_from = scale

    def _arm(self) -> None:
        """Install gradient hooks and the step guard for the active task."""
        self._disarm()
        self._guard = arm_task(self)
        self._needs_arming = False
        if self.trained_tasks(excluding=self.active_task):
            self._protected_once = True  # from now on no new kind of call (calls.py)

    def _disarm(self) -> None:
        """Put the held entries back one last time, then remove the protection."""
        if self._guard is not None:
            self._guard.restore()
            self._guard.disarm()
            self._guard = None


def check_begin_options(mode: str, adjustment: str, alpha: Any, s_max: Any,
                        hard_from: Any = None) -> None:
    """``begin_task``'s options, checked before anything changes."""
    check_choice("mask_init", mode, MASK_INITS)
    check_choice("adjustment", adjustment, ADJUSTMENTS)
    if adjustment == "hat_const_alpha" and not (isinstance(alpha, (int, float))
                                                 and 0 <= alpha <= 1):
        raise OptionError(f"adjustment 'hat_const_alpha' needs alpha in [0, 1], got {alpha!r}")
    check_s_max(s_max)
    if hard_from is not None and (isinstance(hard_from, bool)
                                  or not isinstance(hard_from, (int, float))
                                  or not 0 <= hard_from <= 1):
        raise OptionError(f"hard_from must be a fraction of s_max in [0, 1] or None, "
                          f"got {hard_from!r}")
