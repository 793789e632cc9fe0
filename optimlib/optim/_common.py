"""What optimlib's optimizers share: their base class, argument validation and dtype-preserving
state loads.

:class:`OptimizerBase` is the ``torch.optim.Optimizer`` every optimlib optimizer derives from: it
validates each param group (at construction and in ``add_param_group``), runs the closure and
then one ``_step_group`` per group, walks the parameters that have a gradient (refusing sparse
gradients and checking shapes), and loads state dicts keeping the saved state dtypes.

Validation (issue #9): every optimizer checks its hyper-parameters at construction and raises
``TypeError`` for a value of the wrong type and ``ValueError`` for a value out of range
(negative, non-finite, unknown name), the message naming the argument and what it accepts::

    invalid lr=inf: accepted range is a finite number >= 0

and, at every step, that no parameter changed shape under its state (:func:`check_param_shape`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from optimlib.distributed.row_block import RowBlock

__all__ = ["OptimizerBase", "check_real", "check_betas", "check_int", "check_choice", "check_bool", "fail",
           "load_state_dict_keeping_dtypes", "check_param_shape", "write_rows_"]


def fail(name: str, value, accepted: str, kind: type = ValueError):
    raise kind(f"invalid {name}={value!r}: accepted range is {accepted}")


def _range_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, allow_tensor: bool = False) -> float:
    """A finite real number in the given range (bools are not numbers here); returns it as a float.

    ``allow_tensor``: also accept a one-element tensor (``torch.optim`` accepts a tensor ``lr``).
    """
    accepted = _range_text(low, high, low_open, high_open)
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            fail(name, value, f"{accepted} (a tensor must hold one element)")
        number = float(value.item())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, value, f"{accepted} (got a {type(value).__name__})", TypeError)
    else:
        number = float(value)
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        fail(name, value, accepted)
    return number


def check_betas(name: str, betas, count: int = 2) -> tuple[float, ...]:
    """``count`` numbers, each in ``[0, 1)``."""
    accepted = f"{count} numbers, each in [0, 1)"
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence):
        fail(name, betas, accepted, TypeError)
    if len(betas) != count:
        fail(name, betas, accepted)
    for b in betas:
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            fail(name, betas, accepted, TypeError)
        if not (math.isfinite(b) and 0.0 <= b < 1.0):
            fail(name, betas, accepted)
    return tuple(float(b) for b in betas)


def check_int(name: str, value, *, low: int | None = None, extra: str = "") -> int:
    """An integer (not a bool) ``>= low``; ``extra`` is appended to the accepted range."""
    accepted = (f"an integer >= {low}" if low is not None else "an integer") + extra
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, value, accepted, ValueError if isinstance(value, (float, str)) else TypeError)
    if low is not None and value < low:
        fail(name, value, accepted)
    return value


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        fail(name, value, "True or False")


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
        if current is None:
            continue
        for key, saved in saved_state.get(pid, {}).items():
            now = current.get(key)
            if isinstance(saved, torch.Tensor) and isinstance(now, torch.Tensor) and now.dtype != saved.dtype:
                current[key] = saved.to(device=now.device)


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
class OptimizerBase(torch.optim.Optimizer):
    """The base of optimlib's optimizers (``torch.optim.Optimizer`` with the shared plumbing).

    A subclass defines ``_validate_group(group)`` (raise naming the option; it also checks the
    constructor's ``defaults`` unless ``_validate_defaults`` is overridden) and
    ``_step_group(group_index, group)``, which updates the group's parameters, usually those of
    :meth:`params_with_grad`.  ``step(closure)`` evaluates the closure with gradients enabled,
    checks that a group carrying global ``"shapes"`` (see :func:`optimlib.optim.param_groups`) still
    has one shape per tensor -- DeepSpeed ZeRO flattens each group into one partition, so
    shape-aware optimizers need one parameter per group there -- and steps each group.
    """

    def __init__(self, params, defaults: dict):
        self._validate_defaults(defaults)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def _validate_defaults(self, defaults: dict) -> None:
        self._validate_group(defaults)

    def _step_group(self, group_index: int, group: dict) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    # torch casts floating state to the parameter's dtype on load: keep what was saved (packed
    # signs, int8 codes, float32 factors and moments, the float32 step).
    def load_state_dict(self, state_dict: dict) -> None:
        load_state_dict_keeping_dtypes(self, state_dict, super().load_state_dict)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimizer step over every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            shapes = group.get("shapes")
            if shapes is not None and group["params"] and len(shapes) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} has {len(group['params'])} tensors but {len(shapes)} shapes: under "
                    "DeepSpeed ZeRO shape-aware optimizers need one parameter per group "
                    "(optimlib.optim.param_groups(model, per_parameter_groups=True))")
            self._step_group(gi, group)
        return loss

    def check_grad(self, group_index: int, index: int, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Refuse a sparse gradient; check the parameter's shape against its state
        (:func:`check_param_shape`)."""
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        check_param_shape(self, group_index, index, param)

    def params_with_grad(self, group_index: int, group: dict) -> list[tuple[int, torch.Tensor]]:
        """``(index, parameter)`` of the group's parameters that have a gradient, checked (a list,
        not a generator: ``torch.compile`` cannot resume a graph break inside a generator)."""
        found = []
        for i, p in enumerate(group["params"]):
            if p.grad is not None:
                self.check_grad(group_index, i, p, p.grad)
                found.append((i, p))
        return found
