r"""Q-GaLore: GaLore with INT4 projection matrices and lazy, layer-adaptive subspace refreshes.

Zhang, Jaiswal, Yin, Liu, Zhao, Tian, Wang, "Q-GaLore: Quantized GaLore with INT4 Projection and
Layer-Adaptive Low-Rank Gradients", CPAL 2025, arXiv:2407.08296.  The projector of
``q-galore-torch`` 1.0 (Apache-2.0), which the tests use as an oracle; the code is our own.

GaLore AdamW (:class:`~optimlib.optim.galore.GaLoreAdamW`) with an SVD basis ``P``, plus:

* **INT4 projection.**  At a refresh, ``P`` (``(r, n)`` right, ``(m, r)`` left) is flattened
  row-major, cut into groups of ``proj_group_size`` entries (``-1``: one group per row of ``P``;
  a last, shorter group if the size does not divide), and each group quantized min-max
  asymmetrically to ``proj_bits`` bits::

      s = max(max(g) - min(g), 1e-5) / (2^b - 1);  z = clamp(-round(min(g) / s), 0, 2^b - 1)
      code = clamp(round(g / s) + z, 0, 2^b - 1);  P~ = s * (code - z)

  Only the codes (one ``uint8`` per entry, as ``q-galore-torch`` stores them -- not nibble-packed),
  the group scales and zero points are kept; every projection uses the dequantized ``P~``.
* **Lazy, layer-adaptive refresh.**  At each refresh after the first, the cosine similarity of the
  new leading basis vector (row 0 of a right ``P``, column 0 of a left one; signs as the SVD gives
  them) with the previous one is queued (the last ``queue_size`` values); when the queue is full and
  its mean is at least ``cos_threshold``, this parameter's gap is multiplied by ``gamma_proj``
  (``int(gap * gamma_proj)``), again at every later refresh while that holds.  A refresh happens
  at the steps ``t`` (counted from 0) with ``t % gap == 0``, the gap being the current one.
* The low-rank moments are 8-bit (``moments_dtype="int8"``, optimlib's block-wise format with
  stochastic rounding) by default; ``q-galore-torch`` uses bitsandbytes' 8-bit Adam, so its
  trajectories are matched with plain moments (``moments_dtype=None``) and ``canonical_signs=False``.

Not implemented: Q-GaLore's INT8 weights with stochastic rounding (the weights stay in the model's
dtype; any optimlib reparameterization or the usual mixed precision applies).

Distributed: the refresh is GaLore's exact SVD (the gradient is gathered on refresh steps), after
which every rank quantizes the same full basis: the codes, scales and zero points are replicated
(``r min(m, n)`` bytes plus two floats per group), so the lazy-refresh decision needs no collective.
State per projected parameter: GaLore's (without ``basis``), ``basis_codes`` (``uint8``),
``basis_scales``/``basis_zeros`` (float32, one per group), ``leading_vector`` (float32, ``n`` or
``m``), ``cos_history`` (float64, ``queue_size``), ``cos_count`` (how many of them are set) and
``update_proj_gap`` (ints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from optimlib.distributed.layout import to_local
from optimlib.optim.galore.bases import canonicalize_signs
from optimlib.optim.galore.family import GaLoreMember
from optimlib.optim.galore.projection import ProjectionConfig, Projector
from optimlib.optim.state_spec import REPLICATED, StateSpec
from optimlib.validation import check_int, check_real, fail

__all__ = ["QGaLoreAdamW", "QGaLoreConfig", "QGaLoreProjector", "quantize_minmax", "dequantize_minmax"]

_CODES = ("basis_codes", "basis_scales", "basis_zeros")


def quantize_minmax(w: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization of the 2-D ``w`` in row-major groups of ``group`` entries
    (``-1``: rows); returns ``(codes uint8 like w, scales, zeros)``, one scale and zero per group."""
    flat = w.reshape(w.shape[0], -1) if group == -1 else w.reshape(-1)
    if group != -1:
        pad = -flat.numel() % group           # repeat the last entry: the last group's range is unchanged
        flat = torch.cat([flat, flat[-1:].expand(pad)]).reshape(-1, group)
    top = 2 ** bits - 1
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-5) / top
    zeros = (-torch.round(lo / scales)).clamp_(0, top)
    codes = torch.clamp(torch.round(flat / scales) + zeros, 0, top).to(torch.uint8)
    return codes.reshape(-1)[: w.numel()].view(w.shape), scales.reshape(-1), zeros.reshape(-1)


def dequantize_minmax(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`quantize_minmax` (float32): ``scale * (code - zero)`` per group."""
    if group == -1:
        return scales[:, None] * (codes.float() - zeros[:, None])
    index = torch.arange(codes.numel(), device=codes.device) // group
    return (scales[index] * (codes.reshape(-1).float() - zeros[index])).view(codes.shape)


@dataclass(frozen=True)
class QGaLoreConfig(ProjectionConfig):
    """:class:`ProjectionConfig` with Q-GaLore's quantization and lazy-refresh options."""

    proj_bits: int = 4
    proj_group_size: int = 256
    cos_threshold: float = 0.4
    gamma_proj: float = 2.0
    queue_size: int = 5


class QGaLoreProjector(Projector):
    """GaLore's SVD projector with a quantized basis and a per-parameter, growing refresh gap."""

    def basis_specs(self, rank: int, dtype: torch.dtype | None = None) -> list[StateSpec]:
        """The quantized basis, whole on every rank: ``uint8`` codes of the ``(r, n)`` (right) or
        ``(m, r)`` (left) basis, a float32 scale and zero per quantization group, and the float32
        leading singular vector the lazy refresh compares, and the last ``queue_size`` cosines
        between successive leading vectors (``cos_history``, float64), which exist from the second
        refresh on (:meth:`QGaLoreAdamW.state_specs` leaves them out of a state that has none)."""
        shape = (rank, self.n) if self.side == "right" else (self.m, rank)
        numel = shape[0] * shape[1]
        group = self.config.proj_group_size
        groups = shape[0] if group == -1 else -(-numel // group)
        size = self.config.queue_size
        return [StateSpec("basis_codes", shape, torch.uint8, REPLICATED, numel, "basis"),
                *(StateSpec(key, (groups,), torch.float32, REPLICATED, groups, "basis")
                  for key in ("basis_scales", "basis_zeros")),
                StateSpec("leading_vector", (shape[1] if self.side == "right" else shape[0],), torch.float32,
                          REPLICATED, shape[1] if self.side == "right" else shape[0], "basis"),
                StateSpec("cos_history", (size,), torch.float64, REPLICATED, size, "basis")]

    def needs_refresh(self, state: dict) -> bool:
        if not self.has_basis(state):
            return True
        gap = int(state.get("update_proj_gap", self.config.update_proj_gap))
        return (int(state["step"]) + self.offset) % gap == 0

    def snapshot(self, state: dict) -> dict | None:
        old = super().snapshot(state)
        if old is not None:
            old.update({k: state[k] for k in _CODES if k in state})
        return old

    def basis(self, state: dict, dtype=None, device=None) -> torch.Tensor:
        if "basis_codes" not in state:
            return super().basis(state, dtype, device)
        codes = state["basis_codes"]
        hit = self._derived.get("codes")
        if hit is None or hit[0] is not codes:
            p = dequantize_minmax(codes, state["basis_scales"], state["basis_zeros"], self.config.proj_group_size)
            hit = (codes, p if self.side == "right" else p[self.block.row_start:self.block.row_end])
            self._derived["codes"] = hit
        p = hit[1]
        return p.to(dtype=dtype or p.dtype, device=device or p.device)

    def compute(self, state, grad_rows, dtype, seed):
        g = self.block.gather(grad_rows)
        if not bool(torch.isfinite(g).all()):
            return None, "non-finite values"
        u, _, vh = torch.linalg.svd(g if g.dtype in (torch.float32, torch.float64) else g.float(),
                                    full_matrices=False)
        r = self.max_rank
        p = vh[:r] if self.side == "right" else u[:, :r]
        if self.config.canonical_signs:
            canonicalize_signs(p, dim=1 if self.side == "right" else 0)
        p = p.float()
        lead = (p[0] if self.side == "right" else p[:, 0]).clone()
        new = {"rank": r, "leading_vector": lead}
        gap = int(state.get("update_proj_gap", self.config.update_proj_gap))
        if "leading_vector" in state:
            cos = F.cosine_similarity(to_local(state["leading_vector"]).to(lead), lead, dim=0).double().reshape(1)
            size = self.config.queue_size
            history = state.get("cos_history")       # the last `size` values; the first ones may be unset
            if history is None or history.numel() != size:
                history = torch.zeros(size, dtype=torch.float64)
            new["cos_history"] = history = torch.cat([history[1:].to(cos), cos])
            new["cos_count"] = count = min(int(state.get("cos_count", 0)) + 1, size)
            if count == size and float(history.mean()) >= self.config.cos_threshold:
                gap = int(gap * self.config.gamma_proj)
        new["update_proj_gap"] = gap
        new.update(zip(_CODES, quantize_minmax(p, self.config.proj_group_size, self.config.proj_bits)))
        return new, None


class QGaLoreAdamW(GaLoreMember):
    r"""Q-GaLore (Zhang et al., CPAL 2025, arXiv:2407.08296): GaLore AdamW with INT4 projection
    matrices, lazy layer-adaptive refreshes and 8-bit low-rank moments.

    See :mod:`optimlib.optim.galore.q_galore` for the rule.

    Args:
        params, lr, betas, eps, weight_decay, correct_bias: as :class:`GaLoreAdamW`.
        update_proj_gap (the initial gap), scale, proj_type: as GaLore (Q-GaLore's recipes: 200, 0.25).
        proj_bits (1..8; 4), proj_group_size (>= 1 or -1: per row; 256): the basis quantization.
        cos_threshold (in [-1, 1]; 0.4), gamma_proj (>= 1; 2), queue_size (>= 1; 5): lazy refresh.
        moments_dtype: ``"int8"`` (default) or any :class:`GaLoreAdamW` choice.
        **galore: other :class:`GaLoreAdamW` keywords (``on_refresh``, ``canonical_signs``, ...);
            ``projection`` must be ``"auto"`` or ``"svd"`` and the rank fixed.
    """

    rule = "adamw"
    projector_class, config_class = QGaLoreProjector, QGaLoreConfig
    _CONFIG_FIELDS = tuple(QGaLoreConfig.__dataclass_fields__)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std", proj_bits: int = 4,
                 proj_group_size: int = 256, cos_threshold: float = 0.4, gamma_proj: float = 2.0,
                 queue_size: int = 5, moments_dtype: str | None = "int8", **galore):
        options = dict(proj_bits=proj_bits, proj_group_size=proj_group_size, cos_threshold=cos_threshold,
                       gamma_proj=gamma_proj, queue_size=queue_size)
        super().__init__(params, lr, options=options, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, update_proj_gap=update_proj_gap, scale=scale,
                         proj_type=proj_type, moments_dtype=moments_dtype, **galore)

    @classmethod
    def state_specs(cls, group, place, state=None) -> list[StateSpec]:
        """GaLore's declaration with the quantized basis (:meth:`QGaLoreProjector.basis_specs`);
        ``cos_history``, which the first refresh does not create, only where ``state`` holds it
        (without ``state``: the upper bound, with it)."""
        specs = super().state_specs(group, place, state)
        if state is not None and "cos_history" not in state:
            specs = [s for s in specs if s.key != "cos_history"]
        return specs

    @classmethod
    def _validate_group(cls, group: dict) -> None:
        super()._validate_group(group)
        check_int("proj_bits", group.get("proj_bits", 4), low=1, high=8)
        size = group.get("proj_group_size", 256)
        if size != -1:
            check_int("proj_group_size", size, low=1)
        check_real("cos_threshold", group.get("cos_threshold", 0.4), low=-1.0, high=1.0)
        check_real("gamma_proj", group.get("gamma_proj", 2.0), low=1.0)
        check_int("queue_size", group.get("queue_size", 5), low=1)
        if group.get("projection", "auto") not in ("auto", "svd"):
            fail("projection", group["projection"], "'auto' or 'svd' with Q-GaLore (an exact SVD basis)")
        if group.get("rank") == "auto" or group.get("energy") is not None:
            fail("rank", group.get("rank"), "an integer >= 1 with Q-GaLore (no adaptive rank)")


from optimlib.optim.factory import register_optimizer  # noqa: E402
from optimlib.optim.galore.optimizer import LOWRANK_KEYS  # noqa: E402

register_optimizer(
    "q_galore_adamw", lambda groups, lr, **kwargs: QGaLoreAdamW(groups, lr=lr, **kwargs), shape_aware=True,
    matrix_keys=LOWRANK_KEYS + ("proj_bits", "proj_group_size", "cos_threshold", "gamma_proj", "queue_size"),
    defaults={"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "moments_dtype": "int8"},
    description="Q-GaLore (Zhang et al., 2024): GaLore with INT4 projections, lazy refreshes, 8-bit moments")
