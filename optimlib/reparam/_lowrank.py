"""Helpers shared by the factorized-weight layers (SLTrain, LOST, dynamic rank).

The exact rounding rule for "a fraction of the entries", per-layer random generators and the dense ``nn.Linear`` that ``merged()``
returns.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn


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
