r"""Fira: GaLore plus the norm-scaled residual of the gradient outside the subspace.

Chen, Feng, Li, Lai, Yue, Yuan, Wang, "Fira: Can We Achieve Full-rank Training of LLMs Under
Low-rank Constraint?", arXiv:2410.01623.  The update of the ``fira`` package (1.0.2, Apache-2.0,
``fira.FiraAdamW``), which the tests use as an oracle; the code is our own.

For a projected parameter (a group with ``rank``), gradient :math:`G` of the ``(m, n)`` matrix,
projection as in :class:`~optimlib.optim.galore.GaLoreAdamW` (``up`` the back-projection)::

    R = down(G);  M, V <- Adam moments of R;  N = M / (sqrt(V) + eps)
    k_i = ||N_i|| / (||R_i|| + 1e-8)       for each index i of the kept dimension (rows of a right
                                           projection, columns of a left one)
    S   = (G - scale * up(R)) * k          # the residual, column- (or row-) scaled
    S  <- S / (max(||S|| / (||S_prev|| + 1e-8), gamma) / gamma);  ||S_prev|| <- ||S||   (limiter)
    W  <- W - lr sqrt(1 - b2^t) / (1 - b1^t) * (scale * up(N) + S);   W <- W - lr wd W

The limiter is skipped on a parameter's first step (it only records ``||S||``).  Parameters outside
the low-rank groups get galore-torch's AdamW, as in ``fira``.

Where ``fira`` (and so this class) differs from the paper's Alg. 1: the residual is
``G - scale * P P^T G`` (``fira`` subtracts its ``project_back``, which includes ``alpha``), not
``G - P P^T G``; ``scale`` multiplies only ``up(N)``, not the residual; the scaling factors and
the residual are computed from the un-bias-corrected ``N`` and carry the step size's bias
correction; the limiter keeps the limited norm.  ``fira`` names ``scale`` ``alpha`` (also accepted
here as a group key) and keeps LAPACK's singular-vector signs: ``projection="svd",
canonical_signs=False`` reproduce it.

Distributed: as GaLoreAdamW, plus one all-reduce of one number (the limiter) and, for a left
projection, two all-gathers of ``r x n`` low-rank tensors and one of the ``n`` column factors.
State: GaLore's, plus ``limiter_norm`` (a float64 scalar) per projected parameter.
"""

from __future__ import annotations

from typing import Iterable

from optimlib.optim.galore.family import LIMITER_SPEC, GaLoreMember, kept_factors, limit_norm_growth_
from optimlib.optim.galore.rules import INNER_RULES, InnerRule
from optimlib.validation import check_real

__all__ = ["FiraAdamW", "FiraRule"]


class FiraRule(InnerRule):
    """GaLore's AdamW in the subspace, plus the scaled and limited residual outside it."""

    name = "fira"
    options = {"gamma": 1.01}

    def validate(self, group: dict) -> None:
        check_real("gamma", self.option(group, "gamma"), low=1.0)

    def lowrank_specs(self, group, projector, rank, place):
        return [*super().lowrank_specs(group, projector, rank, place), LIMITER_SPEC]

    def projected_step(self, unit, projector, moments, low, grad_rows, t, group):
        direction, step_size = self.direction(moments, low, t, group)
        direction = direction.to(unit.grad.dtype)
        residual = grad_rows - projector.up(unit.state, low) * float(group["scale"])
        residual.mul_(kept_factors(direction, low, projector))
        limit_norm_growth_(residual, unit.state, projector.block, float(self.option(group, "gamma")))
        a, b = projector.up_factors(unit.state, direction)
        self.apply(unit, projector.block, grad_rows, a, b, step_size, group, residual=residual)


INNER_RULES[FiraRule.name] = FiraRule()


class FiraAdamW(GaLoreMember):
    r"""Fira (Chen et al., arXiv:2410.01623): GaLore AdamW plus the norm-scaled residual
    ``(G - scale P P^T G)`` and the norm-growth limiter; a drop-in for ``fira.FiraAdamW``.

    See :mod:`optimlib.optim.galore.fira` for the update rule and where it differs from the paper.

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as :class:`GaLoreAdamW`.
        rank, update_proj_gap, scale, proj_type: defaults of the low-rank groups (a group is
            low-rank when it has ``rank``); ``alpha`` is accepted as ``fira``'s name of ``scale``
            in a group.  The paper's recipes: ``scale=0.25`` below 1B parameters, ``0.0625`` above.
        gamma (>= 1): the limiter's largest allowed growth of the residual's norm per step (1.01).
        **galore: any other :class:`GaLoreAdamW` keyword (``projection``, ``on_refresh``,
            ``moments_dtype``, ``canonical_signs``, ...).
    """

    rule = "fira"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std", gamma: float = 1.01,
                 **galore):
        super().__init__(params, lr, options={"gamma": gamma}, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, update_proj_gap=update_proj_gap, scale=scale,
                         proj_type=proj_type, **galore)

    def add_param_group(self, param_group: dict) -> None:
        if "alpha" in param_group and "scale" not in param_group:
            param_group["scale"] = param_group.pop("alpha")
        super().add_param_group(param_group)


from optimlib.optim.factory import register_optimizer  # noqa: E402
from optimlib.optim.galore.optimizer import LOWRANK_KEYS  # noqa: E402

register_optimizer(
    "fira_adamw", lambda groups, lr, **kwargs: FiraAdamW(groups, lr=lr, **kwargs), shape_aware=True,
    matrix_keys=LOWRANK_KEYS, defaults={"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    description="Fira (Chen et al., 2024): GaLore AdamW plus the norm-scaled, growth-limited residual")
