"""Argument validation, one style for the whole library: a value of the wrong type raises
``TypeError``, a value out of range (negative, non-finite, unknown name) ``ValueError``, the message
naming the argument and what it accepts::

    invalid lr=inf: accepted range is a finite number >= 0

Part of the bottom layer: imports nothing else of optimlib.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

__all__ = ["fail", "check_real", "check_betas", "check_int", "check_choice", "check_fraction"]


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


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) in ``[low, high]`` (either bound optional); returns it as an int."""
    accepted = ("an integer" + (f" >= {low}" if low is not None and high is None else "")
                + (f" in [{low}, {high}]" if low is not None and high is not None else "")
                + (f" <= {high}" if high is not None and low is None else ""))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, value, accepted, ValueError if isinstance(value, (float, str)) else TypeError)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        fail(name, value, accepted)
    return value


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def check_fraction(name: str, value, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """``value`` as a float in ``(0, 1]`` (``[0, 1]`` with ``allow_zero``, ``(0, 1)`` without
    ``allow_one``); ``ValueError`` naming ``name`` otherwise."""
    return check_real(name, value, low=0.0, high=1.0, low_open=not allow_zero, high_open=not allow_one)
