"""Layer-wise stepping (optimizer-in-backward): each parameter is stepped as soon as its gradient is
final, and the gradient freed, so the full gradients of all layers never coexist."""

from __future__ import annotations

from typing import Callable

import torch

from optimlib.distributed.layout import to_local
from optimlib.validation import fail

__all__ = ["LayerwiseStepper", "step_one"]


@torch.no_grad()
def step_one(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    """Step ``param`` alone, with its param group's options and its state.

    optimlib's optimizers have :meth:`~optimlib.optim._common.OptimizerBase.step_param`; any other
    ``torch.optim.Optimizer`` (``torch.optim.AdamW``, ...) runs its own ``step()`` on a view of its
    groups that holds only ``param``'s group with only ``param`` (its state is keyed by the tensor,
    so it is the state a full ``step()`` would use)."""
    step_param = getattr(optimizer, "step_param", None)
    if step_param is not None:
        step_param(param)
        return
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise ValueError(f"step_one: the tensor of shape {tuple(param.shape)} is not a parameter of this "
                         f"{type(optimizer).__name__}")
    groups = optimizer.param_groups
    optimizer.param_groups = [{**group, "params": [param]}]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


class LayerwiseStepper:
    """Optimizer-in-backward on any ``torch.optim.Optimizer`` (:func:`step_one`).

    A post-accumulate-grad hook on every trainable parameter steps that parameter -- with its
    param group's options, its state and the current learning rate -- during the backward pass of
    the last micro-batch of each accumulation window, and sets its ``.grad`` to ``None`` right away.
    Earlier micro-batches only accumulate gradients as usual.  Usage (``accumulation_steps=4``)::

        stepper = LayerwiseStepper(optimizer, accumulation_steps=4)   # or optimizer.layerwise(4)
        for micro_batch in loader:
            (loss_fn(model(micro_batch)) / 4).backward()   # the 4th backward updates the weights
            if stepper.step():                             # True at the accumulation boundary
                scheduler.step()                           # one LR clock per optimizer step

    ``step()`` must be called once after every micro-batch's backward; at a boundary it calls the
    optimizer's own ``step()``, which steps any parameter whose hook did not fire (so nothing is
    skipped) and is what LR schedulers count.  There is one optimizer and therefore one LR schedule
    (not one per parameter, whose doubled clock is a known bug of galore-torch's per-layer scripts).
    Parameters added to the optimizer's groups later (a layer that replaced one) are hooked at the
    next ``step()``.

    ``prepare(param)``, if given, runs on each parameter right before it is stepped (its gradient
    final on this rank): e.g. average the gradient over data-parallel ranks with an all-reduce
    (what the launcher's ``engine=ddp`` does, in the order the hooks fire, which is the same on
    every rank), or add up its norm.

    Layouts: one process; data parallel with ``prepare`` reducing each gradient (not under
    ``DistributedDataParallel``, whose hooks fire before its all-reduce and whose buckets keep
    every gradient alive); and FSDP2 (``fully_shard``), where the hook runs on the sharded parameter
    after the reduce-scatter (FSDP2 calls post-accumulate-grad hooks of sharded parameters), with
    the ranks running the hooks in the same order.  Not DeepSpeed (it owns the gradients); and
    gradient clipping by the global norm cannot be applied (the gradients are consumed before the
    norm is known).

    Memory: ``grad_bytes_peak`` is the most bytes the ``.grad`` tensors of the optimizer's
    parameters held at once (this rank's shards under FSDP2), counted when each gradient appears
    and when it is freed; the ordinary step holds all of them together.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accumulation_steps: int = 1,
                 prepare: Callable[[torch.Tensor], None] | None = None):
        if not (isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
                and accumulation_steps >= 1):
            fail("accumulation_steps", accumulation_steps, "an integer >= 1")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.prepare = prepare
        self.micro_step = 0
        self.grad_bytes_peak = 0
        self._live: dict[int, int] = {}          # id(param) -> bytes of its .grad, while alive
        self._live_bytes = 0
        self._handles: dict[int, object] = {}
        self._attach()

    def _params(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def _attach(self) -> None:
        for p in self._params():
            if id(p) not in self._handles:
                self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._hook)

    @property
    def is_boundary(self) -> bool:
        """Whether the next backward pass ends an accumulation window (and so steps)."""
        return (self.micro_step + 1) % self.accumulation_steps == 0

    def _count(self, p: torch.Tensor) -> None:
        if id(p) not in self._live:
            self._live[id(p)] = nbytes = to_local(p.grad).nbytes  # FSDP2: this rank's shard
            self._live_bytes += nbytes
            self.grad_bytes_peak = max(self.grad_bytes_peak, self._live_bytes)

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self._count(p)
        if self.is_boundary:
            if self.prepare is not None:
                self.prepare(p)
            step_one(self.optimizer, p)
            p.grad = None
            self._live_bytes -= self._live.pop(id(p))

    def step(self) -> bool:
        """Call after each micro-batch's backward; returns ``True`` if the parameters were stepped."""
        boundary = self.is_boundary
        if boundary:
            for p in self._params():                  # gradients no hook consumed
                if p.grad is not None:
                    self._count(p)
                    if self.prepare is not None:
                        self.prepare(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._forget_grads()
        self.micro_step += 1
        if self._handles:
            self._attach()
        return boundary

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop accumulated gradients (those not consumed yet)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._forget_grads()

    def _forget_grads(self) -> None:
        self._live.clear()
        self._live_bytes = 0

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "accumulation_steps": self.accumulation_steps}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])

    def remove(self) -> None:
        """Remove the hooks (back to ordinary ``optimizer.step()``)."""
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
