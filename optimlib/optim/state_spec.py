"""What an optimizer's state is, declared by the optimizer: one :class:`StateSpec` per state entry.

Every optimizer of the factory declares, next to its update rule, the state it keeps for one
parameter: each entry's key, its single-process shape (a function of the parameter's global shape
and the param group's options), its dtype, and how it lies across ranks:

``replicated``
    the same whole tensor on every rank (step counters, a basis held whole, SMMF's column factors);
``elementwise``
    shaped like the tensor the optimizer steps: the parameter, its FSDP2 shard (a DTensor sharded
    like the parameter), its slice of a DeepSpeed flat partition (Adam's moments);
``sharded``
    a global tensor of ``shape`` cut along dimension ``dim`` (a DTensor ``Shard(dim)`` under FSDP2;
    GaLore's low-rank moments and bases);
``per_rank``
    rows of a global tensor that each rank owns in its own, zero-padded slot (under FSDP2 a
    ``(world, most)`` DTensor, one row per rank; SMMF's row factors and packed signs): :class:`RankRows`.

The declarations are what the code outside the optimizers reads: the memory estimator sums
:attr:`StateSpec.local_numel` times the itemsize, the checkpoint converter turns ``per_rank``
entries into whole tensors and back with :class:`RankRows`, and a layer that changes its width remaps
the ``elementwise`` entries by their :attr:`StateSpec.transform` (:func:`replace_param`).  None of them names an optimizer
or a state key.

An :class:`~optimlib.optim._common.OptimizerBase` declares with its ``state_specs`` classmethod; any
other ``torch.optim.Optimizer`` class with :func:`declare_state` (as the factory does for
``torch.optim.AdamW``).  :func:`state_specs` reads either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from optimlib.distributed.row_block import FlatSlice, chunk_bounds
from optimlib.formats.bitpack import pack_bits, packed_numel, unpack_bits

__all__ = ["Placement", "RankRows", "StateSpec", "declare_state", "elementwise", "replace_param", "state_specs",
           "step_spec",
           "REPLICATED", "ELEMENTWISE", "SHARDED", "PER_RANK"]

REPLICATED, ELEMENTWISE, SHARDED, PER_RANK = "replicated", "elementwise", "sharded", "per_rank"
LAYOUTS = (REPLICATED, ELEMENTWISE, SHARDED, PER_RANK)


@dataclass(frozen=True)
class Placement:
    """A parameter as an optimizer is handed it on one rank.

    ``shape``: the parameter's global shape, or ``None`` for a flat buffer of several parameters
    (DeepSpeed ZeRO with several parameters per group: only element-wise state can be declared).
    ``piece``: where the local elements lie in the flattened parameter, every rank's bounds
    included (``None`` with ``shape=None``).  ``numel``: local elements, padding included.
    ``dtensor``: the parameter is an FSDP2 DTensor.
    """

    shape: tuple[int, ...] | None
    piece: FlatSlice | None
    numel: int
    dtensor: bool = False

    @classmethod
    def whole(cls, shape) -> "Placement":
        """The whole parameter, in one process."""
        numel = math.prod(shape)
        return cls(tuple(shape), FlatSlice.whole(numel), numel)

    @classmethod
    def fsdp2(cls, shape, world: int, rank: int = 0) -> "Placement":
        """Rank ``rank``'s ``Shard(0)`` of the parameter under FSDP2 on ``world`` ranks."""
        shape = tuple(shape)
        if world == 1:
            return cls.whole(shape)
        numel = math.prod(shape)
        rows = shape[0] if shape else 1
        per_row = numel // max(rows, 1)
        bounds = tuple((a * per_row, b * per_row) for a, b in chunk_bounds(rows, world))
        a, b = bounds[rank]
        return cls(shape, FlatSlice(numel, bounds, rank), b - a, True)


@dataclass(frozen=True)
class RankRows:
    """How a ``per_rank`` entry's whole tensor is divided: rank ``k`` owns ``owned[k]`` consecutive
    rows of ``width`` elements (the rows of all ranks, in rank order, make the whole tensor); with
    ``packed`` the elements are bits packed eight to a byte (:mod:`optimlib.formats.bitpack`), per rank."""

    owned: tuple[int, ...]
    width: int = 1
    packed: bool = False

    def numel(self, rows: int) -> int:
        """Elements of ``rows`` rows."""
        return packed_numel(rows * self.width) if self.packed else rows * self.width

    def slot_numel(self) -> int:
        """Elements of one slot: room for the rank owning the most rows."""
        return self.numel(max(self.owned))

    def whole_numel(self) -> int:
        return self.numel(sum(self.owned))

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The whole tensor from the ``(world, slot)`` slots."""
        if self.packed:
            bits = [unpack_bits(slots[k], rows * self.width) for k, rows in enumerate(self.owned)]
            return pack_bits(torch.cat(bits))
        return torch.cat([slots[k, :rows * self.width] for k, rows in enumerate(self.owned)])

    def scatter(self, whole: torch.Tensor) -> torch.Tensor:
        """The ``(world, slot)`` slots (zero-padded) from the whole tensor."""
        flat = unpack_bits(whole, sum(self.owned) * self.width) if self.packed else whole
        out = whole.new_zeros(len(self.owned), self.slot_numel())
        start = 0
        for k, rows in enumerate(self.owned):
            count = rows * self.width
            piece = flat[start:start + count]
            piece = pack_bits(piece) if self.packed else piece
            out[k, :piece.numel()] = piece
            start += count
        return out


@dataclass(frozen=True)
class StateSpec:
    """One state entry of one parameter.

    ``key``: its key in the parameter's state.  ``shape``: its single-process shape.  ``dtype``:
    ``None`` for the dtype of the tensor the optimizer steps, else that dtype.  ``layout``: one of
    ``replicated``, ``elementwise``, ``sharded``, ``per_rank`` (see the module docstring), with
    ``dim`` (``sharded``: the dimension cut across ranks) or ``rows`` (``per_rank``).
    ``local_numel``: elements this rank holds (FSDP2 slots and DeepSpeed padding included).
    ``component``: what it is, as memory breakdowns group entries (``moments``, ``basis``,
    ``factors``, ``sign``, ``step``, ...).  ``transform``: for an ``elementwise`` entry, how it
    follows a linear change of the parameter's coordinates (``linear``: like the parameter, a
    first moment; ``square``: like its elementwise square, a second moment; ``None``: it cannot).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    layout: str
    local_numel: int
    component: str = "moments"
    dim: int = 0
    rows: RankRows | None = None
    transform: str | None = None

    def local_bytes(self, stepped_dtype: torch.dtype) -> int:
        """Bytes this rank holds (``stepped_dtype``: the dtype of the tensor the optimizer steps)."""
        dtype = self.dtype or stepped_dtype
        return self.local_numel * torch.empty((), dtype=dtype).element_size()


def step_spec(key: str = "step") -> StateSpec:
    """A 0-d float32 step counter, replicated (torch's convention, every optimlib optimizer's)."""
    return StateSpec(key, (), torch.float32, REPLICATED, 1, "step")


def elementwise(key: str, place: Placement, *, transform: str | None, dtype: torch.dtype | None = None,
                component: str = "moments") -> StateSpec:
    """An entry shaped like the tensor the optimizer steps."""
    shape = place.shape if place.shape is not None else (place.numel,)
    return StateSpec(key, tuple(shape), dtype, ELEMENTWISE, place.numel, component, transform=transform)


Declaration = Callable[[Mapping, Placement, Mapping | None], list]
_DECLARED: dict[type, Declaration] = {}


def declare_state(optimizer_class: type, declaration: Declaration) -> Declaration:
    """Declare the state of ``optimizer_class`` (one not derived from ``OptimizerBase``):
    ``declaration(group, place, state)`` returns its :class:`StateSpec` s for one parameter."""
    _DECLARED[optimizer_class] = declaration
    return declaration


def state_specs(optimizer, group: Mapping, place: Placement, state: Mapping | None = None) -> list[StateSpec]:
    """The declared state of one parameter of ``optimizer`` (an instance or a class), placed as
    ``place``, in param group ``group``.  ``state``: the parameter's current (or saved) state, for
    what an optimizer decides as it runs (an adaptive rank); without it, the upper bound."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for klass in cls.__mro__:
        if klass in _DECLARED:
            return _DECLARED[klass](group, place, state)
        if "state_specs" in vars(klass):
            return cls.state_specs(group, place, state)
    raise ValueError(f"{cls.__name__} declares no optimizer state: define the classmethod "
                     f"state_specs(group, place, state) or call optimlib.optim.state_spec.declare_state")


def replace_param(optimizer, old: torch.Tensor, new: torch.Tensor,
                  maps: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> list[str]:
    """Put the whole (unsharded) parameter ``new`` where ``old`` is in ``optimizer``: its param
    groups, their recorded ``shapes`` and the rosters of an optimlib optimizer, and move ``old``'s
    state to it, each ``elementwise`` entry through ``maps[transform]`` (computed in float64, stored
    back in the entry's dtype; 0-d entries such as step counters are kept as they are).

    Returns the keys of the tensor entries that cannot follow (not declared ``elementwise`` with a
    transform in ``maps``, or an optimizer that declares no state); then the state is dropped and
    the parameter starts afresh."""
    for group in optimizer.param_groups:
        if any(q is old for q in group["params"]):
            if "shapes" in group:
                group["shapes"] = [tuple(new.shape) if q is old else s for q, s in zip(group["params"], group["shapes"])]
            group["params"] = [new if q is old else q for q in group["params"]]
    for _, roster in optimizer.__dict__.get("_rosters", ()):
        roster[:] = [new if q is old else q for q in roster]
    state = optimizer.state.pop(old, None)
    if not state:
        return []
    group = next(g for g in optimizer.param_groups if any(q is new for q in g["params"]))
    try:
        specs = {s.key: s for s in state_specs(optimizer, group, Placement.whole(old.shape), state)}
    except ValueError:
        specs = {}
    tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    stuck = [k for k in tensors if k not in specs or specs[k].layout != ELEMENTWISE or specs[k].transform not in maps]
    if stuck:
        return stuck
    for key in tensors:
        value = state[key]
        state[key] = maps[specs[key].transform](value.to(torch.float64)).to(dtype=value.dtype, device=value.device)
    optimizer.state[new] = state
    return []
