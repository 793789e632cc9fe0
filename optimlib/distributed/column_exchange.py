"""Move a column-sharded matrix to whole rows and back: one all-to-all each way.

Tensor parallelism's row-wise layers (``RowwiseParallel``) shard a weight ``(m, n)`` along its
columns; under FSDP2 over the other mesh dimension it arrives as ``(Shard(0), Shard(1))``: rank
``(d, t)`` holds rows ``chunk_d(m)`` and columns ``chunk_t(n)``.  Shape-aware optimizers step whole
rows, so for the step the ranks of one ``t``-group exchange their blocks: afterwards rank ``t``
holds the rows ``chunk_t(chunk_d(m))`` with every column -- the layout ``(Shard(0), Shard(0))``
(:func:`optimlib.distributed.layout.row_placements`) -- and after the step the exchange runs in
reverse.  Each rank sends ``(T - 1) / T`` of its block and receives as much (``T``: the ranks
sharing the columns), with ``all_to_all_single`` over their process group (NCCL and gloo alike);
no rank ever holds more of the matrix than its share.

:class:`ColumnExchange` covers a 2-D tensor whose columns are sharded ``Shard(1)`` over one mesh
dimension, the other dimensions sharding rows (``Shard(0)``) or replicating; :func:`column_exchange`
returns ``None`` for any other layout (the caller then uses DTensor's own redistribution).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ColumnExchange:
    """The all-to-all between the column blocks and the row blocks of one DTensor layout."""

    def __init__(self, shape, mesh, placements, target):
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as offsets

        self.dim = next(k for k, pl in enumerate(placements) if pl.is_shard() and pl.dim == 1)
        self.group = mesh.get_group(self.dim)
        me = list(mesh.get_coordinate())
        peers = []
        for j in range(mesh.shape[self.dim]):
            c = list(me)
            c[self.dim] = j
            peers.append(c)
        mesh_shape = tuple(mesh.shape)
        (rows, _), (row0, _) = offsets(tuple(shape), mesh_shape, me, placements)
        self.cols = []           # every peer's columns (start, stop) now
        self.rows = []           # every peer's rows (start, stop) after the exchange, within mine
        for c in peers:
            (_, w), (_, c0) = offsets(tuple(shape), mesh_shape, c, placements)
            (h, _), (r0, _) = offsets(tuple(shape), mesh_shape, c, target)
            self.cols.append((c0, c0 + w))
            self.rows.append((r0 - row0, r0 - row0 + h))
        starts = [a for a, _ in self.rows]
        self.valid = (sorted(starts) == starts and self.rows[0][0] == 0 and self.rows[-1][1] == rows
                      and all(b == a2 for (_, b), (a2, _) in zip(self.rows, self.rows[1:]))
                      and [dist.get_group_rank(self.group, int(mesh.mesh[tuple(c)])) for c in peers]
                      == list(range(len(peers))))
        self.me = me[self.dim]

    def to_rows(self, block: torch.Tensor) -> torch.Tensor:
        """This rank's ``(rows, n)`` after the exchange, from its ``(rows of all, cols)`` block."""
        send = torch.cat([block[a:b].reshape(-1) for a, b in self.rows])
        mine = self.rows[self.me][1] - self.rows[self.me][0]
        sizes_out = [(b - a) * (self.cols[self.me][1] - self.cols[self.me][0]) for a, b in self.rows]
        sizes_in = [mine * (c1 - c0) for c0, c1 in self.cols]
        recv = block.new_empty(sum(sizes_in))
        dist.all_to_all_single(recv, send, sizes_in, sizes_out, group=self.group)
        parts = torch.split(recv, sizes_in)
        return torch.cat([part.view(mine, c1 - c0) for part, (c0, c1) in zip(parts, self.cols)], dim=1)

    def to_columns(self, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_rows`: this rank's column block from every peer's rows."""
        send = torch.cat([rows[:, c0:c1].reshape(-1) for c0, c1 in self.cols])
        width = self.cols[self.me][1] - self.cols[self.me][0]
        sizes_out = [rows.shape[0] * (c1 - c0) for c0, c1 in self.cols]
        sizes_in = [(b - a) * width for a, b in self.rows]
        recv = rows.new_empty(sum(sizes_in))
        dist.all_to_all_single(recv, send, sizes_in, sizes_out, group=self.group)
        return recv.view(-1, width)


_EXCHANGES: dict = {}


def column_exchange(shape, mesh, placements, target) -> ColumnExchange | None:
    """The exchange for a DTensor of global ``shape`` placed ``placements`` on ``mesh`` (cached),
    or ``None`` when it is not a 2-D tensor whose columns are sharded over exactly one mesh
    dimension with every other dimension sharding rows or replicating."""
    if len(shape) != 2:
        return None
    column_dims = [pl for pl in placements if pl.is_shard() and pl.dim == 1]
    others_fit = all(pl.is_replicate() or (pl.is_shard() and pl.dim in (0, 1)) for pl in placements)
    if len(column_dims) != 1 or not others_fit:
        return None
    key = (tuple(shape), id(mesh), tuple(placements), tuple(target))
    found = _EXCHANGES.get(key)
    if found is None or found[0] is not mesh:
        found = _EXCHANGES[key] = (mesh, ColumnExchange(shape, mesh, placements, target))
    exchange = found[1]
    return exchange if exchange.valid else None
