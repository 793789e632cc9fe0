r"""SMMF: Square-Matricized Momentum Factorization.

Park & Lee, "SMMF: Square-Matricized Momentum Factorization for Memory-Efficient Optimization",
AAAI 2025, arXiv:2412.08894.  Written from the paper's equations (the reference code is not
licensed and was not used).

Each parameter (any rank, 0-D to N-D) is viewed as a near-square ``(rows, cols)`` matrix
:math:`\bar G` of its gradient.  Both Adam moments are kept as one rank-1 non-negative factor
pair each, plus the first moment's sign as a 1-bit matrix.  Step :math:`t` (per parameter)::

    beta1_t = beta * growth_rate ** (t - 1)            # time-varying first-moment rate
    beta2_t = 1 - t ** decay_rate                      # decay_rate in [-1, 0]; beta2_1 = 0
    M_hat = S (.) (r_M c_M^T);   V_hat = r_V c_V^T     # decompress (S = +-1 from the sign bits)
    M = beta1_t M_hat + (1 - beta1_t) G
    V = beta2_t V_hat + (1 - beta2_t) G^2
    S <- sign bits of M (1 = positive)
    r_X = row sums of |X|,  c_X = column sums of |X| / sum(|X|)   for X in (M, V)   # rank-1 NNMF
    W <- W (1 - lr * weight_decay)                     # weight_decay_mode="adamw"
    W <- W - lr * M / (sqrt(V) + eps)                  # with this step's uncompressed M, V

No bias correction.  ``weight_decay_mode="adam"`` instead adds ``weight_decay * W`` to the
gradient.  ``beta=None`` keeps no first moment (update ``G / (sqrt(V) + eps)``).  With
``vector_reshape=False`` parameters with at most one dimension keep full-size moments (same
schedules) instead of factors.  :math:`r_X c_X^T` is the closed-form rank-1 factorization that
minimises the I-divergence to :math:`|X|`; it is exact whenever :math:`|X|` has rank 1.

Memory: ``rows + cols`` floats per moment and ``rows * cols / 8`` bytes of packed sign bits
(:mod:`optimlib.formats.bitpack`), i.e. about 1/64 of Adam's ``8 N`` bytes for a large matrix
(the paper's "up to 96 %" with a byte-per-element sign; ~98 % bit-packed).

Prime sizes (padding, not splitting).  The most nearly square factorisation of ``N`` can be
very lopsided (``N`` prime gives ``(N, 1)``, ``2p`` gives ``(p, 2)``), which would store the
factors at full size and silently lose the saving.  :func:`smmf_matrix_shape` therefore pads:
when the exact shape ``(a, b)`` has ``a + b > 2 * (r + c)`` for ``c = isqrt(N)``,
``r = ceil(N / c)``, the parameter is viewed as ``(r, c)`` with ``r * c - N < c`` virtual zero
elements at the end.  Those elements carry no gradient and their moments are held at zero (so
they only enter the factors as zeros); they are never written to the parameter.

Distributed: the ``(rows, cols)`` matrix is row-sharded with :class:`optimlib.distributed.RowBlock`
(``rows >= cols`` always): the row factors and the sign bits of a rank's owned rows stay on that
rank, the column factors are the all-reduce of the ranks' partial column sums (one collective of
``2 * cols`` numbers per parameter and step, plus RowBlock's edge exchange of one row when shards
start mid-row).  Under FSDP2 the rank-local state is stored as ``(world, k)`` DTensors sharded on
dim 0 (one slot per rank) so that distributed checkpoints save every rank's piece.

Peak memory: parameters are processed one at a time, with the full-size ``M``/``V`` temporaries
of only that parameter's owned rows alive at any moment.

:func:`smmf_direction` is the reusable core over ``(R, n)`` owned rows and a ``RowBlock``;
:class:`SMMFLayout` places any tensor's factors (its matrix view, padding, row shards, FSDP2 slots)
and is what both :class:`SMMF` and GaLore's ``inner="smmf"`` (the low-rank moments,
:mod:`optimlib.optim.galore`) step; :func:`smmf_decompress` / :func:`smmf_compress_` convert
between factors and dense moments (GaLore's ``rotate`` refresh policy uses them).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from optimlib.distributed.layout import is_dtensor, shard_like, to_local
from optimlib.distributed.row_block import FlatSlice, RowBlock, isqrt, near_square
from optimlib.optim._common import OptimizerBase, ParamUnit
from optimlib.optim.state_spec import PER_RANK, REPLICATED, Placement, RankRows, StateSpec, elementwise, step_spec
from optimlib.validation import check_choice, check_real
from optimlib.kernels.smmf import smmf_decompress, smmf_factor_sums_, smmf_update_
from optimlib.formats.bitpack import packed_numel

__all__ = ["SMMF", "SMMFLayout", "smmf_direction", "smmf_decompress", "smmf_compress_", "smmf_param_",
           "smmf_matrix_shape", "smmf_betas", "init_smmf_state"]


# ----------------------------------------------------------------------------- shapes and schedules
def smmf_matrix_shape(numel: int) -> tuple[int, int]:
    """The ``(rows, cols)`` matrix SMMF views a parameter of ``numel`` elements as.

    ``rows >= cols`` and ``rows * cols >= numel``: the most nearly square exact factorisation,
    unless padding to ``(ceil(numel / isqrt(numel)), isqrt(numel))`` halves the factor length
    (prime and other lopsided sizes; see the module docstring).
    """
    numel = int(numel)
    if numel <= 0:
        return (0, 1)
    a, b = near_square(numel)
    cols = isqrt(numel)
    rows = -(-numel // cols)
    if a + b > 2 * (rows + cols):
        return rows, cols
    return a, b


def smmf_betas(step: float, beta: float | None, decay_rate: float, growth_rate: float) -> tuple[float | None, float]:
    """``(beta1_t, beta2_t)`` at (1-based) step ``step``."""
    beta1 = None if beta is None else beta * growth_rate ** (step - 1)
    beta2 = 1.0 - step ** decay_rate
    return beta1, beta2


def init_smmf_state(num_rows: int, num_cols: int, *, momentum: bool = True, device=None) -> dict[str, torch.Tensor]:
    """Zero factor state for ``num_rows`` owned rows of a matrix with ``num_cols`` columns."""
    f32 = dict(dtype=torch.float32, device=device)
    state = {"exp_avg_sq_row": torch.zeros(num_rows, **f32), "exp_avg_sq_col": torch.zeros(num_cols, **f32)}
    if momentum:
        state["exp_avg_row"] = torch.zeros(num_rows, **f32)
        state["exp_avg_col"] = torch.zeros(num_cols, **f32)
        state["exp_avg_sign"] = torch.zeros(packed_numel(num_rows * num_cols), dtype=torch.uint8, device=device)
    return state


# ----------------------------------------------------------------------------- the core
def _normalise(col: torch.Tensor) -> torch.Tensor:
    total = col.sum()
    return col / torch.where(total > 0, total, torch.ones_like(total))


def _store_columns(col_sums: torch.Tensor, *, exp_avg_sq_col: torch.Tensor,
                   exp_avg_col: torch.Tensor | None = None) -> None:
    """Normalise the (all-reduced) column sums ``[|M|^T 1, V^T 1]`` into the column factors."""
    if exp_avg_col is not None:
        exp_avg_col.copy_(_normalise(col_sums[0]))
    exp_avg_sq_col.copy_(_normalise(col_sums[-1]))


def smmf_compress_(m: torch.Tensor | None, v: torch.Tensor, block: RowBlock, *, exp_avg_sq_row: torch.Tensor,
                   exp_avg_sq_col: torch.Tensor, exp_avg_row: torch.Tensor | None = None,
                   exp_avg_col: torch.Tensor | None = None, exp_avg_sign: torch.Tensor | None = None) -> None:
    """Store dense ``(R, n)`` owned rows of the moments as factors, in place: the sign bits of ``M``
    and the closed-form rank-1 factors ``r = |X| 1``, ``c = |X|^T 1 / 1^T |X| 1`` of ``|M|`` and ``V``.

    Collective: one ``all_reduce`` of the ``2 n`` (or ``n``) partial column sums when ``block``
    spans several ranks; every rank must call it.
    """
    col_sums = smmf_factor_sums_(m, v, exp_avg_sq_row=exp_avg_sq_row, exp_avg_row=exp_avg_row,
                                 exp_avg_sign=exp_avg_sign)
    block.all_reduce(col_sums.view(-1))
    _store_columns(col_sums, exp_avg_sq_col=exp_avg_sq_col, exp_avg_col=exp_avg_col)


def smmf_direction(grad_rows: torch.Tensor, block: RowBlock, *, exp_avg_sq_row: torch.Tensor,
                   exp_avg_sq_col: torch.Tensor, beta2: float, eps: float,
                   exp_avg_row: torch.Tensor | None = None, exp_avg_col: torch.Tensor | None = None,
                   exp_avg_sign: torch.Tensor | None = None, beta1: float | None = None,
                   valid_numel: int | None = None, apply: tuple | None = None) -> torch.Tensor | None:
    """One SMMF moment update on this rank's owned rows; returns the update rows ``M / (sqrt(V) + eps)``.

    ``grad_rows``: the ``(R, n)`` rows ``[block.row_start, block.row_end)`` of the ``(m, n)``
    matrix view of the gradient.  The factor tensors (float32) are updated in place:
    ``*_row`` hold the ``R`` owned row sums, ``*_col`` the ``n`` normalised column sums (equal on
    every rank), ``exp_avg_sign`` the packed sign bits of the owned rows (row-major).  Pass
    ``beta1=None`` (and no first-moment tensors) for the variant without a first moment.
    ``valid_numel``: elements of the flattened matrix at or beyond this index are padding; their
    moments are held at zero.

    The step itself is the op :func:`optimlib.kernels.smmf_update_` (Triton on CUDA, its PyTorch
    twin elsewhere); this function adds the all-reduce of its partial column sums and their
    normalisation.  Collective: one ``all_reduce`` of ``2 n`` (or ``n``) numbers when ``block``
    spans several ranks; every rank must call it.  The result is float32 (callers cast to the
    parameter dtype).  ``apply = (weight_rows, lr, weight_decay)``: apply the update to the owned
    weight rows instead (:func:`~optimlib.kernels.smmf_update_`) and return ``None``.
    """
    R, n = grad_rows.shape
    pad_from = None
    if valid_numel is not None:
        pad_from = max(valid_numel - block.row_start * n, 0)
    direction, col_sums = smmf_update_(grad_rows, exp_avg_sq_row=exp_avg_sq_row, exp_avg_sq_col=exp_avg_sq_col,
                                       exp_avg_row=exp_avg_row, exp_avg_col=exp_avg_col, exp_avg_sign=exp_avg_sign,
                                       beta1=beta1, beta2=beta2, eps=eps, pad_from=pad_from, apply=apply)
    block.all_reduce(col_sums.view(-1))
    _store_columns(col_sums, exp_avg_sq_col=exp_avg_sq_col, exp_avg_col=exp_avg_col)
    return direction


# ----------------------------------------------------------------------------- layout helpers
def _extend(piece: FlatSlice, total: int) -> FlatSlice:
    """``piece`` with the flat parameter extended by virtual zeros to ``total`` elements."""
    if total == piece.numel:
        return piece
    n = piece.numel
    bounds = tuple((a if a < n else total, b if b < n else total) for a, b in piece.bounds)
    return dataclasses.replace(piece, numel=total, bounds=bounds)


def _ext_flat(t: torch.Tensor, piece: FlatSlice, ext: FlatSlice) -> torch.Tensor:
    """The rank's ``[a, b)`` elements of ``t`` (local layout), plus the virtual zeros of ``ext``."""
    flat = t.reshape(-1)[: piece.stop - piece.start]
    extra = (ext.stop - ext.start) - flat.numel()
    if extra > 0:
        flat = torch.cat([flat, flat.new_zeros(extra)])
    return flat


def _slot(local: torch.Tensor, size: int, p: torch.Tensor, piece: FlatSlice) -> torch.Tensor:
    """Rank-local state; under FSDP2 a ``(world, size)`` DTensor with one row per rank."""
    if not is_dtensor(p):
        return local
    buf = local.new_zeros(1, size)
    buf[0, : local.numel()] = local
    return shard_like(p.device_mesh, piece, buf, 0, (piece.world_size, size))


def _unslot(t: torch.Tensor, length: int) -> torch.Tensor:
    if is_dtensor(t):
        return to_local(t)[0, :length]
    return t


_FACTOR_KEYS = ("exp_avg_row", "exp_avg_col", "exp_avg_sq_row", "exp_avg_sq_col")


class SMMFLayout:
    """Where the SMMF factors of one tensor live, whatever holds it.

    ``numel``: elements of the whole tensor (flattened row-major); ``piece``: this rank's contiguous
    ``[a, b)`` of it (:class:`optimlib.distributed.FlatSlice`).  The tensor is viewed as the
    near-square ``(rows, cols)`` matrix of :func:`smmf_matrix_shape` (zero-padded where that halves
    the factors) and row-sharded with a :class:`RowBlock`.  The same layout serves a parameter (SMMF)
    and a projected low-rank moment (GaLore with ``inner="smmf"``).

    Under FSDP2 (``param`` a DTensor) the rank-local state -- row factors and sign bits -- is stored
    as ``(world, k)`` DTensors sharded on dim 0 (one slot per rank), so distributed checkpoints save
    every rank's piece; the column factors are equal on every rank and stored as plain tensors.
    """

    def __init__(self, numel: int, piece: FlatSlice):
        self.numel = int(numel)
        self.piece = piece
        self.rows, self.cols = smmf_matrix_shape(self.numel)
        self.ext = _extend(piece, self.rows * self.cols)
        self.block = RowBlock((self.rows, self.cols), self.ext)
        self.count = piece.stop - piece.start

    @property
    def padded(self) -> bool:
        return self.rows * self.cols != self.numel

    def init_state(self, state: dict, param: torch.Tensor, *, momentum: bool = True, device=None) -> None:
        """Zero factors into ``state`` (replacing any there)."""
        R = self.block.num_rows
        most = max(e - s for s, e in self.block.owned_rows)
        fresh = init_smmf_state(R, self.cols, momentum=momentum, device=device)
        if not momentum:
            for key in ("exp_avg_row", "exp_avg_col", "exp_avg_sign"):
                state.pop(key, None)
        for key, value in fresh.items():
            if key.endswith("_row"):
                state[key] = _slot(value, most, param, self.piece)
            elif key == "exp_avg_sign":
                state[key] = _slot(value, packed_numel(most * self.cols), param, self.piece)
            else:  # column factors are identical on every rank: plain (replicated) tensors
                state[key] = value

    def state_specs(self, *, momentum: bool, dtensor: bool) -> list[StateSpec]:
        """The declared factors (:mod:`optimlib.optim.state_spec`): float32 row factors and packed
        sign bits of each rank's owned rows (``per_rank``: one slot per rank under FSDP2, ``dtensor``),
        float32 column factors (``replicated``)."""
        owned = tuple(e - s for s, e in self.block.owned_rows)
        mine = self.block.num_rows

        def rows(key: str, division: RankRows, dtype: torch.dtype, component: str) -> StateSpec:
            local = division.slot_numel() if dtensor else division.numel(mine)
            return StateSpec(key, (division.whole_numel(),), dtype, PER_RANK, local, component, rows=division)

        def cols(key: str) -> StateSpec:
            return StateSpec(key, (self.cols,), torch.float32, REPLICATED, self.cols, "factors")

        specs = [rows("exp_avg_sq_row", RankRows(owned), torch.float32, "factors"), cols("exp_avg_sq_col")]
        if momentum:
            specs += [rows("exp_avg_row", RankRows(owned), torch.float32, "factors"), cols("exp_avg_col"),
                      rows("exp_avg_sign", RankRows(owned, self.cols, packed=True), torch.uint8, "sign")]
        return specs

    def factors(self, state: dict) -> dict[str, torch.Tensor]:
        """The plain local factor tensors in ``state`` (views: updates write through)."""
        R = self.block.num_rows
        out = {k: _unslot(state[k], R if k.endswith("_row") else self.cols) for k in _FACTOR_KEYS if k in state}
        if "exp_avg_sign" in state:
            out["exp_avg_sign"] = _unslot(state["exp_avg_sign"], packed_numel(R * self.cols))
        return out

    def update(self, grad: torch.Tensor, state: dict, *, beta1: float | None, beta2: float,
               eps: float) -> torch.Tensor:
        """One SMMF step of the moments with ``grad`` (laid out like the piece); returns the float32
        update ``M / (sqrt(V) + eps)`` of the piece, flat (``b - a`` elements)."""
        g_rows = self.block.rows(_ext_flat(grad, self.piece, self.ext))
        rows = smmf_direction(g_rows, self.block, beta1=beta1, beta2=beta2, eps=eps,
                              valid_numel=self.numel if self.padded else None, **self.factors(state))
        del g_rows
        return self.block.to_local(rows)[: self.count]

    def owned_rows_of(self, local: torch.Tensor) -> torch.Tensor | None:
        """``local`` (the piece) as the ``(R, cols)`` owned rows it exactly is -- no padding, rows
        aligned, contiguous -- or ``None``."""
        R = self.block.num_rows
        if self.padded or not self.block.aligned or not local.is_contiguous() or local.numel() != R * self.cols:
            return None
        return local.view(R, self.cols)

    def step_(self, grad: torch.Tensor, state: dict, weight_rows: torch.Tensor, *, beta1: float | None,
              beta2: float, eps: float, lr: float, weight_decay: float) -> None:
        """:meth:`update` and ``w <- w (1 - lr wd) - lr d`` on ``weight_rows`` (:meth:`owned_rows_of`)
        in one pass (:func:`~optimlib.kernels.smmf_update_`'s ``apply``)."""
        g_rows = self.block.rows(_ext_flat(grad, self.piece, self.ext))
        smmf_direction(g_rows, self.block, beta1=beta1, beta2=beta2, eps=eps, apply=(weight_rows, lr, weight_decay),
                       **self.factors(state))

    def read(self, state: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The decompressed moments ``(M_hat, V_hat)`` of the piece, flat float32 (``M_hat`` is
        ``None`` without a first moment)."""
        m, v = smmf_decompress(self.block.num_rows, self.cols, **self.factors(state))
        outs = [self.block.to_local(t)[: self.count] for t in ((v,) if m is None else (m, v))]
        return (None, outs[0]) if m is None else (outs[0], outs[1])

    def write(self, state: dict, m: torch.Tensor | None, v: torch.Tensor, param: torch.Tensor) -> None:
        """Compress dense moments of the piece (flat, ``b - a`` elements) into fresh factors."""
        self.init_state(state, param, momentum=m is not None, device=v.device)
        flats = [_ext_flat(t.float(), self.piece, self.ext) for t in ((v,) if m is None else (m, v))]
        rows = self.block.rows_many(flats)
        m_rows, v_rows = (None, rows[0]) if m is None else (rows[0], rows[1])
        smmf_compress_(m_rows, v_rows, self.block, **self.factors(state))


def smmf_state_specs(place: Placement, *, momentum: bool, vector_reshape: bool = True) -> list[StateSpec]:
    """The state :func:`smmf_param_` keeps for a parameter placed as ``place`` (its step counter
    aside): the factors of :meth:`SMMFLayout.state_specs`, or full float32 moments for a 0-/1-D
    parameter without ``vector_reshape``; nothing for an empty one."""
    if place.shape is None:
        raise ValueError("SMMF needs the parameter's shape (one parameter per param group under DeepSpeed)")
    numel = math.prod(place.shape)
    if numel == 0:
        return []
    if not (len(place.shape) >= 2 or vector_reshape):
        second = elementwise("exp_avg_sq", place, transform="square", dtype=torch.float32)
        return [elementwise("exp_avg", place, transform="linear", dtype=torch.float32), second] if momentum \
            else [second]
    return SMMFLayout(numel, place.piece).state_specs(momentum=momentum, dtensor=place.dtensor)


def smmf_param_(local: torch.Tensor, grad: torch.Tensor, piece: FlatSlice, shape, state: dict, step: int,
                param: torch.Tensor, *, lr: float, beta: float | None, eps: float, weight_decay: float,
                decay_rate: float, growth_rate: float, vector_reshape: bool = True,
                weight_decay_mode: str = "adamw") -> None:
    """One SMMF step of one parameter, in place on its local piece ``local``.

    ``grad``: the local gradient piece; ``piece``/``shape``: where it lies in the global parameter
    (:func:`optimlib.distributed.local_piece`); ``state``: its factors (created here on the first
    call); ``step``: the 1-based step (already incremented); ``param``: the parameter as the
    optimizer holds it (a DTensor under FSDP2, for the state layout).
    """
    numel = math.prod(shape)
    if numel == 0:
        return
    beta1, beta2 = smmf_betas(step, beta, decay_rate, growth_rate)
    if weight_decay > 0 and weight_decay_mode == "adam":
        grad = grad.add(local, alpha=weight_decay)

    if not (len(shape) >= 2 or vector_reshape):
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
            if beta is not None:
                state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32,
                                                    memory_format=torch.preserve_format)
        exp_avg_sq = to_local(state["exp_avg_sq"])
        g = grad.float()
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        if beta1 is None:
            update = g / denom
        else:
            exp_avg = to_local(state["exp_avg"])
            exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
            update = exp_avg / denom
        if weight_decay > 0 and weight_decay_mode == "adamw":
            local.mul_(1 - lr * weight_decay)
        local.add_(update.to(local.dtype), alpha=-lr)
        return

    layout = SMMFLayout(numel, piece)
    if "exp_avg_sq_row" not in state:
        layout.init_state(state, param, momentum=beta is not None, device=local.device)
    weight_rows = layout.owned_rows_of(local)
    if weight_rows is not None:
        layout.step_(grad, state, weight_rows, beta1=beta1, beta2=beta2, eps=eps, lr=lr,
                     weight_decay=weight_decay if weight_decay_mode == "adamw" else 0.0)
        return
    update = layout.update(grad, state, beta1=beta1, beta2=beta2, eps=eps)
    if weight_decay > 0 and weight_decay_mode == "adamw":
        local.mul_(1 - lr * weight_decay)
    count = layout.count
    if count:
        update = update.to(local.dtype)
        flat = local.view(-1) if local.is_contiguous() else None
        if flat is not None:
            flat[:count].add_(update, alpha=-lr)
        else:
            full = torch.zeros(local.numel(), dtype=local.dtype, device=local.device)
            full[:count] = update
            local.add_(full.view(local.shape), alpha=-lr)


# ----------------------------------------------------------------------------- the optimizer
WEIGHT_DECAY_MODES = ("adamw", "adam")


def validate_smmf_hyperparameters(*, decay_rate, growth_rate) -> None:
    """SMMF's own schedule hyper-parameters (shared with GaLore's ``inner="smmf"``)."""
    check_real("decay_rate", decay_rate, low=-1.0, high=0.0)
    check_real("growth_rate", growth_rate, low=0.0, high=1.0)


def validate_smmf_group(group: dict) -> None:
    """SMMF's hyper-parameters of one param group (``TypeError``/``ValueError`` naming the argument)."""
    check_real("lr", group["lr"], low=0.0, allow_tensor=True)
    if group["beta"] is not None:
        check_real("beta", group["beta"], low=0.0, high=1.0, high_open=True)
    check_real("eps", group["eps"], low=0.0)
    check_real("weight_decay", group["weight_decay"], low=0.0)
    validate_smmf_hyperparameters(decay_rate=group["decay_rate"], growth_rate=group["growth_rate"])
    check_choice("weight_decay_mode", group["weight_decay_mode"], WEIGHT_DECAY_MODES)


class SMMF(OptimizerBase):
    r"""SMMF (Park & Lee, AAAI 2025, arXiv:2412.08894): Adam-style moments stored as rank-1 factors.

    .. math::
        \beta_{1,t} = \beta\gamma^{t-1},\quad \beta_{2,t} = 1 - t^{c},\\
        M_t = \beta_{1,t}\, S_{t-1}\odot(r_{M}c_{M}^\top) + (1-\beta_{1,t})\bar G_t,\quad
        V_t = \beta_{2,t}\, r_{V}c_{V}^\top + (1-\beta_{2,t})\bar G_t^2,\\
        \theta_t = \theta_{t-1}(1-\eta\lambda) - \eta\, M_t / (\sqrt{V_t} + \epsilon)

    then :math:`S_t = \operatorname{sign}(M_t)` (1 bit per element),
    :math:`r = |X|\mathbf 1`, :math:`c = |X|^\top\mathbf 1 / \mathbf 1^\top|X|\mathbf 1` for
    :math:`X \in \{M_t, V_t\}`; :math:`\bar G_t` is the gradient viewed as a near-square matrix
    (:func:`smmf_matrix_shape`; lopsided sizes such as primes are zero-padded, see the module
    docstring).  No bias correction.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (any grouping works
            under DeepSpeed ZeRO, see :class:`~optimlib.optim._common.OptimizerBase`).
        lr: learning rate (>= 0).
        beta: first-moment rate in [0, 1), or ``None`` for no first moment.
        eps: added to ``sqrt(V)`` (>= 0).
        weight_decay: >= 0.
        decay_rate: ``c`` of ``beta2_t = 1 - t**c``, in [-1, 0] (-0.5 for CNNs, -0.8 for
            Transformers in the paper's README).
        growth_rate: ``gamma`` of ``beta1_t = beta * gamma**(t-1)``, in [0, 1].
        vector_reshape: square-matricize 0-D/1-D parameters too (else they keep full moments).
        weight_decay_mode: ``"adamw"`` (decoupled) or ``"adam"`` (L2 added to the gradient).

    State (tensors only, per parameter): ``step``; ``exp_avg_sq_row``/``exp_avg_sq_col`` and, with
    a first moment, ``exp_avg_row``/``exp_avg_col``/``exp_avg_sign`` (packed ``uint8``); or
    ``exp_avg``/``exp_avg_sq`` for unfactored vectors.  Memory traffic (:mod:`optimlib.bench.traffic`):
    12.25 bytes per fp32 element (g read, w read and written, 1 bit read and written) plus the factors.  Row factors and sign bits cover this
    rank's owned rows only, so a checkpoint resumes on the same layout (world size and sharding).
    """

    def __init__(self, params, lr: float = 1e-3, beta: float | None = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0, decay_rate: float = -0.5, growth_rate: float = 0.999,
                 vector_reshape: bool = True, weight_decay_mode: str = "adamw"):
        defaults = dict(lr=lr, beta=beta, eps=eps, weight_decay=weight_decay, decay_rate=decay_rate,
                        growth_rate=growth_rate, vector_reshape=bool(vector_reshape),
                        weight_decay_mode=weight_decay_mode)
        super().__init__(params, defaults)

    _validate_group = staticmethod(validate_smmf_group)

    @classmethod
    def state_specs(cls, group, place: Placement, state=None) -> list[StateSpec]:
        """A 0-d float32 ``step`` and :func:`smmf_state_specs` (:mod:`optimlib.optim.state_spec`)."""
        specs = smmf_state_specs(place, momentum=group["beta"] is not None, vector_reshape=group["vector_reshape"])
        return [step_spec(), *specs] if specs else []

    def _step_units(self, group: dict, units: list[ParamUnit]) -> None:
        for unit in units:
            if math.prod(unit.shape) == 0:
                continue
            state = unit.state
            if not isinstance(state.get("step"), torch.Tensor):  # new, or loaded as a Python number
                state["step"] = torch.tensor(float(state.get("step", 0)))
            state["step"] += 1
            smmf_param_(unit.local, unit.grad, unit.piece, unit.shape, state, float(state["step"].item()), unit.param,
                        lr=float(group["lr"]), beta=group["beta"], eps=group["eps"],
                        weight_decay=group["weight_decay"], decay_rate=group["decay_rate"],
                        growth_rate=group["growth_rate"],
                        vector_reshape=group["vector_reshape"], weight_decay_mode=group["weight_decay_mode"])


# ----------------------------------------------------------------------------- registry
from optimlib.optim.factory import register_optimizer  # noqa: E402


def _build_smmf(groups, lr, **kwargs):
    return SMMF(groups, lr=lr, **kwargs)


register_optimizer("smmf", _build_smmf, shape_aware=True,
                   description="SMMF (Park & Lee, AAAI 2025): rank-1 factorized Adam moments with a 1-bit sign")
