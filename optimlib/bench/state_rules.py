"""Closed-form optimizer-state bytes, one rule per registered optimizer.

A rule receives one :class:`OptimizerTensor` -- a tensor exactly as the optimizer is handed it on
one rank (a whole parameter, an FSDP2 shard, a DeepSpeed flat partition) with its param group --
and returns the bytes of the state the optimizer keeps for it, by component (``moments``,
``basis``, ``factors``, ``sign``, ``step``, ...).  Rules are formulas; the shapes they need come
from the same helpers the optimizers use (:class:`optimlib.optim.galore.projection.Projector` for the
GaLore geometry, :class:`optimlib.optim.smmf.SMMFLayout` for SMMF's square matricization), so
the rule and the optimizer cannot disagree on a shape.  ``tests/bench/test_estimate.py`` checks
every rule against the measured state of every registered optimizer.

Register a rule for a new optimizer with :func:`register_state_rule`; the estimator raises a
``ValueError`` naming an optimizer without one.

Python ints in the state (GaLore's ``step``, ``rank``, ``seed``, ``basis_seed``) cost no tensor
memory and are not counted; 0-d step tensors are (4 bytes each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from optimlib.distributed.row_block import FlatSlice, RowBlock
from optimlib.formats.bitpack import packed_numel

__all__ = ["OptimizerTensor", "StateRule", "register_state_rule", "get_state_rule", "list_state_rules"]

STEP_TENSOR = 4        # a 0-d float32 step counter


@dataclass(frozen=True)
class OptimizerTensor:
    """One tensor as an optimizer holds it on one rank.

    ``shape``: the global shape of the parameter behind it, or ``None`` for a flat buffer of a
    whole param group (DeepSpeed ZeRO with several parameters per group: an element-wise
    optimizer cannot tell them apart).  ``piece``: where the local elements lie in the flattened
    parameter (``None`` with ``shape=None``).  ``numel``: elements of the local tensor, padding
    included.  ``dtype``: its dtype (and its gradient's).  ``dtensor``: an FSDP2 DTensor.
    ``group``: the resolved param group (every option, defaults included).
    """

    shape: tuple[int, ...] | None
    piece: FlatSlice | None
    numel: int
    dtype: torch.dtype
    dtensor: bool
    group: Mapping

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


StateRule = Callable[[OptimizerTensor], dict]
_RULES: dict[str, StateRule] = {}


def register_state_rule(name: str, rule: StateRule) -> StateRule:
    """Register ``rule`` for the registered optimizer ``name`` (replaces an earlier one)."""
    _RULES[name.lower()] = rule
    return rule


def get_state_rule(name: str) -> StateRule:
    try:
        return _RULES[name.lower()]
    except KeyError:
        raise ValueError(f"no memory rule for optimizer {name!r}: register one with "
                         f"optimlib.bench.register_state_rule (rules exist for {', '.join(sorted(_RULES))})") from None


def list_state_rules() -> list[str]:
    return sorted(_RULES)


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------- element-wise rules
def torch_adamw_rule(t: OptimizerTensor) -> dict:
    """``torch.optim.AdamW``: ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad) like the
    tensor, and a 0-d float32 ``step``."""
    moments = (3 if t.group.get("amsgrad") else 2) * t.numel * t.itemsize
    return {"moments": moments, "step": STEP_TENSOR}


def adamp_rule(t: OptimizerTensor) -> dict:
    """AdamP: two moments like the tensor and a 0-d float32 ``step``."""
    return {"moments": 2 * t.numel * t.itemsize, "step": STEP_TENSOR}


def sgdp_rule(t: OptimizerTensor) -> dict:
    """SGDP: a momentum buffer like the tensor (only with ``momentum != 0``) and a 0-d ``step``."""
    buf = t.numel * t.itemsize if t.group.get("momentum", 0) != 0 else 0
    return {"momentum": buf, "step": STEP_TENSOR}


# ----------------------------------------------------------------------------- SMMF
def smmf_factor_bytes(numel: int, piece: FlatSlice, *, momentum: bool, dtensor: bool) -> dict:
    """SMMF's factors for a tensor of ``numel`` elements of which this rank holds ``piece``.

    Square matricization ``(rows, cols)`` (:class:`optimlib.optim.smmf.SMMFLayout`, padding
    included); per moment a float32 row factor over the rank's owned rows and a float32 column
    factor over all ``cols`` (replicated); the first moment's sign as packed bits of the owned
    ``rows x cols`` block.  Under FSDP2 the row factors and signs sit in one slot per rank sized
    for the rank owning the most rows.
    """
    from optimlib.optim.smmf import SMMFLayout

    layout = SMMFLayout(numel, piece)
    rows = layout.block.num_rows
    if dtensor:
        rows = max(e - s for s, e in layout.block.owned_rows)
    moments = 2 if momentum else 1
    out = {"factors": moments * (rows + layout.cols) * 4}
    if momentum:
        out["sign"] = packed_numel(rows * layout.cols)
    return out


def smmf_rule(t: OptimizerTensor) -> dict:
    """SMMF: a 0-d float32 ``step``, rank-1 factors and a 1-bit sign (:func:`smmf_factor_bytes`);
    with ``vector_reshape=False`` 0-/1-D tensors keep full float32 moments instead."""
    g = t.group
    if t.shape is None:
        raise ValueError("SMMF needs the parameter's shape (one parameter per param group under DeepSpeed)")
    numel = math.prod(t.shape)
    if numel == 0:
        return {}
    momentum = g.get("beta", 0.9) is not None
    if not (len(t.shape) >= 2 or g.get("vector_reshape", True)):
        return {"moments": (2 if momentum else 1) * t.numel * 4, "step": STEP_TENSOR}
    return {**smmf_factor_bytes(numel, t.piece, momentum=momentum, dtensor=t.dtensor), "step": STEP_TENSOR}


# ----------------------------------------------------------------------------- GaLore family
def _lowrank_moments(t: OptimizerTensor, projector, rank: int) -> dict:
    """The two low-rank moments of a projected parameter, by its group's inner rule."""
    g = t.group
    inner = g.get("inner", "adamw") or "adamw"
    kept = projector.local_kept
    if inner == "smmf":
        numel = projector.kept_size * rank
        bounds = tuple((a * rank, b * rank) for a, b in projector.kept_bounds)
        piece = FlatSlice(numel, bounds, projector.block.piece.rank, None)
        return smmf_factor_bytes(numel, piece, momentum=True, dtensor=t.dtensor)
    kind = g.get("moments_dtype")
    if kind == "int8":
        blocks = -(-rank // int(g.get("quant_block", 256)))
        return {"moments": 2 * kept * rank, "absmax": 2 * kept * blocks * 4}
    size = t.itemsize if kind in (None, "int8") else _size(getattr(torch, kind))
    return {"moments": 2 * kept * rank * size}


def _basis_bytes(t: OptimizerTensor, projector, rank: int) -> int:
    """The stored basis: svd/randomized a matrix, dct ``rank`` int32 indices, random only a seed."""
    if projector.kind == "dct":
        return rank * 4
    if projector.kind == "random":
        return 0
    bd = t.group.get("basis_dtype")
    size = _size(getattr(torch, bd)) if bd else t.itemsize
    if projector.side == "right":
        if projector.shard_right:
            a, b = projector.basis_cols[projector.block.piece.rank]
            return rank * (b - a) * size
        return rank * projector.n * size
    return projector.block.num_rows * rank * size


def _dense_inner(t: OptimizerTensor) -> dict:
    """State of a parameter outside the low-rank groups, by the group's inner rule (GaLore keeps
    its step counters as ints, so no step tensor)."""
    inner = t.group.get("inner", "adamw") or "adamw"
    if inner == "smmf":
        out = smmf_rule(t)
        out.pop("step", None)
        return out
    return {"moments": 2 * t.numel * t.itemsize}      # galore-torch's AdamW, or AdamP's moments


def galore_rule(t: OptimizerTensor) -> dict:
    """GaLore (any inner rule): per projected parameter the low-rank moments (``kept x r``: the
    larger side for ``proj_type="std"``, this rank's share of it) and the basis; other parameters
    get the inner rule's state on the whole tensor.  An adaptive rank (``rank="auto"`` or
    ``energy``) is counted at its cap, an upper bound."""
    from optimlib.optim.galore.bases import matrix_shape
    from optimlib.optim.galore.projection import ProjectionConfig, Projector

    g = t.group
    if g.get("rank") is None or t.shape is None or len(t.shape) < 2:
        return _dense_inner(t)
    projector = Projector(ProjectionConfig.from_group(g), RowBlock(matrix_shape(t.shape), t.piece))
    rank = projector.max_rank
    out = _lowrank_moments(t, projector, rank)
    out["basis"] = _basis_bytes(t, projector, rank)
    return out


for _name, _rule in (("adamw", torch_adamw_rule), ("adamp", adamp_rule), ("sgdp", sgdp_rule),
                     ("smmf", smmf_rule), ("galore_adamw", galore_rule), ("galore_adamp", galore_rule),
                     ("galore_smmf", galore_rule)):
    register_state_rule(_name, _rule)
