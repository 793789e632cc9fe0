r"""N:M sparsity: the mask, its application, and the SR-STE / gradient-flow backward, fused.

For a weight ``W`` (``(rows, d_in)``, groups of ``M`` consecutive entries along the input
dimension, ``d_in % M == 0``), :mod:`optimlib.reparam.nm` uses::

    mask  = top-N of |W| in every group of M   (ties: the lower index wins)
    W~    = W * s,    s = 1 where kept, beta where pruned       (beta = 0: a binary mask; MDGF: beta(t) > 0)
    dW    = g * s  (grad_mode="exact", e.g. MDGF's decayed gradient of the pruned weights)   or   g  (STE)
            + lam * (1 - mask) * W                                                             (SR-STE term)

The SR-STE term is due once per optimizer step (see :mod:`optimlib.reparam.nm`): :func:`nm_grad`
takes an optional 0-d bool tensor ``pending``; given, the term is added only while it is True and
the op (``optimlib::nm_grad_once``, the mutating twin of ``optimlib::nm_grad``) then sets it False
(after the kernel has read it, in stream order: no host sync), so the first backward of a step
adds the term and later micro-batches' backwards do not.  A mutated tensor rather than a Python
flag, so that ``torch.compile`` traces the backward whole.

Ops: :func:`nm_mask_apply` returns ``(W~, mask)`` in one pass -- an element is kept when fewer
than ``N`` entries of its group beat it (larger ``|w|``, or equal ``|w|`` at a lower index), which
is a branch-free ``M x M`` comparison per group in registers -- and :func:`nm_grad` is the
elementwise backward (one pass over ``g``, ``W`` and the 1-byte mask).

``beta`` reaches the ops as a 0-d float32 tensor (the public functions also take a Python float):
MDGF changes it every optimizer step, and a tensor, unlike a float, is not baked into a
``torch.compile`` graph, so the graph is reused for the whole decay window instead of being
recompiled each step.

Tie rule.  ``torch.topk`` leaves the choice among equal magnitudes unspecified; this op fixes it
(lower index), in the twin (a stable descending sort) and in the kernel alike, so the two agree
bit-for-bit on the mask.  Without ties -- almost surely for trained float weights -- the mask is
``topk``'s; with ties (e.g. several exact zeros in a group) ``topk`` may pick another of the equals.

The N:M parametrization (:mod:`optimlib.reparam.nm`) calls these ops and has no maths of its own;
the twins (any floating dtype, float64 included, for ``gradcheck``) compute ``s`` in ``W``'s dtype
and multiply, as autograd of ``W * s`` does, and the kernels agree with them bit for bit.
"""

from typing import Optional

import torch

from optimlib.kernels._dispatch import (as_2d, cast_rn, cdiv, index_dtype, jit, launch, next_pow2, resolve_backend,
                                        round_through, tl, use_triton)

__all__ = ["nm_mask_apply", "nm_grad", "nm_mask_reference", "nm_mask_apply_reference", "nm_grad_reference"]


# ----------------------------------------------------------------------------- reference twins
def nm_mask_reference(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask: the ``n`` largest ``|w|`` of every ``m`` consecutive entries of each row,
    ties to the lower index (stable descending sort)."""
    groups = weight.detach().abs().reshape(-1, m)
    keep = groups.sort(dim=1, descending=True, stable=True).indices[:, :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True).reshape(weight.shape)


def _scale(mask: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` in ``dtype``: 1 where kept, ``beta`` (a 0-d float32 tensor) rounded to ``dtype`` where pruned."""
    return torch.where(mask, 1.0, beta).to(dtype)


def nm_mask_apply_reference(weight: torch.Tensor, n: int, m: int,
                            beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = nm_mask_reference(weight, n, m)
    return weight * _scale(mask, beta, weight.dtype), mask


def nm_grad_reference(grad: torch.Tensor, weight: torch.Tensor | None, mask: torch.Tensor, beta: torch.Tensor,
                      lam: float, exact: bool, pending: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient (``pending`` is only read: the op clears it)."""
    out = grad * _scale(mask, beta, grad.dtype) if exact else grad
    if lam:
        out = out + lam * weight.masked_fill(mask if pending is None else mask | ~pending, 0)
    return out


# ----------------------------------------------------------------------------- Triton
@jit
def _mask_kernel(w_ptr, out_ptr, mask_ptr, R, C, groups_per_row, num_groups, sw0, sw1, beta_ptr,
                 N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, IDX: tl.constexpr, BG: tl.constexpr):
    q = (tl.program_id(0) * BG + tl.arange(0, BG)).to(IDX)       # (row, group) pairs
    row = q // groups_per_row
    col0 = (q - row * groups_per_row) * M
    k = tl.arange(0, MP)
    valid = (q < num_groups)[:, None] & (k < M)[None, :]
    cols = col0[:, None] + k[None, :]
    x = tl.load(w_ptr + row[:, None] * sw0 + cols * sw1, mask=valid, other=0.0).to(tl.float32)
    a = tl.where(valid, tl.abs(x), -1.0)                             # padding lanes never win
    aj = a[:, None, :]                                                # competitor j
    ak = a[:, :, None]                                                # candidate k
    beats = (aj > ak) | ((aj == ak) & (k[None, None, :] < k[None, :, None]))
    rank = tl.sum(beats.to(tl.int32), axis=2)
    keep = rank < N
    dtype = w_ptr.dtype.element_ty
    s = tl.where(keep, 1.0, round_through(tl.zeros_like(x) + tl.load(beta_ptr), dtype))
    flat = row[:, None] * C + cols
    tl.store(out_ptr + flat, cast_rn(x * s, dtype), mask=valid)
    tl.store(mask_ptr + flat, keep.to(tl.int8), mask=valid)


@jit
def _grad_kernel(g_ptr, w_ptr, mask_ptr, pending_ptr, out_ptr, R, C, sg0, sg1, sw0, sw1, beta_ptr, lam,
                 EXACT: tl.constexpr, HAS_LAM: tl.constexpr, HAS_PENDING: tl.constexpr, IDX: tl.constexpr,
                 BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(IDX)[:, None]
    cols = (tl.program_id(1) * BC + tl.arange(0, BC)).to(IDX)[None, :]
    ok = (rows < R) & (cols < C)
    odt = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + rows * sg0 + cols * sg1, mask=ok, other=0.0).to(tl.float32)
    keep = tl.load(mask_ptr + rows * C + cols, mask=ok, other=0) != 0
    if EXACT:
        s = tl.where(keep, 1.0, round_through(tl.zeros_like(g) + tl.load(beta_ptr), odt))
        g = round_through(g * s, odt)
    if HAS_LAM:
        w = tl.load(w_ptr + rows * sw0 + cols * sw1, mask=ok, other=0.0).to(tl.float32)
        pruned = keep == 0   # (not ~keep: no ~ in Triton 3.3's interpreter)
        if HAS_PENDING:                                  # the term is due only while the flag is set
            pruned = pruned & (tl.load(pending_ptr) != 0)
        g = g + round_through(lam * tl.where(pruned, w, 0.0), odt)
    tl.store(out_ptr + rows * C + cols, cast_rn(g, odt), mask=ok)


def _mask_triton(weight, n, m, beta):
    w = as_2d(weight)
    R, C = w.shape
    out = torch.empty((R, C), dtype=weight.dtype, device=weight.device)
    mask = torch.empty((R, C), dtype=torch.bool, device=weight.device)
    if out.numel():
        mp = next_pow2(m)
        bg = max(1, min(256, 4096 // (mp * mp)))
        groups = R * (C // m)
        launch(_mask_kernel, (cdiv(groups, bg),), w, out, mask.view(torch.int8), R, C, C // m, groups, w.stride(0),
               w.stride(1), beta, N=n, M=m, MP=mp, IDX=index_dtype(w, out), BG=bg, num_warps=4)
    return out.view(weight.shape), mask.view(weight.shape)


def _grad_triton(grad, weight, mask, beta, lam, exact, pending):
    g = as_2d(grad)
    w = as_2d(weight) if weight is not None else g          # (not read when lam == 0)
    R, C = g.shape
    out = torch.empty((R, C), dtype=_grad_dtype(grad, weight), device=grad.device)
    if out.numel():
        bc = min(next_pow2(C), 256)
        br = max(1, min(next_pow2(R), 2048 // bc))
        m8 = mask.contiguous().view(torch.int8)
        launch(_grad_kernel, (cdiv(R, br), cdiv(C, bc)), g, w, m8, m8 if pending is None else pending.view(torch.int8),
               out, R, C, g.stride(0), g.stride(1), w.stride(0), w.stride(1), beta, lam, EXACT=exact,
               HAS_LAM=lam != 0.0, HAS_PENDING=pending is not None, IDX=index_dtype(g, w, out), BR=br, BC=bc,
               num_warps=8)
    return out.view(grad.shape)


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("optimlib::nm_mask_apply", mutates_args=())
def _mask_op(weight: torch.Tensor, n: int, m: int, beta: torch.Tensor,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(backend, (weight, beta)):
        return _mask_triton(weight, n, m, beta)
    out, mask = nm_mask_apply_reference(weight, n, m, beta)
    return out.contiguous(), mask.contiguous()


@_mask_op.register_fake
def _(weight, n, m, beta, backend):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), \
        torch.empty(weight.shape, dtype=torch.bool, device=weight.device)


def _grad_dtype(grad: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    return grad.dtype if weight is None else torch.promote_types(grad.dtype, weight.dtype)


def _grad(grad, weight, mask, pending, beta, lam, exact, backend) -> torch.Tensor:
    if use_triton(backend, (grad, weight, mask, pending, beta)):
        return _grad_triton(grad, weight, mask, beta, lam, exact, pending)
    out = nm_grad_reference(grad, weight, mask, beta, lam, exact, pending)
    return out.clone() if out is grad else out.contiguous()


def _grad_fake(grad, weight, mask, *args):
    return torch.empty(grad.shape, dtype=_grad_dtype(grad, weight), device=grad.device)


@torch.library.custom_op("optimlib::nm_grad", mutates_args=())
def _grad_op(grad: torch.Tensor, weight: Optional[torch.Tensor], mask: torch.Tensor, beta: torch.Tensor, lam: float,
             exact: bool, backend: str) -> torch.Tensor:
    return _grad(grad, weight, mask, None, beta, lam, exact, backend)


# The same gradient with the once-per-step flag: a second op rather than an optional mutated
# argument, which inductor cannot lower when it is None (torch 2.13).
@torch.library.custom_op("optimlib::nm_grad_once", mutates_args=("pending",))
def _grad_once_op(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, pending: torch.Tensor,
                  beta: torch.Tensor,
                  lam: float, exact: bool, backend: str) -> torch.Tensor:
    out = _grad(grad, weight, mask, pending, beta, lam, exact, backend)
    pending.fill_(False)                                 # after the read above, in stream order
    return out


_grad_op.register_fake(_grad_fake)
_grad_once_op.register_fake(_grad_fake)


# ----------------------------------------------------------------------------- public API
def _beta_tensor(beta, device: torch.device) -> torch.Tensor:
    """``beta`` as the 0-d float32 tensor on ``device`` the ops take (a float, or a 0-d floating
    tensor, cast).  A float becomes a device-side fill, not a host-to-device copy, which on CUDA
    would synchronize the stream at every call (the N:M layer's evaluation forward passes 0.0)."""
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise ValueError(f"beta must be a float or a 0-d floating tensor, got shape {tuple(beta.shape)} "
                             f"({beta.dtype})")
        return beta.to(device=device, dtype=torch.float32)
    return torch.full((), float(beta), dtype=torch.float32, device=device)


def nm_mask_apply(weight: torch.Tensor, n: int, m: int, beta: float | torch.Tensor = 0.0, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W * s, mask)`` for the ``n:m`` mask along the last dimension (``s = 1`` kept, ``beta``
    pruned; ``beta`` a float or a 0-d tensor).  Not differentiable by itself (the N:M
    parametrization's autograd function calls it and :func:`nm_grad`)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"need integers 0 < n <= m, got n={n!r}, m={m!r}")
    if weight.dim() == 0 or weight.shape[-1] % m:
        raise ValueError(f"the last dimension ({tuple(weight.shape)[-1:] or 'none'}) is not a multiple of m={m}")
    return _mask_op(weight, n, m, _beta_tensor(beta, weight.device), resolve_backend(backend))


def nm_grad(grad: torch.Tensor, weight: torch.Tensor | None, mask: torch.Tensor, *,
            beta: float | torch.Tensor = 0.0, lam: float = 0.0, exact: bool = False,
            pending: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """The weight's gradient: ``g * s`` (``exact``) or ``g`` (straight-through), plus
    ``lam * (1 - mask) * W`` (SR-STE) when ``lam != 0`` (``weight`` may be ``None`` otherwise).

    ``pending`` (optional, a 0-d bool tensor on the gradient's device): the SR-STE term is added
    only if it is True, and the op sets it to False (the once-per-step flag of the N:M layer)."""
    if weight is None and lam:
        raise ValueError("the SR-STE term (lam != 0) needs the weight")
    if grad.shape != mask.shape or (weight is not None and weight.shape != grad.shape) or mask.dtype != torch.bool:
        raise ValueError(f"grad {tuple(grad.shape)}, weight {None if weight is None else tuple(weight.shape)} and "
                         f"a bool mask {tuple(mask.shape)} ({mask.dtype}) must have one shape")
    if pending is not None and (pending.shape != () or pending.dtype != torch.bool):
        raise ValueError(f"pending must be a 0-d bool tensor, got shape {tuple(pending.shape)} ({pending.dtype})")
    beta_t = _beta_tensor(beta, grad.device)
    if pending is None:
        return _grad_op(grad, weight, mask, beta_t, float(lam), bool(exact), resolve_backend(backend))
    if weight is None:
        raise ValueError("pending (the once-per-step SR-STE flag) needs the weight")
    return _grad_once_op(grad, weight, mask, pending, beta_t, float(lam), bool(exact), resolve_backend(backend))
