"""Helpers shared by the factorized-weight layers (SLTrain, LOST, dynamic rank).

The exact rounding rule for "a fraction of the entries", per-layer random generators, the dense
``nn.Linear`` that ``merged()`` returns, and the placement of a layer's parameters under tensor
parallelism (:class:`TensorParallelFactors`).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn


def count_of(fraction: float, total: int) -> int:
    """``floor(fraction * total)`` computed exactly on the decimal the user wrote.

    ``fraction`` is read through its shortest ``repr`` (``0.03`` is 3/100, not the binary
    float just below it), so ``count_of(0.05, 2000) == 100`` and never 99.
    """
    return math.floor(Fraction(repr(float(fraction))) * total)


def layer_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator for one layer's random choices, and its seed.

    ``seed=None`` draws the seed from PyTorch's global generator, so a run seeded with
    ``torch.manual_seed`` builds the same layers on every rank (the loop seeds before it builds
    and reparameterizes the model).
    """
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen, int(seed)


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` (d_out, d_in) and ``bias`` (copied, detached)."""
    d_out, d_in = weight.shape
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear


class TensorParallelFactors:
    """Mixin of a factorized ``nn.Module`` layer with a tensor-parallel form.

    ``TP_SHARDED`` maps each style to the parameters split in it and their dimension
    (``{"colwise": {"B": 0, "bias": 0}, "rowwise": {"A": 1}}``); every other parameter is
    replicated over the mesh.  :meth:`parallelize` makes the parameters DTensors accordingly, except
    the layer's ``replicated_parameters``, which stay plain tensors (the engines keep them whole on
    every rank, :mod:`optimlib.distributed.replicated`); the layer's forward then computes on local
    tensors (``tp_style`` says which way).
    """

    TP_SHARDED: dict[str, dict[str, int]] = {}
    tp_style: str | None = None
    tp_mesh = None

    def parallelize(self, tp_mesh, style: str):
        """Make this layer tensor parallel over the 1-D ``tp_mesh`` (in place, before FSDP2 shards
        it): ``"colwise"`` splits the output features, ``"rowwise"`` the input features, each of
        which must divide evenly over the mesh."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        if self.tp_style is not None:
            raise RuntimeError(f"this {type(self).__name__} is already tensor parallel ({self.tp_style})")
        if style not in self.TP_SHARDED:
            raise ValueError(f"style must be 'colwise' or 'rowwise', got {style!r}")
        features = self.out_features if style == "colwise" else self.in_features
        if features % tp_mesh.size():
            side = "output" if style == "colwise" else "input"
            raise ValueError(f"{style} tensor parallelism over {tp_mesh.size()} ranks needs the "
                             f"{type(self).__name__}'s {side} features ({features}) to divide evenly")
        for name, param in list(self.named_parameters(recurse=False)):
            if name in getattr(self, "replicated_parameters", ()):
                continue
            dim = self.TP_SHARDED[style].get(name)
            placement = Replicate() if dim is None else Shard(dim)
            setattr(self, name, nn.Parameter(distribute_tensor(param.data, tp_mesh, [placement]),
                                             requires_grad=param.requires_grad))
        self.tp_style, self.tp_mesh = style, tp_mesh
        return self

    def tp_block(self) -> tuple[int, int]:
        """``(start, stop)`` of this rank's output (column-wise) or input (row-wise) features."""
        features = self.out_features if self.tp_style == "colwise" else self.in_features
        size = features // self.tp_mesh.size()
        start = self.tp_mesh.get_local_rank() * size
        return start, start + size

    def block_selection(self, buffer: torch.Tensor, select):
        """``select()``: this rank's share of the fixed index ``buffer`` (a support, kept channels),
        computed once and kept while the buffer is unchanged (a loaded state dict changes it)."""
        key = (buffer.data_ptr(), buffer._version)
        cached = self.__dict__.get("_tp_selection")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_tp_selection"] = (key, select())
        return cached[1]

    def whole(self, name: str) -> torch.Tensor | None:
        """Parameter ``name`` whole (gathered over the tensor-parallel mesh when distributed)."""
        tensor = getattr(self, name)
        return tensor.full_tensor() if self.tp_style is not None and tensor is not None else tensor
