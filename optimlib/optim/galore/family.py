"""The base of GaLore's successors (Fira, APOLLO, ...): :class:`GaLoreAdamW` with one inner rule
fixed and that rule's options as constructor arguments, and the per-rank arithmetic they share --
norms of row-sharded matrices, channel factors along the kept dimension, and the norm-growth limiter.
"""

from __future__ import annotations

import math

import torch

from optimlib.distributed.row_block import RowBlock
from optimlib.optim.galore.optimizer import GaLoreAdamW
from optimlib.optim.galore.projection import Projector
from optimlib.optim.state_spec import REPLICATED, StateSpec

__all__ = ["GaLoreMember", "global_norms", "kept_factors", "limit_norm_growth_", "NORM_EPS"]

#: the guard added to a norm in a denominator (Fira's and APOLLO's ``1e-8``)
NORM_EPS = 1e-8


class GaLoreMember(GaLoreAdamW):
    """:class:`GaLoreAdamW` running the inner rule ``rule``; ``options`` (the rule's group keys) are
    defaults of every param group, like the constructor's other arguments."""

    rule: str = "adamw"

    def __init__(self, params, lr: float, *, options: dict, **galore):
        self._options = dict(options)
        super().__init__(params, lr, inner=self.rule, **galore)
        self.defaults.update(self._options)

    def add_param_group(self, param_group: dict) -> None:
        for key, value in self.__dict__.get("_options", {}).items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)


def global_norms(block: RowBlock, *pieces: torch.Tensor) -> list[float]:
    """The Frobenius norms of matrices whose pieces (disjoint, one per rank) are ``pieces``: one
    all-reduce of one number per matrix; every rank gets the same values."""
    totals = torch.stack([(p.double() ** 2).sum() for p in pieces])
    return [math.sqrt(v) for v in block.all_reduce(totals).tolist()]


def kept_factors(direction: torch.Tensor, low: torch.Tensor, projector: Projector) -> torch.Tensor:
    """``||direction_i|| / (||low_i|| + 1e-8)`` for every index ``i`` of the kept dimension, shaped
    to scale this rank's ``(R, n)`` rows: ``(R, 1)`` for a right projection (the kept rows are the
    owned rows), ``(1, n)`` for a left one (the column blocks of the ranks, all-gathered)."""
    dim = projector.rank_dim
    factors = direction.norm(dim=dim) / (low.norm(dim=dim) + NORM_EPS)
    if projector.side == "right":
        return factors.unsqueeze(1)
    return projector._gather_kept(factors.unsqueeze(0))


LIMITER_SPEC = StateSpec("limiter_norm", (), torch.float64, REPLICATED, 1, "limiter")
"""The declared state of :func:`limit_norm_growth_`: one float64 scalar per parameter, the same on
every rank."""


def limit_norm_growth_(update: torch.Tensor, state: dict, block: RowBlock, gamma: float) -> None:
    """Fira's norm-growth limiter on this rank's rows of ``update``, in place::

        U <- U / (max(||U|| / (||U_prev|| + 1e-8), gamma) / gamma);   ||U_prev|| <- ||U||

    ``||U_prev||`` (the previous update's norm after the limit) is ``state["limiter_norm"]``, a
    float64 scalar; the first call only records it.  One all-reduce of one number."""
    norm, = global_norms(block, update)
    prev = state.get("limiter_norm")
    if prev is not None:
        limiter = max(norm / (float(prev) + NORM_EPS), gamma) / gamma
        update.div_(limiter)
        norm = norm / limiter
    state["limiter_norm"] = torch.tensor(norm, dtype=torch.float64)
