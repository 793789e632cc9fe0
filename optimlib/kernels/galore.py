r"""GaLore's back-projection with the weight update fused into the matmul's epilogue.

GaLore keeps Adam's moments in a rank-``r`` subspace; each step maps the normalised low-rank
direction ``N`` back to the weight's shape and applies it.  With ``U = scale * (A @ B)``, where
``(A, B) = (P, N)`` for a left projection (``P``: ``m x r``, ``N``: ``r x n``) and ``(N, Q)`` for a
right one (``N``: ``m x r``, ``Q``: ``r x n``), this op applies, in place on the ``m x n`` weight
``W``, exactly the update of :func:`optimlib.optim.galore.galore_lowrank_`::

    decay after (AdamW rule, galore-torch):   W <- W - step_size * U;  W <- W - lr * wd * W
    decay first (AdamP / SMMF rules):          W <- W * (1 - lr * wd * wd_factor);  W <- W - step_size * U

(the decay is skipped when ``wd == 0``, as the optimizer does).  The reference twin is those
eager lines (``torch.matmul(A, B) * scale``, ``add_``/``mul_``), so on the reference path the op
is bit-for-bit the optimizer's update.

Kernel: a tiled matmul over the ``r`` (short) reduction with grouped tile order for L2 reuse; the
epilogue reads the ``W`` tile once, applies the scale, the step and the decay, and writes it once.
``U`` never exists in memory: the unfused path writes and re-reads an ``m x n`` update and runs
two more elementwise passes over ``W`` (fp32 4096 x 4096: ~256 MB of extra traffic per step and
weight).  fp32 operands use IEEE products unless ``torch.backends.cuda.matmul.allow_tf32`` is set
(then TF32, as torch would).  Rounding of the intermediate ``U`` to the operands' dtype and of the
decayed ``W`` to its dtype follows the eager sequence; the matmul's summation order differs from
cuBLAS / MKL, so kernel and twin agree to rounding, not bitwise.
"""

import torch

from optimlib.kernels._compiled import add_scaled_, fused_twin
from optimlib.kernels._dispatch import (cast_rn, cdiv, dot_precision, index_dtype, interpreted, jit, launch,
                                        next_pow2, resolve_backend, round_through, tile_indices, tile_matmul, tl,
                                        use_triton)

__all__ = ["galore_backproject_update_", "galore_backproject_reference"]


def galore_backproject_reference(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scale: float,
                                 step_size: float, lr: float, weight_decay: float, wd_factor: float = 1.0,
                                 decay_first: bool = False) -> None:
    """The optimizer's own eager lines (see the module docstring), in place on ``W``."""
    update = torch.matmul(A, B) * scale
    if decay_first:
        if weight_decay > 0.0:
            W.mul_(1 - lr * weight_decay * wd_factor)
        add_scaled_(W, update, -step_size)
        return
    add_scaled_(W, update, -step_size)
    if weight_decay > 0.0:
        add_scaled_(W, W, -lr * weight_decay)


_backproject_fused = fused_twin(galore_backproject_reference, tensor_scalars=("step_size", "lr"))


@jit
def _backproject_kernel(w_ptr, a_ptr, b_ptr, M, N, K, sw0, sw1, sa0, sa1, sb0, sb1,
                        scale, neg_step, decay,
                        DECAY_FIRST: tl.constexpr, HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr,
                        DOT_UPCAST: tl.constexpr, IDX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_indices(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(IDX)
    rn = (pid_n * BN + tl.arange(0, BN)).to(IDX)
    acc = tile_matmul(a_ptr, b_ptr, rm, rn, M, N, K, sa0, sa1, sb0, sb1, PRECISION, DOT_UPCAST, BM, BN, BK)
    udt = a_ptr.dtype.element_ty
    wdt = w_ptr.dtype.element_ty
    u = round_through(round_through(acc, udt) * scale, udt)        # torch.matmul(A, B) * scale
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    w_ptrs = w_ptr + rm[:, None] * sw0 + rn[None, :] * sw1
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    if DECAY_FIRST:
        if HAS_DECAY:
            w = round_through(w * decay, wdt)                     # W.mul_(1 - lr wd wd_factor)
        w = w + neg_step * u                                      # W.add_(U, alpha=-step_size)
    else:
        w = round_through(w + neg_step * u, wdt)                  # W.add_(U, alpha=-step_size)
        if HAS_DECAY:
            w = w + decay * w                                     # W.add_(W, alpha=-lr wd)
    tl.store(w_ptrs, cast_rn(w, wdt), mask=mask)


def _blocks(M: int, N: int, K: int) -> tuple[int, int, int, int]:
    # 64 x 128 tiles, 8 warps: no register spills on sm_90 in fp32 (IEEE) or bf16, where 128 x 128
    # spills (the epilogue holds the W tile, the update and their pointers next to the
    # accumulator).  tests/kernels/test_compile_sm90.py checks the cubin.
    bm = max(16, min(64, next_pow2(M)))
    bn = max(16, min(128, next_pow2(N)))
    bk = max(16, min(32, next_pow2(K)))
    warps = 8 if bm * bn >= 64 * 128 else 4
    return bm, bn, bk, warps


def _backproject_triton(W, A, B, scale, step_size, lr, weight_decay, wd_factor, decay_first) -> None:
    M, N = W.shape
    K = A.shape[1]
    if M == 0 or N == 0:
        return
    bm, bn, bk, warps = _blocks(M, N, K)
    has_decay = weight_decay > 0.0
    decay = (1 - lr * weight_decay * wd_factor) if decay_first else -lr * weight_decay
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    launch(_backproject_kernel, grid, W, A, B, M, N, K, W.stride(0), W.stride(1), A.stride(0), A.stride(1),
           B.stride(0), B.stride(1), scale, -step_size, decay if has_decay else 0.0, DECAY_FIRST=decay_first,
           HAS_DECAY=has_decay, PRECISION=dot_precision(A.dtype),
           DOT_UPCAST=interpreted(_backproject_kernel, (W, A, B)),
           IDX=index_dtype(W, A, B), BM=bm, BN=bn, BK=bk, GROUP_M=8,
           num_warps=warps, num_stages=3)


@torch.library.custom_op("optimlib::galore_backproject_update_", mutates_args=("W",))
def _backproject_op(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, step_size: float, lr: float,
                    weight_decay: float, wd_factor: float, decay_first: bool, backend: str) -> None:
    if use_triton(backend, (W, A, B)):
        _backproject_triton(W, A, B, scale, step_size, lr, weight_decay, wd_factor, decay_first)
        return
    _backproject_fused(W, A, B, scale=scale, step_size=step_size, lr=lr, weight_decay=weight_decay,
                       wd_factor=wd_factor, decay_first=decay_first)


@_backproject_op.register_fake
def _(W, A, B, scale, step_size, lr, weight_decay, wd_factor, decay_first, backend):
    return None


def galore_backproject_update_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, scale: float,
                               step_size: float, lr: float, weight_decay: float = 0.0, wd_factor: float = 1.0,
                               decay_first: bool = False, backend: str | None = None) -> None:
    """``W`` (``m x n``, any strides) <- the GaLore update with ``U = scale * (A @ B)``, in place.

    ``A``: ``m x r``, ``B``: ``r x n`` (left projection: ``A = P``, ``B = N``; right: ``A = N``,
    ``B = Q``), of one dtype (the gradient's, as GaLore back-projects ``direction.to(grad.dtype)``).
    ``step_size``: GaLore AdamW's ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` (or the inner rule's).
    ``decay_first=False``: decoupled decay after the update (AdamW rule); ``True``: before it,
    with factor ``wd_factor`` (AdamP's ``wd_ratio`` when its projection fired, SMMF: 1).
    """
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"W, A, B must be 2-D, got {W.dim()}, {A.dim()}, {B.dim()} dimensions")
    if A.shape[0] != W.shape[0] or B.shape[1] != W.shape[1] or A.shape[1] != B.shape[0]:
        raise ValueError(f"shapes do not chain: W {tuple(W.shape)} = A {tuple(A.shape)} @ B {tuple(B.shape)}")
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must share a dtype, got {A.dtype} and {B.dtype}")
    _backproject_op(W, A, B, float(scale), float(step_size), float(lr), float(weight_decay), float(wd_factor),
                    bool(decay_first), resolve_backend(backend))
