r"""APOLLO and APOLLO-Mini: Adam's per-channel (or per-tensor) learning-rate scaling, estimated in
a seeded random low-rank space and applied to the raw gradient.

Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee, "APOLLO: SGD-like Memory, AdamW-level
Performance", MLSys 2025, arXiv:2412.05270.  Written from the paper's Algorithm 1 and equations (the
authors' code is licensed non-commercially and was not used).

For a projected parameter (a group with ``rank``), gradient :math:`G` of the ``(m, n)`` matrix,
projection ``down`` as in :class:`~optimlib.optim.galore.GaLoreAdamW` (``std``: keep the larger
dimension; its indices are the *channels*)::

    every T steps (and at the first):  P <- N(0, 1/r) entries, drawn from a new seed    (proj="random")
                                       or the top-r singular vectors of G               (proj="svd")
    R = down(G);  M, V <- Adam moments of R;  N = M / (sqrt(V) + eps)
    s = ||N_c|| / (||R_c|| + 1e-8) per channel c   (scale_type="channel")
      or ||N||_F / (||R||_F + 1e-8)                  (scale_type="tensor")
    U = s * G                                      # the raw full-rank gradient, scaled
    U <- U / (max(||U|| / (||U_prev|| + 1e-8), gamma) / gamma);  ||U_prev|| <- ||U||   (limiter)
    W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) * sqrt(scale) * U;   W <- W - lr wd W

The multiplier is :math:`\sqrt{\text{scale}}`, the paper's convention (the channel factor of a rank-r
random space is biased by :math:`\sqrt{r/n}`, so ``scale = n/r`` corrects it; APOLLO-Mini's
``scale=128`` multiplies updates by ``sqrt(128)``).  ``scale_front=True`` applies it before the
limiter (recommended with short warm-ups); ``disable_nl=True`` drops the limiter (skipped anyway on
a parameter's first step, where it only records ``||U||``).  Moments are kept across refreshes
(``on_refresh="keep"``); Adam's bias correction is in the step size, as in GaLore.  Parameters
outside the low-rank groups get galore-torch's AdamW.

APOLLO-Mini (``apollo_mini`` in the factory) is ``rank=1, scale_type="tensor", scale=128``.

Random projections: the seed of a parameter's ``k``-th projection is a function of its qualified
name, the group's ``seed`` and ``k`` (:func:`optimlib.optim.galore.bases.mix_seed`), so every rank
draws the same matrix without communication; only the seed (``basis_seed``) is stored and the
matrix is regenerated when used.

Distributed: as GaLoreAdamW (the projected gradient of a left projection is all-reduced), plus one
all-reduce of two numbers (tensor scaling) and one of one number (the limiter); a left projection's
channel factors are all-gathered (``n`` numbers).  No back-projection.

State per projected ``(m, n)`` parameter: ``exp_avg``/``exp_avg_sq`` (this rank's share of the
kept dimension x ``r``: ``2 r max(m, n)`` numbers in all with ``std``), ``basis_seed``, and
``limiter_norm`` (a float64 scalar) -- the paper's ``2 n r + 2``; APOLLO-Mini's is ``O(m + n)``.
"""

from __future__ import annotations

import math
from typing import Iterable

from optimlib.optim.galore.family import LIMITER_SPEC, NORM_EPS, GaLoreMember, global_norms, kept_factors, limit_norm_growth_
from optimlib.optim.galore.rules import INNER_RULES, InnerRule
from optimlib.validation import check_choice, check_real, fail

__all__ = ["ApolloAdamW", "ApolloRule", "SCALE_TYPES", "APOLLO_PROJ"]

SCALE_TYPES = ("channel", "tensor")
#: APOLLO's ``proj`` names -> the projection basis (:mod:`optimlib.optim.galore.bases`)
APOLLO_PROJ = {"random": "gaussian", "svd": "svd"}


class ApolloRule(InnerRule):
    """Adam moments of the projected gradient, turned into a scaling of the raw gradient."""

    name = "apollo"
    options = {"scale_type": "channel", "scale_front": False, "disable_nl": False, "gamma": 1.01}

    def validate(self, group: dict) -> None:
        check_choice("scale_type", self.option(group, "scale_type"), SCALE_TYPES)
        for key in ("scale_front", "disable_nl"):
            if not isinstance(self.option(group, key), bool):
                fail(key, self.option(group, key), "True or False", TypeError)
        check_real("gamma", self.option(group, "gamma"), low=1.0)

    def lowrank_specs(self, group, projector, rank, place):
        limiter = [] if self.option(group, "disable_nl") else [LIMITER_SPEC]
        return [*super().lowrank_specs(group, projector, rank, place), *limiter]

    def projected_step(self, unit, projector, moments, low, grad_rows, t, group):
        direction, step_size = self.direction(moments, low, t, group)
        direction = direction.to(unit.grad.dtype)
        block = projector.block
        if self.option(group, "scale_type") == "channel":
            update = grad_rows * kept_factors(direction, low, projector)
        else:
            norm_n, norm_r = global_norms(block, direction, low)
            update = grad_rows * (norm_n / (norm_r + NORM_EPS))
        root, front = math.sqrt(float(group["scale"])), self.option(group, "scale_front")
        if front:
            update.mul_(root)
        if not self.option(group, "disable_nl"):
            limit_norm_growth_(update, unit.state, block, float(self.option(group, "gamma")))
        if not front:
            update.mul_(root)
        decay = float(group["lr"]) * group["weight_decay"]

        def apply(rows):
            rows.add_(update, alpha=-step_size)
            if decay > 0.0:
                rows.add_(rows, alpha=-decay)
        self.update_rows(unit, block, apply)


INNER_RULES[ApolloRule.name] = ApolloRule()


class ApolloAdamW(GaLoreMember):
    r"""APOLLO (Zhu et al., MLSys 2025, arXiv:2412.05270): AdamW's channel-wise (or tensor-wise)
    scaling estimated from Adam moments in a seeded random low-rank space, applied to the raw
    gradient; APOLLO-Mini with ``rank=1, scale_type="tensor", scale=128``.

    See :mod:`optimlib.optim.galore.apollo` for the update rule.  Defaults are Hugging Face's
    ``apollo_adamw`` (rank 128 in the factory, ``proj="random"``, channel scaling, ``T=200``,
    ``scale=1``, ``std``).

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as :class:`GaLoreAdamW`.
        update_proj_gap (T), scale (> 0; the update is multiplied by ``sqrt(scale)``), proj_type:
            defaults of the low-rank groups (a group is low-rank when it has ``rank``).
        proj: ``"random"`` (seeded Gaussian projection, ``N(0, 1/r)`` entries, regenerated from
            its seed) or ``"svd"`` (GaLore's SVD basis, "APOLLO w. SVD"); also a group key.
            ``projection=`` (any :class:`GaLoreAdamW` basis) overrides it.
        scale_type: ``"channel"`` or ``"tensor"``.  scale_front: apply ``sqrt(scale)`` before the
            limiter.  disable_nl: no norm-growth limiter.  gamma (>= 1): the limiter's bound (1.01).
        **galore: any other :class:`GaLoreAdamW` keyword (``on_refresh``, ``moments_dtype``, ``seed``, ...).
    """

    rule = "apollo"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std", proj: str = "random",
                 scale_type: str = "channel", scale_front: bool = False, disable_nl: bool = False,
                 gamma: float = 1.01, **galore):
        check_choice("proj", proj, APOLLO_PROJ)
        galore.setdefault("projection", APOLLO_PROJ[proj])
        super().__init__(params, lr, options={"scale_type": scale_type, "scale_front": scale_front,
                                              "disable_nl": disable_nl, "gamma": gamma},
                         betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, **galore)

    def add_param_group(self, param_group: dict) -> None:
        if "proj" in param_group:
            check_choice("proj", param_group["proj"], APOLLO_PROJ)
            param_group.setdefault("projection", APOLLO_PROJ[param_group.pop("proj")])
        super().add_param_group(param_group)


from optimlib.optim.factory import register_optimizer  # noqa: E402
from optimlib.optim.galore.optimizer import LOWRANK_KEYS  # noqa: E402

_APOLLO_KEYS = LOWRANK_KEYS + ("proj", "scale_type")


def _build(groups, lr, **kwargs):
    return ApolloAdamW(groups, lr=lr, **kwargs)


register_optimizer(
    "apollo_adamw", _build, shape_aware=True, matrix_keys=_APOLLO_KEYS,
    defaults={"rank": 128, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "proj": "random",
              "scale_type": "channel"},
    description="APOLLO (Zhu et al., MLSys 2025): AdamW's channel-wise scaling from a seeded random projection")
register_optimizer(
    "apollo_mini", _build, shape_aware=True, matrix_keys=_APOLLO_KEYS,
    defaults={"rank": 1, "update_proj_gap": 200, "scale": 128.0, "proj_type": "std", "proj": "random",
              "scale_type": "tensor"},
    description="APOLLO-Mini (Zhu et al., MLSys 2025): rank-1 random projection, tensor-wise scaling, O(m+n) state")
