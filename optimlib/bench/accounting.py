"""Measured bytes: parameters, gradients and optimizer state, summed from the tensors themselves.

Nothing here is a formula.  Parameters and gradients are this rank's local tensors (the local
shard of an FSDP2 DTensor, DeepSpeed ZeRO-3's ``ds_tensor``).  Optimizer state is found by
walking ``optimizer.state``:

* tensors stored directly in a parameter's state dict (ours, torch's, clovaai's ``adamp``);
* tensors reached through Python objects kept in the state -- galore-torch's and
  pytorch_optimizer's ``state["projector"]`` objects hold the projection matrix as the attribute
  ``ortho_matrix``.  Such objects are walked through their ``__dict__`` (and through lists, tuples
  and dicts inside them), and every tensor found is counted and reported by its path
  (``GaLoreProjector.ortho_matrix``).

Activations: :func:`saved_activation_bytes` runs a forward pass under autograd's saved-tensor
hooks and sums the distinct storages autograd keeps for backward, parameters excluded.

Two totals are kept: ``tensor_bytes`` (``numel * element_size`` of each distinct tensor, what
:func:`optimlib.optimizer_state_bytes` reports for tensors stored directly) and ``storage_bytes``
(the bytes of the distinct storages those tensors keep alive).  They differ when a state tensor
is a view of a larger buffer -- galore-torch keeps ``Vh[:r]`` of the SVD, a view that keeps the
whole ``n x n`` factor alive -- and ``storage_bytes`` is the memory actually held.  Storages
shared with the parameters are not state and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optimlib.distributed.layout import to_local

__all__ = ["StateBytes", "state_bytes", "param_bytes", "grad_bytes", "saved_activation_bytes"]

_MAX_DEPTH = 6


def _local(t: torch.Tensor) -> torch.Tensor:
    return to_local(t)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.untyped_storage().data_ptr())


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (local shards under FSDP2 and ZeRO-3)."""
    total, seen = 0, set()
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = _local(p) if t is None else t
        if id(p) not in seen:
            seen.add(id(p))
            total += _nbytes(t)
    return total


def grad_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors this rank holds (``None`` gradients count 0)."""
    return sum(_nbytes(_local(p.grad)) for p in model.parameters() if p.grad is not None)


@dataclass
class StateBytes:
    """Optimizer-state bytes on this rank (see the module docstring)."""

    tensor_bytes: int = 0
    storage_bytes: int = 0
    object_bytes: int = 0
    """The part of ``storage_bytes`` reached through Python objects rather than the state dict."""
    object_paths: list[str] = field(default_factory=list)
    """Where those tensors were found, e.g. ``GaLoreProjector.ortho_matrix``."""
    num_tensors: int = 0

    @property
    def note(self) -> str:
        """A one-line explanation of how object-held tensors were counted (empty if none)."""
        if not self.object_paths:
            return ""
        views = ""
        if self.storage_bytes != self.tensor_bytes:
            views = (f"; views keep larger buffers alive: storages {self.storage_bytes:,} B vs "
                     f"tensor sizes {self.tensor_bytes:,} B")
        return f"counted tensors inside state objects ({', '.join(sorted(set(self.object_paths)))}){views}"

    def as_dict(self) -> dict:
        return {"tensor_bytes": self.tensor_bytes, "storage_bytes": self.storage_bytes,
                "object_bytes": self.object_bytes, "object_paths": sorted(set(self.object_paths)),
                "num_tensors": self.num_tensors, "note": self.note}


def state_bytes(optimizer: torch.optim.Optimizer, params=None) -> StateBytes:
    """Walk ``optimizer.state`` and count every tensor in it (see the module docstring).

    ``params``: tensors whose storages are not state (default: the optimizer's parameters).
    """
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    skip = {_storage_key(_local(p)) for p in params if isinstance(p, torch.Tensor)}
    out = StateBytes()
    tensors_seen: set = set()
    storages_seen: set = set()

    def visit(value, path: str, via_object: bool, depth: int, objects: set) -> None:
        if isinstance(value, torch.Tensor):
            t = _local(value)
            key = _storage_key(t)
            if key in skip:
                return
            tkey = (key, t.data_ptr() if t.device.type != "meta" else id(t), tuple(t.shape), t.dtype)
            if tkey not in tensors_seen:
                tensors_seen.add(tkey)
                out.tensor_bytes += _nbytes(t)
                out.num_tensors += 1
            if key not in storages_seen:
                storages_seen.add(key)
                size = _nbytes(t) if t.device.type == "meta" else t.untyped_storage().nbytes()
                out.storage_bytes += size
                if via_object:
                    out.object_bytes += size
            if via_object:
                out.object_paths.append(path)
            return
        if depth >= _MAX_DEPTH or value is None or isinstance(value, (str, bytes, int, float, bool, complex,
                                                                        torch.dtype, torch.device)):
            return
        if isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{path}[{k!r}]" if via_object else path, via_object, depth + 1, objects)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for v in value:
                visit(v, path, via_object, depth + 1, objects)
        elif hasattr(value, "__dict__") and id(value) not in objects:
            objects.add(id(value))
            for k, v in vars(value).items():
                visit(v, f"{type(value).__name__}.{k}", True, depth + 1, objects)

    for state in optimizer.state.values():
        for key, value in state.items():
            visit(value, str(key), False, 0, set())
    return out


def saved_activation_bytes(model: nn.Module, forward) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs (distinct storages; the model's
    parameters excluded).  ``forward`` builds the graph, e.g. ``lambda: loss_fn(model(x), y)``."""
    skip = {_storage_key(_local(p)) for p in model.parameters()}
    sizes: dict = {}

    def pack(t: torch.Tensor):
        t_local = _local(t)
        key = _storage_key(t_local)
        if key not in skip:
            size = _nbytes(t_local) if t_local.device.type == "meta" else t_local.untyped_storage().nbytes()
            sizes[key] = max(sizes.get(key, 0), size)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(sizes.values())
