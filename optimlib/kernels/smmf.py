r"""SMMF's step on its rank-1 factors and 1-bit signs, in one pass over the matrix.

SMMF (:mod:`optimlib.optim.smmf`) stores each moment of an ``(R, n)`` matrix (this rank's owned
rows of the square-matricized gradient) as rank-1 factors, plus the first moment's sign as packed
bits (:mod:`optimlib.formats.bitpack`: element ``i`` of the row-major flattening is bit ``i % 8`` of
byte ``i // 8``).  One step, with this step's ``beta1_t``, ``beta2_t``::

    M_hat = S (.) (r_M c_M^T)         V_hat = r_V c_V^T                 decompress
    M = beta1 M_hat + (1 - beta1) G   V = beta2 V_hat + (1 - beta2) G^2   update
    M, V = 0 at flat positions >= pad_from                              (virtual padding)
    S <- [M > 0];  r_M <- |M| 1;  r_V <- V 1                              new sign, row sums
    s_M = |M|^T 1;  s_V = V^T 1                                          column sums (returned)
    D = M / (sqrt(V) + eps)           (no first moment: D = G / (sqrt(V) + eps))

The column factors need the column sums of *all* ranks (an all-reduce of ``2 n`` numbers) and
their total before they are normalised (``c = s / sum(s)``), so the op stops there: it returns
``(D, s)`` with ``s`` of shape ``(2, n)`` (``(1, n)`` without a first moment; rows ``[s_M, s_V]``)
and the caller all-reduces ``s`` and writes ``c_M, c_V``.  Everything else -- decompression,
update, padding, new signs, row sums, partial column sums, the direction -- is one pass: the
kernel reads ``G``, the factors and the sign bytes, and writes ``D``, the sign bytes and the row
factors, never materialising ``M`` or ``V``.  That is the minimum the dependencies allow
(``D`` needs this step's ``V``; ``c`` needs every row).

Kernel layout.  The sign bytes of row ``i`` start mid-byte unless ``n`` is a multiple of 8, so the
kernel works on *wide rows* of ``L = 8 / gcd(n, 8)`` consecutive matrix rows (``L n`` is a multiple
of 8, so every wide row owns whole bytes and programs never share one).  A program owns ``BR`` wide
rows and walks their ``L n`` columns in tiles, accumulating row sums per matrix row in registers
and writing one partial column-sum row per program (summed on the host side of the op: no
atomics, deterministic).

Reference twin: :func:`smmf_update_reference`, built from :func:`smmf_decompress` and
:func:`smmf_factor_sums_`, which :mod:`optimlib.optim.smmf` also uses for its refresh-time
(de)compression -- one implementation; the kernel agrees to rounding (sums in another order).
On the CPU, matrices of at least 128 Ki elements run the same step compiled, in cache-sized row
blocks (:mod:`optimlib.kernels._smmf_blocked`).
"""

from typing import Optional

import torch

from optimlib.kernels._smmf_blocked import apply_rows, smmf_update_blocked, use_blocked
from optimlib.kernels._dispatch import cdiv, index_dtype, jit, launch, next_pow2, resolve_backend, tl, use_triton
from optimlib.formats.bitpack import pack_bits, unpack_bits

__all__ = ["smmf_update_", "smmf_update_reference", "smmf_decompress", "smmf_factor_sums_"]


def smmf_decompress(num_rows: int, num_cols: int, *, exp_avg_sq_row: torch.Tensor, exp_avg_sq_col: torch.Tensor,
                    exp_avg_row: torch.Tensor | None = None, exp_avg_col: torch.Tensor | None = None,
                    exp_avg_sign: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The dense float32 ``(M_hat, V_hat)`` of ``num_rows`` owned rows from their factors:
    ``M_hat = S (.) (r_M c_M^T)``, ``V_hat = r_V c_V^T`` (``M_hat`` is ``None`` without a first moment)."""
    v = torch.outer(exp_avg_sq_row, exp_avg_sq_col)
    if exp_avg_sign is None:
        return None, v
    m = torch.outer(exp_avg_row, exp_avg_col)
    signs = unpack_bits(exp_avg_sign, num_rows * num_cols).view(num_rows, num_cols)
    m.mul_(torch.where(signs, 1.0, -1.0))
    return m, v


def smmf_factor_sums_(m: torch.Tensor | None, v: torch.Tensor, *, exp_avg_sq_row: torch.Tensor,
                      exp_avg_row: torch.Tensor | None = None, exp_avg_sign: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Write the sign bits of dense ``(R, n)`` rows of ``M`` and the row sums ``|M| 1``, ``V 1`` in
    place; return the partial column sums ``[|M|^T 1, V^T 1]`` (``(2, n)``; ``(1, n)`` without
    ``M``), which the caller all-reduces and normalises into the column factors."""
    parts = []
    if m is not None:
        pack_bits(m > 0, out=exp_avg_sign)
        abs_m = m.abs()
        exp_avg_row.copy_(abs_m.sum(dim=1))
        parts.append(abs_m.sum(dim=0))
        del abs_m
    exp_avg_sq_row.copy_(v.sum(dim=1))
    parts.append(v.sum(dim=0))
    return torch.stack(parts)


def smmf_update_reference(grad: torch.Tensor, exp_avg_sq_row: torch.Tensor, exp_avg_sq_col: torch.Tensor,
                          exp_avg_row: torch.Tensor | None, exp_avg_col: torch.Tensor | None,
                          exp_avg_sign: torch.Tensor | None, *, beta1: float, beta2: float, eps: float,
                          pad_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SMMF's step up to the column normalisation, in plain PyTorch (see the module docstring)."""
    R, n = grad.shape
    g = grad.float()
    momentum = exp_avg_row is not None
    m, v = smmf_decompress(R, n, exp_avg_sq_row=exp_avg_sq_row, exp_avg_sq_col=exp_avg_sq_col,
                           exp_avg_row=exp_avg_row, exp_avg_col=exp_avg_col, exp_avg_sign=exp_avg_sign)
    padded = pad_from < R * n
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if padded:
        v.view(-1)[pad_from:] = 0
    if momentum:
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        if padded:
            m.view(-1)[pad_from:] = 0
    col_sums = smmf_factor_sums_(m, v, exp_avg_sq_row=exp_avg_sq_row, exp_avg_row=exp_avg_row,
                                 exp_avg_sign=exp_avg_sign)
    denom = v.sqrt_().add_(eps)
    direction = m.div_(denom) if momentum else torch.div(g, denom, out=denom)
    return direction, col_sums



@jit
def _segment_sums(x, l, LP: tl.constexpr):
    """Row sums of a ``(BR, BC)`` tile split by the matrix row ``l`` (``(BC,)``) each column
    belongs to inside its wide row: ``(BR, LP)``."""
    if LP == 1:
        return tl.sum(x, axis=1)[:, None]
    else:
        onehot = (l[:, None] == tl.arange(0, LP)[None, :]).to(tl.float32)
        return tl.sum(x[:, :, None] * onehot[None, :, :], axis=1)


@jit
def _smmf_kernel(g_ptr, sg0, sg1, rv_ptr, cv_ptr, rm_ptr, cm_ptr, sign_ptr, d_ptr, colv_ptr, colm_ptr,
                 R, n, num_wide, total, pad_from, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                 MOMENTUM: tl.constexpr, L: tl.constexpr, LP: tl.constexpr, IDX: tl.constexpr, BR: tl.constexpr,
                 BC: tl.constexpr):
    pid = tl.program_id(0)
    s = (pid * BR + tl.arange(0, BR)).to(IDX)                     # wide rows of this program
    width = L * n
    acc_v = tl.zeros((BR, LP), tl.float32)
    acc_m = tl.zeros((BR, LP), tl.float32)
    for j0 in range(0, width, BC):
        j = (j0 + tl.arange(0, BC)).to(IDX)
        l = j // n
        c = j - l * n
        row = s[:, None] * L + l[None, :]
        flat = s[:, None] * width + j[None, :]
        valid = (j[None, :] < width) & (row < R)
        keep = valid & (flat < pad_from)
        g = tl.load(g_ptr + row * sg0 + c[None, :] * sg1, mask=valid, other=0.0).to(tl.float32)
        v_hat = tl.load(rv_ptr + row, mask=valid, other=0.0) * tl.load(cv_ptr + c, mask=j < width, other=0.0)[None, :]
        v = tl.where(keep, v_hat * beta2 + one_minus_beta2 * g * g, 0.0)
        denom = tl.sqrt_rn(v) + eps
        if MOMENTUM:
            byte = tl.load(sign_ptr + flat // 8, mask=valid, other=0).to(tl.int32)
            positive = ((byte >> (flat % 8).to(tl.int32)) & 1) != 0
            m_hat = tl.load(rm_ptr + row, mask=valid, other=0.0) * tl.load(cm_ptr + c, mask=j < width,
                                                                             other=0.0)[None, :]
            m_hat = tl.where(positive, m_hat, -m_hat)
            m = tl.where(keep, m_hat * beta1 + one_minus_beta1 * g, 0.0)
            bits = (m > 0).to(tl.int32)
            packed = tl.sum(tl.reshape(bits, (BR, BC // 8, 8)) << tl.arange(0, 8)[None, None, :], axis=2)
            q = tl.arange(0, BC // 8)
            byte_idx = (s[:, None] * width + j0) // 8 + q[None, :]
            byte_ok = (s[:, None] < num_wide) & ((j0 + 8 * q)[None, :] < width) & (byte_idx * 8 < total)
            tl.store(sign_ptr + byte_idx, packed.to(tl.uint8), mask=byte_ok)
            abs_m = tl.abs(m)
            acc_m += _segment_sums(abs_m, l, LP)
            tl.store(colm_ptr + pid * width + j, tl.sum(abs_m, axis=0), mask=j < width)
            d = tl.math.div_rn(m, denom)
        else:
            d = tl.math.div_rn(g, denom)
        acc_v += _segment_sums(v, l, LP)
        tl.store(colv_ptr + pid * width + j, tl.sum(v, axis=0), mask=j < width)
        tl.store(d_ptr + row * n + c[None, :], d, mask=valid)
    lp = tl.arange(0, LP)
    rows = s[:, None] * L + lp[None, :]
    ok = (lp[None, :] < L) & (rows < R)
    tl.store(rv_ptr + rows, acc_v, mask=ok)
    if MOMENTUM:
        tl.store(rm_ptr + rows, acc_m, mask=ok)


def _gcd8(n: int) -> int:
    return 8 // (n & -n if n & 7 else 8)


def _smmf_triton(grad, rv, cv, rm, cm, sign, beta1, beta2, eps, pad_from):
    R, n = grad.shape
    dev = grad.device
    momentum = rm is not None
    d = torch.empty((R, n), dtype=torch.float32, device=dev)
    if R * n == 0:
        rv.zero_()
        if momentum:
            rm.zero_()
        return d, torch.zeros((2 if momentum else 1, n), dtype=torch.float32, device=dev)
    L = _gcd8(n)
    width = L * n
    num_wide = cdiv(R, L)
    # Tiles of 16 x 128 (L = 1, 8 warps) / 4 x 64 (L > 1, 4 warps): no spills on sm_90; each
    # program owns its rows for the whole width, so at least ~1 program per 16 rows.
    bc = max(8, min(next_pow2(width), 128 if L == 1 else 64))
    br = max(1, min(16 if L == 1 else 4, next_pow2(cdiv(num_wide, 256))))
    programs = cdiv(num_wide, br)
    colv = torch.empty((programs, width), dtype=torch.float32, device=dev)
    colm = torch.empty((programs, width), dtype=torch.float32, device=dev) if momentum else colv
    launch(_smmf_kernel, (programs,), grad, grad.stride(0), grad.stride(1), rv, cv, rm if momentum else rv,
           cm if momentum else cv, sign if momentum else rv, d, colv, colm, R, n, num_wide, R * n, min(pad_from, R * n),
           beta1 if momentum else 0.0, 1.0 - beta1 if momentum else 0.0, beta2, 1.0 - beta2, eps,
           MOMENTUM=momentum, L=L, LP=next_pow2(L), IDX=index_dtype(grad, d), BR=br, BC=bc,
           num_warps=8 if L == 1 else 4)
    sums = [colm] if momentum else []
    sums.append(colv)
    return d, torch.stack([c.sum(0).view(L, n).sum(0) for c in sums])


@torch.library.custom_op("optimlib::smmf_update_", mutates_args=("exp_avg_sq_row", "exp_avg_row", "exp_avg_sign"))
def _smmf_op(grad: torch.Tensor, exp_avg_sq_row: torch.Tensor, exp_avg_sq_col: torch.Tensor,
             exp_avg_row: Optional[torch.Tensor], exp_avg_col: Optional[torch.Tensor],
             exp_avg_sign: Optional[torch.Tensor], beta1: float, beta2: float, eps: float, pad_from: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = (grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_row, exp_avg_col, exp_avg_sign)
    if use_triton(backend, tensors):
        return _smmf_triton(*tensors, beta1, beta2, eps, pad_from)
    if use_blocked(grad):
        return smmf_update_blocked(*tensors, beta1=beta1, beta2=beta2, eps=eps, pad_from=pad_from,
                                   reference=smmf_update_reference)
    return smmf_update_reference(*tensors, beta1=beta1, beta2=beta2, eps=eps, pad_from=pad_from)


@_smmf_op.register_fake
def _(grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_row, exp_avg_col, exp_avg_sign, beta1, beta2, eps, pad_from,
      backend):
    R, n = grad.shape
    k = 1 if exp_avg_row is None else 2
    return grad.new_empty((R, n), dtype=torch.float32), grad.new_empty((k, n), dtype=torch.float32)


def smmf_update_(grad: torch.Tensor, *, exp_avg_sq_row: torch.Tensor, exp_avg_sq_col: torch.Tensor,
                 beta2: float, eps: float, exp_avg_row: torch.Tensor | None = None,
                 exp_avg_col: torch.Tensor | None = None, exp_avg_sign: torch.Tensor | None = None,
                 beta1: float | None = None, pad_from: int | None = None,
                 backend: str | None = None, apply: tuple | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One SMMF step on ``(R, n)`` owned rows; returns ``(direction, column_sums)``.

    ``apply = (weight_rows, lr, weight_decay)`` (``weight_rows`` shaped like ``grad``): apply the
    direction as SMMF does, ``w <- w (1 - lr wd) - lr d``, and return ``None`` for it; on the CPU's
    row blocks the direction of a block is applied while it is in cache and never stored whole.

    Updates ``exp_avg_sq_row``, ``exp_avg_row`` (row sums, fp32 ``(R,)``) and ``exp_avg_sign``
    (packed bytes of the ``R n`` signs) in place; reads the column factors ``exp_avg_sq_col``,
    ``exp_avg_col`` (fp32 ``(n,)``).  ``beta1=None`` (and no first-moment tensors): no first
    moment.  ``pad_from``: flat index from which the matrix is virtual padding (``None``: none).
    ``column_sums``: ``(2, n)`` = ``[|M|^T 1, V^T 1]`` (``(1, n)`` without a first moment), to be
    all-reduced across the ranks sharing the matrix and normalised by the caller::

        d, s = smmf_update_(g_rows, beta1=b1, beta2=b2, eps=eps, **factors)
        block.all_reduce(s.view(-1))
        exp_avg_col.copy_(s[0] / total(s[0]));  exp_avg_sq_col.copy_(s[1] / total(s[1]))
    """
    if grad.dim() != 2:
        raise ValueError(f"grad must be the 2-D (R, n) owned rows, got shape {tuple(grad.shape)}")
    R, n = grad.shape
    momentum = beta1 is not None
    if momentum != (exp_avg_row is not None) or momentum != (exp_avg_col is not None) \
            or momentum != (exp_avg_sign is not None):
        raise ValueError("pass beta1 together with exp_avg_row, exp_avg_col and exp_avg_sign (or none of them)")
    for name, t, size in (("exp_avg_sq_row", exp_avg_sq_row, R), ("exp_avg_sq_col", exp_avg_sq_col, n),
                          ("exp_avg_row", exp_avg_row, R), ("exp_avg_col", exp_avg_col, n)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (size,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape ({size},), got {t.dtype} "
                             f"{tuple(t.shape)}")
    if exp_avg_sign is not None and (exp_avg_sign.dtype != torch.uint8 or exp_avg_sign.numel() < (R * n + 7) // 8
                                     or not exp_avg_sign.is_contiguous()):
        raise ValueError(f"exp_avg_sign must be a contiguous uint8 tensor of at least {(R * n + 7) // 8} bytes")
    pad = R * n if pad_from is None else max(0, min(int(pad_from), R * n))
    tensors = (grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_row, exp_avg_col, exp_avg_sign)
    backend = resolve_backend(backend)
    b1 = float(beta1) if momentum else 0.0
    if apply is not None:
        if tuple(apply[0].shape) != (R, n):
            raise ValueError(f"apply's weight rows must have the gradient's shape {(R, n)}, got {tuple(apply[0].shape)}")
        if not use_triton(backend, tensors) and use_blocked(grad):
            return smmf_update_blocked(*tensors, beta1=b1, beta2=float(beta2), eps=float(eps), pad_from=pad,
                                       reference=smmf_update_reference, apply=apply)
    d, col = _smmf_op(*tensors, b1, float(beta2), float(eps), pad, backend)
    if apply is None:
        return d, col
    apply_rows(apply, 0, R, d)
    return None, col
