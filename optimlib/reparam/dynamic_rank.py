"""Rank-adaptive factorized layers: ``W = U S Vᵀ`` whose rank is truncated and re-augmented
during training (augment the bases, train, truncate by a relative tolerance).

After DLRT (Schotthöfer, Zangrando, Kusch, Ceruti, Tudisco, *Low-rank lottery tickets*,
NeurIPS 2022) and its rank-adaptive BUG integrator, adapted to a training loop that runs one
forward/backward and one ``optimizer.step()`` per iteration with *any* optimizer:

* the layer holds ``U (d_out, k)``, ``S (k, k)``, ``V (d_in, k)``, all trained jointly; ``k`` is
  the current rank ``r`` plus ``augment`` candidate directions (capped at ``min(d_out, d_in)``);
* every ``interval`` optimizer steps, :meth:`after_step` re-orthonormalises ``U = Q_u R_u``,
  ``V = Q_v R_v``, takes the SVD of the small core ``R_u S R_vᵀ = P diag(σ) Qᵀ`` and keeps the
  smallest rank ``r`` whose tail ``‖σ_{r:}‖₂ ≤ tol · ‖σ‖₂`` (DLRT's relative criterion), clamped
  to ``[min_rank, max_rank]`` (and to ``k``: the rank grows by at most ``augment`` per truncation);
* the new bases are ``[Q_u P_{:r} | candidates]``, ``[Q_v Q_{:r} | candidates]`` with
  ``S = diag(σ_{:r}) ⊕ 0``: after a truncation ``W`` has rank exactly ``r``.  The candidates are
  the next singular directions of the trained span (``P_{r:k}``: the ones training was building
  up but which did not pass the tolerance yet), then fresh random directions orthogonal to the
  kept ones when the width grows;
* training the ``S`` block of the candidates (and the bases) over the next ``interval`` steps is
  DLRT's augmented Galerkin step; a candidate whose singular value passes the tolerance by the
  next truncation raises the rank.

Differences from DLRT, stated: one joint gradient step on ``U``, ``S``, ``V`` instead of the
K/L/S sub-steps with three forward/backward passes, and candidates taken from the trained span
instead of the K/L-updated bases; the bases are kept orthonormal only at truncations.

**Memory falls with the rank**: the parameters are reallocated at the new width ``k`` (nothing
is pre-allocated at ``max_rank``), and so is the optimizer state: new ``Parameter`` objects
replace the old ones in the module (where the module keeps them: registered, or hidden by a
sharded engine, see :func:`optimlib.distributed.replicated.replace_parameter`) and in
``optimizer.param_groups`` (a graph still alive from an earlier forward keeps referring to the
old ones, harmlessly), the state moves to them, and each state entry the optimizer declares
element-wise (:mod:`optimlib.optim.state_spec`) is remapped with the change of basis: entries
that transform like the parameter (first moments, momentum) as gradients transform
(``m_U ← m_U R_uᵀ P``, ``m_S ← Pᵀ R_u⁻ᵀ m_S R_v⁻¹ Q``, exact before truncation), entries that
transform like its square (second moments) through the elementwise squares of the same maps (a
diagonal approximation), new columns at zero; a param group's recorded ``shapes`` follow.  Memory
at width ``k``: ``(d_out + d_in + k) k`` parameters (+ bias) and, for Adam, twice that in state.
State that is not element-wise (a factorized or projected optimizer state), or the state of an
optimizer that declares none, cannot be remapped: that parameter's state is reset, with a warning.

**Resume**: the current rank, the step counter and the seed of the candidate directions are
buffers (``current_rank``, ``steps``, ``seed``) in the state dict, and loading a state dict
resizes ``U``/``S``/``V`` to the saved width first, so a model + optimizer restored into a fresh
model continues bit for bit.

**Distributed** (FSDP2, DeepSpeed ZeRO-1/2/3): ``U``, ``S``, ``V`` are declared
``replicated_parameters``.  Sharding them would be pointless (they are small) and cannot follow a
rank change (FSDP2's ``DTensor`` shards and ZeRO's flat partitions are laid out once), so the
engines keep them whole on every rank, average their gradients with one all-reduce per step and
train them with a second instance of the run's optimizer (:mod:`optimlib.distributed.replicated`);
the bias is sharded like any parameter.  Every rank then holds the same ``U``, ``S``, ``V`` and
the same optimizer state, runs the same QR / SVD and takes the same rank decision, with no extra
communication; gradient clipping uses the global norm over both kinds of parameters, so a run on
N ranks matches one process.  A factor that *is* sharded (a ``DTensor``, or a ZeRO-3 partition)
or missing from the optimizer handed to :meth:`after_step` is refused with a ``RuntimeError``.

**Tensor parallel** (:meth:`DynamicRankLinear.parallelize`): ``U``, ``S``, ``V`` stay whole and
replicated; only the bias is distributed (split by output rows column-wise).  Column-wise, each
rank computes its output features from the whole ``h = x V Sᵀ`` (``k`` values per token) and its
rows of ``U``; row-wise, each rank multiplies its input features by its rows of ``V``, the ranks'
partial ``x_t V_t`` are summed (``k`` values per token), and ``S`` and ``U`` run whole.  In
backward the ranks sum the gradients only a block of the computation produces (``h`` and ``U``
column-wise, ``V`` row-wise), so every rank of a tensor-parallel group holds its replica's whole
gradient and the engines' all-reduce over all ranks averages the data-parallel replicas.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from optimlib.distributed.layout import is_dtensor
from optimlib.distributed.parallel_region import copy_to_parallel_region, reduce_from_parallel_region
from optimlib.distributed.replicated import replace_parameter
from optimlib.optim.state_spec import replace_param
from optimlib.reparam import register_reparam
from optimlib.validation import check_fraction, check_int
from optimlib.reparam._lowrank import TensorParallelFactors, dense_linear, layer_generator

_GOLDEN = 0x9E3779B97F4A7C15


def select_rank(sigma: torch.Tensor, tol: float, low: int, high: int) -> int:
    """Smallest ``r`` with ``‖sigma[r:]‖₂ <= tol ‖sigma‖₂`` (``sigma`` descending), in ``[low, high]``."""
    sq = sigma.double().square()
    tails = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]).sqrt()  # tails[i] = ‖σ[i:]‖
    tails = torch.cat([tails, tails.new_zeros(1)])
    bound = tol * tails[0]
    ok = (tails[1:] <= bound).nonzero()
    r = int(ok[0]) + 1 if ok.numel() else sigma.numel()
    return max(low, min(high, r))


def _orthonormal_complement(basis: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random orthonormal columns orthogonal to the orthonormal columns of ``basis``."""
    g = torch.randn(basis.shape[0], count, generator=generator, dtype=torch.float64).to(basis.device)
    for _ in range(2):  # project twice: one Gram-Schmidt pass loses orthogonality in fp arithmetic
        g = g - basis @ (basis.T @ g)
    q, _ = torch.linalg.qr(g)
    return q


def _pad(t: torch.Tensor, cols: int, rows: int | None = None) -> torch.Tensor:
    """``t`` (2-D) zero-padded on the right to ``cols`` columns (and at the bottom to ``rows``
    rows when given: for the square core)."""
    out = t.new_zeros(t.shape[0] if rows is None else rows, cols)
    out[:t.shape[0], :t.shape[1]] = t
    return out


class DynamicRankLinear(TensorParallelFactors, nn.Module):
    """``y = x (U S Vᵀ)ᵀ + bias`` whose rank adapts in :meth:`after_step` (see the module doc).

    Options: ``rank`` (initial), ``min_rank``/``max_rank`` (bounds, default 1 and
    ``min(d_out, d_in)``), ``tol`` (relative tail tolerance τ), ``augment`` (candidate directions
    carried beside the rank; default ``max(1, rank // 4)``), ``interval`` (optimizer steps
    between truncations), ``seed`` (the candidate directions' random stream; ``None``: drawn from
    PyTorch's global generator).
    """

    replicated_parameters = ("U", "S", "V")
    """Reshaped by :meth:`truncate`: the sharded engines keep them whole on every rank."""
    TP_SHARDED = {"colwise": {"bias": 0}, "rowwise": {}}

    def __init__(self, in_features: int, out_features: int, rank: int, *, min_rank: int = 1,
                 max_rank: int | None = None, tol: float = 0.1, augment: int | None = None,
                 interval: int = 10, bias: bool = True, seed: int | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.max_width = min(self.in_features, self.out_features)
        self.min_rank = check_int("min_rank", min_rank, 1, self.max_width)
        self.max_rank = check_int("max_rank", self.max_width if max_rank is None else max_rank,
                                  self.min_rank, self.max_width)
        rank = check_int("rank", rank, self.min_rank, self.max_rank)
        self.tol = check_fraction("tol", tol, allow_one=False)
        self.augment = check_int("augment", max(1, rank // 4) if augment is None else augment, 0)
        self.interval = check_int("interval", interval, 1)
        width = min(rank + self.augment, self.max_width)
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.zeros(self.out_features, width, **factory))
        self.S = nn.Parameter(torch.zeros(width, width, **factory))
        self.V = nn.Parameter(torch.zeros(self.in_features, width, **factory))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if bias else None
        _, seed = layer_generator(seed)
        self.register_buffer("current_rank", torch.tensor(rank, dtype=torch.int64, device=device))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64, device=device))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **options) -> "DynamicRankLinear":
        """Top-``rank`` SVD of ``linear.weight`` (``S = diag(σ)``), plus ``augment`` random
        orthonormal candidate directions with zero singular values; the bias is kept."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype, **options)
        if weight.device.type == "meta":
            return layer
        with torch.no_grad():
            U, sigma, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
            r, k = layer.rank, layer.width
            U, V = U[:, :r], Vh[:r].T
            if k > r:
                gen = layer._generator()
                U = torch.cat([U, _orthonormal_complement(U, k - r, gen)], 1)
                V = torch.cat([V, _orthonormal_complement(V, k - r, gen)], 1)
            layer.U.copy_(U)
            layer.V.copy_(V)
            layer.S.copy_(_pad(torch.diag(sigma[:r]), k, k))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def rank(self) -> int:
        """The current rank (after the last truncation)."""
        return int(self.current_rank)

    @property
    def width(self) -> int:
        """Columns of ``U`` / ``V``: the rank plus the candidate directions."""
        return self.U.shape[1]

    def _generator(self) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        gen.manual_seed((int(self.seed) + int(self.steps) * _GOLDEN) % 2 ** 63)
        return gen

    # ------------------------------------------------------------------ function
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The factors stay in their own dtype when an engine casts the sharded parameters (DeepSpeed
        # bf16): compute in the input's dtype.
        U, S, V = (p if p.dtype == x.dtype else p.to(x.dtype) for p in (self.U, self.S, self.V))
        if self.tp_style is None:
            return F.linear(F.linear(F.linear(x, V.t()), S), U, self.bias)
        group = self.tp_mesh.get_group()
        bias = None if self.bias is None else self.bias.to_local()
        start, stop = self.tp_block()
        if self.tp_style == "colwise":
            h = copy_to_parallel_region(F.linear(F.linear(x, V.t()), S), group)
            return F.linear(h, copy_to_parallel_region(U, group)[start:stop], bias)
        h = reduce_from_parallel_region(F.linear(x, copy_to_parallel_region(V, group)[start:stop].t()), group)
        return F.linear(F.linear(h, S), U, bias)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.S @ self.V.t()

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A dense ``nn.Linear`` of ``U S Vᵀ``; under tensor parallelism the whole weight, on every rank."""
        return dense_linear(self.dense_weight(), self.whole("bias"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"width={self.width}, bounds=[{self.min_rank}, {self.max_rank}], tol={self.tol}, "
                f"augment={self.augment}, interval={self.interval}, bias={self.bias is not None}")

    # ------------------------------------------------------------------ rank adaptation
    def _check_unsharded(self, optimizer) -> None:
        for name, p in (("U", self.U), ("S", self.S), ("V", self.V)):
            if is_dtensor(p) or hasattr(p, "ds_id"):
                how = "an FSDP2 DTensor" if is_dtensor(p) else "a DeepSpeed ZeRO-3 partition"
                raise RuntimeError(
                    f"DynamicRankLinear.{name} is sharded ({how}): rank changes reshape it; it is declared in "
                    f"replicated_parameters, so wrap the model with the engines of optimlib.train.engine, which "
                    f"keep it whole on every rank")
        if optimizer is not None:
            held = {id(q) for group in optimizer.param_groups for q in group["params"]}
            for name, p in (("U", self.U), ("S", self.S), ("V", self.V)):
                if p.requires_grad and id(p) not in held:
                    raise RuntimeError(
                        f"DynamicRankLinear.{name} is not one of the parameters of the optimizer given to after_step "
                        f"(DeepSpeed ZeRO and FSDP hand the optimizer flat or sharded copies): rank changes must "
                        f"reshape the optimizer's own tensors; pass the optimizer that trains the replicated "
                        f"parameters (optimlib.reparam.after_step(model, opt, replicated_optimizer=...))")

    def after_step(self, optimizer=None) -> None:
        """Count the step; every ``interval`` steps truncate / augment (see the module doc)."""
        self._check_unsharded(optimizer)
        with torch.no_grad():
            self.steps += 1
        if int(self.steps) % self.interval == 0:
            self.truncate(optimizer)

    @torch.no_grad()
    def truncate(self, optimizer=None) -> int:
        """Re-orthonormalise, truncate by ``tol`` within the bounds, re-augment; remap the
        optimizer's state for ``U``, ``S``, ``V``.  Returns the new rank."""
        U, S, V = (p.detach().to(torch.float64) for p in (self.U, self.S, self.V))
        k = U.shape[1]
        Qu, Ru = torch.linalg.qr(U)
        Qv, Rv = torch.linalg.qr(V)
        P, sigma, Qh = torch.linalg.svd(Ru @ S @ Rv.T)
        r = select_rank(sigma, self.tol, self.min_rank, min(self.max_rank, k))
        k_new = min(r + self.augment, self.max_width)
        keep = min(k, k_new)  # columns carried from the trained span: the rank, then candidates
        Pk, Qk = P[:, :keep], Qh[:keep].T
        U_new, V_new = Qu @ Pk, Qv @ Qk
        if k_new > keep:
            gen = self._generator()
            U_new = torch.cat([U_new, _orthonormal_complement(U_new, k_new - keep, gen)], 1)
            V_new = torch.cat([V_new, _orthonormal_complement(V_new, k_new - keep, gen)], 1)
        S_new = _pad(torch.diag(sigma[:r]), k_new, k_new)

        # Change of basis for the optimizer state (gradients transform with these maps).
        Lu = self._solve_upper(Ru, Pk)  # Ru⁻¹ P: new U coordinates in the old ones
        Lv = self._solve_upper(Rv, Qk)
        maps = {
            self.U: lambda m: _pad(m @ (Ru.T @ Pk), k_new),
            self.V: lambda m: _pad(m @ (Rv.T @ Qk), k_new),
            self.S: lambda m: _pad(Lu.T @ m @ Lv, k_new, k_new),
        }
        squared = {
            self.U: lambda v: _pad(v @ (Ru.T @ Pk).square(), k_new),
            self.V: lambda v: _pad(v @ (Rv.T @ Qk).square(), k_new),
            self.S: lambda v: _pad(Lu.T.square() @ v @ Lv.square(), k_new, k_new),
        }
        for name, new in (("U", U_new), ("V", V_new), ("S", S_new)):
            old = getattr(self, name)
            fresh = nn.Parameter(new.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
            if optimizer is not None:
                _swap_in_optimizer(optimizer, old, fresh, maps[old], squared[old])
            replace_parameter(self, name, fresh)
        self.current_rank.fill_(r)
        return r

    @staticmethod
    def _solve_upper(R: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``R⁻¹ rhs`` for the triangular QR factor; ``rhs`` itself if ``R`` is singular (a
        basis column collapsed: treat the change of basis as the rotation alone)."""
        out = torch.linalg.solve_triangular(R, rhs, upper=True)
        return out if torch.isfinite(out).all() else rhs

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The saved width may differ from this module's: take the saved one before copying.
        fixed = {"U": self.out_features, "V": self.in_features}
        for name in ("U", "S", "V"):
            src = state_dict.get(prefix + name)
            p = getattr(self, name)
            if src is None or src.dim() != 2 or tuple(src.shape) == tuple(p.shape) or is_dtensor(p):
                continue
            width = src.shape[1]
            if name in fixed and src.shape[0] != fixed[name] or name == "S" and src.shape[0] != width:
                continue  # a genuine mismatch: let the default loader report it
            if width > self.max_width:
                continue
            p.grad = None
            p.data = p.data.new_empty(tuple(src.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _swap_in_optimizer(optimizer, old: nn.Parameter, new: nn.Parameter, linear_map, square_map) -> None:
    """Put ``new`` where ``old`` was in ``optimizer`` and remap its state by the optimizer's own
    declarations (:func:`optimlib.optim.state_spec.replace_param`; see the module doc)."""
    stuck = replace_param(optimizer, old, new, {"linear": linear_map, "square": square_map})
    if stuck:
        warnings.warn(f"DynamicRankLinear: optimizer state {stuck} is not declared element-wise by "
                      f"{type(optimizer).__name__}, so it cannot follow the rank change; that parameter's optimizer "
                      f"state is reset", RuntimeWarning, stacklevel=4)


def _convert_dynamic_rank(linear: nn.Linear, rank: int = 32, **options) -> nn.Module:
    return DynamicRankLinear.from_linear(linear, rank=rank, **options)


register_reparam("dynamic_rank", _convert_dynamic_rank, tensor_parallel=True,
                 description="rank-adaptive U S Vᵀ layers: augment, train, truncate by tolerance (after DLRT)")

__all__ = ["DynamicRankLinear", "select_rank"]
