r"""The weight compander's forward and backward, one elementwise pass each.

:mod:`optimlib.reparam.compander` parametrizes a weight as

    W = a tanh(c theta),    c = k / a        (a: saturation, k: slope at zero; 1-element tensors)

and its backward, for an upstream gradient ``g = dL/dW`` (with ``t = tanh(c theta)``), is::

    d theta = g a (1 - t^2) c
    d a     = sum(g t) - sum(g a (1 - t^2) theta) k / a^2          (sum over all entries)
    d k     = sum(g a (1 - t^2) theta) / a

:func:`compander` is differentiable (``torch.library.register_autograd``): forward writes ``W``
(one read, one write), backward recomputes ``t`` from ``theta`` -- so nothing of the weight's size
is saved between them (eager autograd keeps ``t``, one weight-sized tensor per layer) -- and
writes ``d theta`` while reducing the two sums per program (partial sums added on the host side
of the op: deterministic).  The learnable ``log a``, ``log k`` of the module get their gradients
through ``a = exp(log a)`` outside the op.

The compander parametrization calls this op and has no maths of its own.  Reference twin: the
expression ``a * tanh(theta * (k / a))`` with ``a, k`` cast to the weight's dtype (any floating
dtype, float64 included, for ``gradcheck``) and the backward written out in autograd's order
(``aten.tanh_backward``, which forms ``1 - t^2`` with one rounding: an FMA, as the kernel does), so
``d theta`` is bit-identical to autograd's.  The kernel's tanh is our own (Triton's interpreter has no
libdevice): an odd rational approximation for ``|x| < 0.625`` (Cephes' ``tanhf`` coefficients,
~2 ulp) and ``1 - 2 / (exp(2|x|) + 1)`` beyond, the same code on GPU and CPU.
"""

import torch

from optimlib.kernels._dispatch import (as_2d, cast_rn, cdiv, index_dtype, jit, launch, next_pow2, resolve_backend,
                                        round_through, tl, use_triton)

__all__ = ["compander", "compander_forward_reference", "compander_backward_reference"]


# ----------------------------------------------------------------------------- reference twins
def compander_forward_reference(theta: torch.Tensor, scale: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    a = scale.to(theta.dtype)
    return a * torch.tanh(theta * (slope.to(theta.dtype) / a))


def compander_backward_reference(grad: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor, slope: torch.Tensor,
                                 need_params: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = theta.dtype
    a, k = scale.to(dtype), slope.to(dtype)
    c = k / a
    t = torch.tanh(theta * c)
    gu = torch.ops.aten.tanh_backward(grad * a, t)     # g a (1 - t^2), exactly as autograd rounds it
    dtheta = gu * c
    if not need_params:
        return dtheta, torch.zeros_like(scale), torch.zeros_like(slope)
    gc = (gu * theta).sum()
    da = (grad * t).sum() - gc * (c / a)
    dk = gc / a
    return dtheta, da.reshape(scale.shape).to(scale.dtype), dk.reshape(slope.shape).to(slope.dtype)


# ----------------------------------------------------------------------------- Triton
@jit
def _tanh(x):
    """fp32 tanh, a few ulp: odd rational part near 0, exp form beyond (no cancellation there)."""
    ax = tl.abs(x)
    s = x * x
    small = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s + 1.33314422036e-1) * s
             - 3.33332819422e-1) * s * x + x
    big = 1.0 - tl.math.div_rn(2.0, tl.exp(2.0 * tl.minimum(ax, 20.0)) + 1.0)
    return tl.where(ax < 0.625, small, tl.where(x < 0, -big, big))


@jit
def _scalars(a_ptr, k_ptr, DTYPE: tl.constexpr):
    a = round_through(tl.load(a_ptr).to(tl.float32), DTYPE)
    k = round_through(tl.load(k_ptr).to(tl.float32), DTYPE)
    return a, k, round_through(tl.math.div_rn(k, a), DTYPE)


@jit
def _forward_kernel(t_ptr, w_ptr, a_ptr, k_ptr, R, C, st0, st1, IDX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(IDX)[:, None]
    cols = (tl.program_id(1) * BC + tl.arange(0, BC)).to(IDX)[None, :]
    ok = (rows < R) & (cols < C)
    dtype = t_ptr.dtype.element_ty
    a, k, c = _scalars(a_ptr, k_ptr, dtype)
    theta = tl.load(t_ptr + rows * st0 + cols * st1, mask=ok, other=0.0).to(tl.float32)
    t = round_through(_tanh(round_through(theta * c, dtype)), dtype)
    tl.store(w_ptr + rows * C + cols, cast_rn(a * t, dtype), mask=ok)


@jit
def _backward_kernel(g_ptr, t_ptr, a_ptr, k_ptr, d_ptr, part_ptr, R, C, sg0, sg1, st0, st1,
                     NEED_PARAMS: tl.constexpr, IDX: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_r * BR + tl.arange(0, BR)).to(IDX)[:, None]
    cols = (pid_c * BC + tl.arange(0, BC)).to(IDX)[None, :]
    ok = (rows < R) & (cols < C)
    dtype = t_ptr.dtype.element_ty
    a, k, c = _scalars(a_ptr, k_ptr, dtype)
    theta = tl.load(t_ptr + rows * st0 + cols * st1, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows * sg0 + cols * sg1, mask=ok, other=0.0).to(tl.float32)
    t = round_through(_tanh(round_through(theta * c, dtype)), dtype)
    gu = round_through(round_through(g * a, dtype) * tl.fma(-t, t, 1.0), dtype)   # aten.tanh_backward
    tl.store(d_ptr + rows * C + cols, cast_rn(gu * c, dtype), mask=ok)
    if NEED_PARAMS:
        pid = pid_r * tl.num_programs(1) + pid_c
        gt = tl.sum(tl.sum(tl.where(ok, g * t, 0.0), axis=1), axis=0)
        gc = tl.sum(tl.sum(tl.where(ok, gu * theta, 0.0), axis=1), axis=0)
        tl.store(part_ptr + pid * 2, gt)
        tl.store(part_ptr + pid * 2 + 1, gc)


def _tiles(R: int, C: int) -> tuple[int, int]:
    bc = min(next_pow2(C), 256)
    return max(1, min(next_pow2(R), 2048 // bc)), bc


def _forward_triton(theta, scale, slope) -> torch.Tensor:
    x = as_2d(theta)
    R, C = x.shape
    out = torch.empty((R, C), dtype=theta.dtype, device=theta.device)
    if out.numel():
        br, bc = _tiles(R, C)
        launch(_forward_kernel, (cdiv(R, br), cdiv(C, bc)), x, out, scale, slope, R, C, x.stride(0), x.stride(1),
               IDX=index_dtype(x), BR=br, BC=bc, num_warps=8)
    return out.view(theta.shape)


def _backward_triton(grad, theta, scale, slope, need_params):
    x, g = as_2d(theta), as_2d(grad)
    R, C = x.shape
    d = torch.empty((R, C), dtype=theta.dtype, device=theta.device)
    if d.numel() == 0:
        return d.view(theta.shape), torch.zeros_like(scale), torch.zeros_like(slope)
    br, bc = _tiles(R, C)
    grid = (cdiv(R, br), cdiv(C, bc))
    parts = torch.empty((grid[0] * grid[1], 2), dtype=torch.float32, device=theta.device)
    launch(_backward_kernel, grid, g, x, scale, slope, d, parts, R, C, g.stride(0), g.stride(1), x.stride(0),
           x.stride(1), NEED_PARAMS=need_params, IDX=index_dtype(g, x), BR=br, BC=bc, num_warps=8)
    if not need_params:
        return d.view(theta.shape), torch.zeros_like(scale), torch.zeros_like(slope)
    gt, gc = parts.sum(0).unbind()
    a, k = scale.float().reshape(()), slope.float().reshape(())
    da = gt - gc * ((k / a) / a)
    dk = gc / a
    return d.view(theta.shape), da.reshape(scale.shape).to(scale.dtype), dk.reshape(slope.shape).to(slope.dtype)


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("optimlib::compander_fwd", mutates_args=())
def _forward_op(theta: torch.Tensor, scale: torch.Tensor, slope: torch.Tensor, backend: str) -> torch.Tensor:
    if use_triton(backend, (theta, scale, slope)):
        return _forward_triton(theta, scale, slope)
    return compander_forward_reference(theta, scale, slope).contiguous()


@_forward_op.register_fake
def _(theta, scale, slope, backend):
    return torch.empty(theta.shape, dtype=theta.dtype, device=theta.device)


@torch.library.custom_op("optimlib::compander_bwd", mutates_args=())
def _backward_op(grad: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor, slope: torch.Tensor,
                 need_params: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(backend, (grad, theta, scale, slope)):
        return _backward_triton(grad, theta, scale, slope, need_params)
    d, da, dk = compander_backward_reference(grad, theta, scale, slope, need_params)
    return d.contiguous(), da, dk


@_backward_op.register_fake
def _(grad, theta, scale, slope, need_params, backend):
    return (torch.empty(theta.shape, dtype=theta.dtype, device=theta.device), torch.empty_like(scale),
            torch.empty_like(slope))


def _setup_context(ctx, inputs, output):
    theta, scale, slope, backend = inputs
    ctx.save_for_backward(theta, scale, slope)
    ctx.backend = backend


def _backward(ctx, grad):
    theta, scale, slope = ctx.saved_tensors
    need_theta, need_scale, need_slope = ctx.needs_input_grad[:3]
    d, da, dk = _backward_op(grad, theta, scale, slope, bool(need_scale or need_slope), ctx.backend)
    return (d if need_theta else None), (da if need_scale else None), (dk if need_slope else None), None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def compander(theta: torch.Tensor, scale: torch.Tensor, slope: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
    """``scale * tanh(theta * (slope / scale))``, differentiable in all three (``scale``, ``slope``:
    one-element tensors, e.g. ``log_scale.exp()``); the backward saves only its inputs."""
    if scale.numel() != 1 or slope.numel() != 1:
        raise ValueError(f"scale and slope must have one element, got shapes {tuple(scale.shape)}, "
                         f"{tuple(slope.shape)}")
    return _forward_op(theta, scale, slope, resolve_backend(backend))
