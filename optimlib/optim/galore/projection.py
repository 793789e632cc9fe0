r"""Low-rank gradient projection (the GaLore subspace), written once against row-sharded matrices.

GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
ICML 2024, arXiv:2403.03507) runs an optimizer on the projection of each weight gradient
:math:`G \in \mathbb{R}^{m \times n}` onto an :math:`r`-dimensional subspace that is refreshed
every ``update_proj_gap`` steps:

* right projection (keeps ``m``): :math:`R = G P^\top \in \mathbb{R}^{m\times r}`, update
  :math:`U = N P` with :math:`P \in \mathbb{R}^{r\times n}` (orthonormal rows);
* left projection (keeps ``n``): :math:`R = P^\top G \in \mathbb{R}^{r\times n}`, update
  :math:`U = P N` with :math:`P \in \mathbb{R}^{m\times r}` (orthonormal columns).

``proj_type`` chooses the side from the **matrix shape** (never from the low-rank tensor's shape,
which is what breaks galore-torch's ``reverse_std`` when ``r`` reaches a dimension):
``std`` keeps the larger dimension (right if ``m >= n``), ``reverse_std`` the smaller one,
``left``/``right`` force a side.  The rank is ``min(rank, m, n)``.

This module is the projection piece only; an inner rule (AdamW in
:mod:`optimlib.optim.galore.rules`) runs on the projected gradient.  The projected
gradient is the matrix galore-torch has -- ``(m, r)`` for a right projection, ``(r, n)`` for a left
one -- cut along its *kept* dimension (``m`` resp. ``n``): on several ranks each rank holds its
share ``K`` of it, its rows (right: ``(K, r)``) or a ``torch.chunk`` block of the ``n`` columns
(left: ``(r, K)``).  ``Projector.rank_dim`` (1 right, 0 left) names the rank dimension.
Element-wise state in that layout is sharded like the parameter, and the same code runs on one
process, FSDP2 and DeepSpeed.

Bases (``projection``: svd, randomized, dct, random, gaussian, auto): :mod:`optimlib.optim.galore.bases`.

Adaptive rank (``rank="auto"`` or ``energy`` set): at each refresh the rank is the smallest
``r`` whose leading singular values (DCT: sorted coefficient energies) hold a fraction ``energy``
of :math:`\|G\|_F^2`, clipped to ``[min_rank, max_rank]``.

Guard: if the gradient is not finite, or the decomposition raises, the previous basis is kept
and a warning is issued (with no previous basis, a seeded random basis is used).  The decision is
taken on reduced/gathered data, so every rank takes the same branch.

State (all tensors or plain ints, in the caller's per-parameter ``state`` dict): ``rank``,
``refreshes``, ``seed``, and ``basis`` (svd/randomized: ``(r, n)`` right -- replicated -- or this
rank's ``(R, r)`` rows of the ``(m, r)`` left basis), ``indices`` (dct, int32) or ``basis_seed``
(random, gaussian).  ``torch.load(weights_only=True)`` reads it.

Collectives (several ranks): every rank of the block must call :meth:`Projector.refresh`,
:meth:`Projector.down` and :meth:`Projector.up` for the same parameters in the same order.
Ordinary steps: right projection -- none, or one all-gather of the ``r x n`` basis when it is
stored sharded (``shard_basis``); left projection -- one all-reduce of the ``r x n`` projected
gradient and one all-gather of the ``r x n`` update (small matrices).  No step
all-gathers a full gradient except ``svd`` (and left ``dct``) refreshes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from optimlib.distributed.layout import shard_like, to_local
from optimlib.distributed.row_block import RowBlock
from optimlib.optim.state_spec import REPLICATED, SHARDED, StateSpec
from optimlib.optim.galore.bases import (AUTO_SVD_LIMIT, PROJ_TYPES, PROJECTIONS, canonicalize_signs, choose_rank,
                                         dct, dct_basis, gaussian, mix_seed, random_orthogonal, resolve_side)

__all__ = ["ProjectionConfig", "Projector"]


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ProjectionConfig:
    """The projection options of one param group (see the module docstring)."""

    rank: int | str = 128
    update_proj_gap: int = 200
    proj_type: str = "std"
    projection: str = "auto"
    oversample: int = 8
    power_iters: int = 2
    energy: float | None = None
    min_rank: int = 1
    max_rank: int | None = None
    dct_norm: int = 1
    seed: int = 0
    canonical_signs: bool = True
    shard_basis: bool = True

    @property
    def adaptive(self) -> bool:
        return self.rank == "auto" or self.energy is not None

    @property
    def target_energy(self) -> float:
        return 0.9 if self.energy is None else float(self.energy)

    @classmethod
    def from_group(cls, group: dict) -> "ProjectionConfig":
        return cls(**{k: group[k] for k in cls.__dataclass_fields__ if k in group})

    def validate(self) -> "ProjectionConfig":
        def bad(name, value, accepted):
            raise ValueError(f"invalid {name}={value!r}: accepted range is {accepted}")

        rank = self.rank
        if not (rank == "auto" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)):
            bad("rank", rank, "an integer >= 1 or 'auto'")
        gap = self.update_proj_gap
        if not (isinstance(gap, int) and not isinstance(gap, bool) and gap >= 1):
            bad("update_proj_gap", gap, "an integer >= 1")
        if self.proj_type not in PROJ_TYPES:
            bad("proj_type", self.proj_type, f"one of {', '.join(PROJ_TYPES)}")
        if self.projection not in PROJECTIONS:
            bad("projection", self.projection, f"one of {', '.join(PROJECTIONS)}")
        if not (isinstance(self.oversample, int) and self.oversample >= 0):
            bad("oversample", self.oversample, "an integer >= 0")
        if not (isinstance(self.power_iters, int) and self.power_iters >= 0):
            bad("power_iters", self.power_iters, "an integer >= 0")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1):
            bad("energy", self.energy, "None or a number in (0, 1]")
        if not (isinstance(self.min_rank, int) and self.min_rank >= 1):
            bad("min_rank", self.min_rank, "an integer >= 1")
        if self.max_rank is not None and not (isinstance(self.max_rank, int) and self.max_rank >= self.min_rank):
            bad("max_rank", self.max_rank, f"None or an integer >= min_rank ({self.min_rank})")
        if self.dct_norm not in (1, 2):
            bad("dct_norm", self.dct_norm, "1 or 2")
        if not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer")
        if not isinstance(self.canonical_signs, bool):
            bad("canonical_signs", self.canonical_signs, "True or False")
        if not isinstance(self.shard_basis, bool):
            bad("shard_basis", self.shard_basis, "True or False")
        if self.adaptive and self.projection in ("random", "gaussian"):
            bad("projection", self.projection, "svd, randomized, dct or auto with an adaptive rank "
                "(rank='auto' or energy=...): a random basis has no spectrum to choose the rank from")
        return self


# ----------------------------------------------------------------------------- the projector
class Projector:
    """Projection of one parameter's gradient; stateless, operating on the parameter's ``state``.

    ``shape``: the global ``(m, n)`` matrix; ``block``: this rank's rows of it.  Build one per
    step (cheap).  See the module docstring for the layouts and collectives.
    """

    def __init__(self, config: ProjectionConfig, block: RowBlock, *, offset: int = 0, name: str = "",
                 mesh=None):
        self.config = config
        self.mesh = mesh
        self.block = block
        self.m, self.n = block.shape
        self.side = resolve_side(self.m, self.n, config.proj_type)
        kind = config.projection
        if kind == "auto":
            kind = "svd" if min(self.m, self.n) < AUTO_SVD_LIMIT else "randomized"
        self.kind = kind
        full = min(self.m, self.n)
        if config.rank == "auto":
            cap = config.max_rank if config.max_rank is not None else full
        else:
            cap = int(config.rank) if config.max_rank is None else min(int(config.rank), config.max_rank)
        self.max_rank = max(1, min(cap, full))
        self.min_rank = min(config.min_rank, self.max_rank)
        self.adaptive = config.adaptive
        self.offset = int(offset)
        self.name = name
        if self.side == "right":
            self.kept = (block.row_start, block.row_end)
            self.kept_bounds = tuple(block.owned_rows)
            self.kept_size = self.m
        else:
            self.kept_bounds = block.piece.split(self.n)
            self.kept = self.kept_bounds[block.piece.rank]
            self.kept_size = self.n
        self.basis_dim = self.n if self.side == "right" else self.m
        # A right basis (r, n) is needed whole by every rank; with shard_basis each rank stores a
        # torch.chunk block of its columns and the ranks all-gather it when they step.
        self.shard_right = config.shard_basis and block.distributed and self.side == "right"
        self.basis_cols = block.piece.split(self.n)
        self._gathered: tuple | None = None
        self._derived: dict = {}       # bases computed from indices/seeds, for this step only

    # ------------------------------------------------------------------ bookkeeping
    @property
    def local_kept(self) -> int:
        """``K``: this rank's share of the kept dimension."""
        return self.kept[1] - self.kept[0]

    @property
    def rank_dim(self) -> int:
        """The rank dimension of the low-rank layout: 1 (right, ``(K, r)``) or 0 (left, ``(r, K)``)."""
        return 1 if self.side == "right" else 0

    @property
    def kept_dim(self) -> int:
        return 1 - self.rank_dim

    def low_shape(self, rank: int) -> tuple[int, int]:
        """Shape of this rank's low-rank tensors for rank ``rank``."""
        return (self.local_kept, rank) if self.side == "right" else (rank, self.local_kept)

    def basis_specs(self, rank: int, dtype: torch.dtype | None = None) -> list[StateSpec]:
        """The declared basis of rank ``rank`` (:mod:`optimlib.optim.state_spec`; ``dtype``: the
        ``basis_dtype``, ``None`` for the gradient's): a left ``(m, r)`` matrix sharded by rows, a
        right ``(r, n)`` one sharded by columns (``shard_basis``) or whole; ``rank`` int32 DCT
        indices; nothing for a seeded basis."""
        if self.kind == "dct":
            return [StateSpec("indices", (rank,), torch.int32, REPLICATED, rank, "basis")]
        if self.kind not in ("svd", "randomized"):
            return []
        if self.side == "left":
            return [StateSpec("basis", (self.m, rank), dtype, SHARDED, self.block.num_rows * rank, "basis", dim=0)]
        if self.shard_right:
            a, b = self.basis_cols[self.block.piece.rank]
            return [StateSpec("basis", (rank, self.n), dtype, SHARDED, rank * (b - a), "basis", dim=1)]
        return [StateSpec("basis", (rank, self.n), dtype, REPLICATED, rank * self.n, "basis")]

    def transform(self, low: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
        """Express a low-rank tensor of the old basis in the new one (``overlap`` from :meth:`overlap`)."""
        return low @ overlap if self.side == "right" else overlap.t() @ low

    def rank(self, state: dict) -> int:
        return int(state["rank"])

    def has_basis(self, state: dict) -> bool:
        return "rank" in state

    def needs_refresh(self, state: dict) -> bool:
        """Refresh at the parameter's step 0 (pre-increment) and whenever ``(step + offset) % gap == 0``."""
        if not self.has_basis(state):
            return True
        return (int(state["step"]) + self.offset) % self.config.update_proj_gap == 0

    def snapshot(self, state: dict) -> dict | None:
        """The basis-defining entries of ``state`` (to compare an old basis with a new one)."""
        if not self.has_basis(state):
            return None
        return {k: state[k] for k in ("rank", "basis", "indices", "basis_seed") if k in state}

    # ------------------------------------------------------------------ bases
    def basis(self, state: dict, dtype=None, device=None) -> torch.Tensor:
        """Right: ``P`` ``(r, n)``; left: this rank's rows ``(R, r)`` of ``P`` ``(m, r)``."""
        r = int(state["rank"])
        if "basis" in state:
            p = state["basis"]
            p = to_local(p)
            if self.shard_right:
                p = self._gather_columns(p)
        elif "indices" in state:
            idx = state["indices"]
            p = self._derived.get(("dct", id(idx)))
            if p is None or p[0] is not idx:
                if self.side == "right":
                    c = dct_basis(self.n, idx, dtype=torch.float32)
                else:
                    c = dct_basis(self.m, idx, positions=(self.block.row_start, self.block.row_end),
                                  dtype=torch.float32).t()
                p = (idx, c)
                self._derived[("dct", id(idx))] = p
            p = p[1]
        elif "basis_seed" in state:
            key = ("random", int(state["basis_seed"]), r)
            p = self._derived.get(key)
            if p is None:
                seed = int(state["basis_seed"])
                q = (gaussian(self.basis_dim, r, seed) / math.sqrt(r) if self.kind == "gaussian"
                     else random_orthogonal(self.basis_dim, r, seed))           # (d, r)
                p = q.t() if self.side == "right" else q[self.block.row_start:self.block.row_end]
                self._derived[key] = p
        else:  # pragma: no cover - guarded by has_basis
            raise RuntimeError("no basis in state")
        if dtype is not None or device is not None:
            p = p.to(dtype=dtype or p.dtype, device=device or p.device)
        return p

    def down(self, state: dict, grad_rows: torch.Tensor) -> torch.Tensor:
        """Project this rank's ``(R, n)`` gradient rows: returns the ``(K, r)`` (right) or
        ``(r, K)`` (left) low-rank gradient."""
        p = self.basis(state, dtype=grad_rows.dtype, device=grad_rows.device)
        if self.side == "right":
            return torch.matmul(grad_rows, p.t())
        low = torch.matmul(p.t(), grad_rows)                  # (r, n): partial sum over this rank's rows
        self.block.all_reduce(low)
        a, b = self.kept
        return low if not self.block.distributed else low[:, a:b]

    def up(self, state: dict, low: torch.Tensor) -> torch.Tensor:
        """Back-project a low-rank tensor (layout of :meth:`down`) to this rank's ``(R, n)`` rows
        (without ``scale``): ``A @ B`` of :meth:`up_factors`."""
        return torch.matmul(*self.up_factors(state, low))

    def up_factors(self, state: dict, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``A @ B`` the back-projection of ``low`` to this rank's ``(R, n)`` rows:
        ``(low, P)`` for a right projection (``(R, r) @ (r, n)``), ``(P_rows, low_all)`` for a left
        one (this rank's rows of ``P`` and the all-gathered ``(r, n)`` low-rank tensor).  The
        operands of :func:`optimlib.kernels.galore_backproject_update_`."""
        p = self.basis(state, dtype=low.dtype, device=low.device)
        if self.side == "right":
            return low, p
        return p, self._gather_kept(low)

    def _gather_columns(self, chunk: torch.Tensor) -> torch.Tensor:
        """The full ``(r, n)`` right basis from every rank's column block (cached per step)."""
        if self._gathered is not None and self._gathered[0] is chunk:
            return self._gathered[1]
        most = max(b - a for a, b in self.basis_cols)
        buf = chunk.new_zeros(chunk.shape[0], most)
        buf[:, : chunk.shape[1]] = chunk
        parts = self.block.piece.all_gather(buf)
        full = torch.cat([t[:, : b - a] for t, (a, b) in zip(parts, self.basis_cols)], dim=1)
        self._gathered = (chunk, full)
        return full

    def _gather_kept(self, low: torch.Tensor) -> torch.Tensor:
        """The ``(r, n)`` left low-rank tensor from every rank's ``(r, K)`` column block."""
        if not self.block.distributed:
            return low
        most = max(b - a for a, b in self.kept_bounds)
        buf = low.new_zeros(low.shape[0], most)
        buf[:, : low.shape[1]] = low
        parts = self.block.piece.all_gather(buf)
        return torch.cat([t[:, : b - a] for t, (a, b) in zip(parts, self.kept_bounds)], dim=1)

    def overlap(self, old: dict, state: dict, dtype=torch.float32, device=None) -> torch.Tensor:
        """``O[i, j] = <old basis vector i, new basis vector j>``, ``(r_old, r_new)`` (same on every rank).

        With it a right low-rank tensor ``L`` (``(K, r_old)``) of the old basis becomes ``L @ O`` in
        the new one, a left one (``(r_old, K)``) ``O^T @ L`` (:meth:`transform`); exact when the new
        span contains the old one.
        """
        if self.shard_right and "basis" in old and "basis" in state:
            a = to_local(old["basis"]).to(dtype=dtype, device=device)
            b = to_local(state["basis"]).to(dtype=dtype, device=device)
            return self.block.all_reduce(a @ b.t())
        p_old = self.basis(old, dtype=dtype, device=device)
        p_new = self.basis(state, dtype=dtype, device=device)
        if self.side == "right":
            return p_old @ p_new.t()
        o = p_old.t() @ p_new
        return self.block.all_reduce(o)

    # ------------------------------------------------------------------ refresh
    def refresh(self, state: dict, grad_rows: torch.Tensor, *, basis_dtype=None) -> bool:
        """Compute a new basis from this rank's gradient rows into ``state``; ``False`` if the
        previous one was kept (non-finite gradient or failed decomposition)."""
        count = int(state.get("refreshes", 0))
        state["refreshes"] = count + 1
        seed = mix_seed(int(state.get("seed", 0)), count)
        dtype = basis_dtype or grad_rows.dtype
        reason = None
        new: dict | None = None
        try:
            new, reason = self.compute(state, grad_rows, dtype, seed)
        except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
            new, reason = None, f"the decomposition failed ({type(err).__name__}: {err})"
        if new is None:
            where = f" of {self.name}" if self.name else ""
            if self.has_basis(state):
                warnings.warn(f"GaLore: {reason} for the gradient{where} at step {state.get('step', 0)}; "
                              "keeping the previous projection basis", RuntimeWarning, stacklevel=3)
                return False
            warnings.warn(f"GaLore: {reason} for the gradient{where} at step {state.get('step', 0)} and no "
                          "previous basis; using a seeded random basis", RuntimeWarning, stacklevel=3)
            new = self._fallback(seed, dtype, grad_rows.device)
        for key in ("basis", "indices", "basis_seed"):
            state.pop(key, None)
        if "basis" in new and self.shard_right:
            a, b = self.basis_cols[self.block.piece.rank]
            new["basis"] = new["basis"][:, a:b].contiguous()
        if self.mesh is not None and "basis" in new and (self.side == "left" or self.shard_right):
            new["basis"] = self._as_dtensor(new["basis"])
        state.update(new)
        return True

    def compute(self, state: dict, grad_rows: torch.Tensor, dtype, seed: int) -> tuple[dict | None, str | None]:
        """The new basis entries (``rank`` and ``basis``/``indices``/``basis_seed``, a right basis
        whole, a left one as this rank's rows), or ``None`` and the reason to keep the old one."""
        if self.kind == "svd":
            return self._refresh_svd(grad_rows, dtype)
        if self.kind == "randomized":
            return self._refresh_randomized(grad_rows, dtype, seed)
        if self.kind == "dct":
            return self._refresh_dct(grad_rows)
        return {"rank": self.max_rank, "basis_seed": seed}, None

    def tsqr(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """QR of the row-sharded ``(M, k)`` matrix whose rows here are ``b`` (``(R, k)``): this
        rank's rows of ``Q`` and the ``(k, k)`` ``R``, the same on every rank (a local QR, then
        the QR of the stacked triangles: one all-gather of a ``k x k`` triangle per rank)."""
        block, k = self.block, b.shape[1]
        q_loc, r_loc = torch.linalg.qr(b)                          # (R, min(R,k)), (min(R,k), k)
        if r_loc.shape[0] < k:
            r_loc = torch.cat([r_loc, r_loc.new_zeros(k - r_loc.shape[0], k)])
            q_loc = torch.cat([q_loc, q_loc.new_zeros(q_loc.shape[0], k - q_loc.shape[1])], dim=1)
        if not block.distributed:
            return q_loc, r_loc
        parts = block.piece.all_gather(r_loc)
        q_s, r_s = torch.linalg.qr(torch.cat(parts))                # (W k, k), (k, k)
        return q_loc @ q_s[block.piece.rank * k:(block.piece.rank + 1) * k], r_s

    def _as_dtensor(self, local: torch.Tensor):
        """This rank's rows of the ``(m, r)`` left basis or columns of the ``(r, n)`` right basis as
        a DTensor on ``mesh`` (FSDP2), so that ``torch.distributed.checkpoint`` saves every rank's piece."""
        if self.side == "left":
            return shard_like(self.mesh, self.block.piece, local, 0, (self.m, local.shape[1]))
        return shard_like(self.mesh, self.block.piece, local, 1, (local.shape[0], self.n))

    def _fallback(self, seed: int, dtype, device) -> dict:
        r = self.max_rank
        if self.kind == "dct":
            return {"rank": r, "indices": torch.arange(r, dtype=torch.int32, device=device)}
        if self.kind in ("random", "gaussian"):
            return {"rank": r, "basis_seed": seed}
        q = random_orthogonal(self.basis_dim, r, seed)
        p = q.t() if self.side == "right" else q[self.block.row_start:self.block.row_end]
        return {"rank": r, "basis": p.to(dtype=dtype, device=device).contiguous()}

    def _pick_rank(self, values: torch.Tensor, total: float) -> int:
        if not self.adaptive:
            return self.max_rank
        return choose_rank(values, total, self.config.target_energy, self.min_rank, self.max_rank)

    def _refresh_svd(self, grad_rows: torch.Tensor, dtype) -> tuple[dict | None, str | None]:
        g = self.block.gather(grad_rows)
        if not bool(torch.isfinite(g).all()):
            return None, "non-finite values"
        matrix = g if g.dtype in (torch.float32, torch.float64) else g.float()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = self._pick_rank(s, float((s.double() ** 2).sum()))
        if self.side == "right":
            p = vh[:r]
            if self.config.canonical_signs:
                canonicalize_signs(p, dim=1)
        else:
            p = u[:, :r]
            if self.config.canonical_signs:
                canonicalize_signs(p, dim=0)          # full columns: the same flips on every rank
            p = p[self.block.row_start:self.block.row_end]
        # Column-major, the layout LAPACK returns (and galore-torch keeps): the projections then
        # take the same BLAS path as galore-torch's and agree with it to the bit.  A copy, never a
        # view: a slice of U or Vh would keep the whole decomposition alive.
        return {"rank": r, "basis": p.to(dtype).t().clone(memory_format=torch.contiguous_format).t()}, None

    def _refresh_randomized(self, grad_rows: torch.Tensor, dtype, seed: int) -> tuple[dict | None, str | None]:
        block = self.block
        m, n = self.m, self.n
        k = min(self.max_rank + self.config.oversample, m, n)
        g = grad_rows if grad_rows.dtype == torch.float64 else grad_rows.float()
        dev = g.device
        omega = gaussian(m, k, seed)[block.row_start:block.row_end].to(device=dev, dtype=g.dtype)
        y = g.t() @ omega                                          # (n, k), summed over ranks
        stats = torch.cat([y.reshape(-1), (g * g).sum().reshape(1)])
        block.all_reduce(stats)
        if not bool(torch.isfinite(stats).all()):
            return None, "non-finite values"
        total = float(stats[-1])
        y = stats[:-1].reshape(n, k)
        for _ in range(self.config.power_iters):
            q = torch.linalg.qr(y).Q
            y = block.all_reduce(g.t() @ (g @ q))
        q = torch.linalg.qr(y).Q                                   # (n, k): orthonormal, same on every rank
        left, r_s = self.tsqr(g @ q)                                # TSQR of G Q: (R, k) rows, (k, k)
        u_s, s, vh_s = torch.linalg.svd(r_s)
        r = self._pick_rank(s, total)
        if self.side == "right":
            p = canonicalize_signs(vh_s[:r] @ q.t(), dim=1)        # rows are the vectors
        else:
            p = canonicalize_signs(left @ u_s[:, :r], block, dim=0)
        return {"rank": r, "basis": p.to(dtype).contiguous()}, None

    def _refresh_dct(self, grad_rows: torch.Tensor) -> tuple[dict | None, str | None]:
        block = self.block
        g = grad_rows if grad_rows.dtype == torch.float64 else grad_rows.float()
        if self.side == "right":
            s = dct(g, dim=-1)                                     # (R, n) = G C^T
            score = s.abs().sum(0) if self.config.dct_norm == 1 else (s * s).sum(0)
            stats = torch.stack([score, (s * s).sum(0)])
            block.all_reduce(stats)
        else:
            full = block.gather(g)
            s = dct(full, dim=0)                                   # (m, n) = C G
            score = s.abs().sum(1) if self.config.dct_norm == 1 else (s * s).sum(1)
            stats = torch.stack([score, (s * s).sum(1)])
        if not bool(torch.isfinite(stats).all()):
            return None, "non-finite values"
        score, energy = stats[0], stats[1]
        r = self.max_rank
        if self.adaptive:
            r = self._pick_rank(energy.sort(descending=True).values.sqrt(), float(energy.double().sum()))
        idx = torch.topk(score, r, sorted=True).indices
        return {"rank": r, "indices": idx.to(torch.int32)}, None
