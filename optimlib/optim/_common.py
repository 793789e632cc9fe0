"""What optimlib's optimizers share: their base class, the parameter units a step updates, and
dtype-preserving state loads.

:class:`OptimizerBase` is the ``torch.optim.Optimizer`` every optimlib optimizer derives from: it
validates each param group (at construction and in ``add_param_group``, with
:mod:`optimlib.validation`), records the group's parameters, runs the closure, turns each group's
parameters -- whatever wrapper holds them -- into :class:`ParamUnit` s for the rule, checks at every
step that no parameter changed shape under its state (:func:`check_param_shape`), and loads state
dicts keeping the saved state dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from optimlib.distributed.column_exchange import column_exchange
from optimlib.distributed.flat_partition import LayoutError, is_fsdp1_flat, map_flat_partition
from optimlib.distributed.layout import global_shape, is_dtensor, local_piece, rows_only, row_placements, to_local
from optimlib.distributed.row_block import FlatSlice, RowBlock
from optimlib.optim.layerwise import LayerwiseStepper
from optimlib.optim.migrate import convert_state_dict
from optimlib.validation import fail

__all__ = ["OptimizerBase", "ParamUnit", "load_state_dict_keeping_dtypes", "check_param_shape", "write_rows_"]


# ----------------------------------------------------------------------------- checkpoints
def load_state_dict_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict, load) -> None:
    """``load(state_dict)`` (``torch.optim.Optimizer.load_state_dict``), then give every state
    tensor back the dtype it was saved with.

    ``torch.optim`` casts every floating point parameter's state tensors (``step`` excepted) to the
    parameter's dtype -- packed sign bits, int8 codes, int32 indices and float32 factors included.
    optimlib's optimizers choose their state dtypes deliberately, so the saved dtype is restored
    (from the saved tensor itself: no precision is lost through the parameter's dtype).
    """
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    saved_state = state_dict["state"]
    load(state_dict)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        current = optimizer.state.get(p)
        if current is not None:
            _restore_dtypes(current, saved_state.get(pid, {}))


def _restore_dtypes(current: dict, saved: dict) -> None:
    for key, value in saved.items():
        now = current.get(key)
        if isinstance(value, dict) and isinstance(now, dict):  # one parameter of a flat partition
            _restore_dtypes(now, value)
        elif isinstance(value, torch.Tensor) and isinstance(now, torch.Tensor) and now.dtype != value.dtype:
            current[key] = value.to(device=now.device)


# ----------------------------------------------------------------------------- steps
_SHAPES = "_optimlib_param_shapes"


def check_param_shape(optimizer: torch.optim.Optimizer, group_index: int, param_index: int,
                      param: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``param`` no longer has the shape its optimizer state was made for.

    Every optimlib optimizer calls this for each parameter it steps, before touching the state.
    The shape is recorded the first time the parameter is stepped with empty state (when the state
    is created) and compared on every later step; replacing a parameter's ``.data`` by a tensor of
    another shape (model surgery, a resized embedding) would otherwise fail deep inside a matmul
    or a broadcast, or silently step a reshaped view.  Deleting the parameter's state
    (``del optimizer.state[param]``) re-arms it with the new shape.  The record lives on the
    optimizer object, not in its ``state_dict``, keyed weakly by the tensor (a freed parameter's
    ``id`` can be reused by the parameter a dynamic-rank layer swaps in).  Eager steps only: under
    ``torch.compile`` the check is skipped (dynamo guards the shapes and recompiles).
    """
    if torch.compiler.is_compiling():  # host bookkeeping; a compiled step is guarded on shapes anyway
        return
    shapes = optimizer.__dict__.get(_SHAPES)
    if shapes is None:  # keyed by the tensor itself, weakly: a freed parameter's id can be reused
        shapes = optimizer.__dict__[_SHAPES] = WeakIdKeyDictionary()
    shape = tuple(param.shape)
    if not optimizer.state.get(param):
        shapes[param] = shape
        return
    old = shapes.setdefault(param, shape)
    if old != shape:
        group = optimizer.param_groups[group_index]
        names = group.get("names")
        label = f" ({names[param_index]})" if names is not None and param_index < len(names) else ""
        raise ValueError(
            f"{type(optimizer).__name__}: param group {group_index}, parameter {param_index}{label} changed shape "
            f"from {old} to {shape} since its optimizer state was created; the state "
            f"({', '.join(sorted(optimizer.state[param]))}) no longer fits it.  Re-create the optimizer for the "
            f"new parameters, or remap optimizer.state[param] to the new shape (deleting it restarts that "
            f"parameter's state; a 'shapes' entry of its param group must then be updated too).")


def write_rows_(local: torch.Tensor, rows: torch.Tensor, block: RowBlock) -> None:
    """Write owned ``rows`` computed on a copy (:meth:`RowBlock.rows` of a non-contiguous tensor or
    of a DeepSpeed slice that starts mid-row) back into the rank's local piece ``local``; padding
    past the parameter's end (DeepSpeed aligns partitions) is left as it is."""
    piece = block.to_local(rows)
    if piece.numel() == local.numel():
        local.copy_(piece.view(local.shape))
    else:
        local.view(-1)[: piece.numel()].copy_(piece)


# ----------------------------------------------------------------------------- the base class
@dataclass
class ParamUnit:
    """One parameter as a step sees it, whatever holds it.

    ``index``: its position in the param group as built; ``name``: how errors name it;
    ``param``: what its element-wise state is shaped like (the parameter -- a DTensor under FSDP2 --
    or its slice of a DeepSpeed flat partition); ``local``/``grad``: the plain local tensors to read
    and update in place; ``shape``: the global shape; ``piece``: where ``local`` lies in the
    flattened parameter (:class:`~optimlib.distributed.FlatSlice`); ``state``: its state dict;
    ``finish``: what writes ``local`` back into the parameter after the step, when ``local`` is a
    copy laid out by rows (a DTensor sharded along its columns, see :meth:`OptimizerBase.param_unit`).
    """

    index: int
    name: str
    param: torch.Tensor
    local: torch.Tensor
    grad: torch.Tensor
    shape: tuple[int, ...]
    piece: FlatSlice
    state: dict
    finish: Callable[[], None] | None = None


class OptimizerBase(torch.optim.Optimizer):
    """The base of optimlib's optimizers (``torch.optim.Optimizer`` with the shared plumbing).

    A subclass defines ``_validate_group(group)`` (raise naming the option; it also checks the
    constructor's ``defaults`` unless ``_validate_defaults`` is overridden) and
    ``_step_units(group, units)``, which updates the units (:class:`ParamUnit`) of a group --
    all of those with gradients at :meth:`step`, one at :meth:`step_param`.

    Every param group records, when it is added, its parameters (the *roster*) and their global
    shapes (``group["shapes"]``, kept if given, e.g. by :func:`optimlib.optim.param_groups`).  When
    a wrapper later replaces ``group["params"]`` -- DeepSpeed ZeRO-1/2/3 hands the optimizer one
    flat partition per group, whatever the grouping -- :meth:`param_units` maps the partition back
    to the roster's parameters (:func:`optimlib.distributed.flat_partition.map_flat_partition`), so a
    shape-aware rule sees each parameter's rows; what cannot be mapped raises ``ValueError`` at the
    step, naming the optimizer, the parameter and the way out.  Under a flat partition that spans
    several parameters, each one's state is the sub-dict ``state[flat][index]``.
    """

    def __init__(self, params, defaults: dict):
        self._validate_defaults(defaults)
        self._rosters: list[tuple[dict, list[torch.Tensor]]] = []
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def _validate_defaults(self, defaults: dict) -> None:
        self._validate_group(defaults)

    def _step_units(self, group: dict, units: list[ParamUnit]) -> None:
        """Update ``units`` (parameters of ``group`` with gradients) by the optimizer's rule."""
        raise NotImplementedError

    def _step_group(self, group_index: int, group: dict) -> None:
        self._run_units(group, self.param_units(group_index, group))

    def _run_units(self, group: dict, units: list[ParamUnit]) -> None:
        self._step_units(group, units)
        for unit in units:
            if unit.finish is not None:
                unit.finish()

    def layerwise(self, accumulation_steps: int = 1) -> LayerwiseStepper:
        """Switch to layer-wise (optimizer-in-backward) stepping; see :class:`LayerwiseStepper`."""
        return LayerwiseStepper(self, accumulation_steps)

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Step one parameter now, with its param group's options and its own state -- the
        per-parameter step of optimizer-in-backward (:class:`optimlib.optim.layerwise.LayerwiseStepper`).
        ``param`` must be one of the optimizer's parameters and have a gradient."""
        for gi, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                if p is param:
                    self._seen_grad = True
                    self._run_units(group, [self.param_unit(gi, group, index, p)])
                    return
        raise ValueError(f"{type(self).__name__}.step_param: the tensor of shape {tuple(param.shape)} is not a "
                         "parameter of this optimizer")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = list(group["params"])
        shapes = group.get("shapes")
        if shapes is None:
            group["shapes"] = [global_shape(p) for p in params]
        elif len(shapes) != len(params):
            fail("shapes", shapes, f"one global shape per parameter of the group ({len(params)})")
        self._rosters.append((group, params))
        self._validate_group(group)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, and:

        * a state dict written by a peer this optimizer replaces (``adamp``, ``galore_torch``,
          ``pytorch_optimizer``) is converted first (:func:`optimlib.optim.migrate.convert_state_dict`);
        * a param-group key the saved group lacks (an older version's state dict) takes this
          optimizer's value for that group -- the constructor's default unless the group was built
          with its own -- as torch fills group keys added since a state dict was written;
        * every state tensor keeps the dtype it was saved with (torch casts floating state to the
          parameter's dtype: packed signs, int8 codes, float32 factors and moments, the float32 step).
        """
        state_dict = convert_state_dict(state_dict, self)
        current = self.param_groups
        saved = state_dict["param_groups"]
        if len(saved) == len(current):  # (torch refuses a different count, naming it)
            saved = [{**group, **{k: v for k, v in now.items() if k != "params" and k not in group}}
                     for group, now in zip(saved, current)]
            state_dict = {**state_dict, "param_groups": saved}
        load_state_dict_keeping_dtypes(self, state_dict, super().load_state_dict)
        # torch replaces the group dicts: the rosters follow them by position.
        self._rosters = [(group, roster) for group, (_, roster) in zip(self.param_groups, self._rosters)]

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimizer step over every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.__dict__.get("_seen_grad") and not torch.compiler.is_compiling():
            self._check_gradients_arrive()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group)
        return loss

    def _check_gradients_arrive(self) -> None:
        """Until a gradient has been seen: refuse a step on which none of the trainable parameters
        the optimizer was built with has one -- they were replaced behind its back (``fully_shard``
        or another wrapper that re-creates parameters, applied after the optimizer was built), and
        stepping them would silently train nothing."""
        rosters = [(group, roster) for group, roster in self.__dict__.get("_rosters", ())
                   if any(group is g for g in self.param_groups)]
        if any(len(g["params"]) != len(r) or any(p is not q for p, q in zip(g["params"], r)) for g, r in rosters):
            return  # a wrapper (DeepSpeed) stepping flat partitions: they carry the gradients
        trainable = [(pos, g, i, p) for pos, (g, r) in enumerate(rosters) for i, p in enumerate(r) if p.requires_grad]
        if not trainable or any(p.grad is not None for *_, p in trainable):
            self._seen_grad = True
            return
        names = [self.param_label(g, pos, i) for pos, g, i, _ in trainable]
        listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(
            f"{type(self).__name__}: step() found no gradient on any of the {len(names)} trainable parameters it "
            f"was built with ({listed}).  If the model was wrapped after the optimizer was built (fully_shard "
            "and other wrappers re-create the parameters), the optimizer holds parameters that no longer "
            "train: build the optimizer after wrapping.  Otherwise call step() after backward()")

    def check_grad(self, group_index: int, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Refuse a sparse gradient and a complex parameter (``TypeError`` naming it); check the
        parameter's shape against its state (:func:`check_param_shape`)."""
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if param.is_complex() or grad.is_complex():
            # Shape-aware rules (channel views, projections, matricization) are not defined on
            # complex matrices, and torch.view_as_real would change the shape they see.
            group = self.param_groups[group_index]
            name = self.param_label(group, self._roster(group)[0], index)
            raise TypeError(f"{type(self).__name__}: parameter {name} is complex ({param.dtype}); optimlib's "
                            "optimizers step real parameters only.  Keep the parameter real (e.g. store "
                            "torch.view_as_real(weight) and rebuild it with torch.view_as_complex in forward)")
        check_param_shape(self, group_index, index, param)

    # ------------------------------------------------------------------ what a step updates
    def _roster(self, group: dict) -> tuple[int, list[torch.Tensor]]:
        for position, (known, roster) in enumerate(self.__dict__.get("_rosters", ())):
            if known is group:
                return position, roster
        return -1, list(group["params"])

    @staticmethod
    def param_label(group: dict, position: int, index: int) -> str:
        """How a parameter is named: its ``names``/``param_names`` entry, else its position."""
        for key in ("names", "param_names"):
            names = group.get(key)
            if names is not None and index < len(names) and names[index] is not None:
                return str(names[index])
        return f"group{position}.param{index}"

    def param_unit(self, group_index: int, group: dict, index: int, p: torch.Tensor) -> ParamUnit:
        """The unit of parameter ``p``, ``group["params"][index]`` (it has a gradient), checked."""
        self.check_grad(group_index, index, p, p.grad)
        position, roster = self._roster(group)
        name = self.param_label(group, position, index)
        if is_fsdp1_flat(p):
            raise ValueError(
                f"{type(self).__name__}: parameter {name} is an FSDP1 flat parameter (FullyShardedDataParallel), "
                "whose shards do not keep the parameter's shape, so a shape-aware step cannot be placed "
                "on it.  Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) and build the "
                "optimizer after sharding, or use DeepSpeed ZeRO")
        shape = global_shape(p, group, index)
        if is_dtensor(p) and not rows_only(p.placements):
            return self._row_unit(index, name, p, shape)
        local, piece = local_piece(p, shape)
        return ParamUnit(index, name, p, local, to_local(p.grad), shape, piece, self.state[p])

    def _row_unit(self, index: int, name: str, p: torch.Tensor, shape: tuple[int, ...]) -> ParamUnit:
        """The unit of a DTensor sharded along other dimensions than its rows (tensor parallel
        row-wise: ``Shard(1)``): the parameter and its gradient moved so that the same ranks hold
        whole rows (:func:`~optimlib.distributed.layout.row_placements`), stepped there -- its state
        is laid out by rows too -- and moved back.  A matrix whose columns one mesh dimension
        shards moves by one all-to-all each way (:mod:`optimlib.distributed.column_exchange`: each
        rank sends ``(T - 1) / T`` of its block, ``T`` ranks sharing the columns); other layouts
        by DTensor's ``redistribute``.  No rank holds more than its share of the parameter."""
        from torch.distributed.tensor import DTensor

        mesh = p.device_mesh
        try:
            target = row_placements(p.placements)
        except NotImplementedError as err:
            raise NotImplementedError(f"{type(self).__name__}: parameter {name}: {err}") from None
        grad = p.grad if tuple(p.grad.placements) == tuple(p.placements) else p.grad.redistribute(mesh, p.placements)
        exchange = column_exchange(tuple(p.shape), mesh, p.placements, target)
        if exchange is not None:
            local, grad_local = exchange.to_rows(p._local_tensor), exchange.to_rows(grad._local_tensor)
        else:
            local = p.detach().redistribute(mesh, target).to_local().contiguous()
            grad_local = grad.redistribute(mesh, target).to_local().contiguous()
        rows = DTensor.from_local(local, mesh, target, run_check=False, shape=p.shape, stride=p.stride())
        local, piece = local_piece(rows, shape)

        def write_back() -> None:
            if exchange is not None:
                p._local_tensor.copy_(exchange.to_columns(local))
            else:
                p._local_tensor.copy_(rows.redistribute(mesh, p.placements).to_local())

        return ParamUnit(index, name, rows, local, grad_local, shape, piece, self.state[p], write_back)

    def param_units(self, group_index: int, group: dict) -> list[ParamUnit]:
        """The units of the group's parameters that have a gradient (a list: ``torch.compile``
        cannot resume a graph break inside a generator)."""
        params = group["params"]
        position, roster = self._roster(group)
        if position >= 0 and self._adopt_resharded(position, group, roster):
            roster = group["params"]
        if len(params) == len(roster) and all(p is q for p, q in zip(params, roster)):
            return [self.param_unit(group_index, group, i, p) for i, p in enumerate(params) if p.grad is not None]
        return [unit for flat in params if flat.grad is not None
                for unit in self._flat_units(group_index, group, position, roster, flat)]

    def _adopt_resharded(self, position: int, group: dict, roster: list[torch.Tensor]) -> bool:
        """accelerate's FSDP2 preparation swaps each parameter of an optimizer built before
        ``fully_shard`` for its sharded DTensor, one for one.  When every swapped tensor is a
        DTensor of the recorded global shape, adopt the new parameters (moving any state)."""
        params = group["params"]
        if len(params) != len(roster) or all(p is q for p, q in zip(params, roster)):
            return False
        for i, (p, q) in enumerate(zip(params, roster)):
            if p is not q and not (is_dtensor(p) and tuple(p.shape) == tuple(group["shapes"][i])):
                return False
        for p, q in zip(params, roster):
            if p is not q and q in self.state:
                self.state[p] = self.state.pop(q)
        self._rosters[position] = (group, list(params))
        return True

    def _flat_units(self, group_index: int, group: dict, position: int, roster: list[torch.Tensor],
                    flat: torch.Tensor) -> list[ParamUnit]:
        """The units of a flat partition that replaced the group's parameters (DeepSpeed ZeRO)."""
        self.check_grad(group_index, 0, flat, flat.grad)
        labels = [self.param_label(group, position, i) for i in range(len(roster))]
        cache = self.__dict__.setdefault("_flat_segments", WeakIdKeyDictionary())
        segments = cache.get(flat)
        if segments is None:
            try:
                segments = map_flat_partition(flat, roster, labels, group["shapes"])
            except LayoutError as err:
                raise ValueError(f"{type(self).__name__}, param group {position}: {err}") from None
            cache[flat] = segments
        grad = flat.grad
        if len(segments) == 1 and segments[0].start == 0:  # the partition is one parameter's
            seg = segments[0]
            return [ParamUnit(seg.index, labels[seg.index], flat, flat, grad, tuple(group["shapes"][seg.index]),
                              seg.piece, self.state[flat])]
        state = self.state[flat]
        return [ParamUnit(seg.index, labels[seg.index], flat[seg.start:seg.stop], flat[seg.start:seg.stop],
                          grad[seg.start:seg.stop], tuple(group["shapes"][seg.index]), seg.piece,
                          state.setdefault(seg.index, {}))
                for seg in segments]
