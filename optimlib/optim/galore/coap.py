r"""COAP: correlation-aware updates of the projection between occasional re-factorizations.

Xiao, Hou, Ma, Ji, Sun, Tao, Li, Liu, Wang, "COAP: Memory-Efficient Training with Correlation-Aware
Gradient Projection", CVPR 2025, arXiv:2412.00071.  Written from the paper's update rules as the
authors' code (``bytedance/coap``, Apache-2.0) runs them; no code is taken from it.

GaLore AdamW (:class:`~optimlib.optim.galore.GaLoreAdamW`: Adam moments of ``R = down(G)``, update
``scale * up(N)``), with the basis ``P`` (right: ``(r, n)``, ``R = G P^T``; left: ``(m, r)``,
``R = P^T G``) maintained as follows, at the parameter's steps ``t`` (counted from 0)::

    t = 0:                         P <- rsvd(G, Omega),  Omega Gaussian, seeded per parameter
    t % (T_u * f) == 0, t > 0:     P <- rsvd(G, Omega = P)          (warm-started re-factorization)
    t % T_u == 0 otherwise:        P <- P - 0.1 * clip_1(grad_P L(P)),
                                   L(P) = mse(G P^T P, G) * (1 - mean_i cos(row_i(M P), row_i(G)))   (right)
                                   L(P) = mse(P P^T G, G) * (1 - mean_i cos(row_i(P M), row_i(G)))   (left)

``T_u = update_interval`` (``update_proj_gap``), ``f = reproject_factor``, ``M`` the low-rank first
moment (before this step's update), ``mse`` the mean over the ``m n`` entries, ``cos`` the cosine
similarity of the ``i``-th rows of the back-projected moment and the gradient, ``clip_1`` scales the
gradient to norm at most 1 (``torch.nn.utils.clip_grad_norm_``'s rule, ``1 / (norm + 1e-6)``).
The descent step trades the reconstruction error of the gradient against the correlation of the
new basis with the accumulated momentum; ``P`` is not re-orthonormalized between re-factorizations.
``rsvd`` is a one-pass randomized SVD with ``r`` samples and no power iteration: right,
``Q = qr(G Omega)``, ``P = top-r right singular vectors of Q^T G``; left, the same on ``G^T``.
Moments are kept at every change of basis (COAP's default ``restore_state=False``; ``on_refresh``
offers GaLore's ``rotate``/``reset`` instead).  ``canonical_signs`` (default) makes the
factorizations' signs canonical.  Not implemented: COAP's Tucker projection of 4-D convolution
weights, its Adafactor and 8-bit variants (``moments_dtype="int8"`` is refused: the descent reads
the plain first moment).

Distributed (row-sharded ``G``): a re-factorization is a TSQR of ``G Omega`` (an all-gather of one
``r x r`` triangle per rank) and an all-reduce of the ``r x n`` matrix ``Q^T G`` (right), or an
all-reduce of ``G^T Omega`` (``n x r``) and a TSQR of ``G Q`` (left); a descent step all-reduces
two numbers and the ``r x n`` partial gradients (left: also ``P^T G`` and the gathered first
moment), then one number (the clipping norm).  Ordinary steps are GaLore's.  No step gathers a
gradient.  State: GaLore's (the basis is a matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from optimlib.distributed.layout import to_local
from optimlib.optim.galore.bases import canonicalize_signs, gaussian
from optimlib.optim.galore.family import GaLoreMember
from optimlib.optim.galore.projection import ProjectionConfig, Projector
from optimlib.validation import check_int, fail

__all__ = ["COAPAdamW", "COAPConfig", "COAPProjector"]

#: the descent step on the basis: its learning rate and the bound on its gradient's norm
BASIS_LR, BASIS_CLIP = 0.1, 1.0


@dataclass(frozen=True)
class COAPConfig(ProjectionConfig):
    """:class:`ProjectionConfig` with COAP's ``reproject_factor``."""

    reproject_factor: int = 5


class COAPProjector(Projector):
    """The GaLore projector whose refreshes are COAP's: a randomized factorization at the first and
    every ``reproject_factor``-th refresh, a correlation-aware descent step on the basis otherwise."""

    def compute(self, state, grad_rows, dtype, seed):
        g = grad_rows if grad_rows.dtype == torch.float64 else grad_rows.float()
        bad = self.block.all_reduce(torch.tensor([0.0 if bool(torch.isfinite(g).all()) else 1.0]))
        if float(bad) > 0:
            return None, "non-finite values"
        r = self.max_rank
        if not self.has_basis(state):
            omega = gaussian(self.basis_dim, r, seed).to(device=g.device, dtype=g.dtype)
            if self.side == "left":
                omega = omega[self.block.row_start:self.block.row_end]
            return self._factorize(g, omega, dtype), None
        basis = self.basis(state, dtype=g.dtype, device=g.device)
        if (int(state["refreshes"]) - 1) % self.config.reproject_factor == 0:
            return self._factorize(g, basis.t() if self.side == "right" else basis, dtype), None
        return {"rank": r, "basis": self._descend(state, g, basis).to(dtype).contiguous()}, None

    def _factorize(self, g: torch.Tensor, omega: torch.Tensor, dtype) -> dict:
        """``rsvd(G, Omega)``; ``omega`` is ``(n, r)`` (right) or this rank's rows of ``(m, r)`` (left)."""
        block, r = self.block, omega.shape[1]
        if self.side == "right":
            q_rows, _ = self.tsqr(g @ omega)                       # this rank's rows of Q = qr(G Omega)
            b = block.all_reduce(q_rows.t() @ g)                   # Q^T G: (r, n)
            p = torch.linalg.svd(b, full_matrices=False).Vh[:r]
            if self.config.canonical_signs:
                canonicalize_signs(p, dim=1)
        else:
            q = torch.linalg.qr(block.all_reduce(g.t() @ omega)).Q  # qr(G^T Omega): (n, r)
            q2_rows, r2 = self.tsqr(g @ q)                          # G Q = Q2 R2
            p = q2_rows @ torch.linalg.svd(r2).U[:, :r]             # rows of the left singular vectors
            if self.config.canonical_signs:
                canonicalize_signs(p, block, dim=0)
        return {"rank": r, "basis": p.to(dtype).contiguous()}

    def _descend(self, state: dict, g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """One clipped gradient step on ``L(P)`` (see the module docstring); returns the new basis
        (right: whole, left: this rank's rows)."""
        block = self.block
        m, n = self.m, self.n
        moment = to_local(state["exp_avg"]).to(g.dtype)             # (R, r) right, (r, K) left
        p = basis.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            if self.side == "right":
                err = g @ p.t() @ p - g
                through = None
                back = moment @ p
            else:
                through = block.all_reduce(p.detach().t() @ g).requires_grad_(True)  # Z = P^T G: (r, n)
                err = p @ through - g
                back = p @ self._gather_kept(moment)
            mse = (err * err).sum() / (m * n)
            cos = F.cosine_similarity(back, g, dim=1).sum() / m
            mse_grads = torch.autograd.grad(mse, [p] if through is None else [p, through])
            cos_grad, = torch.autograd.grad(cos, p)
        sums = [mse.detach().reshape(1), cos.detach().reshape(1)]
        if self.side == "right":               # P is replicated: its gradient is the sum of the ranks' parts
            sums += [mse_grads[0].reshape(-1), cos_grad.reshape(-1)]
            total = block.all_reduce(torch.cat(sums))
            mse_v, cos_v = float(total[0]), float(total[1])
            grad_mse, grad_cos = (t.view_as(p) for t in total[2:].split(p.numel()))
        else:                                  # this rank's rows of P, plus the path through Z
            total = block.all_reduce(torch.cat(sums + [mse_grads[1].reshape(-1)]))
            mse_v, cos_v = float(total[0]), float(total[1])
            grad_mse = mse_grads[0] + g @ total[2:].view_as(through).t()
            grad_cos = cos_grad
        grad = grad_mse * (1.0 - cos_v) - grad_cos * mse_v
        norm = float((grad.double() ** 2).sum()) if self.side == "right" else \
            float(block.all_reduce((grad.double() ** 2).sum().reshape(1)))
        coef = min(1.0, BASIS_CLIP / (norm ** 0.5 + 1e-6))
        return basis - grad * (BASIS_LR * coef)


class COAPAdamW(GaLoreMember):
    r"""COAP (Xiao et al., CVPR 2025, arXiv:2412.00071): GaLore AdamW whose projection is moved
    by a correlation-aware descent step every ``update_interval`` steps and re-factorized (a
    warm-started randomized SVD) every ``update_interval * reproject_factor`` steps.

    See :mod:`optimlib.optim.galore.coap` for the rule.

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as :class:`GaLoreAdamW`.
        update_interval (int >= 1; ``update_proj_gap``, also accepted as a group key under COAP's
            name): steps between basis updates.  reproject_factor (int >= 1): every this many
            updates is a re-factorization.  scale (> 0), proj_type: as GaLore (COAP's defaults:
            ``scale=1``; its LLaMA recipes use 0.25, ``update_interval`` 40, ``reproject_factor`` 5).
        **galore: other :class:`GaLoreAdamW` keywords (``on_refresh``, ``canonical_signs``,
            ``shard_basis``, ``seed``, ``basis_dtype``, ...).  ``projection`` must stay ``"auto"``,
            the rank fixed and the moments plain (``moments_dtype`` ``None``/float).
    """

    rule = "adamw"
    projector_class, config_class = COAPProjector, COAPConfig
    _CONFIG_FIELDS = tuple(COAPConfig.__dataclass_fields__)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 update_interval: int = 32, reproject_factor: int = 5, scale: float = 1.0, proj_type: str = "std",
                 **galore):
        super().__init__(params, lr, options={"reproject_factor": reproject_factor}, betas=betas, eps=eps,
                         weight_decay=weight_decay, correct_bias=correct_bias, update_proj_gap=update_interval,
                         scale=scale, proj_type=proj_type, **galore)

    def add_param_group(self, param_group: dict) -> None:
        if "update_interval" in param_group and "update_proj_gap" not in param_group:
            param_group["update_proj_gap"] = param_group.pop("update_interval")
        super().add_param_group(param_group)

    @classmethod
    def _validate_group(cls, group: dict) -> None:
        super()._validate_group(group)
        check_int("reproject_factor", group.get("reproject_factor", 5), low=1)
        if group.get("projection", "auto") != "auto":
            fail("projection", group["projection"], "'auto' (COAP computes its own bases)")
        if group.get("rank") == "auto" or group.get("energy") is not None:
            fail("rank", group.get("rank"), "an integer >= 1 with COAP (no adaptive rank)")
        if group.get("moments_dtype") == "int8":
            fail("moments_dtype", "int8", "None or a float dtype with COAP (its basis step reads the first moment)")


from optimlib.optim.factory import register_optimizer  # noqa: E402
from optimlib.optim.galore.optimizer import LOWRANK_KEYS  # noqa: E402

register_optimizer(
    "coap_adamw", lambda groups, lr, **kwargs: COAPAdamW(groups, lr=lr, **kwargs), shape_aware=True,
    matrix_keys=LOWRANK_KEYS + ("reproject_factor",),
    defaults={"rank": 128, "update_proj_gap": 40, "reproject_factor": 5, "scale": 0.25, "proj_type": "std"},
    description="COAP (Xiao et al., CVPR 2025): GaLore with correlation-aware basis updates between re-SVDs")
