"""SMMF's CPU twin for large matrices: the step compiled, in row blocks that fit the cache.

:func:`optimlib.kernels.smmf.smmf_update_reference` writes every intermediate (``M``, ``V``, the
unpacked signs, ``|M|``, ...) as a matrix of its own: about twenty passes over memory, which on a
16 Mi-element embedding matrix no longer fit in any cache.  :func:`smmf_update_blocked` computes
the same step on blocks of rows (a multiple of 8 rows, so every block starts on a sign byte)
of about :data:`BLOCK_NUMEL` elements:

* the block's sign bytes become ``+-1`` floats through a 256-entry table (one gather);
* the block's arithmetic -- decompression, moment update, row sums, partial column sums, the
  direction and the new signs -- is one compiled loop nest (:func:`_block_step`);
* the new signs are packed eight to a byte with one multiply of each 8-byte word by
  ``0x0102040810204080`` (byte ``k`` of the word lands on bit ``k`` of the top byte);

the column sums of the blocks add up.  Blocks that reach the matrix's virtual padding (and the
last, partial block) run the reference itself.

Numerics: row sums, signs and directions are computed from the same expressions as the reference;
the compiled loop folds the Python scalars in double precision and the column sums add block by
block, so results differ from the reference by float rounding (a sign can flip only where
``|M|`` is within rounding of zero).  Small matrices, other devices and
``OPTIMLIB_FUSED_TWINS=0`` run the reference (see :mod:`optimlib.kernels._compiled`).
"""

from __future__ import annotations

import torch

from optimlib.kernels._compiled import MIN_NUMEL, fused_twin, worth_compiling

__all__ = ["smmf_update_blocked", "use_blocked", "apply_rows", "BLOCK_NUMEL"]

BLOCK_NUMEL = 1 << 17
"""Elements per row block (about 128 Ki: its float rows, signs and direction stay in cache)."""

_PACK = 0x0102040810204080
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_SIGNS = torch.where(((torch.arange(256, dtype=torch.uint8)[:, None] >> _SHIFTS) & 1).bool(), 1.0, -1.0)
"""Row ``b``: the eight ``+-1`` signs of sign byte ``b``, least significant bit first."""


def use_blocked(grad: torch.Tensor) -> bool:
    """Whether :func:`smmf_update_blocked` should run for ``grad`` (large, on the CPU, enabled)."""
    return worth_compiling((grad,), MIN_NUMEL) and grad.shape[0] >= 8


def _block_step(grad: torch.Tensor, rv: torch.Tensor, cv: torch.Tensor, rm: torch.Tensor | None,
                cm: torch.Tensor | None, signs: torch.Tensor | None, d: torch.Tensor, positive: torch.Tensor | None,
                beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """The reference's arithmetic on one block: writes ``d``, ``positive`` (``int32`` 0/1) and the
    row factors; returns the block's column sums (``(2, n)``, or ``(1, n)`` without ``M``)."""
    g = grad.float()
    v = rv[:, None] * cv[None, :] * beta2 + g * g * (1 - beta2)
    rv.copy_(v.sum(1))
    if rm is None:
        d.copy_(g / (v.sqrt() + eps))
        return v.sum(0)[None]
    m = rm[:, None] * cm[None, :] * signs * beta1 + g * (1 - beta1)
    am = m.abs()
    rm.copy_(am.sum(1))
    d.copy_(m / (v.sqrt() + eps))
    positive.copy_((m > 0).to(torch.int32))
    return torch.stack([am.sum(0), v.sum(0)])


_block_step_fused = fused_twin(_block_step, min_numel=0)


def apply_rows(apply, r0: int, r1: int, d: torch.Tensor) -> None:
    """``w <- w (1 - lr wd) - lr d`` on rows ``[r0, r1)`` of ``apply = (weight_rows, lr, weight_decay)``
    (the eager lines of :func:`optimlib.optim.smmf.smmf_param_`, block by block)."""
    weight, lr, weight_decay = apply
    rows = weight[r0:r1]
    if weight_decay > 0:
        rows.mul_(1 - lr * weight_decay)
    rows.add_(d.to(rows.dtype), alpha=-lr)


def smmf_update_blocked(grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_row, exp_avg_col, exp_avg_sign, *,
                        beta1: float, beta2: float, eps: float, pad_from: int, reference, apply=None):
    """:func:`~optimlib.kernels.smmf.smmf_update_reference`'s contract, computed block by block
    (see the module docstring); ``reference`` is that function, which runs the padded tail.

    ``apply = (weight_rows, lr, weight_decay)``: instead of returning the direction, apply it to
    ``weight_rows`` (laid out like ``grad``) block by block, while it is in cache; the direction
    returned is then ``None``.
    """
    R, n = grad.shape
    momentum = exp_avg_row is not None
    rows = max(8, BLOCK_NUMEL // n // 8 * 8)
    whole = min(R, pad_from // n) // rows * rows          # blocks before any padding
    d = torch.empty((rows if apply else R, n), dtype=torch.float32, device=grad.device)
    col = torch.zeros((2 if momentum else 1, n), dtype=torch.float32, device=grad.device)
    signs = torch.empty((rows * n // 8, 8), dtype=torch.float32) if momentum and whole else None
    positive = torch.empty((rows, n), dtype=torch.int32) if momentum and whole else None
    step = _block_step_fused.unchecked
    with torch.no_grad():
        for r0 in range(0, whole, rows):
            r1 = r0 + rows
            b0, b1 = r0 * n // 8, r1 * n // 8
            if momentum:
                torch.index_select(_SIGNS, 0, exp_avg_sign[b0:b1].int(), out=signs)
            out = d if apply else d[r0:r1]
            col += step(grad[r0:r1], exp_avg_sq_row[r0:r1], exp_avg_sq_col,
                        exp_avg_row[r0:r1] if momentum else None, exp_avg_col,
                        signs.view(rows, n) if momentum else None, out, positive, beta1, beta2, eps)
            if momentum:
                words = positive.view(-1).to(torch.uint8).view(torch.int64)
                exp_avg_sign[b0:b1].copy_(((words * _PACK) >> 56).to(torch.uint8))
            if apply:
                apply_rows(apply, r0, r1, out)
    if whole < R:
        tail_d, tail_col = reference(grad[whole:], exp_avg_sq_row[whole:], exp_avg_sq_col,
                                     exp_avg_row[whole:] if momentum else None, exp_avg_col,
                                     exp_avg_sign[whole * n // 8:] if momentum else None,
                                     beta1=beta1, beta2=beta2, eps=eps, pad_from=pad_from - whole * n)
        if apply:
            apply_rows(apply, whole, R, tail_d)
        else:
            d[whole:] = tail_d
        col += tail_col
    return (None if apply else d), col
