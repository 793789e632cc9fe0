r"""SLTrain's dense weight and its parameter gradients, without a dense weight or weight gradient kept.

SLTrain (:mod:`optimlib.reparam.sltrain`) composes a linear layer's ``(m, n)`` weight as

    W = B A_s + S,     B: (m, r),  A_s = (alpha / r) A: (r, n),  S = scatter(values, indices)

with ``indices`` the sorted, distinct flat row-major positions of the ``nnz`` sparse entries
(``int32``, or ``int64`` for layers of 2^31 entries or more).  For a batch ``x`` (``(T, n)``) and
output gradient ``dy`` (``(T, m)``), with ``dW = dy^T x``::

    dB = dW A_s^T = dy^T (x A_s^T)       dA_s = B^T dW = (dy B)^T x       dvalues = dW[indices]

Ops:

:func:`sltrain_compose` -- ``W`` in one kernel: a tiled ``B @ A_s`` whose epilogue finds the
    sparse entries of its tile (two binary searches per tile row in the sorted ``indices``) and
    adds them before the tile is final, so ``W`` is written once and ``S`` is never densified.
:func:`sltrain_grads` -- the three parameter gradients.  The kernel path never forms the
    ``m x n`` ``dW``: ``dB`` and ``dA_s`` go through the rank-``r`` factorizations on the right
    (two thin GEMMs each, ``2 T r (m + n)`` flops instead of ``T m n``), and ``dvalues`` is a
    *sampled* GEMM: a tiled ``dy^T x`` whose epilogue gathers only the tile's sparse positions
    from the accumulator and writes ``nnz`` numbers.  (The eager path transiently holds the
    dense ``dW``: 180 MB in fp32 for a 4096 x 11008 layer.)

Reference twins: ``B @ A_s`` then an ``index_add_`` of the values, and the dense ``dW = dy^T x``
with ``dB = dW A_s^T``, ``dA_s = B^T dW``, ``dvalues = dW[indices]`` (the scheme of SLTrain's C++
extension, in eager PyTorch; any floating dtype, float64 included, so ``gradcheck`` runs through
them).  The SLTrain layer calls these ops and has no maths of its own, so on CPU it *is* the twin;
its gradients equal plain autograd through the dense ``B A_s + S`` (tests).  Kernels agree with the
twins to rounding (summation order).  Precondition of the kernels: ``indices`` sorted ascending and
distinct, as ``sample_support`` makes them (the twin's ``index_add_`` would also accept duplicates).

Autocast: both ops run with autocast off, so the output dtypes are the ones the fake
implementations state (``W`` in ``B``'s dtype; ``dB``, ``dA_s`` in the factors' dtypes, ``dvalues``
in ``dy``'s), eager or compiled, CPU or GPU.  A caller that wants the product in autocast's dtype
casts the factors first (the SLTrain layer does, as autocast would have cast the matmul).
"""

import contextlib
from typing import Optional

import torch

from optimlib.kernels._dispatch import (cast_rn, cdiv, dot_precision, index_dtype, interpreted, jit, launch, next_pow2,
                                        resolve_backend, round_through, tile_indices, tile_matmul, tl, use_triton)

__all__ = ["sltrain_compose", "sltrain_grads", "sltrain_compose_reference", "sltrain_grads_reference"]


# ----------------------------------------------------------------------------- reference twins
def sltrain_compose_reference(B: torch.Tensor, A_scaled: torch.Tensor, values: torch.Tensor | None,
                              indices: torch.Tensor | None) -> torch.Tensor:
    """``B @ A_s``, then ``index_add_`` of the values (cast to ``W``'s dtype) at their flat positions."""
    W = B @ A_scaled
    if values is not None and values.numel():
        W.view(-1).index_add_(0, indices, values.to(W.dtype))
    return W


def sltrain_grads_reference(dy: torch.Tensor, x: torch.Tensor, B: torch.Tensor, A_scaled: torch.Tensor,
                            indices: torch.Tensor | None, need_b: bool, need_a: bool,
                            need_v: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``dB = dW A_s^T``, ``dA_s = B^T dW``, ``dvalues = dW[indices]`` through the transient dense
    ``dW = dy^T x`` (in ``dy``'s dtype; ``dB``, ``dA_s`` cast to the factors' dtypes)."""
    dW = dy.t() @ x.to(dy.dtype)
    dB = (dW @ A_scaled.to(dW.dtype).t()).to(B.dtype) if need_b else None
    dA = (B.to(dW.dtype).t() @ dW).to(A_scaled.dtype) if need_a else None
    dv = dW.view(-1).index_select(0, indices) if need_v else None
    return dB, dA, dv


# ----------------------------------------------------------------------------- Triton
@jit
def _lower_bound(idx_ptr, nnz, keys, steps):
    """First position ``p`` with ``indices[p] >= key``, for each key (vectorised binary search)."""
    lo = tl.zeros(keys.shape, tl.int64)
    hi = tl.zeros(keys.shape, tl.int64) + nnz
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) >> 1
        val = tl.load(idx_ptr + mid, mask=active, other=0).to(tl.int64)
        right = val < keys
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (right == 0), mid, hi)   # (not ~right: no ~ in 3.3's interpreter)
    return lo


@jit
def _compose_kernel(b_ptr, a_ptr, v_ptr, idx_ptr, w_ptr, M, N, K, nnz, steps, sb0, sb1, sa0, sa1,
                    HAS_SPARSE: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, IDX: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_indices(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(IDX)
    rn = (pid_n * BN + tl.arange(0, BN)).to(IDX)
    acc = tile_matmul(b_ptr, a_ptr, rm, rn, M, N, K, sb0, sb1, sa0, sa1, PRECISION, DOT_UPCAST, BM, BN, BK)
    wdt = w_ptr.dtype.element_ty
    acc = round_through(acc, wdt)                                # W = B @ A_s (in W's dtype)
    tl.store(w_ptr + rm[:, None] * N + rn[None, :], acc.to(wdt), mask=(rm[:, None] < M) & (rn[None, :] < N))
    if HAS_SPARSE:
        n0 = pid_n * BN
        row_ok = rm < M
        start = _lower_bound(idx_ptr, nnz, rm * N + n0, steps)
        end = _lower_bound(idx_ptr, nnz, rm * N + tl.minimum(n0 + BN, N), steps)
        count = tl.max(tl.where(row_ok, end - start, 0), axis=0)
        tl.debug_barrier()  # the tile's dense store above is complete before the sparse entries overwrite
        for q0 in range(0, count, CH):
            pos = start[:, None] + q0 + tl.arange(0, CH)[None, :]
            ok = row_ok[:, None] & (pos < end[:, None])
            flat = tl.load(idx_ptr + pos, mask=ok, other=0).to(IDX)
            local = tl.where(ok, flat - rm[:, None] * N - n0, 0).to(tl.int32)
            dense = tl.gather(acc, local, axis=1)
            val = round_through(tl.load(v_ptr + pos, mask=ok, other=0.0).to(tl.float32), wdt)
            tl.store(w_ptr + flat, cast_rn(dense + val, wdt), mask=ok)   # index_add_


@jit
def _sampled_kernel(dy_ptr, x_ptr, idx_ptr, out_ptr, T, M, N, nnz, steps, sdy0, sdy1, sx0, sx1,
                    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, IDX: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr,
                    BK: tl.constexpr, CH: tl.constexpr, GROUP_M: tl.constexpr):
    """``out[p] = (dy^T x)[indices[p]]``: the tiles of ``dy^T x`` reduced over ``T``, sampled."""
    pid_m, pid_n = tile_indices(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(IDX)
    rn = (pid_n * BN + tl.arange(0, BN)).to(IDX)
    n0 = pid_n * BN
    row_ok = rm < M
    start = _lower_bound(idx_ptr, nnz, rm * N + n0, steps)
    end = _lower_bound(idx_ptr, nnz, rm * N + tl.minimum(n0 + BN, N), steps)
    count = tl.max(tl.where(row_ok, end - start, 0), axis=0)
    if count > 0:
        # dY^T @ X on the tile: dY (T, M) read transposed through its strides
        acc = tile_matmul(dy_ptr, x_ptr, rm, rn, M, N, T, sdy1, sdy0, sx0, sx1, PRECISION, DOT_UPCAST, BM, BN, BK)
        odt = out_ptr.dtype.element_ty
        for q0 in range(0, count, CH):
            pos = start[:, None] + q0 + tl.arange(0, CH)[None, :]
            ok = row_ok[:, None] & (pos < end[:, None])
            flat = tl.load(idx_ptr + pos, mask=ok, other=0).to(IDX)
            local = tl.where(ok, flat - rm[:, None] * N - n0, 0).to(tl.int32)
            tl.store(out_ptr + pos, cast_rn(tl.gather(acc, local, axis=1), odt), mask=ok)


# Both kernels run 8 warps: with 4, the fp32 (IEEE) tiles spill on sm_90 under some Triton
# releases (compose: 255 registers and 8 bytes spilled at 3.6; the sampled GEMM 8 bytes at 3.4).
def _gemm_blocks(M: int, N: int, K: int) -> tuple[int, int, int]:
    bm = max(16, min(64, next_pow2(M)))
    bn = max(16, min(64, next_pow2(N)))
    bk = max(16, min(32, next_pow2(K)))          # BK=64 spills in fp32 (IEEE) on sm_90
    return bm, bn, bk


def _steps(nnz: int) -> int:
    return max(1, int(nnz).bit_length())


def _compose_triton(B, A_s, values, indices) -> torch.Tensor:
    M, K = B.shape
    N = A_s.shape[1]
    W = torch.empty((M, N), dtype=B.dtype, device=B.device)
    if W.numel() == 0:
        return W
    has_sparse = values is not None and values.numel() > 0
    nnz = values.numel() if has_sparse else 0
    bm, bn, bk = _gemm_blocks(M, N, K)
    launch(_compose_kernel, (cdiv(M, bm) * cdiv(N, bn),), B, A_s, values if has_sparse else B,
           indices if has_sparse else B, W, M, N, K, nnz, _steps(nnz), B.stride(0), B.stride(1), A_s.stride(0),
           A_s.stride(1), HAS_SPARSE=has_sparse, PRECISION=dot_precision(B.dtype),
           DOT_UPCAST=interpreted(_compose_kernel, (B, A_s)), IDX=index_dtype(W, B, A_s), BM=bm, BN=bn, BK=bk,
           CH=16, GROUP_M=8, num_warps=8, num_stages=3)
    return W


def _grads_triton(dy, x, B, A_s, indices, need_b, need_a, need_v):
    xd = x.to(dy.dtype)
    dB = (dy.t() @ (xd @ A_s.to(dy.dtype).t())).to(B.dtype) if need_b else None
    dA = ((dy @ B.to(dy.dtype)).t() @ xd).to(A_s.dtype) if need_a else None
    dv = None
    if need_v:
        T, M = dy.shape
        N = x.shape[1]
        nnz = indices.numel()
        dv = torch.empty(nnz, dtype=dy.dtype, device=dy.device)
        if nnz:
            bm, bn, bk = _gemm_blocks(M, N, T)
            launch(_sampled_kernel, (cdiv(M, bm) * cdiv(N, bn),), dy, xd, indices, dv, T, M, N, nnz, _steps(nnz),
                   dy.stride(0), dy.stride(1), xd.stride(0), xd.stride(1), PRECISION=dot_precision(dy.dtype),
                   DOT_UPCAST=interpreted(_sampled_kernel, (dy,)),
                   IDX=index_dtype(dy, xd) if M * N < 2 ** 31 - 1 else tl.int64,   # keys index the virtual dW
                   BM=bm, BN=bn, BK=bk, CH=16, GROUP_M=8, num_warps=8, num_stages=3)
    return dB, dA, dv


# ----------------------------------------------------------------------------- ops
def _autocast_off(t: torch.Tensor):
    """Autocast disabled for ``t``'s device type while an op runs (custom ops are not autocast
    ops: the dispatcher passes autocast's state through to their implementation, where it would
    turn the twin's matmuls into half-precision ones that the fake implementation knows nothing of)."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("optimlib::sltrain_compose", mutates_args=())
def _compose_op(B: torch.Tensor, A_scaled: torch.Tensor, values: Optional[torch.Tensor],
                indices: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if use_triton(backend, (B, A_scaled, values, indices)):
        return _compose_triton(B, A_scaled, values, indices)
    with _autocast_off(B):
        return sltrain_compose_reference(B, A_scaled, values, indices)


@_compose_op.register_fake
def _(B, A_scaled, values, indices, backend):
    return B.new_empty((B.shape[0], A_scaled.shape[1]))


def _empty(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("optimlib::sltrain_grads", mutates_args=())
def _grads_op(dy: torch.Tensor, x: torch.Tensor, B: torch.Tensor, A_scaled: torch.Tensor,
              indices: Optional[torch.Tensor], need_b: bool, need_a: bool, need_v: bool,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dy, x, B, A_scaled, indices, need_b, need_a, need_v and indices is not None)
    with _autocast_off(dy):
        if use_triton(backend, (dy, x, B, A_scaled, indices)):
            dB, dA, dv = _grads_triton(*args)       # (its thin GEMMs are eager matmuls)
        else:
            dB, dA, dv = sltrain_grads_reference(*args)
    return (_empty(dy, B.dtype) if dB is None else dB, _empty(dy, A_scaled.dtype) if dA is None else dA,
            _empty(dy, dy.dtype) if dv is None else dv)


@_grads_op.register_fake
def _(dy, x, B, A_scaled, indices, need_b, need_a, need_v, backend):
    nnz = indices.shape[0] if (need_v and indices is not None) else 0
    return (dy.new_empty(tuple(B.shape) if need_b else (0,), dtype=B.dtype),
            dy.new_empty(tuple(A_scaled.shape) if need_a else (0,), dtype=A_scaled.dtype),
            dy.new_empty((nnz,)))


# ----------------------------------------------------------------------------- public API
def sltrain_compose(B: torch.Tensor, A_scaled: torch.Tensor, values: torch.Tensor | None = None,
                    indices: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``W = B @ A_scaled + scatter(values, indices)`` as a new contiguous ``(m, n)`` tensor (not
    differentiable: call it inside an ``autograd.Function``, as the SLTrain layer does)."""
    if B.dim() != 2 or A_scaled.dim() != 2 or B.shape[1] != A_scaled.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} @ A_scaled {tuple(A_scaled.shape)} is not a matrix product")
    if B.dtype != A_scaled.dtype:
        raise TypeError(f"B and A_scaled must share a dtype, got {B.dtype} and {A_scaled.dtype}")
    if (values is None) != (indices is None) or (values is not None and values.shape != indices.shape):
        raise ValueError("values and indices go together, with one index per value")
    return _compose_op(B, A_scaled, values, indices, resolve_backend(backend))


def sltrain_grads(dy: torch.Tensor, x: torch.Tensor, B: torch.Tensor, A_scaled: torch.Tensor,
                  indices: torch.Tensor | None, *, need_b: bool = True, need_a: bool = True, need_v: bool = True,
                  backend: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dB, dA_scaled, dvalues)`` for ``dy`` (``(T, m)``) and ``x`` (``(T, n)``); ``None`` where
    not needed.  ``dvalues`` is in ``dy``'s dtype (cast it to the values' dtype); ``dA_scaled`` is
    the gradient of ``A_scaled`` (autograd then applies ``alpha / r`` for ``A``)."""
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} must be (T, m) and (T, n)")
    dB, dA, dv = _grads_op(dy, x, B, A_scaled, indices, bool(need_b), bool(need_a), bool(need_v),
                           resolve_backend(backend))
    return (dB if need_b else None, dA if need_a else None, dv if (need_v and indices is not None) else None)
