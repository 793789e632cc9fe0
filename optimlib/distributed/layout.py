"""Recover where an optimizer's tensor lies in its global parameter, whatever handed it over.

``local_piece(p, shape)`` returns ``(local, FlatSlice)``: the plain local tensor to update in
place and where it lies in the flattened global parameter of shape ``shape``.

* a plain tensor whose shape is ``shape``: the whole parameter, one rank;
* a DTensor sharded ``Shard(0)`` on a 1-D mesh (FSDP2): ``torch.chunk`` semantics, so the first
  ranks hold ``ceil(m / W)`` rows and the last ones fewer (possibly none);
* a flat 1-D tensor where ``shape`` is known from the param group (DeepSpeed ZeRO-1/2/3 with
  one parameter per group): rank ``k`` holds ``[k * P, (k + 1) * P)`` of the parameter padded to
  ``W * P`` elements, ``P`` being the local numel (DeepSpeed pads the last partition).

The param group carries the global shape as ``group["shapes"][i]`` (see
:func:`optimlib.optim.factory.param_groups`): DeepSpeed replaces ``group["params"]`` with
its flat partition but keeps every other key of the group.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from optimlib.distributed.row_block import FlatSlice, chunk_bounds

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch
    DTensor = None
    Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (sharing storage), or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def global_shape(p: torch.Tensor, group: dict | None = None, index: int = 0) -> tuple[int, ...]:
    """The shape of the whole parameter ``p`` stands for."""
    shapes = (group or {}).get("shapes")
    if shapes is not None and shapes[index] is not None:
        return tuple(shapes[index])
    if hasattr(p, "ds_shape"):  # deepspeed.zero.Init partitions parameters at construction
        return tuple(p.ds_shape)
    return tuple(p.shape)


def local_piece(p: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, FlatSlice]:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if is_dtensor(p):
        mesh = p.device_mesh
        if mesh.ndim != 1 or any(not isinstance(pl, Shard) or pl.dim != 0 for pl in p.placements):
            if all(pl.is_replicate() for pl in p.placements):
                return p.to_local(), FlatSlice.whole(numel)
            raise NotImplementedError(
                f"optimlib supports DTensors sharded Shard(0) on a 1-D mesh (FSDP2); got placements "
                f"{p.placements} on a {mesh.ndim}-D mesh")
        world = mesh.size()
        rank = mesh.get_local_rank()
        rows = shape[0] if shape else 1
        per_row = numel // max(rows, 1)
        bounds = tuple((a * per_row, b * per_row) for a, b in chunk_bounds(rows, world))
        return p._local_tensor, FlatSlice(numel, bounds, rank, mesh.get_group())
    if tuple(p.shape) == shape:
        return p, FlatSlice.whole(numel)
    if p.dim() == 1 and dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        size = p.numel()
        if size * world < numel:
            raise ValueError(
                f"a flat partition of {size} elements on {world} ranks cannot hold a parameter of "
                f"shape {shape}; is every parameter in its own param group?")
        bounds = tuple((min(k * size, numel), min((k + 1) * size, numel)) for k in range(world))
        return p, FlatSlice(numel, bounds, rank, None)
    if p.dim() == 1 and p.numel() >= numel:  # one rank, padded flat buffer
        return p, FlatSlice(numel, ((0, numel),), 0, None)
    raise ValueError(f"cannot place a tensor of shape {tuple(p.shape)} in a parameter of shape {shape}")
