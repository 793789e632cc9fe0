"""The DDP engine of ``launch/pretrain.py`` (``torchrun ... engine=ddp``).

Every rank holds the whole model and the whole optimizer state; each gradient is the average of
the ranks' gradients, so every rank applies the same update to the same values and the
optimizers see plain full tensors, as in one process (no collectives of their own).

* Ordinary steps: ``torch.nn.parallel.DistributedDataParallel`` (bucketed all-reduce overlapped
  with the backward pass, ``no_sync`` on all but the last micro-batch of a step,
  ``gradient_as_bucket_view`` so the buckets are the gradients' only copy).
* ``train.layerwise``: no DDP wrapper.  DDP's hooks fire before its all-reduce, and its buckets
  hold every gradient for the life of the model, which would leave nothing for layer-wise
  stepping to save.  Instead each gradient is averaged by its own all-reduce in the stepper's
  ``prepare`` (:meth:`Engine.start_layerwise`), in the order the post-accumulate-grad hooks fire
  (the same on every rank), then stepped and freed; on earlier micro-batches the gradients only
  accumulate, as under ``no_sync``.  The parameters are broadcast from rank 0 once, as DDP does.

Replicated parameters (shapes that change, dynamic rank) are kept out of DDP's buckets like the
sharded engines keep them out of sharding (:meth:`Engine.split_replicated`).  Checkpoints: rank 0
writes the single engine's files (the optimizer state is the same on every rank), so they resume
under one process and under DDP on any world size (:mod:`optimlib.train.checkpoint`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from optimlib.train.engine import Engine


class DDPEngine(Engine):
    """Data parallel with the whole model on every rank (torchrun)."""

    name = "ddp"

    def setup(self, model: nn.Module) -> None:
        model = model.to(self.device)
        self.split_replicated(model)
        if self.cfg.train.layerwise:
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t, src=0)
            self.model = model
        else:
            self.model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.optimizer = self.build_optimizer(model)
        self.start_layerwise(reduce_grad=self._average)

    def _average(self, grad: torch.Tensor) -> None:
        grad.div_(self.world_size)  # then sum: DDP's own order of operations
        dist.all_reduce(grad)

    def forward_backward(self, x, y, scale, last):
        skip_sync = isinstance(self.model, DistributedDataParallel) and not last
        with self.model.no_sync() if skip_sync else contextlib.nullcontext():
            return super().forward_backward(x, y, scale, last)

    @property
    def module(self) -> nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
