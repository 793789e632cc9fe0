"""LOST: low-rank plus channel-wise sparse weights, initialised from the weight's SVD.

Li, Yin, Shen, Xu, Xu, Huang, Wang, Liu, Wang, *LOST: Low-rank and Sparse Pre-training for
Large Language Models*, arXiv 2508.02668 (2025).  The authors' code was not available to us;
this is the construction of the abstract and the reviews (see the reference notes, §2), with
every open detail stated below.

Construction, for a linear layer with initial weight ``W0`` of shape ``(d_out, d_in)``::

    U, Σ, Vᵀ = svd(W0)                                       (once, at conversion)
    B = U[:, :r] Σ[:r]^½     A = Σ[:r]^½ Vᵀ[:r]                 low-rank part: top-r triplets
    W_comp = U[:, r:] Σ[r:] Vᵀ[r:]  (= W0 - B A)                the residual spectrum
    I = the k input channels with the largest ‖W_comp[:, j]‖₂  (k = floor(density · d_in))
    W_s = W_comp[:, I]                                        (d_out, k), dense, trainable
    y = γ · act(x Aᵀ) Bᵀ + (1 - γ) · x[..., I] W_sᵀ + bias

``A``, ``B`` and ``W_s`` train; ``I`` is fixed for the run (an index buffer, replicated under
FSDP2 / ZeRO; ``W_s`` shards by rows like any parameter).

Choices where the paper leaves the detail open:

* the singular values are split evenly between the factors (``Σ^½`` on each side);
* γ multiplies the branches and is *not* compensated in the init: the function at conversion
  is ``γ · (top-r part of W0) + (1 - γ) · (W_comp restricted to the channels I)``, so the sparse
  branch starts small and γ also acts as a per-branch step-size ratio (default ``gamma=0.9``,
  the value the reviews quote for the paper's 130M run);
* the channel score is the column L2 norm of the residual (``score="l2"``, the paper's default
  ``SVD^rem_l2``; ``"l1"`` is the ablation); ties go to the lower channel index;
* ``density`` is the fraction of the weight's *entries* held by the sparse block, which for
  whole columns is ``k / d_in``; the floor is taken of the decimal, at least one channel;
* no nonlinearity between the factors by default (``activation=None``), so the layer merges
  into a dense ``nn.Linear``; ``activation="silu" | "relu" | "gelu"`` is the paper's ablation and
  makes :meth:`merged` raise.

Trainable parameters: ``r (d_in + d_out) + k d_out`` (+ bias).  The forward never forms the
dense weight; autograd saves ``x``, ``x Aᵀ`` (``r`` per token) and ``x[..., I]`` (``k`` per token).

Tensor parallelism (:meth:`LOSTLinear.parallelize`): column-wise, ``B``, ``W_s`` and the bias are
split by output rows and ``A`` is whole, so each rank computes its output features from the whole
``x Aᵀ``; row-wise, ``A`` is split by input columns and ``B``, ``W_s`` and the bias are whole:
the ranks' ``x_t A_tᵀ`` are summed before the activation (``r`` values per token) and each rank
feeds the kept channels that fall in its block to the matching columns of ``W_s``, the sparse
branch summed likewise.  Gradients of the whole tensors that only a block of the computation
uses (``A`` and the input column-wise, ``W_s`` row-wise) are summed over the ranks in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optimlib.distributed.parallel_region import copy_to_parallel_region, reduce_from_parallel_region
from optimlib.reparam import register_reparam
from optimlib.validation import check_fraction, check_int
from optimlib.reparam._lowrank import TensorParallelFactors, count_of, dense_linear

_ACTIVATIONS = {None: None, "none": None, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}
_SCORES = {"l2": 2, "l1": 1}


class LOSTLinear(TensorParallelFactors, nn.Module):
    """``y = γ act(x Aᵀ) Bᵀ + (1 - γ) x[..., I] W_sᵀ + bias`` (see the module doc).

    Build it from a trained or freshly initialised layer with :meth:`from_linear`; the plain
    constructor allocates uninitialised factors of the right shapes (for loading a state dict).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.05,
                 gamma: float = 0.9, activation: str | None = None, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.rank = check_int("rank", rank, 1, min(self.in_features, self.out_features))
        self.density = check_fraction("density", density)
        self.gamma = check_fraction("gamma", gamma, allow_one=False)
        key = activation.lower() if isinstance(activation, str) else activation
        if key not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of None, 'silu', 'relu', 'gelu'; got {activation!r}")
        self.activation = None if key in (None, "none") else key
        self._act = _ACTIVATIONS[key]
        self.channels_kept = max(1, count_of(self.density, self.in_features))
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.zeros(self.rank, self.in_features, **factory))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, **factory))
        self.sparse_weight = nn.Parameter(torch.zeros(self.out_features, self.channels_kept, **factory))
        index_dtype = torch.int32 if self.in_features < 2 ** 31 else torch.int64
        self.register_buffer("channels", torch.arange(self.channels_kept, dtype=index_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, density: float = 0.05, gamma: float = 0.9,
                    activation: str | None = None, score: str = "l2") -> "LOSTLinear":
        """SVD-initialise from ``linear.weight`` (top-``rank`` triplets, channel block from the
        residual spectrum); the bias is kept as it was."""
        if score not in _SCORES:
            raise ValueError(f"score must be 'l2' or 'l1', got {score!r}")
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, density, gamma, activation,
                    bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        if weight.device.type == "meta":
            return layer
        with torch.no_grad():
            W0 = weight.detach().to(torch.float64)
            U, sigma, Vh = torch.linalg.svd(W0, full_matrices=False)
            r = layer.rank
            root = sigma[:r].sqrt()
            B = U[:, :r] * root
            A = root[:, None] * Vh[:r]
            residual = (U[:, r:] * sigma[r:]) @ Vh[r:]
            scores = torch.linalg.vector_norm(residual, ord=_SCORES[score], dim=0)
            # Stable descending order: equal scores keep the lower channel index first.
            order = torch.sort(-scores, stable=True).indices[:layer.channels_kept]
            channels = torch.sort(order).values
            layer.A.copy_(A)
            layer.B.copy_(B)
            layer.sparse_weight.copy_(residual[:, channels])
            layer.channels.copy_(channels)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    TP_SHARDED = {"colwise": {"B": 0, "sparse_weight": 0, "bias": 0}, "rowwise": {"A": 1}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_style is not None:
            return self._forward_tensor_parallel(x)
        return self._combine(F.linear(x, self.A), x.index_select(-1, self.channels), self.B, self.sparse_weight,
                             self.bias)

    def _combine(self, h, x_kept, B, sparse_weight, bias, group=None):
        """``γ act(h) Bᵀ + (1 - γ) x_kept W_sᵀ + bias``; with ``group`` (row-wise), ``h`` and the
        sparse branch are this rank's partial sums, summed over it first."""
        if group is not None:
            h = reduce_from_parallel_region(h, group)
        if self._act is not None:
            h = self._act(h)
        sparse = F.linear(x_kept, sparse_weight)
        if group is not None:
            sparse = reduce_from_parallel_region(sparse, group)
        y = self.gamma * F.linear(h, B) + (1.0 - self.gamma) * sparse
        return y if bias is None else y + bias

    def _forward_tensor_parallel(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_mesh.get_group()
        A, B, sparse_weight = self.A.to_local(), self.B.to_local(), self.sparse_weight.to_local()
        bias = None if self.bias is None else self.bias.to_local()
        if self.tp_style == "colwise":
            x = copy_to_parallel_region(x, group)
            h = F.linear(x, copy_to_parallel_region(A, group))
            return self._combine(h, x.index_select(-1, self.channels), B, sparse_weight, bias)
        mine, local_channels = self.block_selection(self.channels, self._block_channels)
        x_kept = x.index_select(-1, local_channels)
        sparse_weight = copy_to_parallel_region(sparse_weight, group).index_select(1, mine)
        return self._combine(F.linear(x, A), x_kept, B, sparse_weight, bias, group)

    def _block_channels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Which kept channels fall in this rank's block of inputs (positions in ``W_s``'s columns),
        and their positions in the block."""
        start, stop = self.tp_block()
        mine = torch.nonzero((self.channels >= start) & (self.channels < stop)).squeeze(1)
        return mine, self.channels.index_select(0, mine) - start

    def dense_weight(self) -> torch.Tensor:
        """``γ B A + (1 - γ) · W_s`` scattered into the channels ``I`` (needs ``activation=None``)."""
        if self.activation is not None:
            raise ValueError(f"a LOST layer with activation={self.activation!r} between its factors is "
                             f"not a linear map of one weight, so it has no dense form to merge into")
        W = self.gamma * (self.whole("B") @ self.whole("A"))
        return W.index_add(1, self.channels, (1.0 - self.gamma) * self.whole("sparse_weight"))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A dense ``nn.Linear`` of :meth:`dense_weight`; under tensor parallelism the whole weight,
        on every rank."""
        return dense_linear(self.dense_weight(), self.whole("bias"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"channels={self.channels_kept}, gamma={self.gamma}, activation={self.activation}, "
                f"bias={self.bias is not None}")


def _convert_lost(linear: nn.Linear, rank: int = 128, density: float = 0.05, gamma: float = 0.9,
                  activation: str | None = None, score: str = "l2") -> nn.Module:
    return LOSTLinear.from_linear(linear, rank=rank, density=density, gamma=gamma, activation=activation,
                                  score=score)


register_reparam("lost", _convert_lost, tensor_parallel=True,
                 description="LOST: SVD-initialised low-rank + channel-wise sparse complement (Li et al., 2025)")

__all__ = ["LOSTLinear"]
