r"""The inner rules of the GaLore family: what runs in the projected space, and on the parameters
that are not projected.

A rule is an object with four parts, so that a new member of the family is one class:

* ``moments(state, group, projector, like, param)``: the store of its low-rank moments
  (:mod:`optimlib.optim.galore.moments`);
* ``direction(moments, low, t, group)``: updates the moments with the projected gradient ``low``
  (moment step ``t``) and returns the low-rank direction and the step size;
* ``apply(unit, block, grad_rows, a, b, step_size, group)``: applies the back-projected direction
  ``a @ b`` (``(R, n)``, this rank's rows) to the parameter;
* ``dense(group, unit, batch)``: the rule's own step on a parameter outside the low-rank groups.

``projected_step`` chains ``direction``, the back-projection and ``apply``; a rule that needs more
than the low-rank direction (Fira's residual, APOLLO's scaled raw gradient) overrides it.  A rule's
own group keys are ``options`` (with their defaults), checked by ``validate``.

Registered rules: ``adamw`` (galore-torch's AdamW), ``adamp`` (AdamP's scale-invariant projection
of the back-projected update) and ``smmf`` (SMMF-factorized moments); the family members add theirs
(:mod:`optimlib.optim.galore.fira`, :mod:`optimlib.optim.galore.apollo`).  :func:`galore_lowrank_`
is one projected step of one parameter, whatever the rule.
"""

from __future__ import annotations

import math

import torch

from optimlib.distributed.layout import to_local
from optimlib.distributed.row_block import RowBlock
from optimlib.kernels._compiled import add_scaled_, fused_twin, worth_compiling
from optimlib.kernels.galore import galore_backproject_update_
from optimlib.optim._common import ParamUnit, write_rows_
from optimlib.optim.adamp import adamp_param_, scale_invariant_projection
from optimlib.optim.galore.moments import LowRankMoments, SMMFMoments, carry_moments
from optimlib.optim.galore.projection import Projector
from optimlib.optim.smmf import smmf_betas, smmf_param_, smmf_state_specs
from optimlib.optim.state_spec import Placement, StateSpec, elementwise

__all__ = ["InnerRule", "AdamPRule", "SMMFRule", "INNER_RULES", "adam_step_size", "galore_adamw_dense_", "galore_lowrank_", "DenseBatch"]


def adam_step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """galore-torch's step size ``lr sqrt(1 - b2^t) / (1 - b1^t)`` (``lr`` without bias correction)."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


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
    direction share one temporary per tensor.  Large CPU tensors (an embedding, an output layer)
    take galore-torch's per-tensor lines compiled into one loop instead
    (:mod:`optimlib.kernels._compiled`: equal to float rounding).
    """
    compiled = [i for i, p in enumerate(params) if worth_compiling((p,))]
    for i in compiled:
        _dense_tensor_fused(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], beta1=beta1, beta2=beta2, eps=eps,
                            step_size=adam_step_size(lr, beta1, beta2, steps[i], correct_bias), lr=lr,
                            weight_decay=weight_decay)
    if compiled:
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            [x for i, x in enumerate(xs) if i not in compiled] for xs in (params, grads, exp_avgs, exp_avg_sqs, steps))
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
        torch._foreach_add_(ps, ds, alpha=-adam_step_size(lr, beta1, beta2, step, correct_bias))
    del directions, by_step
    if weight_decay > 0.0:
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)


def _dense_tensor(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, beta1: float, beta2: float,
                  eps: float, step_size, lr, weight_decay: float) -> None:
    """galore-torch's AdamW lines on one tensor (the twin :func:`galore_adamw_dense_` compiles)."""
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    add_scaled_(p, m / v.sqrt().add_(eps), -step_size)
    if weight_decay > 0.0:
        add_scaled_(p, p, -lr * weight_decay)


_dense_tensor_fused = fused_twin(_dense_tensor, tensor_scalars=("step_size", "lr"))


class DenseBatch:
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


class InnerRule:
    """The AdamW rule (galore-torch's): Adam moments in the projected space; the back-projected
    direction and the decoupled weight decay (after the update) in one fused op."""

    name = "adamw"
    decay_first = False
    #: parameter-sized tensors the rule reads a second time per matrix and step
    #: (:mod:`optimlib.bench.traffic`)
    second_pass_reads = 0
    #: the rule's own group keys and their defaults (a group without one takes the default)
    options: dict = {}

    def option(self, group: dict, key: str):
        return group.get(key, self.options[key])

    def validate(self, group: dict) -> None:
        """Check the rule's own group keys (``ValueError``/``TypeError`` naming the key)."""

    def moments(self, state: dict, group: dict, projector: Projector, like: torch.Tensor, param: torch.Tensor):
        return LowRankMoments(state, group, projector, like, param)

    def lowrank_specs(self, group: dict, projector: Projector, rank: int, place: Placement) -> list[StateSpec]:
        """The declared state of the store :meth:`moments` returns, at rank ``rank``."""
        return LowRankMoments.state_specs(group, projector, rank)

    def dense_specs(self, group: dict, place: Placement) -> list[StateSpec]:
        """The declared state :meth:`dense` keeps (its step counter aside): Adam's two moments."""
        return [elementwise("exp_avg", place, transform="linear"), elementwise("exp_avg_sq", place, transform="square")]

    def direction(self, moments, low: torch.Tensor, t: int, group: dict) -> tuple[torch.Tensor, float]:
        beta1, beta2 = group["betas"]
        step_size = adam_step_size(float(group["lr"]), beta1, beta2, t, group["correct_bias"])
        return moments.update(low, beta1=beta1, beta2=beta2, eps=group["eps"]), step_size

    def projected_step(self, unit: ParamUnit, projector: Projector, moments, low: torch.Tensor,
                       grad_rows: torch.Tensor, t: int, group: dict) -> None:
        """From the projected gradient ``low`` to the parameter: the direction, back-projected as
        ``a @ b``, applied.  Members of the family that use more than the direction override it."""
        direction, step_size = self.direction(moments, low, t, group)
        a, b = projector.up_factors(unit.state, direction.to(unit.grad.dtype))  # up(direction): (R, n)
        self.apply(unit, projector.block, grad_rows, a, b, step_size, group)

    @staticmethod
    def update_rows(unit: ParamUnit, block: RowBlock, update) -> None:
        """Run ``update(rows)`` in place on the parameter's owned ``(R, n)`` rows and write them back
        when they are a copy (a non-contiguous piece, a DeepSpeed slice starting mid-row)."""
        param = unit.local
        through = block.aligned and param.is_contiguous()      # the owned rows are a view of ``param``
        rows = block.rows(param)
        update(rows)
        if not through:
            write_rows_(param, rows, block)

    def apply(self, unit: ParamUnit, block: RowBlock, grad_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              step_size: float, group: dict, residual: torch.Tensor | None = None) -> None:
        """``W <- W - step_size * (scale * (a @ b) + residual)`` and the decoupled decay
        (:func:`optimlib.kernels.galore_backproject_update_`, fused)."""
        def update(rows):
            if residual is not None:
                rows.add_(residual, alpha=-step_size)
            galore_backproject_update_(rows, a, b, scale=float(group["scale"]), step_size=step_size,
                                       lr=float(group["lr"]), weight_decay=group["weight_decay"],
                                       decay_first=self.decay_first)
        self.update_rows(unit, block, update)

    def _full_moments(self, unit: ParamUnit) -> tuple[torch.Tensor, torch.Tensor]:
        state = unit.state
        if "exp_avg" not in state:
            # zeros_like(param): a DTensor under FSDP2 (distributed checkpoints shard it).
            state["exp_avg"] = torch.zeros_like(unit.param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(unit.param, memory_format=torch.preserve_format)
        return to_local(state["exp_avg"]), to_local(state["exp_avg_sq"])

    def dense(self, group: dict, unit: ParamUnit, batch: DenseBatch) -> None:
        m, v = self._full_moments(unit)
        unit.state["step"] = step = int(unit.state["step"]) + 1
        batch.add(unit.local, unit.grad, m, v, step)


class AdamPRule(InnerRule):
    """AdamP's rule: Adam moments in the projected space; the scale-invariance test and radial
    projection act on the back-projected full-size update, against the weight and the gradient."""

    name = "adamp"
    second_pass_reads = 2      # the weight and the back-projected update, for the cosines

    def direction(self, moments, low, t, group):
        beta1, beta2 = group["betas"]
        direction = moments.update(low, beta1=beta1, beta2=beta2, eps=group["eps"],
                                   bias_correction2_sqrt=math.sqrt(1 - beta2 ** t), nesterov=group["nesterov"])
        return direction, float(group["lr"]) / (1 - beta1 ** t)

    def apply(self, unit, block, grad_rows, a, b, step_size, group):
        param, lr = unit.local, float(group["lr"])
        whole = not block.distributed and param.numel() == block.shape[0] * block.shape[1]
        update = torch.matmul(a, b) * float(group["scale"])
        param_rows = param.reshape(block.shape) if whole else block.rows(param)
        update, wd_factor, _ = scale_invariant_projection(grad_rows, param_rows, update, block, delta=group["delta"],
                                                          wd_ratio=group["wd_ratio"], eps=group["eps"])
        if group["weight_decay"] > 0.0:               # AdamP: decoupled decay before the update
            param.mul_(1 - lr * group["weight_decay"] * wd_factor)
        param.add_(update.view_as(param) if whole else block.to_local(update, like=param), alpha=-step_size)

    def dense(self, group, unit, batch):
        m, v = self._full_moments(unit)
        unit.state["step"] = step = int(unit.state["step"]) + 1
        beta1, beta2 = group["betas"]
        adamp_param_(unit.local, unit.grad, m, v, step, unit.shape, unit.piece, beta1=beta1, beta2=beta2,
                     lr=float(group["lr"]), weight_decay=group["weight_decay"], eps=group["eps"],
                     delta=group["delta"], wd_ratio=group["wd_ratio"], nesterov=group["nesterov"])


class SMMFRule(InnerRule):
    """SMMF's rule: square-matricized rank-1 factors of the low-rank moments and a 1-bit sign;
    decoupled decay before the update; ``betas[0]`` is SMMF's ``beta``."""

    name = "smmf"
    decay_first = True

    def moments(self, state, group, projector, like, param):
        return SMMFMoments(state, projector, like, param)

    def lowrank_specs(self, group, projector, rank, place):
        return SMMFMoments.state_specs(projector, rank, place.dtensor)

    def dense_specs(self, group, place):
        return smmf_state_specs(place, momentum=True)

    def direction(self, moments, low, t, group):
        b1, b2 = smmf_betas(t, group["betas"][0], group["decay_rate"], group["growth_rate"])
        return moments.update(low, beta1=b1, beta2=b2, eps=group["eps"]), float(group["lr"])

    def dense(self, group, unit, batch):
        unit.state["step"] = step = int(unit.state["step"]) + 1
        smmf_param_(unit.local, unit.grad, unit.piece, unit.shape, unit.state, step, unit.param,
                    lr=float(group["lr"]), beta=group["betas"][0], eps=group["eps"],
                    weight_decay=group["weight_decay"], decay_rate=group["decay_rate"],
                    growth_rate=group["growth_rate"])


INNER_RULES: dict[str, InnerRule] = {rule.name: rule for rule in (InnerRule(), AdamPRule(), SMMFRule())}


def galore_lowrank_(unit: ParamUnit, projector: Projector, rule: InnerRule, group: dict, *,
                    basis_dtype=None) -> None:
    """One projected step of one parameter (``unit``), in place on its local piece.

    Refreshes the basis when due (carrying the moments over by ``group["on_refresh"]``), projects
    the gradient rows, lets ``rule`` update its moments and turn them into a direction, and applies
    the back-projected direction.  ``unit.state["step"]`` and ``["moment_step"]`` are incremented.
    """
    state, block, grad = unit.state, projector.block, unit.grad
    # One process, whole parameter: the row view is a reshape (skip RowBlock's generic path);
    # contiguous, so that a non-contiguous gradient takes the same matmul paths as its contiguous twin.
    whole = not block.distributed and unit.local.numel() == block.shape[0] * block.shape[1]
    grad_rows = grad.reshape(block.shape).contiguous() if whole else block.rows(grad)
    moments = rule.moments(state, group, projector, grad, unit.param)
    if projector.needs_refresh(state):
        old = projector.snapshot(state)
        if projector.refresh(state, grad_rows, basis_dtype=basis_dtype) and old is not None and moments.exists():
            carry_moments(group["on_refresh"], moments, projector, old, state)
    low = projector.down(state, grad_rows)                        # (K, r) right, (r, K) left
    if not moments.exists():
        moments.init(low.shape[projector.rank_dim])
    state["step"] = int(state["step"]) + 1
    state["moment_step"] = t = int(state.get("moment_step", 0)) + 1
    rule.projected_step(unit, projector, moments, low, grad_rows, t, group)

