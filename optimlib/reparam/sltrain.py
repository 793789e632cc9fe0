"""SLTrain: sparse plus low-rank weights, and the plain low-rank baseline.

Han, Li, Huang, Hong, Takeda, Jawanpuria, Mishra, *SLTrain: a sparse plus low-rank approach
for parameter and memory efficient pretraining*, NeurIPS 2024 (arXiv 2406.02214).

Construction, for a linear layer with weight ``W`` of shape ``(d_out, d_in)``::

    W = (alpha / r) * B @ A + S
    B: (d_out, r), zeros at init          A: (r, d_in), Kaiming-uniform (a=sqrt(5)), i.e. U(+-1/sqrt(d_in))
    S = scatter(values, indices)           nnz = floor(density * d_out * d_in) entries of W
    values: (nnz,), U(+-1/sqrt(d_in))      indices: a uniformly random support, fixed for the run

Only ``A``, ``B``, ``values`` (and the layer's own bias, kept as it was) train; at step 0
``W = S``, a random ``density``-dense matrix, and the low-rank path starts at zero like LoRA.

Trainable parameters per layer: ``r * (d_in + d_out) + floor(density * d_in * d_out)`` (+ the
bias), where the floor is taken of the *decimal* ``density`` (``0.03`` is 3/100 exactly; see
:func:`optimlib.reparam._lowrank.count_of`).  The support is a sorted ``int32`` buffer of flat
row-major positions (``int64`` only for a layer with 2^31 entries or more): 4 bytes per
non-zero, saved in the state dict, replicated under FSDP2 / ZeRO (``values`` shards like any
parameter, and the forward sees the gathered ``values`` so the global positions stay valid).

Memory: a custom ``autograd.Function`` composes the dense ``W`` in forward, uses it for the
GEMM and frees it; it saves only ``x``, ``B``, ``alpha/r * A``, ``values`` and the indices.
Backward composes ``W`` again for ``dx`` and gets ``dB = dW Aᵀ``, ``dA = Bᵀ dW`` and
``dvalues = dW[indices]`` (``dW = dyᵀ x``) — the scheme of the reference C++ extension.  Both steps
are the custom ops :func:`optimlib.kernels.sltrain_compose` and :func:`optimlib.kernels.sltrain_grads`
(CUDA: Triton kernels that add ``S`` in the GEMM's epilogue and never form ``dW``; CPU: their
eager twins, which form ``dW`` transiently), so the layer runs the same code above the op on
every device, and ``torch.compile`` traces it whole.  A plain parametrization ``F.linear(x, W(θ))``
would keep one dense ``W`` per layer alive from forward to backward.  FLOPs are those of a dense
layer plus one ``B @ A`` per forward and per backward.  Under autocast ``W`` is composed from
factors cast to autocast's dtype (what autocast does to the ``B @ A`` matmul), so no ``fp32`` copy
of ``W`` is made.

``lowrank`` is the same layer with ``density=0``: ``W = (alpha / r) B A`` (the paper's
"Low-Rank" baseline).  Its one difference in init: ``B`` is Kaiming-uniform too
(U(+-1/sqrt(r))), because with no S a zero ``B`` makes every targeted ``W`` zero at step 0, and
layers that multiply each other (query and key, value and output, gate/up and down) then give
each other exactly zero gradient: a saddle training never leaves, where only the embeddings and
the head learn.  SLTrain does not have that problem: ``W = S != 0`` at step 0.  (``b_init``
overrides either choice.)

Tensor parallelism: :meth:`SparseLowRankLinear.parallelize` gives the layer the placements of a
column-wise (``B`` and the bias in row blocks; ``A`` and ``values`` whole) or row-wise (``A`` in
column blocks; ``B``, ``values`` and the bias whole) parallel linear over a 1-D mesh.  Each rank
composes its block of ``W`` from its factors and the non-zeros that fall in the block (a
contiguous run of the sorted support for rows, a masked subset for columns) and runs the same
custom op; the whole factors' and ``values``' gradients are summed over the tensor-parallel
ranks in backward (:mod:`optimlib.distributed.parallel_region`), as is a column-wise layer's
input gradient, and a row-wise layer's output in forward.  The index buffer stays whole, so a
checkpoint holds the same support at any tensor-parallel degree.

Defaults are the paper's LLaMA-60M setting: ``rank=128``, ``density=0.03``, ``alpha=32``
(``alpha / r = 0.25``).  Note that a 1-D ``values`` lands in the factory's no-weight-decay
group, as the bias and norms do (the paper trains with weight decay 0 anyway).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from optimlib.distributed.parallel_region import copy_to_parallel_region, reduce_from_parallel_region
from optimlib.kernels import sltrain_compose, sltrain_grads
from optimlib.reparam import register_reparam
from optimlib.validation import check_fraction, check_int
from optimlib.reparam._lowrank import TensorParallelFactors, count_of, dense_linear, layer_generator


def sample_support(total: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """``nnz`` distinct positions drawn uniformly from ``range(total)``, sorted ascending.

    Draws i.i.d. positions, keeps the distinct ones and subsamples them uniformly to exactly
    ``nnz`` (exchangeability makes the result a uniform ``nnz``-subset), so the work and memory
    are O(nnz) rather than a ``randperm(total)``.  ``int32`` when ``total < 2**31``.
    """
    dtype = torch.int32 if total < 2 ** 31 else torch.int64
    if nnz == 0:
        return torch.empty(0, dtype=dtype)
    if 2 * nnz > total:  # dense-ish: a permutation is as cheap as the sampling
        chosen = torch.randperm(total, generator=generator)[:nnz]
    else:
        draws = math.ceil(-total * math.log1p(-nnz / total) * 1.05) + 16
        while True:
            distinct = torch.unique(torch.randint(0, total, (draws,), generator=generator))
            if distinct.numel() >= nnz:
                break
            draws *= 2
        chosen = distinct[torch.randperm(distinct.numel(), generator=generator)[:nnz]]
    return torch.sort(chosen).values.to(dtype)


def _compose(B: torch.Tensor, A_scaled: torch.Tensor, values: torch.Tensor | None,
             indices: torch.Tensor | None) -> torch.Tensor:
    """Dense ``B @ A_scaled + S`` for the layer's GEMM (no autograd), in autocast's dtype when
    autocast is on for the factors' device (fp64 is left alone, as autocast leaves it)."""
    device_type = B.device.type
    if torch.is_autocast_enabled(device_type) and B.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        B, A_scaled = B.to(dtype), A_scaled.to(dtype)
    return sltrain_compose(B, A_scaled, values, indices)


class _SparseLowRankLinearFn(torch.autograd.Function):
    """``y = x (B A_s + S)ᵀ + bias`` saving the factors, never the dense weight."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, B, A_scaled, values, indices, bias):
        y = F.linear(x, _compose(B, A_scaled, values, indices), bias)
        ctx.save_for_backward(x, B, A_scaled, values, indices)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, B, A_scaled, values, indices = ctx.saved_tensors
        need_x, need_b, need_a, need_v, _, need_bias = ctx.needs_input_grad
        dx = dB = dA = dvalues = dbias = None
        if need_x:
            dx = (dy @ _compose(B, A_scaled, values, indices).to(dy.dtype)).to(x.dtype)
        dy2 = dy.reshape(-1, dy.size(-1))
        if need_b or need_a or need_v:
            dB, dA, dvalues = sltrain_grads(dy2, x.reshape(-1, x.size(-1)), B, A_scaled, indices, need_b=need_b,
                                            need_a=need_a, need_v=need_v)
            if dvalues is not None:
                dvalues = dvalues.to(values.dtype)
        if need_bias and ctx.bias_dtype is not None:
            dbias = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dB, dA, dvalues, None, dbias


def sparse_lowrank_linear(x: torch.Tensor, B: torch.Tensor, A_scaled: torch.Tensor,
                          values: torch.Tensor | None, indices: torch.Tensor | None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Functional form of :class:`SparseLowRankLinear` (``A_scaled`` already holds ``alpha/r``)."""
    return _SparseLowRankLinearFn.apply(x, B, A_scaled, values, indices, bias)


def sltrain_parameter_count(d_in: int, d_out: int, rank: int, density: float, bias: bool = False) -> int:
    """Trainable parameters of one layer: ``r (d_in + d_out) + floor(density d_in d_out)`` (+ bias)."""
    return rank * (d_in + d_out) + count_of(density, d_in * d_out) + (d_out if bias else 0)


class SparseLowRankLinear(TensorParallelFactors, nn.Module):
    """``y = x ((alpha/r) B A + S)ᵀ + bias`` with S on a fixed random support (see the module doc).

    ``density=0`` gives the plain low-rank layer (no ``values`` parameter, no index buffer).
    ``seed`` fixes this layer's random choices (support, ``A``, ``values``); ``None`` draws it
    from PyTorch's global generator.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03,
                 alpha: float = 32.0, bias: bool = True, *, b_init: str | None = None,
                 seed: int | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.rank = check_int("rank", rank, 1)
        self.density = check_fraction("density", density, allow_zero=True)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        if b_init not in (None, "zero", "kaiming"):
            raise ValueError(f"b_init must be 'zero', 'kaiming' or None (zero when there is a sparse part), "
                             f"got {b_init!r}")
        total = self.in_features * self.out_features
        self.nnz = count_of(self.density, total)
        self.b_init = b_init or ("zero" if self.nnz else "kaiming")
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.B = nn.Parameter(torch.empty(self.out_features, self.rank, **factory))
        if self.nnz:
            self.values = nn.Parameter(torch.empty(self.nnz, **factory))
            index_dtype = torch.int32 if total < 2 ** 31 else torch.int64
            self.register_buffer("indices", torch.empty(self.nnz, dtype=index_dtype, device=device))
        else:
            self.register_parameter("values", None)
            self.register_buffer("indices", None)
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """The paper's init (A Kaiming-uniform, B zero, values U(+-1/sqrt(d_in)), a new random
        support; B Kaiming-uniform when there is no sparse part, see the module doc); the bias,
        if any, as ``nn.Linear`` does."""
        gen, _ = layer_generator(seed)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, d_in)

        def uniform(t: torch.Tensor, b: float) -> None:
            if t.device.type != "meta":
                t.copy_(torch.empty(t.shape, dtype=torch.float32).uniform_(-b, b, generator=gen))

        uniform(self.A, bound)
        if self.b_init == "zero":
            self.B.zero_()
        else:
            uniform(self.B, 1.0 / math.sqrt(self.rank))
        if self.nnz:
            uniform(self.values, bound)
            support = sample_support(self.in_features * self.out_features, self.nnz, gen)
            if self.indices.device.type != "meta":
                self.indices.copy_(support)
        if self.bias is not None:
            uniform(self.bias, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, density: float = 0.03, alpha: float = 32.0,
                    b_init: str | None = None, seed: int | None = None) -> "SparseLowRankLinear":
        """Replace ``linear`` (its weight is discarded: SLTrain pretrains from its own init; its
        bias is kept as it was)."""
        layer = cls(linear.in_features, linear.out_features, rank, density, alpha, bias=linear.bias is not None,
                    b_init=b_init, seed=seed, device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    TP_SHARDED = {"colwise": {"B": 0, "bias": 0}, "rowwise": {"A": 1}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_style is not None:
            return self._forward_tensor_parallel(x)
        return sparse_lowrank_linear(x, self.B, self.A * self.scale, self.values, self.indices, self.bias)

    def _block_support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Which non-zeros fall in this rank's block of ``W`` (positions in ``values``), and their
        flat positions in the block (:meth:`block_selection`)."""
        def select():
            start, stop = self.tp_block()
            flat = self.indices.long()
            if self.tp_style == "colwise":     # rows [start, stop): a contiguous run of the sorted support
                picked = torch.nonzero((flat >= start * self.in_features) & (flat < stop * self.in_features)).squeeze(1)
                local = flat[picked] - start * self.in_features
            else:                              # columns [start, stop)
                row, col = flat // self.in_features, flat % self.in_features
                picked = torch.nonzero((col >= start) & (col < stop)).squeeze(1)
                local = row[picked] * (stop - start) + (col[picked] - start)
            return picked, local.to(self.indices.dtype)

        return self.block_selection(self.indices, select)

    def _forward_tensor_parallel(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_mesh.get_group()
        A, B = self.A.to_local(), self.B.to_local()     # differentiable, unlike DTensor._local_tensor
        bias = None if self.bias is None else self.bias.to_local()
        values = local_indices = None
        if self.values is not None:
            picked, local_indices = self._block_support()
            values = copy_to_parallel_region(self.values.to_local(), group).index_select(0, picked)
        if self.tp_style == "colwise":
            x = copy_to_parallel_region(x, group)
            A_scaled = copy_to_parallel_region(A * self.scale, group)
            return sparse_lowrank_linear(x, B, A_scaled, values, local_indices, bias)
        B = copy_to_parallel_region(B, group)
        y = reduce_from_parallel_region(sparse_lowrank_linear(x, B, A * self.scale, values, local_indices), group)
        return y if bias is None else y + bias

    def dense_weight(self) -> torch.Tensor:
        """``(alpha/r) B A + S`` as a dense tensor, differentiable by plain autograd: the naive
        parametrization, an independent reference for the layer's own autograd function (tests)."""
        values = self.whole("values")
        W = self.whole("B") @ (self.whole("A") * self.scale)
        if values is not None:
            W = W.reshape(-1).index_add(0, self.indices, values).view(self.out_features, self.in_features)
        return W

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A dense ``nn.Linear`` holding the weight the forward composes (the same op); under
        tensor parallelism the whole weight, on every rank."""
        return dense_linear(sltrain_compose(self.whole("B"), self.whole("A") * self.scale, self.whole("values"),
                                            self.indices), self.whole("bias"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"density={self.density}, nnz={self.nnz}, alpha={self.alpha}, b_init={self.b_init}, "
                f"bias={self.bias is not None}")


def _convert_sltrain(linear: nn.Linear, rank: int = 128, density: float = 0.03, alpha: float = 32.0,
                     b_init: str | None = None) -> nn.Module:
    density = check_fraction("density", density)
    return SparseLowRankLinear.from_linear(linear, rank=rank, density=density, alpha=alpha, b_init=b_init)


def _convert_lowrank(linear: nn.Linear, rank: int = 128, alpha: float = 32.0, b_init: str | None = None) -> nn.Module:
    return SparseLowRankLinear.from_linear(linear, rank=rank, density=0.0, alpha=alpha, b_init=b_init)


register_reparam("sltrain", _convert_sltrain, tensor_parallel=True,
                 description="SLTrain: W = (alpha/r) B A + S, S on a fixed random support (Han et al., 2024)")
register_reparam("lowrank", _convert_lowrank, tensor_parallel=True,
                 description="plain low-rank W = (alpha/r) B A (SLTrain with density 0)")

__all__ = ["SparseLowRankLinear", "sample_support", "sltrain_parameter_count",
           "sparse_lowrank_linear"]
