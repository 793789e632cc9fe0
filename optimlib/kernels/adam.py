r"""Adam-family moment update and normalised direction, in one pass; plain and 8-bit moments.

For a gradient :math:`g` (in GaLore the projected, low-rank one) and moments :math:`m, v` of the
same shape, in place on :math:`m, v`::

    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g^2
    n  = (m~ / c1) / (sqrt(v) / c2 + eps)          m~ = m, or beta1 m + (1 - beta1) g (Nesterov)

returning ``n``.  ``c1``, ``c2`` are bias corrections supplied by the caller, so one op covers
the family:

==========================  ======================  ===============================================
rule                        ``c1``                  ``c2``
==========================  ======================  ===============================================
GaLore AdamW (galore-torch)  1                      1   (both corrections folded into the step size)
AdamP (``adamp`` 0.3.0)      1                      ``sqrt(1 - beta2^t)``  (``lr / (1 - beta1^t)``
                                                    is the caller's step size)
Adam written out             ``1 - beta1^t``        ``sqrt(1 - beta2^t)``
==========================  ======================  ===============================================

``sqrt(v) / c2`` (not ``sqrt(v / c2^2)``) is torch's and AdamP's rounding; dividing by 1 is exact,
so with ``c1 = c2 = 1`` the reference path is bit-identical to GaLore's
``exp_avg / (exp_avg_sq.sqrt() + eps)``.  The gradient is first cast to the moments' dtype (as
GaLore does).

8-bit variant (:func:`adam8bit_lowrank_update_`): the moments are stored in the blockwise format of
:mod:`optimlib.formats.quantize` -- ``(K, r)`` uint8 codes into a 256-entry logarithmic codebook plus
one fp32 absmax per block of ``block`` consecutive entries of a row; the first moment signed, the
second stored as its square root ``sqrt(v)`` (unsigned).  One pass dequantizes both, applies the
update above, writes ``n`` and requantizes (round to nearest, or stochastic rounding with the
format's counter-based hash of the element's global index ``(row_offset + i) * r + j``, so codes do
not depend on how rows are sharded).  The moments live in the gradient's dtype between dequantize
and requantize, as in :class:`optimlib.optim.galore.GaLoreAdamW` (``moments_dtype="int8"``).

Kernel: memory-bound, one read of each input and one write of each output (plain: 3 reads, 3
writes; 8-bit: 1 + 2 x (1 + 4/block) bytes read and written per element besides ``g`` and ``n``).
The fp32 arithmetic uses IEEE division and square root (``div_rn``, ``sqrt_rn``), and compiled
launches do not contract ``a * b + c`` into an FMA (:mod:`optimlib.kernels._dispatch`); the tests
compare the kernel and the twin to a few ulp (tolerances stated there): bitwise agreement on a
GPU has not been checked (no GPU run yet).
"""

import torch

from optimlib.kernels._compiled import fused_twin
from optimlib.kernels._dispatch import (as_2d, cast_rn, cdiv, index_dtype, jit, launch, next_pow2, resolve_backend,
                                        round_through, tl, use_triton)
from optimlib.formats.quantize import scalar_mix, codebook, dequantize_blockwise, hash_uniform, num_blocks, \
    quantize_blockwise

__all__ = ["adam_lowrank_update_", "adam8bit_lowrank_update_", "adam_update_reference",
           "adam8bit_update_reference"]


# ----------------------------------------------------------------------------- reference twins
def adam_update_reference(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, *, beta1: float,
                          beta2: float, eps: float, bias_correction1: float = 1.0, bias_correction2_sqrt: float = 1.0,
                          nesterov: bool = False) -> torch.Tensor:
    """The update in plain PyTorch, with GaLore's / AdamP's own expressions (in place on the moments)."""
    g = grad.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    numer = (beta1 * exp_avg + (1 - beta1) * g) if nesterov else exp_avg
    return (numer / bias_correction1) / denom


_adam_fused = fused_twin(adam_update_reference)


def _noise(shape, noise, device, which: int):
    if noise is None:
        return None
    seed, step_m, step_v, row_offset = noise
    return hash_uniform(tuple(shape), row_offset, seed=seed, step=(step_m, step_v)[which], device=device)


def adam8bit_update_reference(exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, grad, *,
                              beta1: float, beta2: float, eps: float, block: int, bias_correction1: float = 1.0,
                              bias_correction2_sqrt: float = 1.0, nesterov: bool = False,
                              noise: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Dequantize, update, requantize with :mod:`optimlib.formats.quantize` itself (GaLore's
    ``_Moments.read`` / ``write`` sequence); codes and block maxima are overwritten in place."""
    dtype = grad.dtype
    m = dequantize_blockwise(exp_avg_codes, exp_avg_absmax, signed=True, block=block, dtype=dtype)
    root = dequantize_blockwise(exp_avg_sq_codes, exp_avg_sq_absmax, signed=False, block=block, dtype=dtype)
    v = root * root
    n = adam_update_reference(m, v, grad, beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1,
                              bias_correction2_sqrt=bias_correction2_sqrt, nesterov=nesterov)
    cm, am = quantize_blockwise(m, signed=True, block=block, noise=_noise(m.shape, noise, m.device, 0))
    cv, av = quantize_blockwise(v.sqrt(), signed=False, block=block, noise=_noise(m.shape, noise, m.device, 1))
    exp_avg_codes.copy_(cm)
    exp_avg_absmax.copy_(am)
    exp_avg_sq_codes.copy_(cv)
    exp_avg_sq_absmax.copy_(av)
    return n


# ----------------------------------------------------------------------------- Triton
@jit
def _adam_math(m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c1, c2, NESTEROV: tl.constexpr,
               DTYPE: tl.constexpr):
    """fp32 update of (m, v) with g, rounding through ``DTYPE`` after each eager op of the twin;
    returns (m, v, n)."""
    m = round_through(round_through(m * beta1, DTYPE) + one_minus_beta1 * g, DTYPE)
    v = round_through(round_through(v * beta2, DTYPE) + one_minus_beta2 * g * g, DTYPE)
    root = round_through(tl.sqrt_rn(v), DTYPE)
    denom = round_through(round_through(tl.math.div_rn(root, c2), DTYPE) + eps, DTYPE)
    if NESTEROV:
        numer = round_through(round_through(beta1 * m, DTYPE) + round_through(one_minus_beta1 * g, DTYPE), DTYPE)
    else:
        numer = m
    n = tl.math.div_rn(round_through(tl.math.div_rn(numer, c1), DTYPE), denom)
    return m, v, n


@jit
def _adam_kernel(m_ptr, v_ptr, g_ptr, n_ptr, R, C, sm0, sm1, sv0, sv1, sg0, sg1,
                 beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c1, c2,
                 NESTEROV: tl.constexpr, IDX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(IDX)[:, None]
    cols = (tl.program_id(1) * BC + tl.arange(0, BC)).to(IDX)[None, :]
    mask = (rows < R) & (cols < C)
    dtype = m_ptr.dtype.element_ty
    g = round_through(tl.load(g_ptr + rows * sg0 + cols * sg1, mask=mask, other=0.0).to(tl.float32), dtype)
    m = tl.load(m_ptr + rows * sm0 + cols * sm1, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + rows * sv0 + cols * sv1, mask=mask, other=0.0).to(tl.float32)
    m, v, n = _adam_math(m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c1, c2, NESTEROV, dtype)
    tl.store(m_ptr + rows * sm0 + cols * sm1, m.to(dtype), mask=mask)
    tl.store(v_ptr + rows * sv0 + cols * sv1, v.to(dtype), mask=mask)
    tl.store(n_ptr + rows * C + cols, cast_rn(n, n_ptr.dtype.element_ty), mask=mask)


@jit
def _mix32(x):
    """The 32-bit finaliser of :mod:`optimlib.formats.quantize` (uint32 arithmetic wraps mod 2^32)."""
    x = (x ^ (x >> 16)) * 0x5BD1E995
    x = (x ^ (x >> 15)) * 0x6B43A9B5
    x = (x ^ (x >> 13)) * 0x2C1B3C6D
    return x ^ (x >> 16)


@jit
def _hash_uniform(rows, cols, r, key):
    """``quantize.hash_uniform`` of global element index ``rows * r + cols`` (int64 tensors)."""
    idx = rows * r + cols
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    h = _mix32(lo ^ key)
    h = _mix32(h ^ (hi * 0x5BD1E995))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@jit
def _quantize(x, mask, cb_ptr, noise, N: tl.constexpr, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Codes (int32) and per-row absmax of an fp32 ``(BR, BQ)`` tile holding one block per row,
    exactly as ``quantize.quantize_blockwise`` (``searchsorted`` by binary search in the codebook)."""
    absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
    safe = tl.where(absmax > 0, absmax, 1.0)
    if SIGNED:
        low = -1.0
    else:
        low = 0.0
    u = tl.minimum(tl.maximum(tl.math.div_rn(x, safe[:, None]), low), 1.0)
    lo = tl.zeros(u.shape, tl.int32)
    hi = tl.full(u.shape, N, tl.int32)
    for _ in tl.static_range(9):  # ceil(log2(N + 1)) <= 9 halvings for N <= 511
        active = lo < hi
        mid = (lo + hi) >> 1
        c = tl.load(cb_ptr + mid, mask=active & (mid < N), other=float("inf"))
        right = c < u
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (right == 0), mid, hi)   # (not ~right: no ~ in 3.3's interpreter)
    up_i = tl.minimum(tl.maximum(lo, 1), N - 1)
    lo_i = up_i - 1
    c_lo = tl.load(cb_ptr + lo_i)
    c_hi = tl.load(cb_ptr + up_i)
    frac = tl.math.div_rn(u - c_lo, c_hi - c_lo)
    if STOCHASTIC:
        up = noise < frac
    else:
        up = frac >= 0.5
    code = tl.where(up, up_i, lo_i)
    if not SIGNED:
        code = tl.where((code == 0) & (u > 0), 1, code)
    return code, absmax


@jit
def _adam8bit_kernel(cm_ptr, am_ptr, cv_ptr, av_ptr, g_ptr, n_ptr, cbs_ptr, cbu_ptr,
                     K, r, nb, block, sg0, sg1,
                     beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c1, c2,
                     row_offset, key_m, key_v,
                     NESTEROV: tl.constexpr, STOCHASTIC: tl.constexpr, NS: tl.constexpr, NU: tl.constexpr,
                     IDX: tl.constexpr, BR: tl.constexpr, BQ: tl.constexpr):
    """One program: ``BR`` rows x one quantization block (``block`` columns, ``BQ >= block``)."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(IDX)
    j = tl.program_id(1)
    cols = (j * block + tl.arange(0, BQ)).to(IDX)
    end = tl.minimum((j + 1) * block, r)
    rmask = rows < K
    mask = rmask[:, None] & (cols[None, :] < end)
    offs = rows[:, None] * r + cols[None, :]
    dtype = g_ptr.dtype.element_ty
    g = tl.load(g_ptr + rows[:, None] * sg0 + cols[None, :] * sg1, mask=mask, other=0.0).to(tl.float32)
    a_m = tl.load(am_ptr + rows * nb + j, mask=rmask, other=0.0)
    a_v = tl.load(av_ptr + rows * nb + j, mask=rmask, other=0.0)
    code_m = tl.load(cm_ptr + offs, mask=mask, other=0).to(tl.int32)
    code_v = tl.load(cv_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = round_through(tl.load(cbs_ptr + code_m, mask=mask, other=0.0) * a_m[:, None], dtype)
    root = round_through(tl.load(cbu_ptr + code_v, mask=mask, other=0.0) * a_v[:, None], dtype)
    v = round_through(root * root, dtype)
    m, v, n = _adam_math(m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c1, c2, NESTEROV, dtype)
    tl.store(n_ptr + offs, cast_rn(n, n_ptr.dtype.element_ty), mask=mask)
    if STOCHASTIC:
        grow = (rows.to(tl.int64) + row_offset)[:, None]              # global element index: 64-bit
        gcol = cols.to(tl.int64)[None, :]
        noise_m = _hash_uniform(grow, gcol, r, key_m.to(tl.uint32))
        noise_v = _hash_uniform(grow, gcol, r, key_v.to(tl.uint32))
    else:
        noise_m = tl.zeros(m.shape, tl.float32)
        noise_v = noise_m
    m = tl.where(mask, m, 0.0)
    root = tl.where(mask, round_through(tl.sqrt_rn(v), dtype), 0.0)
    new_cm, new_am = _quantize(m, mask, cbs_ptr, noise_m, NS, True, STOCHASTIC)
    new_cv, new_av = _quantize(root, mask, cbu_ptr, noise_v, NU, False, STOCHASTIC)
    tl.store(cm_ptr + offs, new_cm.to(tl.uint8), mask=mask)
    tl.store(cv_ptr + offs, new_cv.to(tl.uint8), mask=mask)
    tl.store(am_ptr + rows * nb + j, new_am, mask=rmask)
    tl.store(av_ptr + rows * nb + j, new_av, mask=rmask)


def _tile(R: int, C: int, elements: int = 2048) -> tuple[int, int]:
    bc = min(next_pow2(C), 256)
    br = max(1, min(next_pow2(R), elements // bc))
    return br, bc


def _adam_triton(exp_avg, exp_avg_sq, grad, beta1, beta2, eps, c1, c2, nesterov) -> torch.Tensor:
    m, v, g = as_2d(exp_avg), as_2d(exp_avg_sq), as_2d(grad)
    R, C = m.shape
    out = torch.empty((R, C), dtype=exp_avg.dtype, device=exp_avg.device)
    if out.numel():
        br, bc = _tile(R, C)
        launch(_adam_kernel, (cdiv(R, br), cdiv(C, bc)), m, v, g, out, R, C, m.stride(0), m.stride(1),
               v.stride(0), v.stride(1), g.stride(0), g.stride(1), beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
               c1, c2, NESTEROV=nesterov, IDX=index_dtype(m, v, g), BR=br, BC=bc, num_warps=8)
    return out.view(exp_avg.shape)


def _adam8bit_triton(cm, am, cv, av, grad, beta1, beta2, eps, c1, c2, nesterov, block, noise) -> torch.Tensor:
    K, r = cm.shape
    out = torch.empty((K, r), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    nb = num_blocks(r, block)
    bq = next_pow2(min(block, r))
    br = max(1, min(next_pow2(K), 1024 // bq))   # the codebook searches need registers: 4 per thread
    if noise is None:
        key_m = key_v = row_offset = 0
    else:
        seed, step_m, step_v, row_offset = noise
        key_m, key_v = scalar_mix(seed, step_m), scalar_mix(seed, step_v)
    cbs, cbu = codebook(True, grad.device), codebook(False, grad.device)
    launch(_adam8bit_kernel, (cdiv(K, br), nb), cm, am, cv, av, grad, out, cbs, cbu, K, r, nb, block,
           grad.stride(0), grad.stride(1), beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, c1, c2, row_offset,
           key_m, key_v, NESTEROV=nesterov, STOCHASTIC=noise is not None, NS=cbs.numel(), NU=cbu.numel(),
           IDX=index_dtype(cm, grad), BR=br, BQ=bq, num_warps=8)
    return out


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("optimlib::adam_update_", mutates_args=("exp_avg", "exp_avg_sq"))
def _adam_op(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float,
             eps: float, bias_correction1: float, bias_correction2_sqrt: float, nesterov: bool,
             backend: str) -> torch.Tensor:
    if use_triton(backend, (exp_avg, exp_avg_sq, grad)):
        return _adam_triton(exp_avg, exp_avg_sq, grad, beta1, beta2, eps, bias_correction1, bias_correction2_sqrt,
                            nesterov)
    return _adam_fused(exp_avg, exp_avg_sq, grad, beta1=beta1, beta2=beta2, eps=eps,
                       bias_correction1=bias_correction1, bias_correction2_sqrt=bias_correction2_sqrt,
                       nesterov=nesterov).contiguous()


@_adam_op.register_fake
def _(exp_avg, exp_avg_sq, grad, beta1, beta2, eps, bias_correction1, bias_correction2_sqrt, nesterov, backend):
    return torch.empty(exp_avg.shape, dtype=exp_avg.dtype, device=exp_avg.device)


@torch.library.custom_op("optimlib::adam8bit_update_",
                         mutates_args=("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"))
def _adam8bit_op(exp_avg_codes: torch.Tensor, exp_avg_absmax: torch.Tensor, exp_avg_sq_codes: torch.Tensor,
                 exp_avg_sq_absmax: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float, eps: float,
                 bias_correction1: float, bias_correction2_sqrt: float, nesterov: bool, block: int,
                 stochastic: bool, seed: int, noise_step_m: int, noise_step_v: int, row_offset: int,
                 backend: str) -> torch.Tensor:
    noise = (seed, noise_step_m, noise_step_v, row_offset) if stochastic else None
    tensors = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, grad)
    if grad.numel() == 0:  # (quantize_blockwise cannot reshape an empty tensor)
        return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if use_triton(backend, tensors):
        return _adam8bit_triton(*tensors, beta1, beta2, eps, bias_correction1, bias_correction2_sqrt, nesterov,
                                block, noise)
    return adam8bit_update_reference(*tensors, beta1=beta1, beta2=beta2, eps=eps, block=block,
                                     bias_correction1=bias_correction1, bias_correction2_sqrt=bias_correction2_sqrt,
                                     nesterov=nesterov, noise=noise).contiguous()


@_adam8bit_op.register_fake
def _(exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, grad, *args):
    return torch.empty(exp_avg_codes.shape, dtype=grad.dtype, device=grad.device)


# ----------------------------------------------------------------------------- public API
def adam_lowrank_update_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, *, beta1: float,
                         beta2: float, eps: float, bias_correction1: float = 1.0,
                         bias_correction2_sqrt: float = 1.0, nesterov: bool = False,
                         backend: str | None = None) -> torch.Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` in place with ``grad`` and return the direction
    ``(m~ / bias_correction1) / (sqrt(v) / bias_correction2_sqrt + eps)`` (module docstring).

    Any layout: the three tensors need the same shape (viewable as 2-D; strides may differ, e.g.
    the transposed ``(r, K)`` gradient of a left projection).  Returns a new contiguous tensor in
    the moments' dtype.  ``backend``: ``auto``/``triton``/``reference`` (default
    ``$OPTIMLIB_KERNELS`` or ``auto``).
    """
    if not (exp_avg.shape == exp_avg_sq.shape == grad.shape):
        raise ValueError(f"shapes differ: exp_avg {tuple(exp_avg.shape)}, exp_avg_sq {tuple(exp_avg_sq.shape)}, "
                         f"grad {tuple(grad.shape)}")
    if exp_avg.dtype != exp_avg_sq.dtype or not exp_avg.is_floating_point():
        raise TypeError(f"moments must share one floating dtype, got {exp_avg.dtype} and {exp_avg_sq.dtype}")
    return _adam_op(exp_avg, exp_avg_sq, grad, float(beta1), float(beta2), float(eps), float(bias_correction1),
                    float(bias_correction2_sqrt), bool(nesterov), resolve_backend(backend))


def adam8bit_lowrank_update_(exp_avg_codes: torch.Tensor, exp_avg_absmax: torch.Tensor,
                             exp_avg_sq_codes: torch.Tensor, exp_avg_sq_absmax: torch.Tensor, grad: torch.Tensor, *,
                             beta1: float, beta2: float, eps: float, block: int, bias_correction1: float = 1.0,
                             bias_correction2_sqrt: float = 1.0, nesterov: bool = False,
                             noise: tuple[int, int, int, int] | None = None,
                             backend: str | None = None) -> torch.Tensor:
    """The update on 8-bit blockwise moments (``optimlib.formats.quantize`` format), in one pass.

    ``*_codes``: ``(K, r)`` uint8 (contiguous); ``*_absmax``: ``(K, ceil(r / block))`` fp32; the
    second moment is stored as ``sqrt(v)``.  ``grad``: ``(K, r)``, any strides; its dtype is the
    moments' working dtype.  ``noise``: ``(seed, step_m, step_v, row_offset)`` for stochastic
    rounding (``quantize.hash_uniform`` with those steps and the global first row of this piece),
    ``None`` for round-to-nearest.  Codes and maxima are overwritten in place; returns the
    direction ``(K, r)`` in ``grad``'s dtype.
    """
    if exp_avg_codes.dim() != 2 or grad.shape != exp_avg_codes.shape or exp_avg_sq_codes.shape != grad.shape:
        raise ValueError(f"codes and grad must be (K, r) of one shape, got {tuple(exp_avg_codes.shape)}, "
                         f"{tuple(exp_avg_sq_codes.shape)}, {tuple(grad.shape)}")
    K, r = grad.shape
    nb = num_blocks(r, block)
    for name, t, dt, shape in (("exp_avg_codes", exp_avg_codes, torch.uint8, (K, r)),
                               ("exp_avg_sq_codes", exp_avg_sq_codes, torch.uint8, (K, r)),
                               ("exp_avg_absmax", exp_avg_absmax, torch.float32, (K, nb)),
                               ("exp_avg_sq_absmax", exp_avg_sq_absmax, torch.float32, (K, nb))):
        if t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dt} tensor of shape {shape}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    stochastic = noise is not None
    seed, step_m, step_v, row_offset = (int(x) for x in noise) if stochastic else (0, 0, 0, 0)
    return _adam8bit_op(exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, grad, float(beta1),
                        float(beta2), float(eps), float(bias_correction1), float(bias_correction2_sqrt),
                        bool(nesterov), int(block), stochastic, seed, step_m, step_v, row_offset,
                        resolve_backend(backend))

