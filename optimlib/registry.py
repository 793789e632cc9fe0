"""A name -> spec registry, the one behind the optimizer factory and the reparameterizations.

Names are case-insensitive (stored lower-case); registering a name twice is an error, and an
unknown name is an error that lists the known ones::

    ValueError: unknown optimizer 'adamx'; known: adamp, adamw, galore_adamw, ...
"""

from __future__ import annotations

from typing import Generic, TypeVar

Spec = TypeVar("Spec")


class Registry(Generic[Spec]):
    """Specs of one ``kind`` ("optimizer", "reparameterization") by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, Spec] = {}

    def add(self, name: str, spec: Spec) -> Spec:
        key = name.lower()
        if key in self._specs:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._specs[key] = spec
        return spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> Spec:
        spec = self._specs.get(name.lower()) if isinstance(name, str) else None
        if spec is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return spec
