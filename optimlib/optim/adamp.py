r"""AdamP and SGDP: Adam / SGD that remove the radial part of updates to scale-invariant weights.

Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha, "AdamP: Slowing Down the Slowdown for Momentum Optimizers
on Scale-invariant Weights", ICLR 2021, arXiv:2006.08217.  Semantics (arguments, defaults and the
exact update) are those of the reference package ``adamp`` 0.3.0, which the tests use as an oracle.

The update, for a parameter :math:`w` with gradient :math:`g` and base update :math:`d` (Adam's
:math:`\hat m / (\sqrt{\hat v} + \epsilon)`, or SGD's momentum buffer)::

    if w.ndim > 1:
        for view in (channel view: rows of the (out, -1) matrix,  layer view: the whole tensor):
            c = |cos(g_row, w_row)|                    per row of the view, F.cosine_similarity(eps)
            if max(c) < delta / sqrt(row length):      # the weight looks scale-invariant
                u = w_row / (||w_row|| + eps)
                d_row <- d_row - u <u, d_row>          # remove the radial component
                wd_factor = wd_ratio; stop             # (channel view first, layer view only if it fails)
    w <- w (1 - lr * weight_decay * wd_factor)         # SGDP: ... / (1 - momentum)
    w <- w - step_size * d

Everything shape-aware is written against :class:`optimlib.distributed.RowBlock`, so the
optimizer is correct when it holds only some rows of a parameter (FSDP2 ``Shard(0)``) or a flat
DeepSpeed ZeRO partition that starts and ends mid-row: per-row cosines and projections run on
the rows this rank owns, the channel-view maximum and the layer-view dot products are reduced
across ranks with one small collective (five numbers per rank), and element-wise state (Adam's
moments, SGD's momentum) lives on the local piece.  Nothing gathers a full gradient.

:func:`scale_invariant_projection` is the reusable core: it works on any ``(R, n)`` owned rows of
a gradient, weight and update (e.g. a back-projected GaLore update, :mod:`optimlib.optim.galore.rules`)
and a ``RowBlock``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from optimlib.distributed.layout import to_local
from optimlib.distributed.row_block import FlatSlice, RowBlock
from optimlib.kernels._dispatch import as_2d
from optimlib.kernels._compiled import worth_compiling
from optimlib.kernels.adamp import (adamp_apply_, adamp_coefficients, adamp_stats_, projected_apply_fused,
                                    projection_stats_fused)
from optimlib.optim._common import OptimizerBase, ParamUnit, write_rows_
from optimlib.optim.state_spec import Placement, StateSpec, elementwise, step_spec
from optimlib.validation import check_betas, check_real

__all__ = ["AdamP", "SGDP", "adamp", "adamp_param_", "sgdp", "scale_invariant_projection",
           "channel_view_shape"]


# ----------------------------------------------------------------------------- the shape-aware core
def channel_view_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(out, -1)`` channel view of a parameter of global shape ``shape``."""
    numel = math.prod(shape)
    m = int(shape[0]) if len(shape) else 1
    return m, (numel // m if m else 0)


def _gather_stats(stats: torch.Tensor, block: RowBlock) -> tuple[float, torch.Tensor]:
    """Combine per-rank ``[max, s1, s2, ...]``: max of the first entry, sums of the others.

    One ``all_gather`` of a few numbers; every rank combines them in the pieces' order, so all ranks
    reach bit-identical values (and therefore the same decisions).
    """
    stacked = torch.stack(block.piece.all_gather(stats))
    return float(stacked[:, 0].max()), stacked[:, 1:].sum(0)


def scale_invariant_projection(grad_rows: torch.Tensor, param_rows: torch.Tensor,
                               update_rows: torch.Tensor, block: RowBlock, *, delta: float,
                               wd_ratio: float, eps: float) -> tuple[torch.Tensor, float, bool]:
    """AdamP's projection on this rank's owned rows of the channel view.

    ``grad_rows``, ``param_rows``, ``update_rows``: the ``(R, n)`` rows ``[block.row_start,
    block.row_end)`` of the ``(m, n)`` channel view (row ``i`` = output channel ``i``) of the
    gradient, the weight and the update.  Returns ``(update_rows, wd_factor, projected)``: the
    update with its radial component removed if the weight looks scale-invariant in the channel
    view (tested first) or the layer view, ``wd_ratio`` in that case and ``1.0`` otherwise.

    Collective: one ``all_gather`` of 5 numbers per rank when ``block`` spans several ranks; every
    rank of the block must call it (ranks owning no row included).
    """
    m, n = block.shape
    g, w, u = grad_rows, param_rows, update_rows
    cos = torch.nn.functional.cosine_similarity
    # Channel view: F.cosine_similarity per owned row (exactly what the reference computes).
    chan = cos(g, w, dim=1, eps=eps).abs_().max() if g.numel() else g.new_zeros(())
    if not block.distributed:
        # One process: the reference's own expressions, so the result is bit-identical to it.
        # (Tensor-vs-float comparisons, as in the reference: the threshold is cast to the dtype.)
        if bool(chan < delta / math.sqrt(n)):
            unit = w / w.norm(dim=1, keepdim=True).add_(eps)
            return u - unit * (unit * u).sum(dim=1, keepdim=True), wd_ratio, True
        gl, wl, ul = g.reshape(1, -1), w.reshape(1, -1), u.reshape(1, -1)
        if bool(cos(gl, wl, dim=1, eps=eps).abs_().max() < delta / math.sqrt(m * n)):
            unit = wl / wl.norm(dim=1, keepdim=True).add_(eps)
            return (ul - unit * (unit * ul).sum(dim=1, keepdim=True)).view_as(u), wd_ratio, True
        return u, 1.0, False
    # Several ranks: the channel maximum and the layer-view sums in one small collective.
    stats = torch.stack([chan.float(), (g * g).sum().float(), (w * w).sum().float(),
                         (g * w).sum().float(), (w * u).sum().float()]).double()
    chan_max, sums = _gather_stats(stats, block)
    if chan_max < delta / math.sqrt(n):
        unit = w / w.norm(dim=1, keepdim=True).add_(eps)
        return u - unit * (unit * u).sum(dim=1, keepdim=True), wd_ratio, True
    gg, ww, gw, wu = sums.tolist()
    # cos = <g, w> / (max(|g|, eps) max(|w|, eps)), as F.cosine_similarity.
    layer = abs(gw / (max(math.sqrt(gg), eps) * max(math.sqrt(ww), eps)))
    if layer < delta / math.sqrt(m * n):
        norm = math.sqrt(ww) + eps
        unit = w / norm
        return u - unit * (wu / norm), wd_ratio, True
    return update_rows, 1.0, False


def _project_local(grad: torch.Tensor, param: torch.Tensor, update: torch.Tensor,
                   shape: Sequence[int], piece: FlatSlice, *, delta: float, wd_ratio: float,
                   eps: float) -> tuple[torch.Tensor, float, bool]:
    """:func:`scale_invariant_projection` on local pieces laid out like the rank's parameter."""
    block = RowBlock(channel_view_shape(shape), piece)
    g_rows, w_rows, u_rows = block.rows_many([grad, param, update])
    u_rows, wd, projected = scale_invariant_projection(g_rows, w_rows, u_rows, block, delta=delta,
                                                        wd_ratio=wd_ratio, eps=eps)
    if projected:
        update = block.to_local(u_rows, like=update)
    return update, wd, projected


# ----------------------------------------------------------------------------- functional forms
def _combine_over(block: RowBlock):
    """``combine`` of :func:`optimlib.kernels.adamp_coefficients` for a row-sharded parameter:
    the global channel-cosine maximum and the global sums of the four per-row statistics (one
    ``all_gather`` of five numbers per rank, combined in rank order so every rank decides alike)."""
    def combine(chan_max: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mx, total = _gather_stats(torch.cat([chan_max.reshape(1), sums]).double(), block)
        return torch.tensor(mx, dtype=torch.float64, device=sums.device), total
    return combine


def adamp_param_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, shape: Sequence[int], piece: FlatSlice, *, beta1: float, beta2: float, lr: float,
                 weight_decay: float, eps: float, delta: float, wd_ratio: float, nesterov: bool) -> None:
    """One AdamP step of one parameter's local piece, in place (``step`` already incremented).

    The step is the fused ops of :mod:`optimlib.kernels.adamp` (Triton on CUDA, their PyTorch twins
    elsewhere): :func:`~optimlib.kernels.adamp_stats_` on the owned rows of the channel view,
    :func:`~optimlib.kernels.adamp_coefficients` (with one 5-number all-gather between when the
    rows are sharded), :func:`~optimlib.kernels.adamp_apply_`.  0-/1-D parameters (no projection)
    are element-wise and step their local piece as it is.
    """
    if math.prod(shape) == 0:
        return
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step, nesterov=nesterov)
    if len(shape) <= 1:
        w, g, m, v = (as_2d(t) for t in (param, grad, exp_avg, exp_avg_sq))
        stats = adamp_stats_(m, v, g, w, beta1=beta1, beta2=beta2, eps=eps, step=step, nesterov=nesterov)
        coef, decay = adamp_coefficients(stats, num_rows=1, num_cols=w.shape[1], lr=lr, weight_decay=weight_decay,
                                         delta=delta, wd_ratio=wd_ratio, eps=eps, project=False)
        adamp_apply_(w, m, v, g, coef, decay, **hyper)
        return
    block = RowBlock(channel_view_shape(shape), piece)
    locals_ = (param, grad, exp_avg, exp_avg_sq)
    # Owned rows: views of the local tensors when the pieces are row-aligned and contiguous
    # (one process, FSDP2), else copies (DeepSpeed slices that start mid-row, channels-last).
    through = block.aligned and all(t.is_contiguous() for t in locals_)
    w, g, m, v = block.rows_many(list(locals_))
    stats = adamp_stats_(m, v, g, w, beta1=beta1, beta2=beta2, eps=eps, step=step, nesterov=nesterov)
    coef, decay = adamp_coefficients(stats, num_rows=block.shape[0], num_cols=block.shape[1], lr=lr,
                                     weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, eps=eps,
                                     combine=_combine_over(block) if block.distributed else None)
    adamp_apply_(w, m, v, g, coef, decay, **hyper)
    if not through:
        for local, rows in ((param, w), (exp_avg, m), (exp_avg_sq, v)):
            write_rows_(local, rows, block)


def adamp(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor],
          shapes: list[Sequence[int]], pieces: list[FlatSlice], *, beta1: float, beta2: float,
          lr: float, weight_decay: float, eps: float, delta: float, wd_ratio: float,
          nesterov: bool) -> None:
    """Functional AdamP on local pieces (plain tensors); ``shapes``/``pieces`` place each piece in
    its global parameter (see :func:`optimlib.distributed.local_piece`)."""
    for param, grad, exp_avg, exp_avg_sq, step_t, shape, piece in zip(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, shapes, pieces):
        step_t += 1
        adamp_param_(param, grad, exp_avg, exp_avg_sq, int(step_t.item()), shape, piece, beta1=beta1,
                     beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, delta=delta, wd_ratio=wd_ratio,
                     nesterov=nesterov)


def sgdp(params: list[torch.Tensor], grads: list[torch.Tensor],
         momentum_buffers: list[torch.Tensor | None], state_steps: list[torch.Tensor],
         shapes: list[Sequence[int]], pieces: list[FlatSlice], *, lr: float, momentum: float,
         dampening: float, weight_decay: float, nesterov: bool, eps: float, delta: float,
         wd_ratio: float) -> None:
    """Functional SGDP on local pieces; ``momentum_buffers[i]`` is ``None`` when ``momentum == 0``."""
    for param, grad, buf, step_t, shape, piece in zip(params, grads, momentum_buffers, state_steps,
                                                      shapes, pieces):
        step_t += 1
        if buf is None:  # momentum == 0: the buffer would be (1 - dampening) * grad every step
            d_p = grad * (1 - dampening)
            buf_is_direction = False
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            buf_is_direction = not nesterov
            d_p = grad + momentum * buf if nesterov else buf

        wd = 1.0
        if len(shape) > 1 and piece.numel:
            if _sgdp_compiled_(param, grad, d_p, shape, piece, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               delta=delta, wd_ratio=wd_ratio, eps=eps, write_update=buf_is_direction):
                continue
            d_p, wd, projected = _project_local(grad, param, d_p, shape, piece, delta=delta,
                                                wd_ratio=wd_ratio, eps=eps)
            if projected and buf_is_direction:
                # The reference projects the momentum buffer itself in place (d_p is the buffer).
                buf.copy_(d_p)
                d_p = buf
        if weight_decay > 0:
            param.mul_(1 - lr * weight_decay * wd / (1 - momentum))
        param.add_(d_p, alpha=-lr)


def _sgdp_compiled_(param, grad, update, shape, piece: FlatSlice, *, lr, momentum, weight_decay, delta, wd_ratio,
                    eps, write_update: bool) -> bool:
    """SGDP's projection and update of a large CPU matrix in two compiled passes (the row statistics,
    then the apply) around :func:`~optimlib.kernels.adamp.adamp_coefficients`: AdamP's structure,
    equal to :func:`_project_local`'s result to float rounding.  Returns ``False`` (nothing done)
    unless the matrix is worth compiling and its pieces are row-aligned and contiguous."""
    if not worth_compiling((param,)):
        return False
    block = RowBlock(channel_view_shape(shape), piece)
    if not (block.aligned and all(t.is_contiguous() for t in (param, grad, update))):
        return False
    w, g, u = block.rows_many([param, grad, update])
    stats = projection_stats_fused(g, w, u)
    coef, decay = adamp_coefficients(stats, num_rows=block.shape[0], num_cols=block.shape[1], lr=lr,
                                     weight_decay=weight_decay / (1 - momentum), delta=delta, wd_ratio=wd_ratio,
                                     eps=eps, combine=_combine_over(block) if block.distributed else None)
    projected_apply_fused(w, u, coef, decay, lr=lr, write_update=write_update)
    return True


# ----------------------------------------------------------------------------- helpers shared by the classes
def validate_adamp_group(group: dict) -> None:
    """AdamP's hyper-parameters of one param group (``TypeError``/``ValueError`` naming the argument)."""
    check_real("lr", group["lr"], low=0.0, allow_tensor=True)
    check_betas("betas", group["betas"])
    check_real("eps", group["eps"], low=0.0)
    check_real("weight_decay", group["weight_decay"], low=0.0)
    check_real("delta", group["delta"], low=0.0)
    check_real("wd_ratio", group["wd_ratio"], low=0.0, high=1.0)


def validate_sgdp_group(group: dict) -> None:
    """SGDP's hyper-parameters of one param group."""
    check_real("lr", group["lr"], low=0.0, allow_tensor=True)
    check_real("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    check_real("dampening", group["dampening"], low=0.0, high=1.0)
    check_real("weight_decay", group["weight_decay"], low=0.0)
    check_real("eps", group["eps"], low=0.0)
    check_real("delta", group["delta"], low=0.0)
    check_real("wd_ratio", group["wd_ratio"], low=0.0, high=1.0)


# ----------------------------------------------------------------------------- classes
class AdamP(OptimizerBase):
    r"""AdamP (Heo et al., ICLR 2021, arXiv:2006.08217): Adam with projection for scale-invariant weights.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\\
        d_t = \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}
              \;\Big(\text{nesterov: } \frac{\beta_1 m_t + (1-\beta_1) g_t}{\cdots}\Big),\\
        d_t \leftarrow \Pi_w(d_t) \text{ if } w \text{ looks scale-invariant (then } r = \text{wd\_ratio},
        \text{ else } r = 1),\\
        w_t = w_{t-1}(1 - \eta\lambda r) - \frac{\eta}{1-\beta_1^t} d_t

    where :math:`\Pi_w` removes the component of each row of :math:`d` along the matching row of
    :math:`w` (channel view, ``(out, -1)``) or of the whole tensor (layer view), applied when the
    largest ``|cos(g, w)|`` of the view is below ``delta / sqrt(row length)``; parameters with at
    most one dimension are plain AdamW-style Adam.  Matches ``adamp.AdamP`` 0.3.0.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param groups (which may carry
            ``"names"`` and ``"shapes"``, as :func:`optimlib.optim.param_groups` records them).
            Any grouping works under DeepSpeed ZeRO (see :class:`OptimizerBase`).
        lr: learning rate (>= 0).  betas: ``(beta1, beta2)`` each in [0, 1).  eps: >= 0.
        weight_decay: decoupled weight decay (>= 0).  delta: cosine threshold (>= 0).
        wd_ratio: weight-decay factor for projected weights, in [0, 1].  nesterov: Nesterov momentum.

    Distributed: works on FSDP2 DTensors (``Shard(0)``), DeepSpeed flat partitions and plain
    tensors alike (see the module docstring); the step is per parameter (``state["step"]``).

    Memory traffic (:mod:`optimlib.bench.traffic`): AdamW's 28 bytes per fp32 element plus a second
    read of the weight and the update for a matrix (the cosines decide the update before it is
    applied): 36 bytes.
    """

    @staticmethod
    def second_pass_reads(group) -> int:
        """Parameter-sized tensors read a second time per matrix and step: the weight, the update."""
        return 2

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False):
        defaults = dict(lr=lr, betas=check_betas("betas", betas), eps=eps, weight_decay=weight_decay,
                        delta=delta, wd_ratio=wd_ratio, nesterov=bool(nesterov))
        super().__init__(params, defaults)

    _validate_group = staticmethod(validate_adamp_group)

    @classmethod
    def state_specs(cls, group, place: Placement, state=None) -> list[StateSpec]:
        """A 0-d float32 ``step``; ``exp_avg`` (m) and ``exp_avg_sq`` (v) like the parameter."""
        return [step_spec(), elementwise("exp_avg", place, transform="linear"),
                elementwise("exp_avg_sq", place, transform="square")]

    def _step_units(self, group: dict, units: list[ParamUnit]) -> None:
        lists: dict[str, list] = {k: [] for k in ("p", "g", "m", "v", "s", "shape", "piece")}
        for unit in units:
            state = unit.state
            if not state:
                state["step"] = torch.tensor(0.0)
                # zeros_like(param): a DTensor under FSDP2 (so distributed checkpoints shard it).
                state["exp_avg"] = torch.zeros_like(unit.param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(unit.param, memory_format=torch.preserve_format)
            if not isinstance(state.get("step"), torch.Tensor):  # new, or loaded as a Python number
                state["step"] = torch.tensor(float(state.get("step", 0)))
            lists["p"].append(unit.local)
            lists["g"].append(unit.grad)
            lists["m"].append(to_local(state["exp_avg"]))
            lists["v"].append(to_local(state["exp_avg_sq"]))
            lists["s"].append(state["step"])
            lists["shape"].append(unit.shape)
            lists["piece"].append(unit.piece)
        beta1, beta2 = group["betas"]
        adamp(lists["p"], lists["g"], lists["m"], lists["v"], lists["s"], lists["shape"], lists["piece"],
              beta1=beta1, beta2=beta2, lr=float(group["lr"]), weight_decay=group["weight_decay"],
              eps=group["eps"], delta=group["delta"], wd_ratio=group["wd_ratio"], nesterov=group["nesterov"])


class SGDP(OptimizerBase):
    r"""SGDP (Heo et al., ICLR 2021, arXiv:2006.08217): SGD with projection for scale-invariant weights.

    .. math::
        b_t = \mu b_{t-1} + (1-\tau) g_t,\quad d_t = g_t + \mu b_t \text{ (nesterov) or } b_t,\\
        d_t \leftarrow \Pi_w(d_t) \text{ if } w \text{ looks scale-invariant (then } r = \text{wd\_ratio},
        \text{ else } r = 1),\\
        w_t = w_{t-1}\Big(1 - \frac{\eta\lambda r}{1-\mu}\Big) - \eta d_t

    with the same test and projection :math:`\Pi_w` as :class:`AdamP` (the cosine compares the raw
    gradient with the weight).  As in the reference, without Nesterov the momentum buffer itself
    is projected.  Matches ``adamp.SGDP`` 0.3.0.  With ``momentum=0`` no buffer is stored.

    Args:
        params: parameters or param groups (may carry ``"shapes"``, see :class:`AdamP`).
        lr: learning rate (>= 0; a number or a one-element tensor).  Defaults to 1e-3, as
            ``torch.optim.SGD``'s (``adamp.SGDP`` requires it); a param group's own ``lr`` wins.
        momentum: in [0, 1).  dampening: in [0, 1].
        weight_decay: >= 0 (decoupled, divided by ``1 - momentum``).  nesterov: Nesterov momentum.
        eps: >= 0.  delta: >= 0.  wd_ratio: in [0, 1].

    Memory traffic (:mod:`optimlib.bench.traffic`): SGD-momentum's 20 bytes per fp32 element plus
    AdamP's second read of the weight and the update for a matrix: 28 bytes.
    """

    second_pass_reads = staticmethod(AdamP.second_pass_reads)

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov), eps=eps, delta=delta, wd_ratio=wd_ratio)
        super().__init__(params, defaults)

    _validate_group = staticmethod(validate_sgdp_group)

    @classmethod
    def state_specs(cls, group, place: Placement, state=None) -> list[StateSpec]:
        """A 0-d float32 ``step``; with ``momentum != 0`` the buffer ``momentum_buffer`` (b) like the parameter."""
        if group["momentum"] == 0:
            return [step_spec()]
        return [step_spec(), elementwise("momentum_buffer", place, transform="linear", component="momentum")]

    def _step_units(self, group: dict, units: list[ParamUnit]) -> None:
        momentum = group["momentum"]
        lists: dict[str, list] = {k: [] for k in ("p", "g", "b", "s", "shape", "piece")}
        for unit in units:
            state = unit.state
            if not isinstance(state.get("step"), torch.Tensor):  # new, or loaded as a Python number
                state["step"] = torch.tensor(float(state.get("step", 0)))
            if momentum != 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(unit.param, memory_format=torch.preserve_format)
            buf = state.get("momentum_buffer") if momentum != 0 else None
            lists["p"].append(unit.local)
            lists["g"].append(unit.grad)
            lists["b"].append(None if buf is None else to_local(buf))
            lists["s"].append(state["step"])
            lists["shape"].append(unit.shape)
            lists["piece"].append(unit.piece)
        sgdp(lists["p"], lists["g"], lists["b"], lists["s"], lists["shape"], lists["piece"],
             lr=float(group["lr"]), momentum=momentum, dampening=group["dampening"],
             weight_decay=group["weight_decay"], nesterov=group["nesterov"], eps=group["eps"], delta=group["delta"],
             wd_ratio=group["wd_ratio"])


# ----------------------------------------------------------------------------- registry
from optimlib.optim.factory import register_optimizer  # noqa: E402


def _build_adamp(groups, lr, **kwargs):
    return AdamP(groups, lr=lr, **kwargs)


def _build_sgdp(groups, lr, **kwargs):
    return SGDP(groups, lr=lr, **kwargs)


register_optimizer("adamp", _build_adamp, shape_aware=True,
                   description="AdamP (Heo et al., ICLR 2021): Adam with radial projection for scale-invariant weights")
register_optimizer("sgdp", _build_sgdp, shape_aware=True,
                   description="SGDP (Heo et al., ICLR 2021): SGD with radial projection for scale-invariant weights")
