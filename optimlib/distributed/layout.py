"""Recover where an optimizer's tensor lies in its global parameter, whatever handed it over.

``local_piece(p, shape)`` returns ``(local, FlatSlice)``: the plain local tensor to update in
place and where it lies in the flattened global parameter of shape ``shape``.

* a plain tensor whose shape is ``shape``: the whole parameter, one rank;
* a DTensor sharded ``Shard(0)`` on a 1-D mesh (FSDP2): ``torch.chunk`` semantics, so the first
  ranks hold ``ceil(m / W)`` rows and the last ones fewer (possibly none);
* a DTensor whose rows are divided over an N-D mesh (:class:`MeshRows`): FSDP2 over a
  column-wise tensor-parallel weight gives ``(_StridedShard(0), Shard(0))``, contiguous row blocks
  in another order than the ranks; ``Replicate()`` mesh dimensions hold copies;
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
try:  # FSDP2 over tensor parallelism (not a Shard subclass in every torch)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - older torch
    _StridedShard = ()


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


def shard_dim(placement) -> int | None:
    """The tensor dimension a DTensor placement divides (``Shard`` or ``_StridedShard``), or ``None``."""
    if placement.is_shard() or isinstance(placement, _StridedShard):
        return placement.dim
    return None


def rows_only(placements) -> bool:
    """Whether DTensor ``placements`` divide the tensor along its first dimension only."""
    return all(pl.is_replicate() or shard_dim(pl) == 0 for pl in placements)


def row_placements(placements) -> tuple:
    """Placements that divide the same ranks' shares along the first dimension instead: what a
    column-sharded (``Shard(1)``, tensor parallel row-wise) weight is redistributed to for a step."""
    for pl in placements:
        if isinstance(pl, _StridedShard) and pl.dim != 0:
            raise NotImplementedError(f"optimlib cannot place a DTensor sharded {tuple(placements)} by rows")
        if pl.is_partial():
            raise NotImplementedError(f"optimlib steps DTensors that are sharded or replicated; got {tuple(placements)}")
    return tuple(pl if pl.is_replicate() or shard_dim(pl) == 0 else Shard(0) for pl in placements)


class MeshRows:
    """How DTensor ``placements`` on ``mesh`` divide a first dimension: the ranks that hold distinct
    rows (the mesh dimensions that shard; the others hold copies), the order of their row blocks
    and the process group they reduce over.

    Positions are the row blocks in row order; ``order[k]`` is the rank in ``group`` of the process
    holding block ``k``.  ``split(size)`` gives every block's ``[start, stop)`` for a first dimension
    of ``size`` (nested ``torch.chunk`` as DTensor defines it, ``_StridedShard`` included).
    """

    def __init__(self, mesh, placements):
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

        self._offsets = _compute_local_shape_and_global_offset
        self.mesh, self.placements = mesh, tuple(placements)
        self.dims = [d for d, pl in enumerate(self.placements) if shard_dim(pl) is not None]
        me = list(mesh.get_coordinate())
        if len(self.dims) == 1:
            self.group = mesh.get_group(self.dims[0])
        elif len(self.dims) == mesh.ndim:
            self.group = _whole_mesh_group(mesh)
        else:
            raise NotImplementedError(
                f"optimlib supports DTensors whose rows are sharded over one mesh dimension or over all of "
                f"them; got placements {self.placements} on a {mesh.ndim}-D mesh")
        coords = []
        for flat in range(math.prod(mesh.shape[d] for d in self.dims)):
            c = list(me)
            for d in reversed(self.dims):
                c[d], flat = flat % mesh.shape[d], flat // mesh.shape[d]
            coords.append(c)
        # A size every block holds rows of, so the order has no ties; small, because DTensor's
        # offset arithmetic for _StridedShard runs in time linear in it (4M rows: 1.2 s a mesh).
        probe = len(coords) * 64
        coords.sort(key=lambda c: self._start(c, probe))
        self.coords = coords
        ranks = [int(mesh.mesh[tuple(c)]) for c in coords]
        self.order = tuple(r if self.group is None else dist.get_group_rank(self.group, r) for r in ranks)
        self.position = coords.index(me)
        self._splits: dict[int, tuple[tuple[int, int], ...]] = {}

    def _start(self, coord, size: int) -> int:
        return self._offsets((size,), tuple(self.mesh.shape), coord, self.placements)[1][0]

    def split(self, size: int) -> tuple[tuple[int, int], ...]:
        found = self._splits.get(size)
        if found is None:
            found = self._splits[size] = self._split(size)
        return found

    def _split(self, size: int) -> tuple[tuple[int, int], ...]:
        out, cursor = [], 0
        for c in self.coords:
            (count,), (start,) = self._offsets((size,), tuple(self.mesh.shape), c, self.placements)
            if count and start != cursor:
                raise NotImplementedError(f"placements {self.placements} do not divide {size} rows into "
                                          "contiguous blocks")
            out.append((cursor, cursor + count))
            cursor += count
        return tuple(out)

    def placements_on(self, dim: int) -> list:
        """The same division applied to dimension ``dim`` (a state tensor sharded like the rows)."""
        return [_StridedShard(dim, split_factor=pl.split_factor) if isinstance(pl, _StridedShard)
                else Shard(dim) if pl.is_shard() else pl for pl in self.placements]


def shard_like(mesh, piece: FlatSlice, local: torch.Tensor, dim: int, shape) -> torch.Tensor:
    """``local``, this rank's block of a state tensor of global ``shape`` divided along ``dim`` the
    way ``piece`` divides a DTensor parameter's rows over ``mesh``, as a DTensor (so distributed
    checkpoints save every block); ``local`` itself when ``mesh`` is ``None`` (no DTensor)."""
    if mesh is None:
        return local
    placements = piece.sharding.placements_on(dim) if piece.sharding is not None else [Shard(dim)]
    shape = tuple(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local.contiguous(), mesh, placements, run_check=False, shape=shape, stride=stride)


def on_local(weight: torch.Tensor, fn) -> torch.Tensor:
    """``fn(weight)``; for a DTensor, ``fn`` of its local tensor, put back with the same placements
    (differentiable both ways) -- for a function that acts on each local block by itself, such as
    an element-wise map or a row-local mask."""
    if not is_dtensor(weight):
        return fn(weight)
    out = fn(weight.to_local())
    return DTensor.from_local(out, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape,
                              stride=weight.stride())


def copies(t: torch.Tensor) -> int:
    """How many processes of the default group hold each element of ``t``'s local block: the
    ranks a DTensor's mesh replicates it over (``Replicate()`` dimensions) and the ranks outside
    its mesh (a mesh over one dimension of a 2-D world); 1 for a plain tensor."""
    if not is_dtensor(t):
        return 1
    mesh = t.device_mesh
    pieces = math.prod(mesh.shape[d] for d, pl in enumerate(t.placements) if shard_dim(pl) is not None)
    return dist.get_world_size() // pieces


def local_blocks(shape, mesh, placements) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(local shape, global offset)`` of every rank's block of a DTensor of global ``shape``."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    coords = [[]]
    for size in mesh.shape:
        coords = [c + [i] for c in coords for i in range(size)]
    return [_compute_local_shape_and_global_offset(tuple(shape), tuple(mesh.shape), c, placements) for c in coords]


def _whole_mesh_group(mesh):
    """The process group over every rank of ``mesh`` (``None``: the default group)."""
    ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return None
    if not mesh.mesh_dim_names:
        raise NotImplementedError("optimlib needs mesh_dim_names on a device mesh that does not span every rank")
    return mesh._flatten().get_group()


def local_piece(p: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, FlatSlice]:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if is_dtensor(p):
        if all(pl.is_replicate() for pl in p.placements):
            return p.to_local(), FlatSlice.whole(numel)
        if not rows_only(p.placements):
            raise NotImplementedError(
                f"optimlib places DTensors sharded along their first dimension; got placements "
                f"{p.placements} (redistribute with optimlib.distributed.layout.row_placements first)")
        rows = shape[0] if shape else 1
        per_row = numel // max(rows, 1)
        mesh = p.device_mesh
        if mesh.ndim == 1:
            bounds = chunk_bounds(rows, mesh.size())
            return p._local_tensor, FlatSlice(numel, tuple((a * per_row, b * per_row) for a, b in bounds),
                                              mesh.get_local_rank(), mesh.get_group())
        layout = _mesh_rows(mesh, p.placements)
        split = layout.split(rows)
        start, stop = split[layout.position]
        if p._local_tensor.numel() != (stop - start) * per_row:
            raise NotImplementedError(
                f"the local block of a DTensor of shape {shape} placed {tuple(p.placements)} holds "
                f"{p._local_tensor.numel()} elements where the mesh's row division gives {stop - start} rows")
        bounds = tuple((a * per_row, b * per_row) for a, b in split)
        return p._local_tensor, FlatSlice(numel, bounds, layout.position, layout.group, layout.order, layout)
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


_LAYOUTS: dict = {}


def _mesh_rows(mesh, placements) -> MeshRows:
    key = (id(mesh), tuple(placements))
    layout = _LAYOUTS.get(key)
    if layout is None or layout.mesh is not mesh:
        layout = _LAYOUTS[key] = MeshRows(mesh, placements)
    return layout
