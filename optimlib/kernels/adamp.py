r"""AdamP's step fused: Adam moments, the channel/layer cosines, the radial projection and the update.

AdamP (:mod:`optimlib.optim.adamp`) on a weight viewed as ``(R, n)`` channels (rows of the
``(out, -1)`` channel view), with gradient ``g`` and moments ``m, v``::

    m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
    u  = m~ / (sqrt(v) / sqrt(1 - beta2^t) + eps)                        (m~: Nesterov or m)
    cos_i = <g_i, w_i> / (max(|g_i|, eps) max(|w_i|, eps))               per row  (channel view)
    cos   = <g, w> / (max(|g|, eps) max(|w|, eps))                       whole tensor (layer view)
    channel view fires if max_i |cos_i| < delta / sqrt(n):   u_i <- u_i - w_i <w_i, u_i> / (|w_i| + eps)^2
    else layer view fires if |cos| < delta / sqrt(R n):       u   <- u   - w   <w, u>     / (|w|   + eps)^2
    w <- w (1 - lr wd r) - step_size u       r = wd_ratio if a view fired, else 1;  step_size = lr / (1 - beta1^t)

Everything the decision needs is four numbers per row, ``[<g,g>, <w,w>, <g,w>, <w,u>]``, and the
projection of row ``i`` is ``u_i - coef_i w_i`` with ``coef_i`` a function of those numbers.  So
the step is two passes (the decision is global, and nothing can be written before it is known):

1. :func:`adamp_stats_` -- update ``m, v`` in place, form ``u`` on the fly (never stored) and reduce
   the four per-row statistics: reads ``g, m, v, w``, writes ``m, v`` and ``4 R`` floats.
2. :func:`adamp_coefficients` -- a few tiny tensor ops on ``(R, 4)``: the decision and ``coef``,
   and the decay factor, on the device (no host synchronisation).  Under row sharding the caller
   combines the per-rank channel maximum and the four column sums here (one small collective).
3. :func:`adamp_apply_` -- recompute ``u`` from ``m, v`` (and ``g`` for Nesterov), project, decay and
   step ``w``: reads ``m, v, w`` (``g``), writes ``w``.

Traffic per element: 4 + 3 (+1) tensor reads and 3 writes, against the eager path's ~20 (perturb
materialised, projected copy, norms, two weight passes).

:class:`optimlib.AdamP` (and GaLore's dense ``inner="adamp"`` rule) step with these ops.
Relation to the ``adamp`` package's eager AdamP 0.3.0 (the test oracle): the moments, ``u``, the
decision (up to the rounding of the cosines at the threshold) and the un-projected update are
bit-identical on the reference path;
a fired projection is computed as ``u - w * (<w,u> / (|w| + eps)^2)`` instead of AdamP's
``u - unit <unit, u>`` with ``unit = w / (|w| + eps)``, the same number up to rounding (~1e-7
relative).  The kernel and the twin agree to rounding.
"""

import math
from typing import Callable

import torch

from optimlib.kernels._compiled import add_scaled_, fused_twin
from optimlib.kernels._dispatch import (as_2d, cast_rn, cdiv, index_dtype, jit, launch, next_pow2, resolve_backend,
                                        round_through, tl, use_triton)
from optimlib.kernels.adam import _adam_math, adam_update_reference

__all__ = ["adamp_update_", "adamp_stats_", "adamp_coefficients", "adamp_apply_", "adamp_stats_reference",
           "adamp_apply_reference", "projection_stats", "projected_apply_reference", "projection_stats_fused",
           "projected_apply_fused"]


# ----------------------------------------------------------------------------- reference twins
def _perturb(exp_avg, exp_avg_sq, grad, *, beta1, eps, bias_correction2_sqrt, nesterov):
    """AdamP's ``perturb`` from the *updated* moments (its own expressions)."""
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    if nesterov:
        return (beta1 * exp_avg + (1 - beta1) * grad.to(exp_avg.dtype)) / denom
    return exp_avg / denom


def adamp_stats_reference(exp_avg, exp_avg_sq, grad, weight, *, beta1, beta2, eps, bias_correction2_sqrt,
                          nesterov) -> torch.Tensor:
    u = adam_update_reference(exp_avg, exp_avg_sq, grad, beta1=beta1, beta2=beta2, eps=eps,
                              bias_correction2_sqrt=bias_correction2_sqrt, nesterov=nesterov)
    return projection_stats(grad, weight, u)


def projection_stats(grad, weight, update) -> torch.Tensor:
    """The ``(R, 4)`` per-row sums ``[g.g, w.w, g.w, w.u]`` (float32) the scale-invariance test and the
    projection need (:func:`adamp_coefficients`); AdamP's and SGDP's statistics pass."""
    g, w, u = grad.float(), weight.float(), update.float()
    return torch.stack([(g * g).sum(1), (w * w).sum(1), (g * w).sum(1), (w * u).sum(1)], dim=1)


def projected_apply_reference(weight, update, coef, decay, *, lr, write_update: bool) -> None:
    """SGDP's apply pass: ``d = u - coef w`` (per row), ``w <- w * decay - lr d``; with
    ``write_update`` ``d`` is also written into ``update`` (SGDP's projected momentum buffer)."""
    d = update - weight * coef[:, None].to(update.dtype)
    if write_update:
        update.copy_(d)
    weight.mul_(decay)
    add_scaled_(weight, d, -lr)


def adamp_apply_reference(weight, exp_avg, exp_avg_sq, grad, coef, decay, *, step_size, beta1, eps,
                          bias_correction2_sqrt, nesterov) -> None:
    u = _perturb(exp_avg, exp_avg_sq, grad, beta1=beta1, eps=eps, bias_correction2_sqrt=bias_correction2_sqrt,
                 nesterov=nesterov)
    u = u - weight * coef[:, None].to(u.dtype)
    weight.mul_(decay)
    add_scaled_(weight, u, -step_size)


_stats_fused = fused_twin(adamp_stats_reference)
_apply_fused = fused_twin(adamp_apply_reference, tensor_scalars=("step_size",))
projection_stats_fused = fused_twin(projection_stats)
projected_apply_fused = fused_twin(projected_apply_reference, tensor_scalars=("lr",))


# ----------------------------------------------------------------------------- Triton
@jit
def _stats_kernel(m_ptr, v_ptr, g_ptr, w_ptr, out_ptr, R, C, sm0, sm1, sv0, sv1, sg0, sg1, sw0, sw1,
                  beta1, one_minus_beta1, beta2, one_minus_beta2, eps, c2,
                  NESTEROV: tl.constexpr, IDX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(IDX)
    rmask = rows < R
    dtype = m_ptr.dtype.element_ty
    gg = tl.zeros((BR,), tl.float32)
    ww = tl.zeros((BR,), tl.float32)
    gw = tl.zeros((BR,), tl.float32)
    wu = tl.zeros((BR,), tl.float32)
    for c0 in range(0, C, BC):
        cols = (c0 + tl.arange(0, BC)).to(IDX)
        mask = rmask[:, None] & (cols[None, :] < C)
        r2, c2d = rows[:, None], cols[None, :]
        g_raw = tl.load(g_ptr + r2 * sg0 + c2d * sg1, mask=mask, other=0.0).to(tl.float32)
        g = round_through(g_raw, dtype)
        m = tl.load(m_ptr + r2 * sm0 + c2d * sm1, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + r2 * sv0 + c2d * sv1, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + r2 * sw0 + c2d * sw1, mask=mask, other=0.0).to(tl.float32)
        m, v, u = _adam_math(m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, 1.0, c2, NESTEROV, dtype)
        tl.store(m_ptr + r2 * sm0 + c2d * sm1, m.to(dtype), mask=mask)
        tl.store(v_ptr + r2 * sv0 + c2d * sv1, v.to(dtype), mask=mask)
        u = tl.where(mask, round_through(u, dtype), 0.0)
        gg += tl.sum(g_raw * g_raw, axis=1)
        ww += tl.sum(w * w, axis=1)
        gw += tl.sum(g_raw * w, axis=1)
        wu += tl.sum(w * u, axis=1)
    base = out_ptr + rows * 4
    tl.store(base, gg, mask=rmask)
    tl.store(base + 1, ww, mask=rmask)
    tl.store(base + 2, gw, mask=rmask)
    tl.store(base + 3, wu, mask=rmask)


@jit
def _apply_kernel(w_ptr, m_ptr, v_ptr, g_ptr, coef_ptr, decay_ptr, R, C, sw0, sw1, sm0, sm1, sv0, sv1, sg0, sg1,
                  neg_step, beta1, one_minus_beta1, eps, c2,
                  NESTEROV: tl.constexpr, IDX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(IDX)[:, None]
    cols = (tl.program_id(1) * BC + tl.arange(0, BC)).to(IDX)[None, :]
    mask = (rows < R) & (cols < C)
    dtype = m_ptr.dtype.element_ty
    wdt = w_ptr.dtype.element_ty
    m = tl.load(m_ptr + rows * sm0 + cols * sm1, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + rows * sv0 + cols * sv1, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows * sw0 + cols * sw1, mask=mask, other=0.0).to(tl.float32)
    denom = round_through(round_through(tl.math.div_rn(round_through(tl.sqrt_rn(v), dtype), c2), dtype) + eps,
                          dtype)
    if NESTEROV:
        g = round_through(tl.load(g_ptr + rows * sg0 + cols * sg1, mask=mask, other=0.0).to(tl.float32), dtype)
        numer = round_through(round_through(beta1 * m, dtype) + round_through(one_minus_beta1 * g, dtype), dtype)
    else:
        numer = m
    u = round_through(tl.math.div_rn(numer, denom), dtype)
    coef = round_through(tl.load(coef_ptr + rows, mask=rows < R, other=0.0), dtype)
    u = round_through(u - round_through(w * coef, dtype), dtype)
    decay = round_through(tl.load(decay_ptr), wdt)
    w = round_through(w * decay, wdt)
    tl.store(w_ptr + rows * sw0 + cols * sw1, cast_rn(w + neg_step * u, wdt), mask=mask)


def _stats_triton(m, v, g, w, beta1, beta2, eps, c2, nesterov) -> torch.Tensor:
    R, C = m.shape
    out = torch.zeros((R, 4), dtype=torch.float32, device=m.device)
    if R == 0 or C == 0:
        return out
    bc = min(next_pow2(C), 256)
    br = max(1, min(next_pow2(R), 1024 // bc))
    launch(_stats_kernel, (cdiv(R, br),), m, v, g, w, out, R, C, m.stride(0), m.stride(1), v.stride(0),
           v.stride(1), g.stride(0), g.stride(1), w.stride(0), w.stride(1), beta1, 1.0 - beta1, beta2,
           1.0 - beta2, eps, c2, NESTEROV=nesterov, IDX=index_dtype(m, v, g, w), BR=br, BC=bc, num_warps=4)
    return out


def _apply_triton(w, m, v, g, coef, decay, step_size, beta1, eps, c2, nesterov) -> None:
    R, C = w.shape
    if R == 0 or C == 0:
        return
    bc = min(next_pow2(C), 256)
    br = max(1, min(next_pow2(R), 2048 // bc))
    launch(_apply_kernel, (cdiv(R, br), cdiv(C, bc)), w, m, v, g, coef, decay, R, C, w.stride(0), w.stride(1),
           m.stride(0), m.stride(1), v.stride(0), v.stride(1), g.stride(0), g.stride(1), -step_size, beta1,
           1.0 - beta1, eps, c2, NESTEROV=nesterov, IDX=index_dtype(w, m, v, g), BR=br, BC=bc, num_warps=8)


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("optimlib::adamp_stats_", mutates_args=("exp_avg", "exp_avg_sq"))
def _stats_op(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
              beta1: float, beta2: float, eps: float, bias_correction2_sqrt: float, nesterov: bool,
              backend: str) -> torch.Tensor:
    if use_triton(backend, (exp_avg, exp_avg_sq, grad, weight)):
        return _stats_triton(exp_avg, exp_avg_sq, grad, weight, beta1, beta2, eps, bias_correction2_sqrt, nesterov)
    return _stats_fused(exp_avg, exp_avg_sq, grad, weight, beta1=beta1, beta2=beta2, eps=eps,
                        bias_correction2_sqrt=bias_correction2_sqrt, nesterov=nesterov)


@_stats_op.register_fake
def _(exp_avg, exp_avg_sq, grad, weight, beta1, beta2, eps, bias_correction2_sqrt, nesterov, backend):
    return exp_avg.new_empty((exp_avg.shape[0], 4), dtype=torch.float32)


@torch.library.custom_op("optimlib::adamp_apply_", mutates_args=("weight",))
def _apply_op(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
              coef: torch.Tensor, decay: torch.Tensor, step_size: float, beta1: float, eps: float,
              bias_correction2_sqrt: float, nesterov: bool, backend: str) -> None:
    if use_triton(backend, (weight, exp_avg, exp_avg_sq, grad, coef, decay)):
        _apply_triton(weight, exp_avg, exp_avg_sq, grad, coef, decay, step_size, beta1, eps, bias_correction2_sqrt,
                      nesterov)
        return
    _apply_fused(weight, exp_avg, exp_avg_sq, grad, coef, decay, step_size=step_size, beta1=beta1,
                 eps=eps, bias_correction2_sqrt=bias_correction2_sqrt, nesterov=nesterov)


@_apply_op.register_fake
def _(weight, exp_avg, exp_avg_sq, grad, coef, decay, step_size, beta1, eps, bias_correction2_sqrt, nesterov,
      backend):
    return None


# ----------------------------------------------------------------------------- public API
def _check_rows(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected 2-D tensors of one (R, n) shape, got {shapes}")


def adamp_stats_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, *,
                 beta1: float, beta2: float, eps: float, step: int, nesterov: bool = False,
                 backend: str | None = None) -> torch.Tensor:
    """Pass 1: update the moments in place; return the ``(R, 4)`` fp32 per-row statistics
    ``[<g,g>, <w,w>, <g,w>, <w,u>]`` of the channel view (``step``: 1-based, already incremented)."""
    _check_rows(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, grad=grad, weight=weight)
    c2 = math.sqrt(1 - beta2 ** step)
    return _stats_op(exp_avg, exp_avg_sq, grad, weight, float(beta1), float(beta2), float(eps), c2, bool(nesterov),
                     resolve_backend(backend))


def adamp_coefficients(stats: torch.Tensor, *, num_rows: int, num_cols: int, lr: float, weight_decay: float,
                       delta: float, wd_ratio: float, eps: float, project: bool = True,
                       combine: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: from the per-row statistics, the per-row projection coefficients ``coef`` (``(R,)``)
    and the 0-d decay factor ``1 - lr wd r`` (``1`` when ``weight_decay == 0``), on the device.

    ``num_rows``/``num_cols``: the *global* channel view ``(R, n)``.  ``combine(chan_max, sums)``:
    under row sharding, returns the global channel-cosine maximum and the global sums of the four
    statistics (e.g. one all-gather, as :func:`optimlib.optim.adamp.scale_invariant_projection`).
    ``project=False`` (AdamP's 0-/1-D parameters): ``coef = 0``, ``r = 1``.
    """
    gg, ww, gw, wu = stats.unbind(1)
    norm_w = ww.sqrt()
    cos = gw.abs() / (gg.sqrt().clamp_min(eps) * norm_w.clamp_min(eps))
    chan_max = cos.max() if cos.numel() else cos.new_zeros(())
    sums = stats.sum(0)
    if combine is not None:
        chan_max, sums = combine(chan_max, sums)
    if not project or num_rows * num_cols == 0:
        coef = torch.zeros_like(gg)
        fired = torch.zeros((), dtype=torch.bool, device=stats.device)
    else:
        channel = chan_max < delta / math.sqrt(num_cols)
        layer_cos = sums[2].abs() / (sums[0].sqrt().clamp_min(eps) * sums[1].sqrt().clamp_min(eps))
        layer = (~channel) & (layer_cos < delta / math.sqrt(num_rows * num_cols))
        row_coef = wu / (norm_w + eps).square()
        layer_coef = sums[3] / (sums[1].sqrt() + eps).square()
        coef = torch.where(channel, row_coef, torch.where(layer, layer_coef, torch.zeros_like(row_coef)))
        fired = channel | layer
    if weight_decay > 0:
        decay = 1 - lr * weight_decay * torch.where(fired, wd_ratio, 1.0).to(torch.float64)
    else:
        decay = torch.ones((), dtype=torch.float64, device=stats.device)
    return coef, decay.to(torch.float32)


def adamp_apply_(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                 coef: torch.Tensor, decay: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                 step: int, nesterov: bool = False, backend: str | None = None) -> None:
    """Pass 3: ``w <- w * decay - lr / (1 - beta1^t) * (u - coef w)``, in place on ``weight``."""
    _check_rows(weight=weight, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, grad=grad)
    step_size = lr / (1 - beta1 ** step)
    c2 = math.sqrt(1 - beta2 ** step)
    _apply_op(weight, exp_avg, exp_avg_sq, grad, coef.float().contiguous(), decay.float().reshape(()),
              float(step_size), float(beta1), float(eps), c2, bool(nesterov), resolve_backend(backend))


def adamp_update_(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, delta: float,
                  wd_ratio: float, nesterov: bool = False, project: bool | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """One whole AdamP step of one (unsharded) parameter, in place; returns the ``(R, 4)`` stats.

    Any shape: the channel view is ``(shape[0], -1)`` (``Tensor.view`` of each tensor, so the
    updates write through; N-D tensors must allow that view).  ``project`` defaults to
    ``weight.dim() > 1`` (AdamP leaves 0-/1-D parameters alone).
    """
    if project is None:
        project = weight.dim() > 1
    views = [t.view(t.shape[0], math.prod(t.shape[1:])) if t.dim() > 1 else as_2d(t)
             for t in (weight, grad, exp_avg, exp_avg_sq)]
    w, g, m, v = views
    stats = adamp_stats_(m, v, g, w, beta1=beta1, beta2=beta2, eps=eps, step=step, nesterov=nesterov,
                         backend=backend)
    coef, decay = adamp_coefficients(stats, num_rows=w.shape[0], num_cols=w.shape[1], lr=lr,
                                     weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, eps=eps,
                                     project=project)
    adamp_apply_(w, m, v, g, coef, decay, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step, nesterov=nesterov,
                 backend=backend)
    return stats
