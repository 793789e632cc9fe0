"""Where FSDP2 over tensor parallelism puts each LLaMA parameter on a (dp, tp) mesh, as arithmetic.

The layout is the launcher's (``parallel.tp``: :class:`optimlib.train.engine.FSDP2Engine`): a
device mesh ``(dp, tp) = (world / tp, tp)``, process rank ``r`` at coordinate ``(d, t) = (r // tp,
r % tp)``; in every block the projections of :data:`~optimlib.models.tensor_parallel.COLUMN_WISE`
are column-wise and those of :data:`~optimlib.models.tensor_parallel.ROW_WISE` row-wise tensor
parallel over ``tp``, then ``fully_shard`` shards every block and the root over ``dp``.  With
``chunk_k(x)`` the ``k``-th of ``torch.chunk``'s pieces:

================  ====================================  ====================================
parameter         weights and gradients of ``(d, t)``   what a shape-aware optimizer steps
================  ====================================  ====================================
column-wise       rows ``chunk_d(chunk_t(m))``          the same rows; row block ``t * dp + d``
row-wise          rows ``chunk_d(m)`` x columns         rows ``chunk_t(chunk_d(m))``; row
                  ``chunk_t(n)``                        block ``d * tp + t`` (the rank)
every other one   rows ``chunk_d(m)`` (copies on the    the same rows; row block ``d`` of
                  ``tp`` ranks of one replica)          ``dp``
================  ====================================  ====================================

The column-wise weights are DTensors placed ``(_StridedShard(0, split_factor=tp), Shard(0))`` on
the mesh, the row-wise ones ``(Shard(0), Shard(1))``; a shape-aware optimizer (optimlib's
``OptimizerBase``) redistributes a row-wise weight to ``(Shard(0), Shard(0))`` for its step and
keeps its state in that layout, while an optimizer that steps the parameter as it is
(``torch.optim.AdamW``) keeps element-wise state shaped like the local rows x columns block.

:class:`NestedRows` is the row division that :class:`optimlib.distributed.layout.MeshRows` reads
off the mesh: always for the ``(Shard(0), Shard(0))`` rows, and for the column-wise
``_StridedShard`` rows at every size ``tp`` divides, which is each dimension of a column-wise
weight (:func:`~optimlib.models.tensor_parallel.tensor_parallel_problem` asks ``tp`` to divide
the heads and the hidden width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from optimlib.distributed.row_block import FlatSlice, chunk_bounds
from optimlib.models.tensor_parallel import COLUMN_WISE, ROW_WISE

__all__ = ["COLUMN", "ROW", "DATA", "NestedRows", "MeshPlacement", "tp_style"]

COLUMN, ROW, DATA = "column", "row", "data"


def tp_style(name: str) -> str:
    """How the tensor-parallel plan places the LLaMA parameter ``name`` (``layers.3.attn.q_proj.weight``):
    :data:`COLUMN`, :data:`ROW` or :data:`DATA` (whole on the tp ranks, sharded over dp only)."""
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "layers":
        return DATA
    module, leaf = ".".join(parts[2:-1]), parts[-1]
    if module in COLUMN_WISE and leaf in ("weight", "bias"):
        return COLUMN
    if module in ROW_WISE and leaf == "weight":       # a row-wise bias is replicated over tp
        return ROW
    return DATA


@dataclass(frozen=True)
class NestedRows:
    """A first dimension cut by ``torch.chunk`` into ``outer`` blocks, each cut again into ``inner``
    blocks: row block ``o * inner + i`` (row order) is the ``i``-th piece of the ``o``-th block.
    ``split`` has the signature of :meth:`optimlib.distributed.layout.MeshRows.split`, so it can
    stand for a mesh as a :class:`~optimlib.distributed.row_block.FlatSlice`'s ``sharding``."""

    outer: int
    inner: int

    def split(self, size: int) -> tuple[tuple[int, int], ...]:
        return tuple((a + c, a + e) for a, b in chunk_bounds(size, self.outer)
                     for c, e in chunk_bounds(b - a, self.inner))


class MeshPlacement:
    """Every process's share of each parameter on the ``(world / tp, tp)`` mesh (module docstring).

    ``by_rows``: the optimizer steps row-wise weights redistributed by rows (a shape-aware
    optimizer); otherwise it steps the local block as it is.
    Lists are indexed by the process rank.
    """

    def __init__(self, world: int, tp: int, by_rows: bool = True):
        self.world, self.tp, self.dp, self.by_rows = world, tp, world // tp, by_rows
        #: ``(d, t)`` of every process, in rank order
        self.coordinates = [(r // tp, r % tp) for r in range(world)]

    def weight_numel(self, shape: tuple[int, ...], style: str) -> list[int]:
        """Local elements of the weight (and of its gradient) on every process."""
        if style == ROW:
            rows, cols = chunk_bounds(shape[0], self.dp), chunk_bounds(shape[1], self.tp)
            return [(rows[d][1] - rows[d][0]) * (cols[t][1] - cols[t][0]) for d, t in self.coordinates]
        return [n for _, n in self._row_pieces(shape, style)]

    def pieces(self, shape: tuple[int, ...], style: str) -> list[tuple[FlatSlice, int]]:
        """``(piece, local numel)`` of the tensor the optimizer steps, on every process: the row
        layout, with the local block's numel for a row-wise weight stepped as it is."""
        pieces = self._row_pieces(shape, style)
        if style == ROW and not self.by_rows:
            return [(piece, n) for (piece, _), n in zip(pieces, self.weight_numel(shape, ROW))]
        return pieces

    def _row_pieces(self, shape: tuple[int, ...], style: str) -> list[tuple[FlatSlice, int]]:
        numel = math.prod(shape)
        rows = shape[0] if shape else 1
        per_row = numel // max(rows, 1)
        if style == DATA:
            sharding, row_bounds = None, chunk_bounds(rows, self.dp)
            position = [d for d, _ in self.coordinates]
        elif style == COLUMN:
            sharding = NestedRows(self.tp, self.dp)
            row_bounds, position = sharding.split(rows), [t * self.dp + d for d, t in self.coordinates]
        else:
            sharding = NestedRows(self.dp, self.tp)
            row_bounds, position = sharding.split(rows), [d * self.tp + t for d, t in self.coordinates]
        bounds = tuple((a * per_row, b * per_row) for a, b in row_bounds)
        return [(FlatSlice(numel, bounds, k, sharding=sharding), bounds[k][1] - bounds[k][0]) for k in position]
