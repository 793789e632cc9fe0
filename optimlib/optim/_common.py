"""Helpers shared by optimlib's optimizers: argument validation and dtype-preserving state loads.

Validation (issue #9): every optimizer checks its hyper-parameters at construction and raises
``TypeError`` for a value of the wrong type and ``ValueError`` for a value out of range
(negative, non-finite, unknown name), the message naming the argument and what it accepts::

    invalid lr=inf: accepted range is a finite number >= 0
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = ["check_real", "check_betas", "check_int", "check_choice", "check_bool", "fail",
           "load_state_dict_keeping_dtypes"]


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
