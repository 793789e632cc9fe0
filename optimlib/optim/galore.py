r"""GaLore AdamW: Adam (or AdamP, or SMMF) in a periodically refreshed low-rank gradient subspace.

Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection", ICML 2024, arXiv:2403.03507.  Semantics, defaults and the exact update of
``galore_torch.GaLoreAdamW`` (galore-torch 1.0), which the tests use as an oracle; the code is our
own.

For a parameter in a low-rank group (a group with a ``rank`` key), viewed as an ``(m, n)``
matrix with gradient :math:`G_t`, at its step :math:`t` (per parameter, counted from 0)::

    if t is a refresh step (t + offset) % T == 0, or there is no basis yet:
        P <- basis(G_t)                                   # svd / randomized / dct / random
        moments <- on_refresh(moments, P_old, P)          # keep (GaLore) / rotate / reset
    R   = G_t P^T              (right, keeps m)   or   P^T G_t   (left, keeps n)
    M   = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R^2
    N   = M / (sqrt(V) + eps)
    W  -= lr * sqrt(1 - b2^t') / (1 - b1^t') * scale * (N P   or   P N)     # t' = t + 1
    W  -= lr * weight_decay * W                           # decoupled, after the update

(``correct_bias=False`` drops the two bias corrections.)  Parameters of groups without ``rank``,
and 0-/1-D parameters, get the same AdamW update on the full gradient (galore-torch's AdamW: note
``eps`` is added to ``sqrt(V)`` before the bias correction and weight decay comes after the
update, unlike ``torch.optim.AdamW``).

Inner rules (``inner``, a constructor argument or a group key; ``galore_adamp`` / ``galore_smmf``
in the factory).  The projection piece is the same for every rule; what runs on the projected
gradient ``R`` (and, on the full gradient, for the parameters outside the low-rank groups) is:

``adamw`` (default)
    the update above, bit for bit galore-torch's.
``adamp``
    AdamP (Heo et al., ICLR 2021, arXiv:2006.08217; :mod:`optimlib.optim.adamp`).  Its Adam part
    runs on the low-rank moments (:func:`optimlib.kernels.adam_lowrank_update_` with AdamP's bias
    correction ``N = M / (sqrt(V) / sqrt(1 - b2^t) + eps)``, Nesterov optional).  Its
    scale-invariance test and radial projection need the weight, which has no low-rank
    counterpart, so they act on the **back-projected full-size update** ``U = scale * up(N)``:
    when ``max |cos(G_row, W_row)| < delta / sqrt(n)`` (channel view) or ``|cos(G, W)| < delta /
    sqrt(m n)`` (layer view) -- ``G`` the full gradient, as AdamP tests the gradient, not the
    update -- the component of ``U`` along each row of ``W`` (or along ``W``) is removed and the
    weight decay is multiplied by ``wd_ratio``
    (:func:`optimlib.optim.adamp.scale_invariant_projection`, on row shards with one 5-number
    collective).  Then ``W <- W (1 - lr wd wd_factor) - lr / (1 - b1^t) U``.  Group keys
    ``delta`` (0.1), ``wd_ratio`` (0.1), ``nesterov`` (False); ``correct_bias`` is ignored.
``smmf``
    SMMF (Park & Lee, AAAI 2025, arXiv:2412.08894; :mod:`optimlib.optim.smmf`).  The low-rank
    moments -- the ``(m, r)`` matrix of a right projection, the transpose of the ``(r, n)`` one
    of a left projection -- are stored as SMMF stores any tensor: square-matricized, rank-1
    factors of ``|M|`` and ``V`` plus the 1-bit packed sign of ``M``
    (:class:`optimlib.optim.smmf.SMMFLayout`), updated with SMMF's schedules ``b1_t = betas[0] *
    growth_rate^(t-1)``, ``b2_t = 1 - t^decay_rate`` (``betas[1]`` is not used) and no bias
    correction; then ``W <- W (1 - lr wd) - lr * scale * up(M / (sqrt(V) + eps))``.  Row shards
    of the low-rank moments are pieces of that flattened matrix (SMMF's column factors take one
    all-reduce of ``2 cols`` numbers).  Group keys ``decay_rate`` (-0.5; the SMMF README advises
    -0.8 for Transformers), ``growth_rate`` (0.999); ``moments_dtype`` must be ``None``.

Refresh policies with ``inner="smmf"``: ``keep`` reuses the factors as coordinates in the new
basis (nothing is touched when the rank does not change; a rank change re-factorizes the leading
columns); ``rotate`` decompresses ``M`` and ``V`` to the dense low-rank moments (one transient
``K x r`` pair), rotates them as above (``M O``, ``V (O * O)``) and re-factorizes them -- exact
when ``|M O|`` stays rank 1 in SMMF's matrix view (a signed permutation of the basis), otherwise
the rotated moments get SMMF's usual rank-1 approximation; ``reset`` zeroes the factors and
restarts SMMF's schedules (``b2_1 = 0``: the next ``V`` is the squared projected gradient).

With the identity as basis and ``scale=1`` the projected space is the full space and
``inner="adamp"`` / ``"smmf"`` reduce to AdamP / SMMF bit for bit (tests/optim/test_galore_inner.py).

Kernels (issue #7): the step runs on the custom ops of :mod:`optimlib.kernels` -- the Adam moment
update on the projected gradient (``adam_lowrank_update_``; ``adam8bit_lowrank_update_`` for 8-bit
moments), SMMF's step (``smmf_update_``) and the back-projection fused with the weight update and
decay (``galore_backproject_update_``; AdamP's rule projects the back-projected update first, so it
back-projects with a matmul) -- Triton kernels on CUDA tensors, their PyTorch twins elsewhere, so
CPU and GPU run the same code above the op boundary (``OPTIMLIB_KERNELS`` forces either).  The
parameters outside the low-rank groups take galore-torch's AdamW as ``torch._foreach_*``
multi-tensor ops over the group.  Between basis refreshes ``step()`` compiles under
``torch.compile(fullgraph=True)`` (tests/optim/test_optimizer_compile.py).

Low-rank group keys (galore-torch's, with its defaults where it has them): ``rank`` (int or
``"auto"``), ``update_proj_gap`` (T, 200), ``scale`` (0.25), ``proj_type`` (``std``,
``reverse_std``, ``left``, ``right``).  Ours: ``projection`` (``auto``, ``svd``, ``randomized``,
``dct``, ``random``; see :mod:`optimlib.optim.projection`), ``on_refresh`` (``keep``: the old
moments are reused as coordinates in the new basis, GaLore's behaviour; ``rotate``: moments are
mapped into the new basis, ``M <- M O``, ``V <- V (O * O)`` with ``O`` the ``r_old x r_new``
overlap of the bases, i.e. the variance of independent coordinates is carried over; ``reset``:
zero moments and restart the bias correction), ``stagger`` (spread the refresh steps of the
parameters over the gap instead of refreshing all of them on the same step), ``energy``,
``min_rank``, ``max_rank`` (adaptive rank), ``oversample``, ``power_iters`` (randomized),
``dct_norm``, ``moments_dtype`` (``None``: the gradient's dtype; ``"int8"``: 8-bit blockwise
quantized low-rank moments, :mod:`optimlib.formats.quantize`), ``quant_block``,
``stochastic_rounding``, ``basis_dtype`` (``None``: the gradient's dtype, as galore-torch;
``"float32"``), ``seed``, ``canonical_signs`` and ``shard_basis`` (see the class).  galore-torch
requires ``update_proj_gap``, ``scale`` and ``proj_type`` in every low-rank group; the defaults
here are Hugging Face's (200, 0.25, ``std``).

Drop-in exactness: with ``projection="svd"`` and ``canonical_signs=False``, one process gives
galore-torch's parameters to the bit (fp32; tests/optim/test_galore*.py).  The default
``canonical_signs=True`` flips singular vectors to a canonical sign so that runs do not depend on
LAPACK's sign choice, which a rounding-level change of the gradient (data-parallel averaging)
can flip; with ``on_refresh="keep"`` such a flip changes the trajectory (see
:mod:`optimlib.optim.projection`).

Distributed. Every parameter is reached through :meth:`OptimizerBase.param_units` and a
:class:`optimlib.distributed.RowBlock`: plain tensors, FSDP2 DTensors (``Shard(0)``, uneven
included) and DeepSpeed ZeRO-1/2/3 flat partitions (any grouping: a partition is mapped back to
its parameters) all run the same code. The low-rank moments live in the layout of
:class:`optimlib.optim.projection.Projector` (this rank's rows of the ``(m, r)`` moments of a
right projection, its ``torch.chunk`` block of the columns of the ``(r, n)`` moments of a left
one), so optimizer state shrinks with the number of ranks; under FSDP2 they are DTensors sharded
on the kept dimension so that ``torch.distributed.checkpoint`` saves every rank's piece. Step
counters are per parameter (ZeRO-3 calls ``step()`` once per sub-group). Collectives per
low-rank parameter and step: for a right projection none, except one all-gather of the ``r x n``
basis when it is stored sharded (``shard_basis``, svd/randomized bases); for a left one an
all-reduce of the ``r x n`` projected gradient and an all-gather of the ``r x n`` update (plus
RowBlock's exchange of one row per rank when DeepSpeed slices start mid-row); refreshes as
described in :mod:`optimlib.optim.projection`.  The inner rules add: ``smmf`` one all-reduce of
SMMF's ``2 cols`` column sums (plus an exchange of one matrix-view row when a rank's piece of the
low-rank moments starts mid-row); ``adamp`` one 5-number all-gather (the channel-view maximum and
the layer-view sums) and the exchange of one weight row.
Every rank must step the same parameters in the same order.

Layer-wise stepping (optimizer in backward, gradients freed as they are used, one step per
gradient-accumulation window, one LR clock): :meth:`GaLoreAdamW.layerwise` /
:class:`LayerwiseStepper`; one process and FSDP2.

State (per parameter; tensors and plain ints only, so ``torch.load(weights_only=True)`` reads a
checkpoint): ``step``, ``moment_step``, ``seed``, ``rank``, ``refreshes``, the basis (``basis``,
``indices`` or ``basis_seed``), and ``exp_avg``/``exp_avg_sq`` (or their ``_codes``/``_absmax``
when quantized; the second moment is then stored as its square root), or with ``inner="smmf"``
SMMF's ``exp_avg_row``/``exp_avg_col``/``exp_avg_sq_row``/``exp_avg_sq_col``/``exp_avg_sign``.
Parameters outside the low-rank groups keep the inner optimizer's own state (AdamW/AdamP
moments, SMMF factors) with an int ``step``.  Loading a state dict keeps every tensor's saved
dtype (torch would cast codes, indices, sign bits and float32 factors to the parameter's dtype).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from optimlib.distributed.layout import global_shape, is_dtensor, local_piece, to_local
from optimlib.distributed.row_block import FlatSlice, RowBlock
from optimlib.kernels.adam import adam8bit_lowrank_update_, adam_lowrank_update_
from optimlib.kernels.galore import galore_backproject_update_
from optimlib.optim._common import OptimizerBase, ParamUnit, check_betas, check_choice, check_real, write_rows_
from optimlib.optim.adamp import adamp_param_, scale_invariant_projection
from optimlib.optim.projection import ProjectionConfig, Projector, matrix_shape, name_seed
from optimlib.formats.quantize import dequantize_blockwise, hash_uniform, quantize_blockwise
from optimlib.optim.smmf import SMMFLayout, smmf_betas, smmf_param_, validate_smmf_hyperparameters

__all__ = ["GaLoreAdamW", "LayerwiseStepper", "galore_adamw_dense_", "galore_lowrank_", "galore_adamw_lowrank_",
           "LOWRANK_KEYS", "INNER_RULES"]

ON_REFRESH = ("keep", "rotate", "reset")
INNER_RULES = ("adamw", "adamp", "smmf")
MOMENTS_DTYPES = (None, "float32", "bfloat16", "float16", "int8")
BASIS_DTYPES = (None, "float32", "float64", "bfloat16", "float16")
_GOLDEN = (math.sqrt(5) - 1) / 2

# Keys that configure a low-rank group (the factory puts them on the targeted-matrix group).
LOWRANK_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projection", "on_refresh", "stagger",
                "oversample", "power_iters", "energy", "min_rank", "max_rank", "dct_norm",
                "moments_dtype", "quant_block", "stochastic_rounding", "basis_dtype", "seed", "canonical_signs",
                "shard_basis")


def _bad(name: str, value, accepted: str):
    raise ValueError(f"invalid {name}={value!r}: accepted range is {accepted}")


def is_lowrank_group(group: dict) -> bool:
    """galore-torch's rule: a group is low-rank when it has a ``rank`` key (``None`` = absent)."""
    return group.get("rank") is not None


# ----------------------------------------------------------------------------- functional core
def _step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    step_size = lr
    if correct_bias:
        bias_correction1 = 1.0 - beta1 ** step
        bias_correction2 = 1.0 - beta2 ** step
        step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
    return step_size


def galore_adamw_dense_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                        exp_avg_sqs: list[torch.Tensor], steps: list[int], *, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float, correct_bias: bool) -> None:
    """galore-torch's AdamW on lists of local pieces, in place (``steps``: each one's step, already
    incremented)::

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        w <- w - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps);  w <- w - lr wd w

    The element-wise passes run as ``torch._foreach_*`` multi-tensor ops (one launch per pass for
    all the tensors on CUDA, one C++ loop on CPU), each pass the same kernel as galore-torch's
    per-tensor line, so the result is galore-torch's to the bit; ``sqrt(v) + eps`` and the
    direction share one temporary per tensor.
    """
    if not params:
        return
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    directions = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(directions, eps)
    for m, d in zip(exp_avgs, directions):
        torch.div(m, d, out=d)
    by_step: dict[int, tuple[list, list]] = {}      # one multi-tensor add per distinct step count
    for p, d, step in zip(params, directions, steps):
        ps, ds = by_step.setdefault(step, ([], []))
        ps.append(p)
        ds.append(d)
    for step, (ps, ds) in by_step.items():
        torch._foreach_add_(ps, ds, alpha=-_step_size(lr, beta1, beta2, step, correct_bias))
    del directions, by_step
    if weight_decay > 0.0:
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)


class _Moments:
    """Read/write the two low-rank moments of one parameter in its projector's layout.

    Plain moments are stored in that layout.  Quantized ones are stored as ``(K, r)`` codes and
    block maxima (blocks run along the rank, within one row of the kept dimension, so they do not
    depend on the sharding), transposed for a left projection.
    """

    def __init__(self, state: dict, group: dict, projector: Projector, like: torch.Tensor, param):
        self.state, self.group, self.proj, self.param = state, group, projector, param
        self.kind = group["moments_dtype"]
        self.block = int(group["quant_block"])
        self.device = like.device
        self.dtype = like.dtype if self.kind in (None, "int8") else getattr(torch, self.kind)

    @property
    def quantized(self) -> bool:
        return self.kind == "int8"

    def exists(self) -> bool:
        return ("exp_avg" in self.state) or ("exp_avg_codes" in self.state)

    def _wrap(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Under FSDP2: a DTensor sharded on the kept dimension ``dim`` (so DCP saves every rank's piece)."""
        p = self.param
        if not is_dtensor(p) or p.device_mesh.ndim != 1:
            return t
        from torch.distributed.tensor import DTensor, Shard

        t = t.contiguous()
        shape = list(t.shape)
        shape[dim] = self.proj.kept_size
        return DTensor.from_local(t, p.device_mesh, [Shard(dim)], run_check=False, shape=tuple(shape),
                                  stride=(shape[1], 1))

    def _to_kr(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.proj.side == "right" else t.t()

    def read(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two moments in the projector's layout (``rank``: that of the stored moments; their
        shapes carry it here)."""
        s = self.state
        if not self.quantized:
            return to_local(s["exp_avg"]), to_local(s["exp_avg_sq"])
        m = dequantize_blockwise(to_local(s["exp_avg_codes"]), to_local(s["exp_avg_absmax"]), signed=True,
                                 block=self.block, dtype=self.dtype)
        root = dequantize_blockwise(to_local(s["exp_avg_sq_codes"]), to_local(s["exp_avg_sq_absmax"]),
                                    signed=False, block=self.block, dtype=self.dtype)
        return self._to_kr(m).contiguous(), self._to_kr(root * root).contiguous()

    def _noise(self) -> tuple[int, int, int, int] | None:
        """Stochastic rounding's ``(seed, step_m, step_v, first kept row)``: counter-based, so the
        codes do not depend on the sharding; ``None`` for round-to-nearest."""
        if not self.group["stochastic_rounding"]:
            return None
        s = self.state
        step = int(s["step"]) + 7919 * int(s["refreshes"])
        return int(s["seed"]), 2 * step, 2 * step + 1, self.proj.kept[0]

    def write(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, fresh: bool = False) -> None:
        """Store new moments (a no-op for plain moments already stored, unless ``fresh``)."""
        s = self.state
        if not self.quantized:
            if fresh or "exp_avg" not in s:
                dim = self.proj.kept_dim
                s["exp_avg"], s["exp_avg_sq"] = self._wrap(exp_avg, dim), self._wrap(exp_avg_sq, dim)
            return
        exp_avg, exp_avg_sq = self._to_kr(exp_avg), self._to_kr(exp_avg_sq)
        noise_m = noise_v = None
        noise = self._noise()
        if noise is not None:
            seed, step_m, step_v, offset = noise
            shape = tuple(exp_avg.shape)
            noise_m = hash_uniform(shape, offset, seed=seed, step=step_m, device=self.device)
            noise_v = hash_uniform(shape, offset, seed=seed, step=step_v, device=self.device)
        cm, am = quantize_blockwise(exp_avg, signed=True, block=self.block, noise=noise_m)
        cv, av = quantize_blockwise(exp_avg_sq.sqrt(), signed=False, block=self.block, noise=noise_v)
        s["exp_avg_codes"], s["exp_avg_absmax"] = self._wrap(cm), self._wrap(am)
        s["exp_avg_sq_codes"], s["exp_avg_sq_absmax"] = self._wrap(cv), self._wrap(av)

    def update(self, low: torch.Tensor, *, beta1: float, beta2: float, eps: float,
               bias_correction2_sqrt: float = 1.0, nesterov: bool = False) -> torch.Tensor:
        """The Adam moment update with the projected gradient ``low``, in place on the stored
        moments; returns the direction ``m~ / (sqrt(v) / bias_correction2_sqrt + eps)`` in the
        projector's layout, in the moments' dtype (the ops of :mod:`optimlib.kernels.adam`; 8-bit
        moments are dequantized, updated and requantized in the same pass)."""
        s = self.state
        hyper = dict(beta1=beta1, beta2=beta2, eps=eps, bias_correction2_sqrt=bias_correction2_sqrt,
                     nesterov=nesterov)
        if not self.quantized:
            return adam_lowrank_update_(to_local(s["exp_avg"]), to_local(s["exp_avg_sq"]), low, **hyper)
        direction = adam8bit_lowrank_update_(
            to_local(s["exp_avg_codes"]), to_local(s["exp_avg_absmax"]), to_local(s["exp_avg_sq_codes"]),
            to_local(s["exp_avg_sq_absmax"]), self._to_kr(low.to(self.dtype)), block=self.block, noise=self._noise(),
            **hyper)
        return self._to_kr(direction)

    def zeros(self, rank: int) -> torch.Tensor:
        return torch.zeros(self.proj.low_shape(rank), dtype=self.dtype, device=self.device)

    def init(self, rank: int) -> None:
        """Zero moments of rank ``rank``."""
        self.write(self.zeros(rank), self.zeros(rank), fresh=True)


class _SMMFMoments:
    """SMMF-factorized low-rank moments (``inner="smmf"``), with :class:`_Moments`' interface.

    The low-rank moments of a parameter form a ``(kept, r)`` matrix (kept-major: ``(m, r)`` for a
    right projection, the transpose of the ``(r, n)`` moments of a left one); this rank holds the
    contiguous rows ``kept`` of it, i.e. a contiguous piece of its flattening.  SMMF treats that
    matrix as any tensor: square-matricized (:func:`optimlib.optim.smmf.smmf_matrix_shape`), rank-1
    factors of ``|M|`` and ``V`` plus the packed sign bits of ``M``, row-sharded by
    :class:`optimlib.optim.smmf.SMMFLayout` (one all-reduce of the column sums per step; an edge
    exchange of one row when the pieces start mid-row).  State keys are SMMF's:
    ``exp_avg_row``/``exp_avg_col``/``exp_avg_sq_row``/``exp_avg_sq_col`` (float32) and
    ``exp_avg_sign`` (packed ``uint8``).  ``read``/``write`` decompress to and compress from the
    dense low-rank moments (used on basis refreshes only).
    """

    quantized = False

    def __init__(self, state: dict, projector: Projector, like: torch.Tensor, param):
        self.state, self.proj, self.param, self.device = state, projector, param, like.device

    def exists(self) -> bool:
        return "exp_avg_sq_row" in self.state

    def layout(self, rank: int) -> SMMFLayout:
        p = self.proj
        numel = p.kept_size * rank
        piece = FlatSlice(numel, tuple((a * rank, b * rank) for a, b in p.kept_bounds), p.block.piece.rank,
                          p.block.group)
        return SMMFLayout(numel, piece)

    def _flat(self, low: torch.Tensor) -> torch.Tensor:
        return low.reshape(-1) if self.proj.side == "right" else low.t().reshape(-1)

    def _unflat(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        kr = flat.view(self.proj.local_kept, rank)
        return kr if self.proj.side == "right" else kr.t()

    def init(self, rank: int) -> None:
        self.layout(rank).init_state(self.state, self.param, momentum=True, device=self.device)

    def zeros(self, rank: int) -> torch.Tensor:
        return torch.zeros(self.proj.low_shape(rank), dtype=torch.float32, device=self.device)

    def read(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rank = int(self.state["rank"]) if rank is None else rank
        m, v = self.layout(rank).read(self.state)
        return self._unflat(m, rank), self._unflat(v, rank)

    def write(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, fresh: bool = False) -> None:
        rank = exp_avg.shape[self.proj.rank_dim]
        self.layout(rank).write(self.state, self._flat(exp_avg), self._flat(exp_avg_sq), self.param)

    def update(self, low: torch.Tensor, *, beta1: float, beta2: float, eps: float) -> torch.Tensor:
        """SMMF's moment update with the projected gradient ``low`` (the op
        :func:`optimlib.kernels.smmf_update_`); returns ``M / (sqrt(V) + eps)`` in the projector's
        layout (float32)."""
        rank = low.shape[self.proj.rank_dim]
        update = self.layout(rank).update(self._flat(low), self.state, beta1=beta1, beta2=beta2, eps=eps)
        return self._unflat(update, rank)


def _on_refresh(policy: str, moments: _Moments, projector: Projector, old: dict, state: dict) -> None:
    """Carry the moments from the old basis (``old``) to the new one (in ``state``)."""
    r_old, r_new = int(old["rank"]), int(state["rank"])
    if policy == "reset":
        moments.init(r_new)
        state["moment_step"] = 0
        return
    if policy == "keep":
        if r_old == r_new:
            return
        m, v = moments.read(r_old)
        k = min(r_old, r_new)
        new_m, new_v = moments.zeros(r_new), moments.zeros(r_new)
        keep = (slice(None), slice(0, k)) if projector.rank_dim == 1 else (slice(0, k), slice(None))
        new_m[keep] = m[keep]
        new_v[keep] = v[keep]
        moments.write(new_m, new_v, fresh=True)
        return
    m, v = moments.read(r_old)
    o = projector.overlap(old, state, dtype=torch.float32, device=m.device)
    new_m = projector.transform(m.float(), o).to(m.dtype)
    new_v = projector.transform(v.float(), o * o).to(v.dtype)
    moments.write(new_m, new_v, fresh=True)


def galore_lowrank_(param: torch.Tensor, grad: torch.Tensor, state: dict, projector: Projector, moments, *,
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                    on_refresh: str, inner: str = "adamw", correct_bias: bool = True, basis_dtype=None,
                    delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False, decay_rate: float = -0.5,
                    growth_rate: float = 0.999) -> None:
    """One projected step of one parameter, in place on its local piece ``param``.

    ``grad``: the local gradient piece (laid out like ``param``); ``state``: the parameter's state
    (``step`` is incremented here); ``projector``: its :class:`Projector` (which carries the
    RowBlock); ``moments``: :class:`_Moments` (``adamw``/``adamp``) or :class:`_SMMFMoments`
    (``smmf``); ``inner``: the rule run in the projected space (see the module docstring).
    """
    block = projector.block
    # One process, whole parameter: the row view is a reshape (skip RowBlock's generic path).
    whole = not block.distributed and param.numel() == block.shape[0] * block.shape[1]
    grad_rows = grad.reshape(block.shape) if whole else block.rows(grad)
    if projector.needs_refresh(state):
        old = projector.snapshot(state)
        if projector.refresh(state, grad_rows, basis_dtype=basis_dtype) and old is not None and moments.exists():
            _on_refresh(on_refresh, moments, projector, old, state)
    low = projector.down(state, grad_rows)                        # (K, r) right, (r, K) left
    if not moments.exists():
        moments.init(low.shape[projector.rank_dim])
    state["step"] = int(state["step"]) + 1
    state["moment_step"] = t = int(state.get("moment_step", 0)) + 1
    if inner == "smmf":
        b1, b2 = smmf_betas(t, beta1, decay_rate, growth_rate)
        direction = moments.update(low, beta1=b1, beta2=b2, eps=eps)
        step_size = lr
    elif inner == "adamp":
        direction = moments.update(low, beta1=beta1, beta2=beta2, eps=eps,
                                   bias_correction2_sqrt=math.sqrt(1 - beta2 ** t), nesterov=nesterov)
        step_size = lr / (1 - beta1 ** t)
    else:
        direction = moments.update(low, beta1=beta1, beta2=beta2, eps=eps)
        step_size = _step_size(lr, beta1, beta2, t, correct_bias)
    a, b = projector.up_factors(state, direction.to(grad.dtype))  # up(direction) = a @ b: (R, n)
    if inner == "adamp":
        # AdamP's scale-invariance test and radial projection need the weight: they act on the
        # back-projected full-size update, against the weight and the (full) gradient rows.
        update = torch.matmul(a, b) * scale
        param_rows = param.reshape(block.shape) if whole else block.rows(param)
        update, wd_factor, _ = scale_invariant_projection(grad_rows, param_rows, update, block, delta=delta,
                                                          wd_ratio=wd_ratio, eps=eps)
        if weight_decay > 0.0:               # AdamP: decoupled decay before the update
            param.mul_(1 - lr * weight_decay * wd_factor)
        param.add_(update.view_as(param) if whole else block.to_local(update, like=param), alpha=-step_size)
        return
    # W <- W - step_size * scale * (a @ b) and the decoupled decay (after the update for AdamW as
    # galore-torch, before it for SMMF), fused: optimlib.kernels.galore_backproject_update_.
    through = block.aligned and param.is_contiguous()      # the owned rows are a view of ``param``
    rows = block.rows(param)
    galore_backproject_update_(rows, a, b, scale=scale, step_size=step_size, lr=lr, weight_decay=weight_decay,
                               decay_first=inner == "smmf")
    if not through:
        write_rows_(param, rows, block)


def galore_adamw_lowrank_(param: torch.Tensor, grad: torch.Tensor, state: dict, projector: Projector,
                          moments: _Moments, **kwargs) -> None:
    """:func:`galore_lowrank_` with the AdamW inner rule (galore-torch's update)."""
    galore_lowrank_(param, grad, state, projector, moments, inner="adamw", **kwargs)


# ----------------------------------------------------------------------------- the optimizer
class GaLoreAdamW(OptimizerBase):
    r"""GaLore AdamW (Zhao et al., ICML 2024, arXiv:2403.03507), a drop-in for ``galore_torch.GaLoreAdamW``.

    See the module docstring for the update rule, the group keys and the distributed contract.
    A param group is low-rank when it has a ``rank`` key; every low-rank key below can be set
    per group, the constructor's value being the default.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups; groups may carry
            ``names`` and ``shapes`` (as :func:`optimlib.optim.param_groups` records them; names
            appear in errors and seed random projections, shapes default to the parameters')).
        lr (>= 0), betas (each in [0, 1)), eps (>= 0), weight_decay (>= 0), correct_bias:
            galore-torch's AdamW arguments and defaults (eps 1e-6).
        update_proj_gap (int >= 1), scale (> 0), proj_type (std, reverse_std, left, right):
            defaults for low-rank groups (galore-torch / Hugging Face defaults 200, 0.25, std).
        projection: auto, svd, randomized, dct, random.  on_refresh: keep, rotate, reset.
        stagger: offset each low-rank parameter's refresh schedule (golden-ratio spacing in
            ``[0, update_proj_gap)``) so that refreshes are spread over the gap.
        energy (None or in (0, 1]), min_rank, max_rank: adaptive rank (also ``rank="auto"``,
            which uses ``energy=0.9`` unless given).
        oversample, power_iters: randomized range finder.  dct_norm: 1 or 2.
        moments_dtype: None (gradient dtype), float32, bfloat16, float16 or int8 (8-bit blockwise
            quantized low-rank moments).  quant_block: block length along the rank (>= 1).
        stochastic_rounding: unbiased rounding of quantized moments (hash-based, reproducible).
        basis_dtype: None (gradient dtype, as galore-torch) or float32/float64/bfloat16/float16.
        seed: base seed of the seeded bases (random, randomized sketches, fallbacks).
        canonical_signs: flip every new basis vector so that its largest-magnitude entry is
            positive (default; makes runs independent of the sharding).  ``False`` with
            ``projection="svd"`` reproduces galore-torch to the bit (see
            :mod:`optimlib.optim.projection`).
        shard_basis: on several ranks, each rank stores a column block of a right-projection
            basis (``(r, n)``) and the ranks all-gather it when they step (an ``r x n``
            collective per step); ``False`` replicates it (no collective, ``r n`` more bytes per rank).
        inner: the rule run in the projected space and on the other parameters: ``adamw``
            (default), ``adamp`` or ``smmf`` (see the module docstring).
        delta (>= 0), wd_ratio (in [0, 1]), nesterov: AdamP's, for ``inner="adamp"``.
        decay_rate (in [-1, 0]), growth_rate (in [0, 1]): SMMF's, for ``inner="smmf"``
            (``betas[0]`` is SMMF's ``beta``).
        no_deprecation_warning: accepted for drop-in compatibility with galore-torch; ignored.

    Invalid arguments raise ``ValueError`` (``TypeError`` for a non-number where a number is
    expected) naming the argument and its accepted range, at construction.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 projection: str = "auto", on_refresh: str = "keep", stagger: bool = False,
                 oversample: int = 8, power_iters: int = 2, energy: float | None = None, min_rank: int = 1,
                 max_rank: int | None = None, dct_norm: int = 1, moments_dtype: str | None = None,
                 quant_block: int = 256, stochastic_rounding: bool = True, basis_dtype: str | None = None,
                 seed: int = 0, canonical_signs: bool = True, shard_basis: bool = True, inner: str = "adamw",
                 delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False, decay_rate: float = -0.5,
                 growth_rate: float = 0.999, no_deprecation_warning: bool = True):
        defaults = dict(lr=lr, betas=check_betas("betas", betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=bool(correct_bias), update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, projection=projection, on_refresh=on_refresh, stagger=stagger,
                        oversample=oversample, power_iters=power_iters, energy=energy, min_rank=min_rank,
                        max_rank=max_rank, dct_norm=dct_norm, moments_dtype=moments_dtype,
                        quant_block=quant_block, stochastic_rounding=stochastic_rounding,
                        basis_dtype=basis_dtype, seed=seed, canonical_signs=canonical_signs,
                        shard_basis=shard_basis, inner=inner, delta=delta, wd_ratio=wd_ratio,
                        nesterov=bool(nesterov), decay_rate=decay_rate, growth_rate=growth_rate)
        self._lowrank_count = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if is_lowrank_group(group):
            n = len(group["params"])
            if group["stagger"] and "refresh_offsets" not in group:
                gap = group["update_proj_gap"]
                group["refresh_offsets"] = [int(((self._lowrank_count + j) * _GOLDEN) % 1.0 * gap)
                                            for j in range(n)]
            self._lowrank_count += n

    @staticmethod
    def _validate_common(group: dict) -> None:
        check_real("lr", group["lr"], low=0.0, allow_tensor=True)
        check_betas("betas", group["betas"])
        check_real("eps", group["eps"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)
        check_choice("inner", group["inner"], INNER_RULES)
        check_real("delta", group["delta"], low=0.0)
        check_real("wd_ratio", group["wd_ratio"], low=0.0, high=1.0)
        validate_smmf_hyperparameters(decay_rate=group["decay_rate"], growth_rate=group["growth_rate"])

    def _validate_defaults(self, defaults: dict) -> None:
        # The options every group uses (low-rank ones are checked per low-rank group).
        self._validate_common(defaults)
        if defaults["inner"] == "smmf" and defaults["moments_dtype"] is not None:
            _bad("moments_dtype", defaults["moments_dtype"], "None with inner='smmf' (SMMF stores its own "
                 "float32 factors and 1-bit signs)")

    @classmethod
    def _validate_group(cls, group: dict) -> None:
        cls._validate_common(group)
        shapes = group.get("shapes")
        if shapes is not None and len(shapes) != len(group["params"]):
            raise ValueError(f"param group has {len(group['params'])} parameters but {len(shapes)} shapes")
        if not is_lowrank_group(group):
            return
        ProjectionConfig.from_group(group).validate()
        scale = group["scale"]
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
                and scale > 0):
            _bad("scale", scale, "a finite number > 0")
        if group["on_refresh"] not in ON_REFRESH:
            _bad("on_refresh", group["on_refresh"], f"one of {', '.join(ON_REFRESH)}")
        if group["moments_dtype"] not in MOMENTS_DTYPES:
            _bad("moments_dtype", group["moments_dtype"], "None, 'float32', 'bfloat16', 'float16' or 'int8'")
        if group["inner"] == "smmf" and group["moments_dtype"] is not None:
            _bad("moments_dtype", group["moments_dtype"], "None with inner='smmf' (SMMF stores its own float32 "
                 "factors and 1-bit signs)")
        if group["basis_dtype"] not in BASIS_DTYPES:
            _bad("basis_dtype", group["basis_dtype"], "None, 'float32', 'float64', 'bfloat16' or 'float16'")
        qb = group["quant_block"]
        if not (isinstance(qb, int) and not isinstance(qb, bool) and qb >= 1):
            _bad("quant_block", qb, "an integer >= 1")
        if not isinstance(group["stagger"], bool):
            _bad("stagger", group["stagger"], "True or False")
        offsets = group.get("refresh_offsets")
        if offsets is not None and (len(offsets) != len(group["params"])
                                    or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            _bad("refresh_offsets", offsets, "one integer >= 0 per parameter")

    def layerwise(self, accumulation_steps: int = 1) -> "LayerwiseStepper":
        """Switch to layer-wise (optimizer-in-backward) stepping; see :class:`LayerwiseStepper`."""
        return LayerwiseStepper(self, accumulation_steps)

    # ------------------------------------------------------------------ step
    _CONFIG_FIELDS = tuple(ProjectionConfig.__dataclass_fields__)

    def _config(self, group: dict) -> ProjectionConfig:
        """The group's ProjectionConfig, rebuilt only when one of its keys changed."""
        key = tuple(group.get(k) for k in self._CONFIG_FIELDS)
        cache = self.__dict__.setdefault("_config_cache", {})
        hit = cache.get(id(group))
        if hit is None or hit[0] != key:
            hit = (key, ProjectionConfig.from_group(group))
            cache[id(group)] = hit
        return hit[1]

    def _step_group(self, group_index: int, group: dict) -> None:
        dense = _DenseBatch()
        for unit in self.param_units(group_index, group):
            self._step_unit(group, unit, dense)
        dense.run(group)

    def _step_param(self, group: dict, gi: int, i: int, p: torch.Tensor) -> None:
        """Step parameter ``p`` (``group["params"][i]``, with a gradient) on its own (layer-wise mode)."""
        self._step_unit(group, self.param_unit(gi, group, i, p), None)

    def _step_unit(self, group: dict, unit: ParamUnit, dense: "_DenseBatch | None") -> None:
        """Step one parameter.  The AdamW rule on a full gradient is appended to ``dense`` (run
        for the whole group as multi-tensor ops) when given, else run at once (layer-wise mode)."""
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        p, local, piece, shape, g, state, name = (unit.param, unit.local, unit.piece, unit.shape, unit.grad,
                                                  unit.state, unit.name)
        if not state:
            state["step"] = 0
            state["seed"] = name_seed(name, int(group.get("seed", 0)))
        if is_lowrank_group(group) and len(shape) >= 2 and math.prod(shape) > 0:  # empty: the dense rule
            config = self._config(group)
            offsets = group.get("refresh_offsets")
            block = RowBlock(matrix_shape(shape), piece)
            mesh = p.device_mesh if is_dtensor(p) and p.device_mesh.ndim == 1 else None
            projector = Projector(config, block, offset=offsets[unit.index] if offsets else 0, name=name, mesh=mesh)
            inner = group["inner"]
            moments = (_SMMFMoments(state, projector, g, p) if inner == "smmf"
                       else _Moments(state, group, projector, g, p))
            bd = group["basis_dtype"]
            galore_lowrank_(local, g, state, projector, moments, lr=lr, beta1=beta1, beta2=beta2,
                            eps=group["eps"], weight_decay=group["weight_decay"], scale=float(group["scale"]),
                            on_refresh=group["on_refresh"], inner=inner, correct_bias=group["correct_bias"],
                            basis_dtype=getattr(torch, bd) if bd else None, delta=group["delta"],
                            wd_ratio=group["wd_ratio"], nesterov=group["nesterov"],
                            decay_rate=group["decay_rate"], growth_rate=group["growth_rate"])
            return
        self._step_dense(group, p, local, piece, shape, g, state, dense)

    @staticmethod
    def _step_dense(group: dict, p: torch.Tensor, local: torch.Tensor, piece, shape, g: torch.Tensor,
                    state: dict, dense: "_DenseBatch | None") -> None:
        """The inner rule on the full gradient (groups without ``rank``, 0-/1-D parameters): the
        inner optimizer's own per-parameter step (galore-torch's AdamW, AdamP, SMMF)."""
        beta1, beta2 = group["betas"]
        lr, inner = float(group["lr"]), group["inner"]
        if inner == "smmf":
            state["step"] = int(state["step"]) + 1
            smmf_param_(local, g, piece, shape, state, state["step"], p, lr=lr, beta=beta1, eps=group["eps"],
                        weight_decay=group["weight_decay"], decay_rate=group["decay_rate"],
                        growth_rate=group["growth_rate"])
            return
        if "exp_avg" not in state:
            # zeros_like(p): a DTensor under FSDP2 (distributed checkpoints shard it).
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1
        if inner == "adamp":
            adamp_param_(local, g, to_local(state["exp_avg"]), to_local(state["exp_avg_sq"]), state["step"], shape,
                         piece, beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"],
                         eps=group["eps"], delta=group["delta"], wd_ratio=group["wd_ratio"],
                         nesterov=group["nesterov"])
            return
        batch = dense if dense is not None else _DenseBatch()
        batch.add(local, g, to_local(state["exp_avg"]), to_local(state["exp_avg_sq"]), state["step"])
        if dense is None:
            batch.run(group)


class _DenseBatch:
    """The local pieces of one group's parameters that take galore-torch's AdamW on their full
    gradient, collected during a step and updated together by :func:`galore_adamw_dense_`."""

    def __init__(self):
        self.lists: tuple[list, ...] = ([], [], [], [], [])

    def add(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
            step: int) -> None:
        for lst, value in zip(self.lists, (param, grad, exp_avg, exp_avg_sq, step)):
            lst.append(value)

    def run(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        galore_adamw_dense_(*self.lists, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], correct_bias=group["correct_bias"])


# ----------------------------------------------------------------------------- layer-wise stepping
class LayerwiseStepper:
    """Optimizer-in-backward: step each parameter as soon as its gradient is final, then free it.

    ``optimizer`` is a :class:`GaLoreAdamW` (or any optimizer with the same ``_step_param``).  A
    post-accumulate-grad hook on every parameter steps that parameter -- with the optimizer's own
    param group, state and current learning rate -- during the backward pass of the last
    micro-batch of each accumulation window, and sets its ``.grad`` to ``None`` right away, so
    that full gradients of all layers never coexist.  Earlier micro-batches only accumulate
    gradients as usual.  Usage (``accumulation_steps=4``)::

        stepper = LayerwiseStepper(optimizer, accumulation_steps=4)   # or optimizer.layerwise(4)
        for micro_batch in loader:
            (loss_fn(model(micro_batch)) / 4).backward()   # the 4th backward updates the weights
            if stepper.step():                             # True at the accumulation boundary
                scheduler.step()                           # one LR clock per optimizer step

    ``step()`` must be called once after every micro-batch's backward; at a boundary it also
    steps any parameter whose hook did not fire (so nothing is skipped).  There is one optimizer
    and therefore one LR schedule (not one per parameter, whose doubled clock is a known bug of
    the per-layer scripts of galore-torch).

    Layouts: one process, and FSDP2 (``fully_shard``) where the hook runs on the sharded
    parameter after the reduce-scatter (FSDP2 calls post-accumulate-grad hooks of sharded
    parameters), with the ranks running the hooks in the same order.  Not for DDP (its hooks fire
    before the all-reduce) nor DeepSpeed (it owns the gradients); and gradient clipping by the
    global norm cannot be applied (the gradients are consumed before the norm is known).
    """

    def __init__(self, optimizer: "GaLoreAdamW", accumulation_steps: int = 1):
        if not (isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
                and accumulation_steps >= 1):
            _bad("accumulation_steps", accumulation_steps, "an integer >= 1")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.micro_step = 0
        self._stepped: set[int] = set()
        self._handles = []
        self._index: dict[int, tuple[int, int]] = {}
        for gi, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if not p.requires_grad or id(p) in self._index:
                    continue
                self._index[id(p)] = (gi, i)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @property
    def is_boundary(self) -> bool:
        """Whether the next backward pass ends an accumulation window (and so steps)."""
        return (self.micro_step + 1) % self.accumulation_steps == 0

    def _step_one(self, p: torch.Tensor) -> None:
        gi, i = self._index[id(p)]
        with torch.no_grad():
            self.optimizer._step_param(self.optimizer.param_groups[gi], gi, i, p)
        self._stepped.add(id(p))
        p.grad = None

    def _hook(self, p: torch.Tensor) -> None:
        if self.is_boundary and p.grad is not None and id(p) not in self._stepped:
            self._step_one(p)

    def step(self) -> bool:
        """Call after each micro-batch's backward; returns ``True`` if the parameters were stepped."""
        boundary = self.is_boundary
        if boundary:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None and id(p) not in self._stepped and id(p) in self._index:
                        self._step_one(p)
            self._stepped.clear()
            # Tell torch's LR schedulers that the optimizer stepped (they check this flag to warn
            # about scheduler.step() before optimizer.step()).
            self.optimizer._opt_called = True
        self.micro_step += 1
        return boundary

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop accumulated gradients (those not consumed yet)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step, "accumulation_steps": self.accumulation_steps}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])

    def remove(self) -> None:
        """Remove the hooks (back to ordinary ``optimizer.step()``)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------- registry
from optimlib.optim.factory import register_optimizer  # noqa: E402


def _builder(inner: str):
    def build(groups, lr, **kwargs):
        given = kwargs.pop("inner", inner)
        if given != inner:
            raise ValueError(f"invalid inner={given!r} for galore_{inner}: use optimizer 'galore_{given}' or "
                             f"'galore_adamw' with inner={given!r}")
        return GaLoreAdamW(groups, lr=lr, inner=inner, **kwargs)
    return build


_GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}


def _build_galore_adamw(groups, lr, **kwargs):
    # Any inner rule may be chosen with galore_adamw's ``inner=`` keyword.
    return GaLoreAdamW(groups, lr=lr, **kwargs)


register_optimizer(
    "galore_adamw", _build_galore_adamw, shape_aware=True, matrix_keys=LOWRANK_KEYS, defaults=_GALORE_DEFAULTS,
    description="GaLore AdamW (Zhao et al., ICML 2024): Adam on a refreshed low-rank gradient projection")
register_optimizer(
    "galore_adamp", _builder("adamp"), shape_aware=True, matrix_keys=LOWRANK_KEYS, defaults=_GALORE_DEFAULTS,
    description="GaLore with AdamP's rule: low-rank Adam moments, radial projection of the back-projected update")
register_optimizer(
    "galore_smmf", _builder("smmf"), shape_aware=True, matrix_keys=LOWRANK_KEYS, defaults=_GALORE_DEFAULTS,
    description="GaLore with SMMF's rule: square-matricized rank-1 factors of the low-rank moments, 1-bit sign")
