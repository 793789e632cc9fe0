"""The low-rank moments of a projected parameter, behind one interface.

:class:`LowRankMoments` stores Adam's two moments in the projector's layout, plain (any float
dtype) or 8-bit block-wise quantized; :class:`SMMFMoments` stores them SMMF-factorized.  Both
``read``/``write`` dense moments (refreshes only), ``update`` them with a projected gradient (the
fused ops of :mod:`optimlib.kernels`) and ``init`` zeros of a rank.  :func:`carry_moments` moves
them to a new basis at a refresh (``on_refresh``: keep, rotate, reset).
"""

from __future__ import annotations

import dataclasses

import torch

from optimlib.distributed.layout import is_dtensor, shard_like, to_local
from optimlib.formats.quantize import dequantize_blockwise, hash_uniform, quantize_blockwise
from optimlib.kernels.adam import adam8bit_lowrank_update_, adam_lowrank_update_
from optimlib.optim.galore.projection import Projector
from optimlib.optim.smmf import SMMFLayout
from optimlib.optim.state_spec import SHARDED, StateSpec

__all__ = ["LowRankMoments", "SMMFMoments", "carry_moments"]


class LowRankMoments:
    """Read/write the two low-rank moments of one parameter in its projector's layout.

    Plain moments are stored in that layout.  Quantized ones are stored as ``(K, r)`` codes and
    block maxima (blocks run along the rank, within one row of the kept dimension, so they do not
    depend on the sharding), transposed for a left projection.
    """

    def __init__(self, state: dict, group: dict, projector: Projector, like: torch.Tensor, param):
        self.state, self.group, self.proj, self.param = state, group, projector, param
        self.kind = group["moments_dtype"]
        self.block = int(group["quant_block"])
        self.device = like.device
        self.dtype = like.dtype if self.kind in (None, "int8") else getattr(torch, self.kind)

    @property
    def quantized(self) -> bool:
        return self.kind == "int8"

    @staticmethod
    def state_specs(group: dict, projector: Projector, rank: int) -> list[StateSpec]:
        """The declared moments of rank ``rank`` (:mod:`optimlib.optim.state_spec`), sharded on the
        kept dimension: ``exp_avg``/``exp_avg_sq`` in the projector's layout (``moments_dtype``, else
        the gradient's), or 8-bit ``*_codes`` ``(kept, r)`` and float32 ``*_absmax`` ``(kept, blocks)``."""
        kind, kept, local = group["moments_dtype"], projector.kept_size, projector.local_kept
        if kind == "int8":
            blocks = -(-rank // int(group["quant_block"]))
            return [StateSpec(f"{name}_{part}", (kept, width), dtype, SHARDED, local * width, component)
                    for name in ("exp_avg", "exp_avg_sq")
                    for part, width, dtype, component in (("codes", rank, torch.uint8, "moments"),
                                                          ("absmax", blocks, torch.float32, "absmax"))]
        dtype = None if kind is None else getattr(torch, kind)
        shape = (kept, rank) if projector.side == "right" else (rank, kept)
        return [StateSpec(name, shape, dtype, SHARDED, local * rank, "moments", dim=projector.kept_dim)
                for name in ("exp_avg", "exp_avg_sq")]

    def exists(self) -> bool:
        return ("exp_avg" in self.state) or ("exp_avg_codes" in self.state)

    def _wrap(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Under FSDP2: a DTensor sharded on the kept dimension ``dim`` (so DCP saves every rank's piece)."""
        p = self.param
        shape = list(t.shape)
        shape[dim] = self.proj.kept_size
        return shard_like(p.device_mesh if is_dtensor(p) else None, self.proj.block.piece, t, dim, shape)

    def _to_kr(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.proj.side == "right" else t.t()

    def read(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two moments in the projector's layout (``rank``: that of the stored moments; their
        shapes carry it here)."""
        s = self.state
        if not self.quantized:
            return to_local(s["exp_avg"]), to_local(s["exp_avg_sq"])
        m = dequantize_blockwise(to_local(s["exp_avg_codes"]), to_local(s["exp_avg_absmax"]), signed=True,
                                 block=self.block, dtype=self.dtype)
        root = dequantize_blockwise(to_local(s["exp_avg_sq_codes"]), to_local(s["exp_avg_sq_absmax"]),
                                    signed=False, block=self.block, dtype=self.dtype)
        return self._to_kr(m).contiguous(), self._to_kr(root * root).contiguous()

    def _noise(self) -> tuple[int, int, int, int] | None:
        """Stochastic rounding's ``(seed, step_m, step_v, first kept row)``: counter-based, so the
        codes do not depend on the sharding; ``None`` for round-to-nearest."""
        if not self.group["stochastic_rounding"]:
            return None
        s = self.state
        step = int(s["step"]) + 7919 * int(s["refreshes"])
        return int(s["seed"]), 2 * step, 2 * step + 1, self.proj.kept[0]

    def write(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, fresh: bool = False) -> None:
        """Store new moments (a no-op for plain moments already stored, unless ``fresh``)."""
        s = self.state
        if not self.quantized:
            if fresh or "exp_avg" not in s:
                dim = self.proj.kept_dim
                s["exp_avg"], s["exp_avg_sq"] = self._wrap(exp_avg, dim), self._wrap(exp_avg_sq, dim)
            return
        exp_avg, exp_avg_sq = self._to_kr(exp_avg), self._to_kr(exp_avg_sq)
        noise_m = noise_v = None
        noise = self._noise()
        if noise is not None:
            seed, step_m, step_v, offset = noise
            shape = tuple(exp_avg.shape)
            noise_m = hash_uniform(shape, offset, seed=seed, step=step_m, device=self.device)
            noise_v = hash_uniform(shape, offset, seed=seed, step=step_v, device=self.device)
        cm, am = quantize_blockwise(exp_avg, signed=True, block=self.block, noise=noise_m)
        cv, av = quantize_blockwise(exp_avg_sq.sqrt(), signed=False, block=self.block, noise=noise_v)
        s["exp_avg_codes"], s["exp_avg_absmax"] = self._wrap(cm), self._wrap(am)
        s["exp_avg_sq_codes"], s["exp_avg_sq_absmax"] = self._wrap(cv), self._wrap(av)

    def update(self, low: torch.Tensor, *, beta1: float, beta2: float, eps: float,
               bias_correction2_sqrt: float = 1.0, nesterov: bool = False) -> torch.Tensor:
        """The Adam moment update with the projected gradient ``low``, in place on the stored
        moments; returns the direction ``m~ / (sqrt(v) / bias_correction2_sqrt + eps)`` in the
        projector's layout, in the moments' dtype (the ops of :mod:`optimlib.kernels.adam`; 8-bit
        moments are dequantized, updated and requantized in the same pass)."""
        s = self.state
        hyper = dict(beta1=beta1, beta2=beta2, eps=eps, bias_correction2_sqrt=bias_correction2_sqrt,
                     nesterov=nesterov)
        if not self.quantized:
            return adam_lowrank_update_(to_local(s["exp_avg"]), to_local(s["exp_avg_sq"]), low, **hyper)
        direction = adam8bit_lowrank_update_(
            to_local(s["exp_avg_codes"]), to_local(s["exp_avg_absmax"]), to_local(s["exp_avg_sq_codes"]),
            to_local(s["exp_avg_sq_absmax"]), self._to_kr(low.to(self.dtype)), block=self.block, noise=self._noise(),
            **hyper)
        return self._to_kr(direction)

    def zeros(self, rank: int) -> torch.Tensor:
        return torch.zeros(self.proj.low_shape(rank), dtype=self.dtype, device=self.device)

    def init(self, rank: int) -> None:
        """Zero moments of rank ``rank``."""
        self.write(self.zeros(rank), self.zeros(rank), fresh=True)


class SMMFMoments:
    """SMMF-factorized low-rank moments (``inner="smmf"``), with :class:`LowRankMoments`' interface.

    The low-rank moments of a parameter form a ``(kept, r)`` matrix (kept-major: ``(m, r)`` for a
    right projection, the transpose of the ``(r, n)`` moments of a left one); this rank holds the
    contiguous rows ``kept`` of it, i.e. a contiguous piece of its flattening.  SMMF treats that
    matrix as any tensor: square-matricized (:func:`optimlib.optim.smmf.smmf_matrix_shape`), rank-1
    factors of ``|M|`` and ``V`` plus the packed sign bits of ``M``, row-sharded by
    :class:`optimlib.optim.smmf.SMMFLayout` (one all-reduce of the column sums per step; an edge
    exchange of one row when the pieces start mid-row).  State keys are SMMF's:
    ``exp_avg_row``/``exp_avg_col``/``exp_avg_sq_row``/``exp_avg_sq_col`` (float32) and
    ``exp_avg_sign`` (packed ``uint8``).  ``read``/``write`` decompress to and compress from the
    dense low-rank moments (used on basis refreshes only).
    """

    quantized = False

    def __init__(self, state: dict, projector: Projector, like: torch.Tensor, param):
        self.state, self.proj, self.param, self.device = state, projector, param, like.device

    def exists(self) -> bool:
        return "exp_avg_sq_row" in self.state

    @staticmethod
    def moments_layout(projector: Projector, rank: int) -> SMMFLayout:
        """SMMF's layout of the flattened ``(kept, rank)`` moments, this rank holding its kept rows."""
        numel = projector.kept_size * rank
        piece = dataclasses.replace(projector.block.piece, numel=numel,
                                    bounds=tuple((a * rank, b * rank) for a, b in projector.kept_bounds))
        return SMMFLayout(numel, piece)

    @classmethod
    def state_specs(cls, projector: Projector, rank: int, dtensor: bool) -> list[StateSpec]:
        """The declared factors of the moments of rank ``rank`` (:meth:`SMMFLayout.state_specs`)."""
        return cls.moments_layout(projector, rank).state_specs(momentum=True, dtensor=dtensor)

    def layout(self, rank: int) -> SMMFLayout:
        return self.moments_layout(self.proj, rank)

    def _flat(self, low: torch.Tensor) -> torch.Tensor:
        return low.reshape(-1) if self.proj.side == "right" else low.t().reshape(-1)

    def _unflat(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        kr = flat.view(self.proj.local_kept, rank)
        return kr if self.proj.side == "right" else kr.t()

    def init(self, rank: int) -> None:
        self.layout(rank).init_state(self.state, self.param, momentum=True, device=self.device)

    def zeros(self, rank: int) -> torch.Tensor:
        return torch.zeros(self.proj.low_shape(rank), dtype=torch.float32, device=self.device)

    def read(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rank = int(self.state["rank"]) if rank is None else rank
        m, v = self.layout(rank).read(self.state)
        return self._unflat(m, rank), self._unflat(v, rank)

    def write(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, fresh: bool = False) -> None:
        rank = exp_avg.shape[self.proj.rank_dim]
        self.layout(rank).write(self.state, self._flat(exp_avg), self._flat(exp_avg_sq), self.param)

    def update(self, low: torch.Tensor, *, beta1: float, beta2: float, eps: float) -> torch.Tensor:
        """SMMF's moment update with the projected gradient ``low`` (the op
        :func:`optimlib.kernels.smmf_update_`); returns ``M / (sqrt(V) + eps)`` in the projector's
        layout (float32)."""
        rank = low.shape[self.proj.rank_dim]
        update = self.layout(rank).update(self._flat(low), self.state, beta1=beta1, beta2=beta2, eps=eps)
        return self._unflat(update, rank)


def carry_moments(policy: str, moments, projector: Projector, old: dict, state: dict) -> None:
    """Carry the moments from the old basis (``old``) to the new one (in ``state``)."""
    r_old, r_new = int(old["rank"]), int(state["rank"])
    if policy == "reset":
        moments.init(r_new)
        state["moment_step"] = 0
        return
    if policy == "keep":
        if r_old == r_new:
            return
        m, v = moments.read(r_old)
        k = min(r_old, r_new)
        new_m, new_v = moments.zeros(r_new), moments.zeros(r_new)
        keep = (slice(None), slice(0, k)) if projector.rank_dim == 1 else (slice(0, k), slice(None))
        new_m[keep] = m[keep]
        new_v[keep] = v[keep]
        moments.write(new_m, new_v, fresh=True)
        return
    m, v = moments.read(r_old)
    o = projector.overlap(old, state, dtype=torch.float32, device=m.device)
    new_m = projector.transform(m.float(), o).to(m.dtype)
    new_v = projector.transform(v.float(), o * o).to(v.dtype)
    moments.write(new_m, new_v, fresh=True)
