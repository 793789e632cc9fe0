"""Layer-wise (optimizer-in-backward) training under Hugging Face's ``transformers.Trainer``.

::

    args = TrainingArguments(..., gradient_accumulation_steps=2, max_grad_norm=0)
    optimizers = layerwise_optimizers(model, "galore_adamw", args, rank=128, target_modules=["attn", "mlp"])
    Trainer(model=model, args=args, optimizers=optimizers, ...).train()

Each parameter is stepped by a post-accumulate-grad hook (:class:`~optimlib.optim.layerwise.LayerwiseStepper`)
during the backward pass of the last micro-batch of each accumulation window, and its gradient
freed there.  The window is the Trainer's own: before every micro-batch the Trainer tells
accelerate whether it ends an optimizer step (``gradient_state.sync_gradients``, also for the
shorter last window of an epoch), and the hooks read that flag.  Gradient accumulation therefore
works (transformers' own layer-wise GaLore refuses it).

The Trainer gets :class:`LayerwiseTrainerOptimizer`, a stand-in for the real optimizer:

* ``param_groups``, ``state`` and ``defaults`` *are* the real optimizer's, so the Trainer's LR
  scheduler sets the learning rate the hooks use and the Trainer logs it.  The Trainer steps its
  scheduler after ``optimizer.step()``, so the hooks of step ``k`` run with the LR an ordinary
  run uses at step ``k``;
* ``step()`` steps only parameters whose gradient no hook consumed (none, in a plain model) and
  ``zero_grad()`` drops accumulated gradients, as the real ones would;
* ``state_dict()`` / ``load_state_dict()`` are the real optimizer's, so checkpoints save and
  resume it.

Refused, by :func:`check_layerwise_args` (when the pair is built, and again before the first
parameter steps, on the same ``TrainingArguments``): ``max_grad_norm > 0`` (clipping by the global
norm needs every gradient before any step, and the Trainer would clip gradients that are already
gone), ``fp16`` (its loss scaler unscales gradients only in ``optimizer.step()``), and more than
one process or DeepSpeed (the hooks would step before the gradients are reduced).  The Trainer's
logged ``grad_norm`` is 0: the gradients are freed before it measures them.

Outside the Trainer use :class:`~optimlib.optim.layerwise.LayerwiseStepper` directly.  This module
imports accelerate (installed with the Trainer) only when a hook first runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from optimlib.optim.layerwise import LayerwiseStepper

__all__ = ["LayerwiseTrainerOptimizer", "check_layerwise_args", "layerwise_optimizers"]


def check_layerwise_args(args: Any) -> None:
    """Refuse ``TrainingArguments`` under which layer-wise steps would be wrong (``ValueError``
    naming the argument): ``max_grad_norm > 0``, ``fp16``, ``deepspeed``, ``world_size > 1``."""
    clip = getattr(args, "max_grad_norm", None)
    if clip is not None and clip > 0:
        raise ValueError(f"max_grad_norm={clip!r}: layer-wise training steps each parameter inside the backward "
                         "pass, before the global gradient norm is known, so the Trainer's gradient clipping "
                         "cannot apply; set TrainingArguments(max_grad_norm=0)")
    if getattr(args, "fp16", False):
        raise ValueError("fp16=True: the fp16 loss scaler unscales gradients in optimizer.step(), after the "
                         "layer-wise hooks have stepped with the scaled ones; use bf16 or float32")
    if getattr(args, "deepspeed", None):
        raise ValueError("deepspeed: DeepSpeed owns the gradients and the optimizer step; layer-wise training "
                         "runs in one process")
    world = getattr(args, "world_size", 1)
    if world > 1:
        raise ValueError(f"world_size={world}: under the Trainer's DDP/FSDP the hooks would step before the "
                         "gradients are reduced; layer-wise training under the Trainer runs in one process")


class _TrainerStepper(LayerwiseStepper):
    """:class:`LayerwiseStepper` whose accumulation boundary is the Trainer's (accelerate's
    ``sync_gradients``, set before each micro-batch), checking ``args`` before the first step."""

    def __init__(self, optimizer: torch.optim.Optimizer, args: Any):
        self._args = args
        self._checked = False
        self._gradient_state = None
        super().__init__(optimizer)

    @property
    def is_boundary(self) -> bool:
        if self._gradient_state is None:
            from accelerate.state import GradientState

            self._gradient_state = GradientState()  # shared state: the Trainer's accelerator sets it
        return bool(self._gradient_state.sync_gradients)

    def _hook(self, p: torch.Tensor) -> None:
        if not self._checked and p.grad is not None and self.is_boundary:
            check_layerwise_args(self._args)  # again: the arguments may have changed since
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                raise ValueError(f"world_size={torch.distributed.get_world_size()}: layer-wise training under the "
                                 "Trainer runs in one process")
            self._checked = True
        super()._hook(p)


class LayerwiseTrainerOptimizer(torch.optim.Optimizer):
    """What the Trainer holds as its optimizer in layer-wise training (see the module docstring).

    ``optimizer``: the real optimizer; ``stepper``: the :class:`LayerwiseStepper` whose hooks step
    it.  ``param_groups``, ``state`` and ``defaults`` are the real optimizer's (also after
    ``load_state_dict``, which replaces its group dicts).  ``remove()`` takes the hooks off.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, args: Any):
        # Not Optimizer.__init__: it would build param groups of its own.
        self.optimizer = optimizer
        self.stepper = _TrainerStepper(optimizer, args)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def step(self, closure: Callable | None = None):
        """At the end of an accumulation window: step what no hook stepped (see
        :meth:`LayerwiseStepper.step`); the hooks have stepped everything else."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.stepper.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.stepper.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)
        self.stepper._attach()

    def remove(self) -> None:
        self.stepper.remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


def layerwise_optimizers(model: torch.nn.Module, name: str, args: Any, *,
                         lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
                         **optimizer_kwargs: Any) -> tuple[LayerwiseTrainerOptimizer, Any]:
    """``(optimizer, scheduler)`` for ``Trainer(args=args, optimizers=...)``, training layer-wise.

    ``name`` and ``optimizer_kwargs``: as for :func:`optimlib.integrations.transformers.optimizer_cls_and_kwargs`
    (``lr`` and ``weight_decay`` default to ``args``', ``target_modules`` to its
    ``optim_target_modules``); any registered optimizer, and the built optimizer is
    ``optimizer.optimizer``.  ``args``: the ``TrainingArguments`` the Trainer gets (checked now by
    :func:`check_layerwise_args`, and again before the first step).  ``lr_scheduler``: ``None``
    (the Trainer builds its own, ``lr_scheduler_type`` and warmup, on the returned optimizer) or
    a callable that builds one from the returned optimizer.  Build the pair after the model is
    on its device, and pass the same ``args`` to the Trainer.
    """
    from optimlib.integrations.trainer_options import trainer_options
    from optimlib.optim.factory import create_optimizer

    if args is None:
        raise ValueError("args: layer-wise training needs the Trainer's TrainingArguments (checked for "
                         "max_grad_norm, fp16, deepspeed and world_size)")
    check_layerwise_args(args)
    options = trainer_options(name, args, **optimizer_kwargs)
    optimizer = LayerwiseTrainerOptimizer(create_optimizer(model, **options), args)
    return optimizer, (lr_scheduler(optimizer) if lr_scheduler is not None else None)
