"""The GaLore optimizer class: its options, their validation, and the step over param units."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from optimlib.distributed.layout import is_dtensor
from optimlib.distributed.row_block import RowBlock
from optimlib.optim._common import OptimizerBase, ParamUnit
from optimlib.validation import check_betas, check_choice, check_real, fail
from optimlib.optim.galore.bases import matrix_shape, name_seed
from optimlib.optim.galore.projection import ProjectionConfig, Projector
from optimlib.optim.galore.rules import INNER_RULES, DenseBatch, galore_lowrank_
from optimlib.optim.smmf import validate_smmf_hyperparameters
from optimlib.optim.state_spec import Placement, StateSpec

__all__ = ["GaLoreAdamW", "LOWRANK_KEYS", "is_lowrank_group"]

ON_REFRESH = ("keep", "rotate", "reset")
MOMENTS_DTYPES = (None, "float32", "bfloat16", "float16", "int8")
BASIS_DTYPES = (None, "float32", "float64", "bfloat16", "float16")
_GOLDEN = (math.sqrt(5) - 1) / 2

# Keys that configure a low-rank group (the factory puts them on the targeted-matrix group).
LOWRANK_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projection", "on_refresh", "stagger",
                "oversample", "power_iters", "energy", "min_rank", "max_rank", "dct_norm",
                "moments_dtype", "quant_block", "stochastic_rounding", "basis_dtype", "seed", "canonical_signs",
                "shard_basis")


def is_lowrank_group(group: dict) -> bool:
    """galore-torch's rule: a group is low-rank when it has a ``rank`` key (``None`` = absent)."""
    return group.get("rank") is not None


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
        projection: auto, svd, randomized, dct, random, gaussian.  on_refresh: keep, rotate, reset.
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
            :mod:`optimlib.optim.galore.projection`).
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
        INNER_RULES[group["inner"]].validate(group)
        check_real("delta", group["delta"], low=0.0)
        check_real("wd_ratio", group["wd_ratio"], low=0.0, high=1.0)
        validate_smmf_hyperparameters(decay_rate=group["decay_rate"], growth_rate=group["growth_rate"])

    def _validate_defaults(self, defaults: dict) -> None:
        # The options every group uses (low-rank ones are checked per low-rank group).
        self._validate_common(defaults)
        if defaults["inner"] == "smmf" and defaults["moments_dtype"] is not None:
            fail("moments_dtype", defaults["moments_dtype"], "None with inner='smmf' (SMMF stores its own "
                 "float32 factors and 1-bit signs)")

    @classmethod
    def _validate_group(cls, group: dict) -> None:
        cls._validate_common(group)
        if not is_lowrank_group(group):
            return
        ProjectionConfig.from_group(group).validate()
        scale = group["scale"]
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
                and scale > 0):
            fail("scale", scale, "a finite number > 0")
        if group["on_refresh"] not in ON_REFRESH:
            fail("on_refresh", group["on_refresh"], f"one of {', '.join(ON_REFRESH)}")
        if group["moments_dtype"] not in MOMENTS_DTYPES:
            fail("moments_dtype", group["moments_dtype"], "None, 'float32', 'bfloat16', 'float16' or 'int8'")
        if group["inner"] == "smmf" and group["moments_dtype"] is not None:
            fail("moments_dtype", group["moments_dtype"], "None with inner='smmf' (SMMF stores its own float32 "
                 "factors and 1-bit signs)")
        if group["basis_dtype"] not in BASIS_DTYPES:
            fail("basis_dtype", group["basis_dtype"], "None, 'float32', 'float64', 'bfloat16' or 'float16'")
        qb = group["quant_block"]
        if not (isinstance(qb, int) and not isinstance(qb, bool) and qb >= 1):
            fail("quant_block", qb, "an integer >= 1")
        if not isinstance(group["stagger"], bool):
            fail("stagger", group["stagger"], "True or False")
        offsets = group.get("refresh_offsets")
        if offsets is not None and (len(offsets) != len(group["params"])
                                    or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            fail("refresh_offsets", offsets, "one integer >= 0 per parameter")

    # ------------------------------------------------------------------ step
    #: how a projected parameter's basis is computed and stored, and its options (family members refine them)
    projector_class, config_class = Projector, ProjectionConfig
    _CONFIG_FIELDS = tuple(ProjectionConfig.__dataclass_fields__)

    def _config(self, group: dict) -> ProjectionConfig:
        """The group's ProjectionConfig, rebuilt only when one of its keys changed."""
        key = tuple(group.get(k) for k in self._CONFIG_FIELDS)
        cache = self.__dict__.setdefault("_config_cache", {})
        hit = cache.get(id(group))
        if hit is None or hit[0] != key:
            hit = (key, self.config_class.from_group(group))
            cache[id(group)] = hit
        return hit[1]

    @staticmethod
    def second_pass_reads(group) -> int:
        """The inner rule's second reads of parameter-sized tensors (:mod:`optimlib.bench.traffic`)."""
        return INNER_RULES[group["inner"]].second_pass_reads

    @classmethod
    def state_specs(cls, group, place: Placement, state=None) -> list[StateSpec]:
        """The declared state of one parameter (:mod:`optimlib.optim.state_spec`): a projected one's
        low-rank moments (its inner rule's store) and basis, at its current rank (``state``) or the
        rank cap; any other the inner rule's own state.  Python-int entries (``step``, ``seed``,
        ``rank``, ...) are not tensors and are not declared."""
        rule = INNER_RULES[group["inner"]]
        shape = place.shape
        if not (is_lowrank_group(group) and shape is not None and len(shape) >= 2 and math.prod(shape) > 0):
            return rule.dense_specs(group, place)
        projector = cls.projector_class(cls.config_class.from_group(group), RowBlock(matrix_shape(shape), place.piece))
        rank = int(state["rank"]) if state and "rank" in state else projector.max_rank
        bd = group["basis_dtype"]
        return [*rule.lowrank_specs(group, projector, rank, place),
                *projector.basis_specs(rank, getattr(torch, bd) if bd else None)]

    def _step_units(self, group: dict, units: list[ParamUnit]) -> None:
        """Projected parameters take :func:`galore_lowrank_`; the others the inner rule's own step
        (galore-torch's AdamW ones batched as multi-tensor ops)."""
        rule = INNER_RULES[group["inner"]]
        dense = DenseBatch()
        for unit in units:
            state = unit.state
            if not state:
                state["step"] = 0
                state["seed"] = name_seed(unit.name, int(group.get("seed", 0)))
            if is_lowrank_group(group) and len(unit.shape) >= 2 and math.prod(unit.shape) > 0:
                p = unit.param
                offsets = group.get("refresh_offsets")
                mesh = p.device_mesh if is_dtensor(p) else None
                projector = self.projector_class(self._config(group), RowBlock(matrix_shape(unit.shape), unit.piece),
                                                 offset=offsets[unit.index] if offsets else 0, name=unit.name,
                                                 mesh=mesh)
                bd = group["basis_dtype"]
                galore_lowrank_(unit, projector, rule, group, basis_dtype=getattr(torch, bd) if bd else None)
            else:  # 0-/1-D or empty parameters, groups without ``rank``
                rule.dense(group, unit, dense)
        dense.run(group)


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
