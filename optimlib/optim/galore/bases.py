r"""The bases a GaLore projection is built from, and the small arithmetic around them.

Bases (``projection``):

``svd``
    exact, ``torch.linalg.svd`` of the gradient in fp32 (fp64 for fp64 gradients). On several
    ranks the full gradient is gathered on refresh steps only (the one allowed exception) and
    every rank runs the same SVD, so the bases agree. Signs: LAPACK's choice of the sign of a
    singular vector is not a continuous function of the matrix (a 1e-6 relative perturbation of
    a gradient flips some vectors), and with ``on_refresh="keep"`` a flipped vector flips the
    meaning of its kept moments, so a run would depend on the rounding of the data-parallel
    gradient average. With ``canonical_signs=True`` (default) every basis vector is flipped so
    that its largest-magnitude entry is positive, which makes one process and any sharding
    agree; ``canonical_signs=False`` keeps LAPACK's signs, i.e. galore-torch's basis to the bit
    (in one process).
``randomized``
    a randomized range finder (Halko, Martinsson & Tropp 2011) with ``power_iters`` power
    iterations and ``oversample`` extra columns, computed with collectives on row shards:
    :math:`Y = G^\top\Omega` and :math:`G^\top(GQ)` are sums over ranks of ``n x k`` matrices
    (``k = r + oversample``), the final small SVD uses a TSQR of :math:`GQ` (an all-gather of one
    ``k x k`` triangle per rank).  Signs are canonicalised (largest-magnitude entry of each basis
    vector positive) in every layout, so one process and ``W`` ranks agree.
``dct``
    SVD-free (Modoranu et al., arXiv:2505.17967): a fixed orthonormal DCT-II basis; at a refresh
    the ``r`` basis vectors with the largest ``l1`` (``dct_norm=1``) or ``l2`` alignment with the
    gradient are chosen.  Only the ``r`` int32 indices are stored; the basis rows are recomputed
    from the closed form.  Scores for a right projection are one all-reduce of an ``n``-vector;
    for a left projection the gradient is gathered on refresh steps (as for ``svd``).
``random``
    a seeded random orthonormal basis (QR of a Gaussian matrix drawn on the CPU from a
    ``torch.Generator``): only the seed is stored, and it is identical on every rank and device.
``gaussian``
    a seeded Gaussian matrix with ``N(0, 1/r)`` entries (APOLLO's random projection): not
    orthonormal, only its seed is stored, identical on every rank.
``auto``
    ``svd`` when ``min(m, n) < 2048`` else ``randomized``.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch

from optimlib.distributed.row_block import RowBlock

__all__ = ["PROJECTIONS", "PROJ_TYPES", "AUTO_SVD_LIMIT", "matrix_shape", "resolve_side", "dct_basis", "dct",
           "random_orthogonal", "choose_rank", "mix_seed", "name_seed", "canonicalize_signs", "gaussian"]

PROJECTIONS = ("auto", "svd", "randomized", "dct", "random", "gaussian")
PROJ_TYPES = ("std", "reverse_std", "left", "right")
AUTO_SVD_LIMIT = 2048



# ----------------------------------------------------------------------------- small helpers
def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(m, n)`` matrix a parameter of ``shape`` (at least 2-D) is projected as."""
    if len(shape) < 2:
        raise ValueError(f"a projected parameter needs at least 2 dimensions, got shape {tuple(shape)}")
    m = int(shape[0])
    return m, int(math.prod(shape[1:]))


def resolve_side(m: int, n: int, proj_type: str) -> str:
    """``"right"`` (keep ``m``: ``G P^T``) or ``"left"`` (keep ``n``: ``P^T G``), from the matrix shape."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"invalid proj_type={proj_type!r}: accepted values are {', '.join(PROJ_TYPES)}")


_M64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser; deterministic everywhere)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _M64)) & _M64
        h = (h * 0xBF58476D1CE4E5B9) & _M64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _M64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def name_seed(name: str, base: int = 0) -> int:
    """A per-parameter seed from its qualified name (stable across processes and layouts)."""
    return mix_seed(base, zlib.crc32(name.encode()))


def choose_rank(values: torch.Tensor, total: float, energy: float, min_rank: int, max_rank: int) -> int:
    """Smallest ``r`` with ``sum(values[:r] ** 2) >= energy * total``, clipped to ``[min_rank, max_rank]``.

    ``values`` are sorted descending (singular values, or square roots of DCT energies).
    """
    if total <= 0 or values.numel() == 0 or not math.isfinite(total):
        return max(1, min(min_rank, max_rank))
    cum = torch.cumsum(values.double() ** 2, 0) / total
    r = int((cum < energy * (1 - 1e-12)).sum().item()) + 1
    return max(min_rank, min(r, max_rank))


_COS_TABLES: dict[int, torch.Tensor] = {}


def _cos_table(d: int) -> torch.Tensor:
    """``cos(pi j / (2 d))`` for ``j in [0, 4 d)``, float64 (cached: 4 d numbers per size)."""
    t = _COS_TABLES.get(d)
    if t is None:
        t = torch.cos(torch.arange(4 * d, dtype=torch.float64) * (math.pi / (2 * d)))
        _COS_TABLES[d] = t
    return t


def dct_basis(d: int, indices: torch.Tensor, *, positions: tuple[int, int] | None = None,
              dtype=torch.float32, device=None) -> torch.Tensor:
    """Rows ``indices`` of the orthonormal ``d x d`` DCT-II matrix, columns ``positions``.

    ``C[k, i] = s_k cos(pi (2 i + 1) k / (2 d))`` with ``s_0 = sqrt(1/d)``, ``s_k = sqrt(2/d)``;
    the rows are orthonormal basis vectors.  The angle is reduced exactly in integers
    (``(2 i + 1) k mod 4 d``) and read from a float64 table, so the result is the same on every
    rank and device and costs no trigonometry per step.
    """
    a, b = positions if positions is not None else (0, d)
    k = indices.to(device="cpu", dtype=torch.int64)[:, None]
    i = torch.arange(a, b, dtype=torch.int64)[None, :]
    c = _cos_table(d)[((2 * i + 1) * k) % (4 * d)] * math.sqrt(2.0 / d)
    c[k[:, 0] == 0] *= math.sqrt(0.5)
    return c.to(dtype=dtype, device=device)


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` by one FFT (Makhoul 1980): ``x @ C^T`` for ``dim=-1``."""
    x = x.movedim(dim, -1)
    d = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spec = torch.fft.fft(v.double() if x.dtype == torch.float64 else v.float(), dim=-1)
    k = torch.arange(d, device=x.device, dtype=spec.real.dtype)
    tw = torch.polar(torch.ones_like(k), -math.pi * k / (2 * d))
    out = (spec * tw).real * math.sqrt(2.0 / d)
    out[..., 0] *= math.sqrt(0.5)
    return out.to(x.dtype).movedim(-1, dim)


def random_orthogonal(d: int, r: int, seed: int) -> torch.Tensor:
    """A ``(d, r)`` matrix with orthonormal columns, a pure function of ``(d, r, seed)`` (fp32, CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & ((1 << 63) - 1))
    g = torch.randn(d, r, generator=gen, dtype=torch.float32)
    q, rr = torch.linalg.qr(g)
    return q * torch.where(torch.diagonal(rr) < 0, -1.0, 1.0)


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & ((1 << 63) - 1))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32)


def canonicalize_signs(vectors: torch.Tensor, block: RowBlock | None = None, *, dim: int = 0) -> torch.Tensor:
    """Flip basis vectors so that each one's largest-magnitude entry is positive (in place).

    ``dim``: the dimension along which a vector's entries run (``0``: vectors are columns).
    With ``block`` given and ``dim=0`` the entries are distributed over ranks by rows: the
    largest entry is found across ranks (the first rows win ties), so every layout flips the same
    vectors as one process does.
    """
    v = vectors if dim == 0 else vectors.t()
    r = v.shape[1]
    if v.shape[0]:
        idx = v.abs().argmax(dim=0)
        picked = v.gather(0, idx[None, :])[0]
    else:
        picked = v.new_zeros(r)
    if block is not None and block.distributed:
        stacked = torch.stack(block.piece.all_gather(picked))    # (W, r)
        best = stacked.abs().argmax(dim=0)                       # the first rows win ties
        picked = stacked.gather(0, best[None, :])[0]
    sign = torch.where(picked < 0, -1.0, 1.0).to(v.dtype)
    v.mul_(sign[None, :])
    return vectors


