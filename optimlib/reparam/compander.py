"""Weight compander: an odd, monotone, saturating, steep-at-zero map of every weight.

    model = optimlib.reparam.apply(model, "compander", saturation=3.0, slope=2.0, learnable=True)

Source: R. Cakaj, J. Mehnert, B. Yang, "Weight Compander: A Simple Weight Reparameterization for
Regularization", IJCNN 2023, arXiv 2306.16993 (OpenReview ``CWzvagbsQM``).  The paper
reparameterizes each weight with a non-linear function that "restrict[s] the magnitude of the
weights while forcing them away from zero", and optionally learns that function's
hyper-parameters.  Its exact closed form could not be read in any stored copy of the paper
(only the abstract is reachable; no public code exists), so **the form below is ours**, chosen
to have exactly the properties the abstract states:

    W = f(theta) = a * tanh(k * theta / a)

* odd and strictly monotone; ``|W| < a`` (saturating: no weight can dominate);
* ``f'(theta) = k * (1 - (W / a)^2)`` is largest at 0 (``f'(0) = k``), so latent weights near
  zero move the effective weight fastest ("reactivation of dead weights"), while weights near
  ``+-a`` barely move;
* inverse ``theta = (a / k) * atanh(W / a)``, used as ``right_inverse`` (assigning
  ``linear.weight = W`` stores ``theta``; ``W`` is clamped to ``+-(1 - 1e-4) a`` first).

Hyper-parameters, per layer: ``a = saturation * sigma0`` where ``sigma0`` is the standard
deviation of the layer's initial weight (``init_std`` overrides it), and ``k = slope``.  Fixed
(buffers) by default; ``learnable=True`` makes ``log a`` and ``log k`` parameters of shape
``(1,)`` — fewer than two dimensions, so :func:`optimlib.optim.factory.param_groups` puts them in
the no-weight-decay group, as it does for norms and biases.

Initialisation.  The latent weight is set so that the effective weight is the original one,
with the tails beyond ``+-a`` clamped; the clamped tails would lower the variance, so the
original weight is first scaled by the ``c >= 1`` that makes ``std(f(theta0)) == sigma0``
exactly (solved by bisection on the tensor).  The effective initial weights thus have the
original initialiser's variance (``saturation`` must exceed 1 for that to be possible);
``preserve_variance=False`` skips the scaling and only clamps.  On the meta device nothing can be
measured: pass ``init_std`` (then ``a = saturation * init_std`` and the weight is left alone).

Kernel.  Forward and backward are the custom op :func:`optimlib.kernels.compander` (computed as
``a * tanh(theta * (k / a))`` with ``a``, ``k`` in the weight's dtype; gradients of ``theta``, ``a``
and ``k`` in one pass; a Triton kernel on CUDA, its eager twin on CPU).  The backward recomputes
``tanh`` from ``theta``, so no weight-sized tensor is kept between forward and backward (autograd
of the plain expression keeps ``tanh(c theta)``); ``log a``, ``log k`` get their gradients through
``exp`` by autograd, outside the op.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from optimlib.distributed.layout import is_dtensor, on_local
from optimlib.kernels import compander
from optimlib.reparam import register_reparam

_MARGIN = 1e-4  # right_inverse clamps W/a to +-(1 - _MARGIN)


class Compander(nn.Module):
    """Parametrization ``theta -> a * tanh(k * theta / a)`` (see the module docstring)."""

    def __init__(self, scale: float, slope: float, *, learnable: bool = False, device=None):
        super().__init__()
        log_a = torch.tensor([math.log(scale)], dtype=torch.float32, device=device)
        log_k = torch.tensor([math.log(slope)], dtype=torch.float32, device=device)
        if learnable:
            self.log_scale = nn.Parameter(log_a)
            self.log_slope = nn.Parameter(log_k)
        else:
            self.register_buffer("log_scale", log_a)
            self.register_buffer("log_slope", log_k)

    @property
    def scale(self) -> torch.Tensor:
        """The saturation level ``a`` (``|W| < a``)."""
        return self.log_scale.exp()

    @property
    def slope(self) -> torch.Tensor:
        """The slope at zero ``k = f'(0)``."""
        return self.log_slope.exp()

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return on_local(theta, lambda t: compander(t, self.scale, self.slope))  # element-wise: block by block

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        a, k = self.scale.float(), self.slope.float()
        ratio = (weight.float() / a).clamp(-1 + _MARGIN, 1 - _MARGIN)
        return ((a / k) * torch.atanh(ratio)).to(weight.dtype)

    def extra_repr(self) -> str:
        learn = isinstance(self.log_scale, nn.Parameter)
        return f"scale={float(self.scale):.4g}, slope={float(self.slope):.4g}, learnable={learn}"


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"option {name!r} must be a positive number, got {value!r}")
    return float(value)


@torch.no_grad()
def variance_preserving_target(weight: torch.Tensor, bound: float, sigma: float, iters: int = 60) -> torch.Tensor:
    """``c * weight`` with ``c >= 1`` chosen so that ``std(clamp(c * weight, +-bound)) == sigma``
    (the effective weight the compander's ``right_inverse`` reproduces).

    ``std`` of the clamped tensor is evaluated in O(log n) from prefix sums over the entries
    sorted by magnitude, so the bisection costs one sort per layer."""
    w = weight.detach().double().flatten().cpu().numpy()
    n = w.size
    order = np.argsort(np.abs(w), kind="stable")
    mag, signed = np.abs(w)[order], w[order]
    sum_sq = np.concatenate([[0.0], np.cumsum(mag * mag)])  # over the k smallest magnitudes
    sum_w = np.concatenate([[0.0], np.cumsum(signed)])
    sign_tail = np.concatenate([np.cumsum(np.sign(signed)[::-1])[::-1], [0.0]])  # signs from k on

    def std_at(c: float) -> float:
        k = int(np.searchsorted(mag, bound / c))  # entries [0, k) are not clamped
        total_sq = c * c * sum_sq[k] + bound * bound * (n - k)
        mean = (c * sum_w[k] + bound * sign_tail[k]) / n
        return math.sqrt(max(total_sq - n * mean * mean, 0.0) / (n - 1))

    if std_at(1.0) >= sigma * (1 - 1e-9):
        return weight.detach().clone()
    lo, hi = 1.0, 2.0
    while std_at(hi) < sigma:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("cannot preserve the weight variance: raise option 'saturation'")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if std_at(mid) < sigma else (lo, mid)
    return (weight.detach().double() * hi).to(weight.dtype)


def compand(linear: nn.Linear, *, saturation: float = 3.0, slope: float = 2.0, learnable: bool = False,
            init_std: float | None = None, preserve_variance: bool = True) -> nn.Linear:
    """Register a :class:`Compander` on ``linear.weight`` with the variance-preserving
    initialisation; returns ``linear`` (the ``convert`` of ``apply(model, "compander", ...)``)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"the compander applies to nn.Linear, got {type(linear).__name__}")
    saturation = _positive("saturation", saturation)
    slope = _positive("slope", slope)
    if not isinstance(learnable, bool):
        raise ValueError(f"option 'learnable' must be true or false, got {learnable!r}")
    if saturation <= 1.0 and preserve_variance:
        raise ValueError(f"option 'saturation' ({saturation}) must exceed 1: |W| < saturation * sigma0 cannot keep "
                         f"the initial standard deviation sigma0 otherwise")
    if parametrize.is_parametrized(linear, "weight"):
        raise ValueError("this linear's weight is already parametrized; the compander must be the only "
                         "parametrization (merge() the other one first)")
    weight = linear.weight
    if is_dtensor(weight) and learnable:
        raise ValueError("option 'learnable' must be false for a tensor-parallel linear: each rank would see only "
                         "its block's share of the scale's and slope's gradients")
    whole = weight.full_tensor() if is_dtensor(weight) else weight  # the statistics are of the whole weight
    if init_std is not None:
        sigma = _positive("init_std", init_std)
    elif weight.is_meta:
        raise ValueError("the layer is on the meta device, so its initial std cannot be measured: "
                         "pass option 'init_std'")
    else:
        sigma = float(whole.detach().float().std())
        if not sigma > 0:
            raise ValueError("the layer's weight has zero variance: pass option 'init_std'")
    bound = saturation * sigma
    if preserve_variance and not weight.is_meta:
        target = variance_preserving_target(whole.detach(), bound * (1 - _MARGIN), sigma)
        with torch.no_grad():
            if is_dtensor(weight):
                from torch.distributed.tensor import distribute_tensor

                target = distribute_tensor(target, weight.device_mesh, weight.placements)
            weight.copy_(target)
    parametrize.register_parametrization(linear, "weight", Compander(bound, slope, learnable=learnable,
                                                                    device=weight.device))
    return linear


register_reparam("compander", compand, tensor_parallel=True, parametrization=True,
                 description="weight compander W = a*tanh(k*theta/a) (Cakaj et al. 2023; form ours)")

__all__ = ["Compander", "compand", "variance_preserving_target"]
