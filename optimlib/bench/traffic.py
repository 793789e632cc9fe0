"""An optimizer step's memory-traffic floor, and the bandwidth that turns it into a time.

An optimizer step on large tensors is bound by memory traffic: its floor is the bytes it must
read and write at least once.  For one parameter of ``N`` elements that is

* the gradient, read once: ``N * g`` bytes;
* the parameter, read and written once: ``2 N * p`` bytes;
* every state entry the optimizer declares (:mod:`optimlib.optim.state_spec`), read and written
  once: twice its declared bytes (AdamW's two moments, SMMF's packed signs and factors, GaLore's
  low-rank moments and basis);
* the parameter-sized tensors its rule must read a second time because a statistic of the whole
  tensor decides the update (``second_pass_reads``, declared by the optimizer next to its rule:
  AdamP's cosines read the weight and the update again): ``k N * p`` bytes for a matrix.

So fp32 AdamW moves 28 bytes per parameter, AdamP 36, SMMF 12.25 (plus its ``O(sqrt N)``
factors), GaLore ``12 + 16 r / m`` plus its basis.  :func:`traffic_floor` sums it over an
optimizer's parameters; :func:`copy_bandwidth` measures the bytes per second a large ``copy_``
achieves on the same device and threads, so ``floor / bandwidth`` is the fastest the step could
run there and ``(floor / bandwidth) / measured`` the fraction of that bound a step reaches.
"""

from __future__ import annotations

import time

import torch

from optimlib.optim.state_spec import Placement, state_specs

__all__ = ["traffic_floor", "copy_bandwidth", "second_pass_reads"]


def second_pass_reads(optimizer, group: dict) -> int:
    """Parameter-sized reads the rule of ``optimizer`` adds per matrix and step (0 if undeclared)."""
    declared = getattr(type(optimizer), "second_pass_reads", None)
    return int(declared(group)) if callable(declared) else 0


def traffic_floor(optimizer: torch.optim.Optimizer) -> int:
    """Bytes one step of ``optimizer`` (one process, whole parameters) must move at least (see the
    module docstring); raises ``ValueError`` if the optimizer declares no state."""
    total = 0
    for group in optimizer.param_groups:
        extra = second_pass_reads(optimizer, group)
        shapes = group.get("shapes") or [None] * len(group["params"])
        for p, shape in zip(group["params"], shapes):
            shape = tuple(shape) if shape is not None else tuple(p.shape)
            size = p.element_size()
            n = p.numel()
            total += 3 * n * size + (extra * n * size if len(shape) >= 2 else 0)
            for spec in state_specs(optimizer, group, Placement.whole(shape)):
                total += 2 * spec.local_bytes(p.dtype)
    return total


def copy_bandwidth(device: torch.device | str = "cpu", numel: int = 1 << 26, reps: int = 5) -> float:
    """Bytes per second that ``dst.copy_(src)`` moves (read plus write) on float32 tensors of
    ``numel`` elements (256 MiB by default: beyond any cache), the median of ``reps`` calls."""
    device = torch.device(device)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(reps + 1):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return 2 * numel * src.element_size() / times[len(times) // 2]
