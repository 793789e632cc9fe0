"""The two collectives of a tensor-parallel layer written on local tensors (Megatron-LM's ``f`` and ``g``).

A layer whose tensor-parallel ranks each hold a block of the weight computes on local tensors and
marks where the ranks' values meet:

* :func:`copy_to_parallel_region` -- a tensor every rank holds whole (the input of a column-wise
  layer, a replicated factor) and uses for its own block: identity forward, gradients summed over
  the group backward (each rank's gradient is its block's share);
* :func:`reduce_from_parallel_region` -- a partial result every rank holds for its block (the
  output of a row-wise layer): summed over the group forward, identity backward.

``group`` is the tensor-parallel process group (``tp_mesh.get_group()``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _CopyToParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` unchanged; its gradient all-reduced (summed) over ``group``."""
    return _CopyToParallelRegion.apply(x, group)


def reduce_from_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` all-reduced (summed) over ``group``; its gradient passed through."""
    return _ReduceFromParallelRegion.apply(x, group)
