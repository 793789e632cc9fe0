"""N:M structured sparse training: straight-through, SR-STE and progressive gradient flow.

    model = optimlib.reparam.apply(model, "nm", n=2, m=4, recipe="srste")
    model = optimlib.reparam.apply(model, "nm", n=1, m=8, recipe="mdgf", decay="exponential",
                                   decay_steps=200)
    ... train, calling optimlib.reparam.after_step(model, opt) after every optimizer step ...
    optimlib.reparam.merge(model)          # dense weights with exact N:M zeros
    optimlib.reparam.nm_export.to_semi_structured(model)   # 2:4 only, on a GPU that has sparse tensor cores

The rule.  Each targeted ``nn.Linear`` keeps its dense weight ``W`` (``d_out x d_in``) as the
trainable parameter; a ``torch.nn.utils.parametrize`` parametrization computes the weight the
layer uses.  The mask ``m`` keeps the ``N`` largest ``|W|`` of every group of ``M`` consecutive
weights along the input dimension (a row of ``W``), the layout sparse tensor cores accelerate
(``Y = X W^T`` reduces over ``d_in``).  It is recomputed from ``W`` at every forward, so it is
stateless: under FSDP2 it is computed from the gathered weight, and it would be row-local on a
row shard.  The layer's bias is untouched.

Recipes (``recipe=``), the forward weight ``W~`` and the gradient handed to ``W`` given the
gradient ``g = dL/dW~``:

* ``ste`` — ``W~ = W * m``; ``dW = g`` (straight-through estimator).
* ``srste`` — SR-STE (Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
  From Scratch", ICLR 2021): ``W~ = W * m``; ``dW = g + lambda * (1 - m) * W``, a decay on the
  pruned weights only, ``lambda = 2e-4`` by default (the paper's ``decay``), independent of the
  optimizer's weight decay.
* ``mdgf`` — mask-decay gradient flow (Bambhaniya et al., "Progressive Gradient Flow for Robust
  N:M Sparsity Training in Transformers", arXiv 2402.04744): the pruned weights are scaled by a
  decaying ``beta(t)`` instead of zeroed, ``W~ = W * (m + (1 - m) * beta(t))``; what decays is the
  pruned weights' contribution to the forward (and so the gradient the *loss* sends through them).
  The gradient to ``W`` is straight-through, ``dW = g``, as in the paper's code;
  ``grad_mode="exact"`` gives the autograd-exact ``dW = g * (m + (1 - m) * beta)`` instead.
* ``sdgf`` — structure-decay gradient flow (same paper): binary masks that move through a
  sequence of patterns of falling density, e.g. ``7:8 -> 4:8 -> 2:8 -> 1:8``; straight-through.

``srste_lambda`` adds the SR-STE term to any recipe (default ``2e-4`` for ``srste``, 0 otherwise).
It is added once per optimizer step, in the first backward after :meth:`NMSparsity.after_step`,
like a weight decay: with gradient accumulation over ``k`` micro-batches the step's gradient is
``mean(g) + lambda * (1 - m) * W``, not ``k`` times the term (the reference adds it in every
backward, which only agrees without accumulation), and data-parallel ranks, which each add it
once, average to the same value.  So a training loop must call ``after_step`` after every
optimizer step (``launch/pretrain.py``'s loop does; the mdgf/sdgf schedules need it too).  The
once-per-step flag is a 0-d bool buffer (not in the state dict) that the backward op clears
and ``after_step`` sets: a tensor, not a Python attribute, so that ``torch.compile`` traces the
backward without a graph break and no host sync is needed.

A step that is *skipped* (its gradients discarded, e.g. non-finite ones under
``train.on_nonfinite=skip``, or an AMP ``GradScaler`` inf step) took the term with it, so the
loop must then call ``optimlib.reparam.after_skipped_step(model)`` instead of ``after_step``
(``launch/pretrain.py``'s loop does): :meth:`NMSparsity.after_skipped_step` re-arms the term
without advancing the schedule, and the next step's gradient is again
``mean(g) + lambda * (1 - m) * W``.  Without it that step would silently lack the term.

Kernels.  Mask and application are one op, :func:`optimlib.kernels.nm_mask_apply`, and the
backward of every recipe is :func:`optimlib.kernels.nm_grad` (Triton kernels on CUDA, their eager
twins on CPU): the parametrization has no maths of its own, so it computes the same on every
device and compiles without graph breaks.  The backward keeps the mask (1 byte per weight), and
the weight when there is an SR-STE term.  mdgf's ``beta(t)`` reaches the ops as a 0-d float32
buffer (``pruned_scale``: not in the state dict, refilled when the schedule moves or is loaded,
kept float32 under ``module.to(dtype)``), not as a Python float, so that ``torch.compile`` reuses
one graph over the whole decay window; what the forward branches on (dense or not, ``n``, ``m``)
changes only with the mask's structure, and only that recompiles.

``grad_mode="exact"`` gives any recipe the true gradient of its forward (pruned weights then get
``beta * g``, i.e. nothing under a binary mask).

Schedule (mdgf, sdgf; ``t`` = optimizer steps applied, counted by :meth:`NMSparsity.after_step`;
skipped steps do not count):

* ``t < dense_steps``: dense (no mask) for every recipe;
* ``s = t - dense_steps`` in ``[0, decay_steps)``: the decay window.  mdgf's ``beta(s)``:
  ``exponential`` ``exp(-c s)`` (``c = decay_coef``, default ``5 / decay_steps``, so
  ``beta = e^-5`` at the window's end), ``linear`` ``1 - s / T``, ``cosine``
  ``(1 + cos(pi s / T)) / 2``, ``stepwise`` ``1 - floor(K s / T) / K`` (``K = decay_stages``,
  default 4), with ``T = decay_steps``.  sdgf splits the window into equal frames, one per
  pattern of ``structure``: ``stepwise`` ``(M-1):M, M/2:M, M/4:M, ..., N:M`` (the paper's
  SdGf-Stepwise), ``geometric`` ``8N:8M, 4N:4M, 2N:2M, N:M`` (constant density, shrinking
  groups: SdGf-Geometric), ``densify`` ``N:8M, N:4M, N:2M, N:M``, or an explicit list such as
  ``["7:8", "4:8", "2:8", "1:8"]`` ending at ``N:M``;
* ``s >= decay_steps``: the binary target ``N:M`` mask (the paper's fine-tuning phase).

The position is a buffer (``...parametrizations.weight.0.step``), so it is in the model's
state_dict and a resumed run continues the schedule exactly.

Evaluation and export use the target mask.  Whenever the parametrization runs without autograd
(``torch.no_grad()``) or in eval mode, the weight is ``W * m`` with the target ``N:M`` mask,
whatever the schedule's position: the evaluation loss is that of the sparse network one would
deploy (an mdgf network with ``beta > 0`` is not sparse), and ``merge()`` — which evaluates the
weight under ``no_grad`` — bakes in exact ``N:M`` zeros.

Deviations from the reference code (``abhibambhaniya/progressive_gradient_flow_nm_sparsity``),
on purpose: the bias is used (the reference drops it), the schedule is counted in optimizer steps
held in a buffer (not passed through ``forward``), the decay window has an explicit length, and
the target pattern is the last frame of the sdgf window rather than starting at the fine-tuning
phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from optimlib.distributed.layout import is_dtensor, local_blocks, on_local
from optimlib.kernels import nm_grad, nm_mask_apply
from optimlib.reparam import register_reparam

RECIPES = ("ste", "srste", "mdgf", "sdgf")
DECAYS = ("exponential", "linear", "cosine", "stepwise")
STRUCTURES = ("stepwise", "geometric", "densify")
GRAD_MODES = ("ste", "exact")
SRSTE_LAMBDA = 2e-4  # SR-STE's default decay (Zhou et al. 2021)


# ----------------------------------------------------------------------------- the mask
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|weight|`` of every ``m`` consecutive entries
    of each row: exactly ``n`` per group, ties to the lower index, so the mask is the same on
    every device and rank (the mask of :func:`optimlib.kernels.nm_mask_apply`)."""
    return nm_mask_apply(weight.detach(), n, m)[1]


def is_nm_sparse(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive entries of each row has at most ``n`` non-zeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(dim=1) <= n).all())


class _MaskedWeight(torch.autograd.Function):
    """``W~ = W * where(mask, 1, beta)`` for the ``n:m`` mask of ``W``, with the backward chosen
    by the recipe: ``dW = g`` (straight-through) or ``g * where(mask, 1, beta)`` (``exact``),
    plus ``lam * (1 - mask) * W`` (SR-STE) if ``pending`` (a 0-d bool tensor, or None: always)
    is set, which the backward then clears."""

    @staticmethod
    def forward(ctx, weight, pending, n: int, m: int, beta, lam: float, exact: bool):
        out, mask = nm_mask_apply(weight, n, m, beta)
        # beta: a float, or the layer's 0-d buffer -- copied, so the backward uses this forward's value
        ctx.beta = beta.clone() if isinstance(beta, torch.Tensor) else beta
        ctx.lam, ctx.exact = lam, exact
        ctx.save_for_backward(mask, weight if lam else None)
        ctx.pending = pending  # not saved: the backward mutates it (no version check wanted)
        return out

    @staticmethod
    def backward(ctx, grad):
        mask, weight = ctx.saved_tensors
        dw = nm_grad(grad, weight, mask, beta=ctx.beta, lam=ctx.lam, exact=ctx.exact,
                     pending=ctx.pending if ctx.lam else None)
        return dw, None, None, None, None, None, None


# ----------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class NMState:
    """What the parametrization applies at one schedule position."""

    dense: bool
    n: int
    m: int
    beta: float  # the pruned weights' forward scale (0 = binary mask)


def _parse_pattern(item, where: str) -> tuple[int, int]:
    if isinstance(item, str) and item.count(":") == 1:
        a, b = item.split(":")
        try:
            return int(a), int(b)
        except ValueError:
            pass
    elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, int) for v in item):
        return int(item[0]), int(item[1])
    raise ValueError(f"option {where!r}: pattern {item!r} is not of the form 'N:M' (e.g. '4:8')")


def _check_pattern(n, m, name_n="n", name_m="m") -> None:
    for name, value in ((name_n, n), (name_m, m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"option {name!r} must be a positive integer, got {value!r}")
    if n >= m:
        raise ValueError(f"option {name_n!r} ({n}) must be smaller than {name_m!r} ({m}): "
                         f"N:M keeps N of every M weights")


def structure_patterns(structure, n: int, m: int) -> tuple[tuple[int, int], ...]:
    """The sdgf pattern sequence for target ``n:m`` (see the module docstring)."""
    if isinstance(structure, str):
        key = structure.lower()
        if key == "stepwise":
            seq, k = [(m - 1, m)], m // 2
            while k > n:
                seq.append((k, m))
                k //= 2
            seq.append((n, m))
        elif key == "geometric":
            seq = [(n * f, m * f) for f in (8, 4, 2, 1)]
        elif key == "densify":
            seq = [(n, m * f) for f in (8, 4, 2, 1)]
        else:
            raise ValueError(f"option 'structure' must be one of {', '.join(STRUCTURES)} or a list of "
                             f"'N:M' patterns, got {structure!r}")
        out = []
        for p in seq:  # (m-1):m == m/2:m for m=2, etc.
            if not out or out[-1] != p:
                out.append(p)
        return tuple(out)
    if isinstance(structure, (list, tuple)) and structure:
        seq = tuple(_parse_pattern(p, "structure") for p in structure)
        for pn, pm in seq:
            _check_pattern(pn, pm, "structure (N)", "structure (M)")
        if seq[-1] != (n, m):
            raise ValueError(f"option 'structure' must end at the target pattern {n}:{m}, "
                             f"got {':'.join(map(str, seq[-1]))}")
        return seq
    raise ValueError(f"option 'structure' must be one of {', '.join(STRUCTURES)} or a non-empty list of "
                     f"'N:M' patterns, got {structure!r}")


@dataclass(frozen=True)
class NMSchedule:
    """The pure function ``step -> NMState`` of one recipe (see the module docstring)."""

    n: int
    m: int
    recipe: str = "srste"
    dense_steps: int = 0
    decay_steps: int | None = None
    decay: str = "exponential"
    decay_coef: float | None = None
    decay_stages: int = 4
    patterns: tuple[tuple[int, int], ...] = ()

    def beta(self, s: int) -> float:
        """mdgf's forward scale of the pruned weights, ``s`` steps into the decay window."""
        T = self.decay_steps
        if s >= T:
            return 0.0
        if self.decay == "exponential":
            c = self.decay_coef if self.decay_coef is not None else 5.0 / T
            return math.exp(-c * s)
        if self.decay == "linear":
            return 1.0 - s / T
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * s / T))
        return 1.0 - math.floor(self.decay_stages * s / T) / self.decay_stages  # stepwise

    def state(self, step: int) -> NMState:
        s = step - self.dense_steps
        if s < 0:
            return NMState(True, self.m, self.m, 1.0)
        if self.recipe == "mdgf":
            return NMState(False, self.n, self.m, self.beta(s))
        if self.recipe == "sdgf" and s < self.decay_steps:
            n, m = self.patterns[s * len(self.patterns) // self.decay_steps]
            return NMState(False, n, m, 0.0)
        return NMState(False, self.n, self.m, 0.0)

    @property
    def all_patterns(self) -> tuple[tuple[int, int], ...]:
        return tuple(dict.fromkeys((*self.patterns, (self.n, self.m))))


def build_schedule(n: int = 2, m: int = 4, recipe: str = "srste", *, dense_steps: int = 0,
                   decay_steps: int | None = None, decay: str | None = None, decay_coef: float | None = None,
                   decay_stages: int | None = None, structure=None) -> NMSchedule:
    """Validate the options and build the :class:`NMSchedule` (errors name the option)."""
    _check_pattern(n, m)
    if not isinstance(recipe, str) or recipe.lower() not in RECIPES:
        raise ValueError(f"option 'recipe' must be one of {', '.join(RECIPES)}, got {recipe!r}")
    recipe = recipe.lower()
    if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
        raise ValueError(f"option 'dense_steps' must be a non-negative integer, got {dense_steps!r}")
    scheduled = recipe in ("mdgf", "sdgf")
    if scheduled:
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise ValueError(f"recipe {recipe!r} needs option 'decay_steps' (a positive integer: the length "
                             f"of the decay window in optimizer steps), got {decay_steps!r}")
    elif decay_steps is not None:
        raise ValueError(f"option 'decay_steps' applies to recipes mdgf and sdgf, not {recipe!r}")
    for name, value in (("decay", decay), ("decay_coef", decay_coef), ("decay_stages", decay_stages)):
        if value is not None and recipe != "mdgf":
            raise ValueError(f"option {name!r} applies to recipe mdgf only, not {recipe!r}")
    if structure is not None and recipe != "sdgf":
        raise ValueError(f"option 'structure' applies to recipe sdgf only, not {recipe!r}")
    decay = "exponential" if decay is None else decay
    if not isinstance(decay, str) or decay.lower() not in DECAYS:
        raise ValueError(f"option 'decay' must be one of {', '.join(DECAYS)}, got {decay!r}")
    decay = decay.lower()
    if decay_coef is not None:
        if decay != "exponential":
            raise ValueError(f"option 'decay_coef' applies to decay 'exponential' only, not {decay!r}")
        if isinstance(decay_coef, bool) or not isinstance(decay_coef, (int, float)) or not decay_coef > 0:
            raise ValueError(f"option 'decay_coef' must be a positive number, got {decay_coef!r}")
        decay_coef = float(decay_coef)
    if decay_stages is not None:
        if decay != "stepwise":
            raise ValueError(f"option 'decay_stages' applies to decay 'stepwise' only, not {decay!r}")
        if isinstance(decay_stages, bool) or not isinstance(decay_stages, int) or decay_stages < 1:
            raise ValueError(f"option 'decay_stages' must be a positive integer, got {decay_stages!r}")
    patterns = structure_patterns("stepwise" if structure is None else structure, n, m) if recipe == "sdgf" else ()
    if recipe == "sdgf" and len(patterns) > decay_steps:
        raise ValueError(f"option 'decay_steps' ({decay_steps}) is shorter than the {len(patterns)} sdgf "
                         f"patterns {[f'{a}:{b}' for a, b in patterns]}: each needs at least one step")
    return NMSchedule(n, m, recipe, dense_steps, decay_steps, decay, decay_coef,
                      4 if decay_stages is None else decay_stages, patterns)


# ----------------------------------------------------------------------------- the parametrization
class NMSparsity(nn.Module):
    """Parametrization ``W -> W~`` of one linear's weight (register with
    ``torch.nn.utils.parametrize``); see the module docstring for the rule.

    ``step`` (a buffer) is the schedule position; :meth:`after_step` advances it by one,
    :meth:`after_skipped_step` leaves it where it is.
    """

    def __init__(self, schedule: NMSchedule, *, srste_lambda: float = 0.0, grad_mode: str = "ste"):
        super().__init__()
        self.schedule = schedule
        self.srste_lambda = float(srste_lambda)
        self.exact = grad_mode == "exact"
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._position = 0  # Python mirror of ``step``: no device sync in forward
        self._state = schedule.state(0)  # replaced only when the schedule changes it (see current)
        # The pruned weights' forward scale: a tensor the forward passes to the ops, so that MDGF's
        # beta, which changes every step of its decay window, is not a constant of a compiled graph.
        self.register_buffer("pruned_scale", torch.tensor(self._state.beta, dtype=torch.float32), persistent=False)
        # The SR-STE term is still to go into this optimizer step's gradient (cleared by the backward).
        self.register_buffer("decay_pending", torch.ones((), dtype=torch.bool), persistent=False)

    @property
    def n(self) -> int:
        return self.schedule.n

    @property
    def m(self) -> int:
        return self.schedule.m

    def current(self) -> NMState:
        """The state the next training forward applies.  Held, not recomputed from the step in the
        forward, so that ``torch.compile`` guards on the state rather than on the step count and
        recompiles only when the mask's structure changes (dense -> sparse, sdgf's next pattern):
        mdgf's beta reaches the forward through the ``pruned_scale`` buffer, not this object."""
        return self._state

    def _set_position(self, position: int) -> None:
        self._position = position
        state = self.schedule.state(position)
        if state != self._state:
            if state.beta != self._state.beta:
                self.pruned_scale.fill_(state.beta)
            self._state = state

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # A tensor-parallel weight (a DTensor) is masked block by block: its blocks hold whole
        # groups of m consecutive inputs (checked by nm_sparsify).
        if not (self.training and torch.is_grad_enabled()):
            # evaluation / export: W * m with the target mask (differentiable: dW = g * m)
            return on_local(weight, lambda w: _MaskedWeight.apply(w, None, self.n, self.m, 0.0, 0.0, True))
        st = self.current()
        if st.dense:
            return weight
        return on_local(weight, lambda w: _MaskedWeight.apply(w, self.decay_pending, st.n, st.m, self.pruned_scale,
                                                              self.srste_lambda, self.exact))

    def after_step(self, optimizer=None) -> None:
        """Advance the schedule by one optimizer step (and re-arm the SR-STE term)."""
        self._set_position(self._position + 1)
        self.decay_pending.fill_(True)
        self.step.fill_(self._position)

    def after_skipped_step(self) -> None:
        """The optimizer step was skipped and its gradients discarded: re-arm the SR-STE term,
        which the discarded backward consumed, so that the next step's gradient carries it once;
        the schedule does not move (only applied steps count)."""
        self.decay_pending.fill_(True)

    def _apply(self, fn, recurse=True):
        # ``module.to(dtype)``, ``.bfloat16()`` etc. cast floating buffers: keep beta's buffer
        # float32 and exact (the ops round it to the weight's dtype themselves), so that a round
        # trip (bf16 and back) does not leave beta rounded until the schedule next moves.
        super()._apply(fn, recurse)
        self.pruned_scale = torch.full((), self._state.beta, dtype=torch.float32, device=self.pruned_scale.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._set_position(int(self.step))

    def extra_repr(self) -> str:
        s = self.schedule
        text = f"{s.n}:{s.m}, recipe={s.recipe}, step={self._position}"
        if s.recipe in ("mdgf", "sdgf"):
            text += f", dense_steps={s.dense_steps}, decay_steps={s.decay_steps}"
        if s.recipe == "mdgf":
            text += f", decay={s.decay}"
        if s.recipe == "sdgf":
            text += ", structure=" + " -> ".join(f"{a}:{b}" for a, b in s.patterns)
        if self.srste_lambda:
            text += f", srste_lambda={self.srste_lambda:g}"
        if self.exact:
            text += ", grad_mode=exact"
        return text


def nm_sparsify(linear: nn.Linear, n: int = 2, m: int = 4, recipe: str = "srste", *,
                srste_lambda: float | None = None, grad_mode: str = "ste", dense_steps: int = 0,
                decay_steps: int | None = None, decay: str | None = None, decay_coef: float | None = None,
                decay_stages: int | None = None, structure=None) -> nn.Linear:
    """Register an :class:`NMSparsity` parametrization on ``linear.weight``; returns ``linear``
    (the ``convert`` of ``apply(model, "nm", ...)``)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"N:M sparsity applies to nn.Linear, got {type(linear).__name__}")
    schedule = build_schedule(n, m, recipe, dense_steps=dense_steps, decay_steps=decay_steps, decay=decay,
                              decay_coef=decay_coef, decay_stages=decay_stages, structure=structure)
    d_in = linear.in_features
    weight = linear.weight
    blocks = ([(shape[1], offset[1]) for shape, offset in local_blocks(weight.shape, weight.device_mesh,
                                                                         weight.placements)]
              if is_dtensor(weight) else [(d_in, 0)])
    for pn, pm in schedule.all_patterns:
        what = "option 'm'" if (pn, pm) == (n, m) else f"option 'structure' (pattern {pn}:{pm})"
        if d_in % pm:
            raise ValueError(f"{what}: groups of {pm} do not divide the layer's input dimension "
                             f"in_features={d_in}; N:M groups run along the input dimension")
        if any(width % pm or start % pm for width, start in blocks):
            raise ValueError(f"{what}: the tensor-parallel blocks of this linear's weight (placements "
                             f"{tuple(weight.placements)}) split its {d_in} inputs into pieces of "
                             f"{sorted({w for w, _ in blocks})}, not whole groups of {pm}; choose a tensor-parallel "
                             f"degree that leaves each rank a multiple of {pm} inputs")
    if srste_lambda is None:
        srste_lambda = SRSTE_LAMBDA if schedule.recipe == "srste" else 0.0
    if isinstance(srste_lambda, bool) or not isinstance(srste_lambda, (int, float)) or srste_lambda < 0:
        raise ValueError(f"option 'srste_lambda' must be a non-negative number, got {srste_lambda!r}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"option 'grad_mode' must be one of {', '.join(GRAD_MODES)}, got {grad_mode!r}")
    if parametrize.is_parametrized(linear, "weight"):
        raise ValueError("this linear's weight is already parametrized; N:M sparsity must be the only "
                         "parametrization (merge() the other one first)")
    parametrize.register_parametrization(
        linear, "weight", NMSparsity(schedule, srste_lambda=srste_lambda, grad_mode=grad_mode))
    return linear


register_reparam("nm", nm_sparsify, tensor_parallel=True, parametrization=True,
                 description="N:M structured sparsity along the input dimension (ste, srste, mdgf, sdgf)")


__all__ = ["NMSchedule", "NMSparsity", "NMState", "build_schedule", "is_nm_sparse", "nm_mask", "nm_sparsify",
           "structure_patterns"]
