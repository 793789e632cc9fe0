"""Layer-wise stepping (optimizer-in-backward): each parameter is stepped as soon as its gradient is
final, and the gradient freed, so the full gradients of all layers never coexist."""

from __future__ import annotations

import torch

from optimlib.validation import fail

__all__ = ["LayerwiseStepper"]


class LayerwiseStepper:
    """Optimizer-in-backward on any optimlib optimizer (:meth:`OptimizerBase.step_param`).

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

    Layouts: one process, and FSDP2 (``fully_shard``) where the hook runs on the sharded parameter
    after the reduce-scatter (FSDP2 calls post-accumulate-grad hooks of sharded parameters), with
    the ranks running the hooks in the same order.  Not for DDP (its hooks fire before the
    all-reduce) nor DeepSpeed (it owns the gradients); and gradient clipping by the global norm
    cannot be applied (the gradients are consumed before the norm is known).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accumulation_steps: int = 1):
        if not (isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
                and accumulation_steps >= 1):
            fail("accumulation_steps", accumulation_steps, "an integer >= 1")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.micro_step = 0
        self._handles = []
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def is_boundary(self) -> bool:
        """Whether the next backward pass ends an accumulation window (and so steps)."""
        return (self.micro_step + 1) % self.accumulation_steps == 0

    def _hook(self, p: torch.Tensor) -> None:
        if self.is_boundary and p.grad is not None:
            self.optimizer.step_param(p)
            p.grad = None

    def step(self) -> bool:
        """Call after each micro-batch's backward; returns ``True`` if the parameters were stepped."""
        boundary = self.is_boundary
        if boundary:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1
        return boundary

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop accumulated gradients (those not consumed yet)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "accumulation_steps": self.accumulation_steps}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])

    def remove(self) -> None:
        """Remove the hooks (back to ordinary ``optimizer.step()``)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
