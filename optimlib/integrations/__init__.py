"""Thin adapters for training stacks other than optimlib's launcher.

* :mod:`optimlib.integrations.transformers` -- Hugging Face ``Trainer`` (one process, DDP, or
  through accelerate with FSDP2 or DeepSpeed ZeRO): the factory for ``optimizer_cls_and_kwargs``.
* Lightning needs no adapter: ``configure_optimizers`` returns :func:`optimlib.create_optimizer`'s
  optimizer (one process, DDP, FSDP2 through ``ModelParallelStrategy``).

Target selection for both follows Hugging Face's ``optim_target_modules`` rules and takes GPT-2's
``Conv1D`` (:mod:`optimlib.optim.factory`).  Nothing here is imported by ``import optimlib``, and
nothing here imports a framework.  Usage, with copy-paste examples: ``docs/integrations.md``.
"""
