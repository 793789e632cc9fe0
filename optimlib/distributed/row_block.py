"""The one sharding abstraction every shape-aware method in optimlib is written against.

A :class:`RowBlock` is *this rank's whole rows* of a global ``(m, n)`` matrix view of a
parameter, plus the process group that holds the other rows.  Methods that need the shape of a
parameter (GaLore projection, AdamP's channel/layer cosines, SMMF's row and column factors)
are written once against it and are then correct in every layout optimlib meets:

* one process: the local tensor is the whole parameter (world size 1, no collective runs);
* FSDP2 ``fully_shard``: a DTensor sharded ``Shard(0)``; its local rows are contiguous rows of
  the parameter (uneven shards included);
* DeepSpeed ZeRO-1/2/3: the optimizer is handed a flat fp32 slice ``[a, b)`` of the flattened
  parameter that may start and end mid-row (see :mod:`optimlib.distributed.layout`).

All three are described by one :class:`FlatSlice` -- the rank's contiguous piece ``[a, b)`` of
the flattened parameter, and every rank's piece -- so there is one code path.  A rank *owns* the
rows whose first element lies in its slice.  Reading owned rows needs the tails of rows that
continue on the next rank(s); writing back needs the heads of rows owned by the previous rank:
both are one ``all_gather`` of ``n`` elements per rank (never a full gradient), and neither runs
when every rank's slice is row-aligned (FSDP2 with the parameter's own row view).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class FlatSlice:
    """Where each rank's local piece lies in the flattened global parameter.

    ``bounds[k] = (a_k, b_k)``: the ``k``-th piece holds elements ``[a_k, b_k)``; pieces are
    contiguous, in order, and cover ``[0, numel)``.  ``rank`` is the index of this process's piece.
    The ``k``-th piece is held by the process of rank ``order[k]`` in ``group`` (``k`` itself when
    ``order`` is ``None``): FSDP2 over tensor parallelism lays rows out in another order than the
    ranks (see :class:`optimlib.distributed.layout.MeshRows`), which ``sharding`` describes.
    """

    numel: int
    bounds: tuple[tuple[int, int], ...]
    rank: int
    group: object | None = None
    order: tuple[int, ...] | None = None
    sharding: object | None = None

    @property
    def world_size(self) -> int:
        return len(self.bounds)

    @property
    def start(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank][1]

    @staticmethod
    def whole(numel: int) -> "FlatSlice":
        return FlatSlice(numel=numel, bounds=((0, numel),), rank=0, group=None)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every piece's ``tensor`` (same shape on every rank), in piece order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts if self.order is None else [parts[r] for r in self.order]

    def split(self, size: int) -> tuple[tuple[int, int], ...]:
        """Every piece's ``[start, stop)`` of a dimension of ``size`` divided over the ranks the way
        the parameter's rows are (``torch.chunk`` over the pieces, or the mesh's own division)."""
        if self.sharding is not None:
            return self.sharding.split(size)
        return chunk_bounds(size, self.world_size)


def chunk_bounds(size: int, world: int) -> tuple[tuple[int, int], ...]:
    """``torch.chunk``'s split of ``size`` into ``world`` pieces, as FSDP2 shards dim 0: the first
    pieces hold ``ceil(size / world)``, the last ones fewer (possibly none)."""
    chunk = -(-size // world) if world else size
    return tuple((min(k * chunk, size), min((k + 1) * chunk, size)) for k in range(world))


def _owned_rows(a: int, b: int, n: int, m: int) -> tuple[int, int]:
    """Rows whose first element lies in ``[a, b)``."""
    if b <= a:
        start = min(-(-a // n), m)
        return start, start
    return min(-(-a // n), m), min(-(-b // n), m)


class RowBlock:
    """This rank's owned rows ``[row_start, row_end)`` of a global ``(m, n)`` matrix view.

    ``rows(local)`` turns a tensor laid out like the rank's local piece (a gradient, the
    parameter, an element-wise state) into the owned ``(R, n)`` rows; ``to_local(rows)`` is its
    inverse; ``all_reduce`` sums a small tensor over the ranks; ``gather`` assembles the full
    matrix (only for refresh-time work such as an exact SVD).  With one rank every method is
    a reshape and no collective runs.
    """

    def __init__(self, shape: Sequence[int], piece: FlatSlice):
        m, n = int(shape[0]), int(shape[1])
        if m * n != piece.numel:
            raise ValueError(f"matrix view {m}x{n} does not match a parameter of {piece.numel} elements")
        self.shape = (m, n)
        self.piece = piece
        #: every rank's owned rows ``(start, stop)``, in rank order
        self.owned_rows = [_owned_rows(a, b, n, m) for a, b in piece.bounds]
        self.row_start, self.row_end = self.owned_rows[piece.rank]
        self.aligned = all(a % n == 0 and (b % n == 0 or b == piece.numel) for a, b in piece.bounds)

    # ------------------------------------------------------------------ basics
    @property
    def world_size(self) -> int:
        return self.piece.world_size

    @property
    def group(self):
        return self.piece.group

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or ``op``) ``tensor`` over the ranks in place; returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group)
        return tensor

    # ------------------------------------------------------------------ rows <-> local piece
    def rows(self, local: torch.Tensor) -> torch.Tensor:
        """The owned ``(R, n)`` rows of ``local`` (laid out like this rank's piece)."""
        return self.rows_many([local])[0]

    def rows_many(self, locals_: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``rows`` for several same-layout tensors with one collective."""
        m, n = self.shape
        a, b = self.piece.start, self.piece.stop
        flats = [t.reshape(-1)[: b - a] for t in locals_]
        if self.aligned:
            return [f.reshape(self.num_rows, n) for f in flats]
        # (Collectives run on every rank, including ranks that own no row.)
        # Every rank publishes its first n elements; the tail of this rank's last owned row is
        # the concatenation of the following ranks' heads.
        k = len(flats)
        heads = torch.zeros(k, n, dtype=flats[0].dtype, device=flats[0].device)
        for i, f in enumerate(flats):
            h = f[:n]
            heads[i, : h.numel()] = h
        gathered = self.piece.all_gather(heads)
        need = self.row_end * n - b if self.num_rows else 0
        begin = min(self.row_start * n - a, b - a)
        out = []
        for i, f in enumerate(flats):
            parts = [f[begin:]]
            have = 0
            for r in range(self.piece.rank + 1, self.world_size):
                if have >= need:
                    break
                ra, rb = self.piece.bounds[r]
                take = min(rb - ra, n, need - have)
                parts.append(gathered[r][i, :take])
                have += take
            out.append(torch.cat(parts).reshape(self.num_rows, n))
        return out

    def to_local(self, rows: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`rows`: the rank's piece ``[a, b)``, shaped like ``like`` if given.

        Elements of the piece that lie in a row owned by an earlier rank come from that rank.
        Padding beyond the parameter (DeepSpeed aligns partitions) is filled with zeros.
        """
        m, n = self.shape
        a, b = self.piece.start, self.piece.stop
        flat_rows = rows.reshape(-1)
        if self.aligned:
            piece = flat_rows
        else:
            # Every rank publishes its last owned row; the head of this piece is a suffix of the
            # last row owned by an earlier rank.
            last = torch.zeros(n, dtype=rows.dtype, device=rows.device)
            if self.num_rows:
                last.copy_(flat_rows[-n:])
            gathered = self.piece.all_gather(last)
            head_end = min(self.row_start * n, b)
            parts = []
            if head_end > a:
                row = self.row_start - 1
                owner = next(r for r, (s, e) in enumerate(self.owned_rows) if s <= row < e)
                offset = a - row * n
                parts.append(gathered[owner][offset : offset + head_end - a])
            parts.append(flat_rows[: max(0, b - self.row_start * n)])
            piece = torch.cat(parts) if len(parts) > 1 else parts[0]
        if like is None:
            return piece
        if like.numel() != piece.numel():
            padded = torch.zeros(like.numel(), dtype=piece.dtype, device=piece.device)
            padded[: piece.numel()] = piece
            piece = padded
        return piece.reshape(like.shape)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The full ``(m, n)`` matrix from every rank's owned rows (refresh-time only)."""
        if not self.distributed:
            return rows
        m, n = self.shape
        most = max(e - s for s, e in self.owned_rows)
        buf = torch.zeros(most, n, dtype=rows.dtype, device=rows.device)
        buf[: self.num_rows] = rows
        gathered = self.piece.all_gather(buf)
        return torch.cat([g[: e - s] for g, (s, e) in zip(gathered, self.owned_rows)])

    def __repr__(self) -> str:
        return (f"RowBlock(shape={self.shape}, rows=[{self.row_start}, {self.row_end}), "
                f"rank={self.piece.rank}/{self.world_size})")


def isqrt(n: int) -> int:
    """``math.isqrt(n)`` (``n >= 0``) in plain integer arithmetic, which ``torch.compile`` folds
    into a constant (``math.isqrt`` itself is a graph break): a float estimate, corrected."""
    b = int(n ** 0.5)
    while b * b > n:
        b -= 1
    while (b + 1) * (b + 1) <= n:
        b += 1
    return b


def near_square(numel: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b == numel``, ``a >= b`` and ``a - b`` minimal."""
    if numel <= 0:
        return (max(numel, 0), 1) if numel == 0 else (0, 0)
    b = isqrt(numel)
    while numel % b:
        b -= 1
    return numel // b, b
