"""The reference twins, compiled: one fused loop instead of a pass over memory per PyTorch op.

A twin written in eager PyTorch reads and writes every tensor once per op (AdamP's statistics
pass is about a dozen passes), which is what decides an optimizer step's speed on the CPU.
:func:`fused_twin` wraps a twin so that, called on large CPU tensors, it runs through
``torch.compile`` (inductor: the twin's element-wise chain and row sums become one vectorised
C++ loop per output); small tensors, other devices and everything inside an outer
``torch.compile`` run the eager twin, unchanged.

Numerics: the compiled twin computes the same expressions, but inductor evaluates the Python
scalars (``beta1``, ``1 - beta1``, the bias corrections) in double precision before rounding,
where eager PyTorch rounds them to the tensor's dtype first, and sums rows in another order; so
its results differ from the eager twin's by float rounding (about one unit in the last place of
fp32).  The eager twin, bit-exact with the reference packages, is what runs below
:data:`MIN_NUMEL` elements (every parity test), and with ``OPTIMLIB_FUSED_TWINS=0``.

Compilation happens at the first large call of each twin (seconds; inductor caches the code on
disk for later processes), with dynamic shapes and symbolic scalars, so neither a new shape nor
a new step's bias correction recompiles it.  A scalar that changes every step and reaches an
``alpha=``/``value=`` argument (a step size, a scheduled learning rate) would be specialised
instead, one compilation per value: a twin names such arguments in ``tensor_scalars``, they reach
the compiled twin as 0-d float64 tensors, and the twin applies them with :func:`add_scaled_`.
Where compilation fails (no C++ compiler, say) the twin warns once and stays eager.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

ENV_VAR = "OPTIMLIB_FUSED_TWINS"
MIN_NUMEL = 1 << 17
"""Tensors with fewer elements than this (128 Ki) run the eager twin: compiling them gains less
than it costs."""


def enabled() -> bool:
    """Whether large CPU calls of a twin run compiled (``OPTIMLIB_FUSED_TWINS``, default on)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def worth_compiling(tensors, min_numel: int = MIN_NUMEL) -> bool:
    """Whether a call on ``tensors`` should run compiled: all on the CPU, the largest of at least
    ``min_numel`` elements, compilation enabled and not already inside a ``torch.compile``."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return (enabled() and not torch.compiler.is_compiling() and bool(tensors)
            and all(t.device.type == "cpu" for t in tensors) and max(t.numel() for t in tensors) >= min_numel)


def add_scaled_(out: torch.Tensor, x: torch.Tensor, alpha) -> torch.Tensor:
    """``out.add_(x, alpha=alpha)`` for a number ``alpha`` (the eager twin's own expression); for a
    0-d tensor (a compiled twin's ``tensor_scalars``) ``out.add_(x * alpha)``."""
    if isinstance(alpha, torch.Tensor):
        return out.add_(x * alpha)
    return out.add_(x, alpha=alpha)


def fused_twin(twin: Callable, *, min_numel: int = MIN_NUMEL, tensor_scalars: tuple[str, ...] = ()) -> Callable:
    """``twin`` (an optimizer step's twin: no autograd through it), compiled when called on CPU
    tensors of at least ``min_numel`` elements; the keyword arguments named in ``tensor_scalars``
    reach the compiled twin as 0-d float64 tensors (see the module docstring)."""
    compiled: list = []

    def unchecked(*args, **kwargs):
        """The compiled twin without the per-call checks, for a caller that has decided to compile,
        holds ``torch.no_grad()`` and passes detached tensors (a loop over blocks)."""
        if compiled == [None]:
            return twin(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(twin, dynamic=True, fullgraph=True))
        try:
            return compiled[0](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager twin is always right
            compiled[0] = None
            warnings.warn(f"optimlib: compiling {twin.__name__} failed ({type(exc).__name__}: {exc}); "
                          f"it runs eagerly (set {ENV_VAR}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
            return twin(*args, **kwargs)

    @functools.wraps(twin)
    def call(*args, **kwargs):
        if compiled == [None] or not worth_compiling((*args, *kwargs.values()), min_numel):
            return twin(*args, **kwargs)
        # optimizer math on parameters and their views: detached aliases (same storage) keep
        # autograd's view tracking out of the compiled graph
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: a.detach() if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
        with torch.no_grad():
            scalars = {k: torch.tensor(float(kwargs[k]), dtype=torch.float64) for k in tensor_scalars
                       if isinstance(kwargs.get(k), (int, float))}
            return unchecked(*args, **{**kwargs, **scalars})

    call.unchecked = unchecked
    call.eager = twin
    return call
