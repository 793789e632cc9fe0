r"""GaLore AdamW: Adam in a periodically refreshed low-rank gradient subspace.

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
quantized low-rank moments, :mod:`optimlib.optim.quantize`), ``quant_block``,
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

Distributed. Every parameter is reached through :func:`optimlib.distributed.local_piece` and a
:class:`optimlib.distributed.RowBlock`: plain tensors, FSDP2 DTensors (``Shard(0)``, uneven
included) and DeepSpeed ZeRO-1/2/3 flat partitions (one parameter per group; ``group["shapes"]``
gives the global shape) all run the same code. The low-rank moments live in the layout of
:class:`optimlib.optim.projection.Projector` (this rank's rows of the ``(m, r)`` moments of a
right projection, its ``torch.chunk`` block of the columns of the ``(r, n)`` moments of a left
one), so optimizer state shrinks with the number of ranks; under FSDP2 they are DTensors sharded
on the kept dimension so that ``torch.distributed.checkpoint`` saves every rank's piece. Step
counters are per parameter (ZeRO-3 calls ``step()`` once per sub-group). Collectives per
low-rank parameter and step: for a right projection none, except one all-gather of the ``r x n``
basis when it is stored sharded (``shard_basis``, svd/randomized bases); for a left one an
all-reduce of the ``r x n`` projected gradient and an all-gather of the ``r x n`` update (plus
RowBlock's exchange of one row per rank when DeepSpeed slices start mid-row); refreshes as described in :mod:`optimlib.optim.projection`.
Every rank must step the same parameters in the same order.

Layer-wise stepping (optimizer in backward, gradients freed as they are used, one step per
gradient-accumulation window, one LR clock): :meth:`GaLoreAdamW.layerwise` /
:class:`LayerwiseStepper`; one process and FSDP2.

State (per parameter; tensors and plain ints only, so ``torch.load(weights_only=True)`` reads a
checkpoint): ``step``, ``moment_step``, ``seed``, ``rank``, ``refreshes``, the basis (``basis``,
``indices`` or ``basis_seed``), and ``exp_avg``/``exp_avg_sq`` (or their ``_codes``/``_absmax``
when quantized; the second moment is then stored as its square root).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim.optimizer import Optimizer

from optimlib.distributed.layout import global_shape, is_dtensor, local_piece, to_local
from optimlib.distributed.row_block import RowBlock
from optimlib.optim.projection import ProjectionConfig, Projector, matrix_shape, name_seed
from optimlib.optim.quantize import dequantize_blockwise, hash_uniform, quantize_blockwise

__all__ = ["GaLoreAdamW", "LayerwiseStepper", "galore_adamw_dense_", "galore_adamw_lowrank_", "LOWRANK_KEYS"]

ON_REFRESH = ("keep", "rotate", "reset")
MOMENTS_DTYPES = (None, "float32", "bfloat16", "float16", "int8")
BASIS_DTYPES = (None, "float32", "float64", "bfloat16", "float16")
_GOLDEN = (math.sqrt(5) - 1) / 2

# Keys that configure a low-rank group (the factory puts them on the targeted-matrix group).
LOWRANK_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projection", "on_refresh", "stagger",
                "oversample", "power_iters", "energy", "min_rank", "max_rank", "dct_norm",
                "moments_dtype", "quant_block", "stochastic_rounding", "basis_dtype", "seed", "canonical_signs",
                "shard_basis")


def _bad(name: str, value, accepted: str):
    raise ValueError(f"invalid {name}={value!r}: accepted {accepted}")


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


def galore_adamw_dense_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor, step: int, *, lr: float, beta1: float, beta2: float,
                        eps: float, weight_decay: float, correct_bias: bool) -> None:
    """galore-torch's AdamW on a local piece, in place (``step`` already incremented)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    param.add_(exp_avg / denom, alpha=-_step_size(lr, beta1, beta2, step, correct_bias))
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


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

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.state
        if not self.quantized:
            return to_local(s["exp_avg"]), to_local(s["exp_avg_sq"])
        m = dequantize_blockwise(to_local(s["exp_avg_codes"]), to_local(s["exp_avg_absmax"]), signed=True,
                                 block=self.block, dtype=self.dtype)
        root = dequantize_blockwise(to_local(s["exp_avg_sq_codes"]), to_local(s["exp_avg_sq_absmax"]),
                                    signed=False, block=self.block, dtype=self.dtype)
        return self._to_kr(m).contiguous(), self._to_kr(root * root).contiguous()

    def write(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, fresh: bool = False) -> None:
        """Store the moments (a no-op for plain moments updated in place unless ``fresh``)."""
        s = self.state
        if not self.quantized:
            if fresh or "exp_avg" not in s:
                dim = self.proj.kept_dim
                s["exp_avg"], s["exp_avg_sq"] = self._wrap(exp_avg, dim), self._wrap(exp_avg_sq, dim)
            return
        exp_avg, exp_avg_sq = self._to_kr(exp_avg), self._to_kr(exp_avg_sq)
        noise_m = noise_v = None
        if self.group["stochastic_rounding"]:
            shape = tuple(exp_avg.shape)
            offset, step, seed = self.proj.kept[0], int(s["step"]) + 7919 * int(s["refreshes"]), int(s["seed"])
            noise_m = hash_uniform(shape, offset, seed=seed, step=2 * step, device=self.device)
            noise_v = hash_uniform(shape, offset, seed=seed, step=2 * step + 1, device=self.device)
        cm, am = quantize_blockwise(exp_avg, signed=True, block=self.block, noise=noise_m)
        cv, av = quantize_blockwise(exp_avg_sq.sqrt(), signed=False, block=self.block, noise=noise_v)
        if "exp_avg_codes" in s and not fresh and to_local(s["exp_avg_codes"]).shape == cm.shape:
            to_local(s["exp_avg_codes"]).copy_(cm)
            to_local(s["exp_avg_absmax"]).copy_(am)
            to_local(s["exp_avg_sq_codes"]).copy_(cv)
            to_local(s["exp_avg_sq_absmax"]).copy_(av)
        else:
            s["exp_avg_codes"], s["exp_avg_absmax"] = self._wrap(cm), self._wrap(am)
            s["exp_avg_sq_codes"], s["exp_avg_sq_absmax"] = self._wrap(cv), self._wrap(av)

    def zeros(self, rank: int) -> torch.Tensor:
        return torch.zeros(self.proj.low_shape(rank), dtype=self.dtype, device=self.device)


def _on_refresh(policy: str, moments: _Moments, projector: Projector, old: dict, state: dict) -> None:
    """Carry the moments from the old basis (``old``) to the new one (in ``state``)."""
    r_old, r_new = int(old["rank"]), int(state["rank"])
    if policy == "reset":
        moments.write(moments.zeros(r_new), moments.zeros(r_new), fresh=True)
        state["moment_step"] = 0
        return
    if policy == "keep":
        if r_old == r_new:
            return
        m, v = moments.read()
        k = min(r_old, r_new)
        new_m, new_v = moments.zeros(r_new), moments.zeros(r_new)
        keep = (slice(None), slice(0, k)) if projector.rank_dim == 1 else (slice(0, k), slice(None))
        new_m[keep] = m[keep]
        new_v[keep] = v[keep]
        moments.write(new_m, new_v, fresh=True)
        return
    m, v = moments.read()
    o = projector.overlap(old, state, dtype=torch.float32, device=m.device)
    new_m = projector.transform(m.float(), o).to(m.dtype)
    new_v = projector.transform(v.float(), o * o).to(v.dtype)
    moments.write(new_m, new_v, fresh=True)


def galore_adamw_lowrank_(param: torch.Tensor, grad: torch.Tensor, state: dict, projector: Projector,
                          moments: _Moments, *, lr: float, beta1: float, beta2: float, eps: float,
                          weight_decay: float, correct_bias: bool, scale: float, on_refresh: str,
                          basis_dtype=None) -> None:
    """One GaLore AdamW step of one parameter, in place on its local piece ``param``.

    ``grad``: the local gradient piece (laid out like ``param``); ``state``: the parameter's state
    (``step`` is incremented here); ``projector``: its :class:`Projector` (which carries the
    RowBlock).  See the module docstring for the update.
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
        r = low.shape[projector.rank_dim]
        moments.write(moments.zeros(r), moments.zeros(r), fresh=True)
    exp_avg, exp_avg_sq = moments.read()
    state["step"] = int(state["step"]) + 1
    state["moment_step"] = int(state.get("moment_step", 0)) + 1
    low = low.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = _step_size(lr, beta1, beta2, state["moment_step"], correct_bias)
    norm_grad = exp_avg / denom
    moments.write(exp_avg, exp_avg_sq)
    update = projector.up(state, norm_grad.to(grad.dtype)) * scale  # (R, n)
    param.add_(update.view_as(param) if whole else block.to_local(update, like=param), alpha=-step_size)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


# ----------------------------------------------------------------------------- the optimizer
class GaLoreAdamW(Optimizer):
    r"""GaLore AdamW (Zhao et al., ICML 2024, arXiv:2403.03507), a drop-in for ``galore_torch.GaLoreAdamW``.

    See the module docstring for the update rule, the group keys and the distributed contract.
    A param group is low-rank when it has a ``rank`` key; every low-rank key below can be set
    per group, the constructor's value being the default.

    Args:
        params: parameters or param groups; groups may carry ``names`` and ``shapes`` (as
            :func:`optimlib.optim.param_groups` records them; ``shapes`` is required under
            DeepSpeed ZeRO, one parameter per group).
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
        no_deprecation_warning: accepted for drop-in compatibility with galore-torch; ignored.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 projection: str = "auto", on_refresh: str = "keep", stagger: bool = False,
                 oversample: int = 8, power_iters: int = 2, energy: float | None = None, min_rank: int = 1,
                 max_rank: int | None = None, dct_norm: int = 1, moments_dtype: str | None = None,
                 quant_block: int = 256, stochastic_rounding: bool = True, basis_dtype: str | None = None,
                 seed: int = 0, canonical_signs: bool = True, shard_basis: bool = True,
                 no_deprecation_warning: bool = True):
        if not (isinstance(lr, (int, float)) and lr >= 0.0):
            _bad("lr", lr, "a number >= 0")
        if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            _bad("betas", betas, "two numbers, each in [0, 1)")
        if not (isinstance(eps, (int, float)) and eps >= 0.0):
            _bad("eps", eps, "a number >= 0")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0.0):
            _bad("weight_decay", weight_decay, "a number >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=bool(correct_bias), update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, projection=projection, on_refresh=on_refresh, stagger=stagger,
                        oversample=oversample, power_iters=power_iters, energy=energy, min_rank=min_rank,
                        max_rank=max_rank, dct_norm=dct_norm, moments_dtype=moments_dtype,
                        quant_block=quant_block, stochastic_rounding=stochastic_rounding,
                        basis_dtype=basis_dtype, seed=seed, canonical_signs=canonical_signs,
                        shard_basis=shard_basis)
        self._lowrank_count = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        if is_lowrank_group(group):
            n = len(group["params"])
            if group["stagger"] and "refresh_offsets" not in group:
                gap = group["update_proj_gap"]
                group["refresh_offsets"] = [int(((self._lowrank_count + j) * _GOLDEN) % 1.0 * gap)
                                            for j in range(n)]
            self._lowrank_count += n

    @staticmethod
    def _validate_group(group: dict) -> None:
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) or (isinstance(lr, (int, float)) and lr >= 0)):
            _bad("lr", lr, "a number >= 0")
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

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype: keep block maxima in fp32.
        for st in self.state.values():
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                if key in st and st[key].dtype != torch.float32:
                    st[key] = st[key].float()

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

    def _param_name(self, group: dict, gi: int, i: int) -> str:
        names = group.get("names")
        if names is not None and i < len(names) and names[i] is not None:
            return str(names[i])
        return f"group{gi}.param{i}"

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimizer step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._step_param(group, gi, i, p, p.grad)
        return loss

    def _step_param(self, group: dict, gi: int, i: int, p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        shape = global_shape(p, group, i)
        local, piece = local_piece(p, shape)
        g = to_local(grad)
        state = self.state[p]
        name = self._param_name(group, gi, i)
        if not state:
            state["step"] = 0
            state["seed"] = name_seed(name, int(group.get("seed", 0)))
        if is_lowrank_group(group) and len(shape) >= 2:
            config = self._config(group)
            offsets = group.get("refresh_offsets")
            block = RowBlock(matrix_shape(shape), piece)
            mesh = p.device_mesh if is_dtensor(p) and p.device_mesh.ndim == 1 else None
            projector = Projector(config, block, offset=offsets[i] if offsets else 0, name=name, mesh=mesh)
            moments = _Moments(state, group, projector, g, p)
            bd = group["basis_dtype"]
            galore_adamw_lowrank_(local, g, state, projector, moments, lr=lr, beta1=beta1, beta2=beta2,
                                  eps=group["eps"], weight_decay=group["weight_decay"],
                                  correct_bias=group["correct_bias"], scale=float(group["scale"]),
                                  on_refresh=group["on_refresh"],
                                  basis_dtype=getattr(torch, bd) if bd else None)
            return
        if "exp_avg" not in state:
            # zeros_like(p): a DTensor under FSDP2 (distributed checkpoints shard it).
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1
        galore_adamw_dense_(local, g, to_local(state["exp_avg"]), to_local(state["exp_avg_sq"]), state["step"],
                            lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
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
            self.optimizer._step_param(self.optimizer.param_groups[gi], gi, i, p, p.grad)
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


def _build_galore_adamw(groups, lr, **kwargs):
    return GaLoreAdamW(groups, lr=lr, **kwargs)


register_optimizer(
    "galore_adamw", _build_galore_adamw, shape_aware=True, matrix_keys=LOWRANK_KEYS,
    defaults={"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    description="GaLore AdamW (Zhao et al., ICML 2024): Adam on a refreshed low-rank gradient projection")
