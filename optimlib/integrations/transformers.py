"""optimlib's optimizers in Hugging Face's ``transformers.Trainer``.

Two ways in (``docs/integrations.md`` has runnable examples):

* ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("galore_adamw", args, rank=128))``:
  the Trainer builds the optimizer itself, at the moment its engine needs it -- the only way under
  FSDP (the Trainer refuses ``optimizers=`` there), and what it does under DeepSpeed ZeRO too.
  The first element is :class:`OptimlibFactory`, a class the Trainer instantiates and calls as
  ``OptimlibFactory()(model, **kwargs)``; the kwargs are :func:`optimlib.create_optimizer`'s.
* ``Trainer(..., optimizers=(optimlib.create_optimizer(model, "galore_adamw", ...), None))``:
  one process, DDP or DeepSpeed (not FSDP).
* ``Trainer(args=args, optimizers=layerwise_optimizers(model, "galore_adamw", args, ...))``:
  layer-wise (optimizer-in-backward) training, with gradient accumulation, in one process
  (:mod:`optimlib.integrations.transformers_layerwise`).

Target selection (``target_modules``, or the ``TrainingArguments``' ``optim_target_modules``)
follows the Trainer's own rules -- a string is a regex matched against the whole module name,
``"all-linear"`` takes every linear, a list matches names, substrings and full regexes -- and
takes GPT-2's ``Conv1D`` layers as the transposed linears they are (see
:func:`optimlib.optim.factory.conv1d_group_options`).

This module imports neither transformers nor accelerate: it only builds what the Trainer calls.
"""

from __future__ import annotations

from typing import Any

import torch

from optimlib.integrations.transformers_layerwise import (LayerwiseTrainerOptimizer, check_layerwise_args,
                                                           layerwise_optimizers)
from optimlib.integrations.trainer_options import trainer_options
from optimlib.optim.factory import create_optimizer
from optimlib.validation import fail

__all__ = ["LayerwiseTrainerOptimizer", "OptimlibFactory", "check_layerwise_args", "layerwise_optimizers",
           "optimizer_cls_and_kwargs"]


class OptimlibFactory:
    """The optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(OptimlibFactory, kwargs))``.

    The Trainer calls ``OptimlibFactory()(model, **kwargs)``; ``kwargs`` are those of
    :func:`optimlib.create_optimizer` and must include ``name`` (a registered optimizer).  The
    Trainer's ``learning_rate`` and ``weight_decay`` do not reach a factory:
    :func:`optimizer_cls_and_kwargs` copies them from the ``TrainingArguments`` when given.
    """

    def __call__(self, model: torch.nn.Module, name: str | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        if name is None:
            fail("name", None, "a registered optimizer name in the factory's kwargs (optimlib.list_optimizers())")
        return create_optimizer(model, name, **kwargs)


def optimizer_cls_and_kwargs(name: str, args: Any = None, **kwargs: Any) -> tuple[type, dict]:
    """``(OptimlibFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``name``: a registered optimizer (``optimlib.list_optimizers()``); ``kwargs``: the options of
    :func:`optimlib.create_optimizer` (``lr``, ``weight_decay``, ``target_modules``,
    ``per_parameter_groups``, the optimizer's own: ``rank``, ``update_proj_gap``, ...).
    ``args``: the ``TrainingArguments``; when given, ``lr`` and ``weight_decay`` default to its
    ``learning_rate`` and ``weight_decay``, and for a projected optimizer ``target_modules`` to its
    ``optim_target_modules`` (when set).  Unknown names and options are refused here, by name,
    rather than when the Trainer starts training.
    """
    return OptimlibFactory, trainer_options(name, args, **kwargs)

