"""Helpers shared by the factorized-weight layers (SLTrain, LOST, dynamic rank).

Option checking with errors that name the argument, the exact rounding rule for "a fraction
of the entries", per-layer random generators and the dense ``nn.Linear`` that ``merged()``
returns.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import torch
from torch import nn


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_fraction(name: str, value, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """``value`` as a float in ``(0, 1]`` (``[0, 1]`` with ``allow_zero``, ``(0, 1)`` without
    ``allow_one``); ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    low_ok = value >= 0 if allow_zero else value > 0
    high_ok = value <= 1 if allow_one else value < 1
    if not (low_ok and high_ok and math.isfinite(value)):
        interval = ("[0, " if allow_zero else "(0, ") + ("1]" if allow_one else "1)")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def count_of(fraction: float, total: int) -> int:
    """``floor(fraction * total)`` computed exactly on the decimal the user wrote.

    ``fraction`` is read through its shortest ``repr`` (``0.03`` is 3/100, not the binary
    float just below it), so ``count_of(0.05, 2000) == 100`` and never 99.
    """
    return math.floor(Fraction(repr(float(fraction))) * total)


def layer_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator for one layer's random choices, and its seed.

    ``seed=None`` draws the seed from PyTorch's global generator, so a run seeded with
    ``torch.manual_seed`` builds the same layers on every rank (the loop seeds before it builds
    and reparameterizes the model).
    """
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen, int(seed)


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` (d_out, d_in) and ``bias`` (copied, detached)."""
    d_out, d_in = weight.shape
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear
