"""Map a DeepSpeed ZeRO flat partition back to the parameters it holds.

``deepspeed.initialize`` replaces every param group's ``params`` by this rank's flat fp32
partition of the group (ZeRO-1/2, and the bf16 optimizer without ZeRO) or of a sub-group (ZeRO-3).
A shape-aware optimizer needs each parameter's rows back.  It knows the parameters it was built
with (the group's *roster*, recorded at construction, before DeepSpeed flattens anything), and
DeepSpeed leaves its own bookkeeping on those very parameter objects:

* ZeRO-1/2 (and ``bf16`` without ZeRO): each trainable parameter's ``.data`` becomes a view of the
  group's flat 16-bit (or fp32) buffer, so its storage offset is its offset in the flattened group
  (including any ``parameter_alignment`` padding).  The buffer is padded to a multiple of
  ``2 x world`` elements and cut into ``world`` equal partitions; rank ``k`` holds
  ``[k P, (k + 1) P)`` of it.  A partition may span several parameters and start or end mid-row.
* ZeRO-3: each trainable parameter carries ``ds_tensor``, its own partition of
  ``ceil(numel / world)`` elements; rank ``k`` holds ``[k s, (k + 1) s)`` of the flattened
  parameter (padded at the end), and a sub-group's flat partition is its parameters' partitions
  back to back.

:func:`map_flat_partition` reads that bookkeeping, checks it against the flat tensor it was handed
(size, world size, alignment), and returns one :class:`Segment` per trainable parameter: where its
elements lie in the flat partition and where they lie in the flattened parameter on every rank.
Anything that does not add up raises :class:`LayoutError` naming the parameter -- a layout is
never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from optimlib.distributed.row_block import FlatSlice

__all__ = ["Segment", "LayoutError", "map_flat_partition", "is_fsdp1_flat"]

ALIGNMENT_PER_RANK = 2  # ZeRO-1/2 pad the flattened group to a multiple of 2 x world elements


class LayoutError(ValueError):
    """A tensor handed to an optimizer cannot be mapped back to the parameters it was built with."""


@dataclass(frozen=True)
class Segment:
    """One parameter's part of a flat partition.

    ``index``: the parameter's position in its param group as built; ``start``/``stop``: its
    elements in the flat partition (``stop - start == piece.stop - piece.start``); ``piece``:
    every rank's part of the flattened parameter (the process group included).
    """

    index: int
    start: int
    stop: int
    piece: FlatSlice


def is_fsdp1_flat(t: torch.Tensor) -> bool:
    """Whether ``t`` is an FSDP1 ``FlatParameter`` or a flattened original parameter
    (``use_orig_params=True``): FSDP1 marks both."""
    return bool(getattr(t, "_fsdp_flattened", False))


def _trainable(roster: Sequence[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """The parameters DeepSpeed puts in a flat partition: trainable, with at least one element."""
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    return [(i, p) for i, p in enumerate(roster) if p.requires_grad and numel(p) > 0]


def map_flat_partition(flat: torch.Tensor, roster: Sequence[torch.Tensor], labels: Sequence[str],
                       shapes: Sequence[Sequence[int]]) -> list[Segment]:
    """The segments of ``flat`` (this rank's DeepSpeed partition of a group built over ``roster``).

    ``labels[i]`` names ``roster[i]`` in errors; ``shapes[i]`` is its global shape.  Raises
    :class:`LayoutError` when the partition does not match the group's parameters.
    """
    if flat.dim() != 1:
        raise LayoutError(f"a tensor of shape {tuple(flat.shape)} replaced the group's parameters "
                          f"({', '.join(labels)}); only DeepSpeed ZeRO's 1-D flat partitions are mapped")
    if not (dist.is_available() and dist.is_initialized()):
        raise LayoutError(f"a flat tensor of {flat.numel()} elements replaced the group's parameters "
                          f"({', '.join(labels)}) outside a process group")
    members = _trainable(roster)
    if not members:
        raise LayoutError(f"a flat partition replaced a group without trainable parameters ({', '.join(labels)})")
    for i, p in members:
        if math.prod(shapes[i]) != int(getattr(p, "ds_numel", p.numel())):
            raise LayoutError(f"parameter {labels[i]} has {int(getattr(p, 'ds_numel', p.numel()))} elements "
                              f"but was recorded with shape {tuple(shapes[i])}")
    if all(hasattr(p, "ds_tensor") for _, p in members):
        return _zero3_segments(flat, members, labels, shapes)
    if any(hasattr(p, "ds_tensor") for _, p in members):
        raise LayoutError("param group mixes ZeRO-3 partitioned parameters and plain ones: "
                          f"{', '.join(labels)}")
    return _zero12_segments(flat, members, labels, shapes)


def _bounds(numel: int, size: int, world: int) -> tuple[tuple[int, int], ...]:
    return tuple((min(k * size, numel), min((k + 1) * size, numel)) for k in range(world))


def _zero3_segments(flat, members, labels, shapes) -> list[Segment]:
    group = getattr(members[0][1], "ds_process_group", None)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    segments, offset = [], 0
    for i, p in members:
        if getattr(p, "ds_process_group", None) is not group:
            raise LayoutError(f"parameter {labels[i]} is partitioned over another process group than "
                              f"{labels[members[0][0]]}; give it a param group of its own")
        numel, size = math.prod(shapes[i]), int(p.ds_tensor.ds_numel)
        if size != -(-numel // world):
            raise LayoutError(f"parameter {labels[i]}: a ZeRO-3 partition of {size} elements does not split "
                              f"{numel} elements over {world} ranks")
        piece = FlatSlice(numel, _bounds(numel, size, world), rank, group)
        segments.append(Segment(i, offset, offset + piece.stop - piece.start, piece))
        offset += size
    if offset != flat.numel():
        names = ", ".join(labels[i] for i, _ in members)
        raise LayoutError(
            f"a ZeRO-3 flat partition of {flat.numel()} elements does not hold the group's {offset} "
            f"partitioned elements ({names}): DeepSpeed split the param group into sub-groups "
            "(zero_optimization.sub_group_size).  Raise sub_group_size above the group's size, or give "
            "each parameter a param group of its own (optimlib.optim.param_groups(model, "
            "per_parameter_groups=True))")
    return segments


def _zero12_segments(flat, members, labels, shapes) -> list[Segment]:
    world, rank = dist.get_world_size(), dist.get_rank()
    first = members[0][1]
    storage, base = first.untyped_storage().data_ptr(), first.storage_offset()
    offsets, end = [], 0
    for i, p in members:
        offset = p.storage_offset() - base
        if (p.untyped_storage().data_ptr() != storage or not p.is_contiguous() or offset < end
                or offset - end >= 16):
            raise LayoutError(
                f"parameter {labels[i]} is not where DeepSpeed ZeRO-1/2 puts it (a contiguous view of its "
                "param group's flat buffer, after the previous parameter): the optimizer was handed a flat "
                "tensor by a wrapper optimlib does not know.  Build the optimizer over the parameters the "
                "wrapper trains, after wrapping")
        offsets.append(offset)
        end = offset + p.numel()
    alignment = ALIGNMENT_PER_RANK * world
    total = flat.numel() * world
    if total != -(-end // alignment) * alignment:
        names = ", ".join(labels[i] for i, _ in members)
        raise LayoutError(
            f"a flat partition of {flat.numel()} elements on {world} ranks does not hold the {end} elements "
            f"of {names} as DeepSpeed ZeRO-1/2 lays them out (padded to a multiple of {alignment}); is "
            "the data-parallel group the whole world?")
    lo, hi = rank * flat.numel(), (rank + 1) * flat.numel()
    segments = []
    for (i, p), offset in zip(members, offsets):
        numel = p.numel()
        bounds = tuple((min(max(k * flat.numel() - offset, 0), numel),
                        min(max((k + 1) * flat.numel() - offset, 0), numel)) for k in range(world))
        start = min(max(offset - lo, 0), hi - lo)
        piece = FlatSlice(numel, bounds, rank, None)
        segments.append(Segment(i, start, start + piece.stop - piece.start, piece))
    return segments
