"""Optimizer registry and factory, in the style of ``timm.optim``.

``create_optimizer(model, "adamw", lr=3e-3, weight_decay=0.1)`` builds the param groups and the
optimizer:

* norms, biases and embeddings (every parameter with fewer than two dimensions, and every
  ``nn.Embedding`` weight) go to a group with ``weight_decay=0``;
* for methods registered with ``matrix_keys`` (projected / low-rank methods), the 2-D weights of
  the attention and MLP linears go to their own group carrying those keys (``rank``,
  ``update_proj_gap``, ...).  ``target_modules`` overrides the selection with Hugging Face's
  ``optim_target_modules`` semantics (:func:`match_target`): a string is a regex the module's
  qualified name must match in full (``"all-linear"``: every linear); a list matches a name equal
  to an entry, containing an entry, or matching an entry as a full regex.  Linears are
  ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2's transposed linear, see
  :func:`is_conv1d`);
* ``per_parameter_groups=True`` (what the launcher uses for shape-aware methods under DeepSpeed)
  gives each parameter its own group so that ZeRO partitions each one separately.

Every group records each parameter's qualified name (``names``, used in error messages and to
seed random projections) and global shape (``shapes``).  Any grouping works under DeepSpeed: the
optimizers map flat partitions back to their parameters
(:mod:`optimlib.distributed.flat_partition`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from optimlib.optim.state_spec import Placement, StateSpec, declare_state, elementwise, step_spec
from optimlib.registry import Registry

@dataclass(frozen=True)
class OptimizerSpec:
    """How the factory builds one registered optimizer.

    ``matrix_keys``: keyword arguments that belong on the targeted-matrix param group rather
    than the constructor (a group with them is treated as low-rank / shape-aware by the
    optimizer).  ``shape_aware``: the optimizer reads ``group["shapes"]``, so under DeepSpeed it
    needs one parameter per group.
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    matrix_keys: tuple[str, ...] = ()
    shape_aware: bool = False
    defaults: dict = field(default_factory=dict)
    description: str = ""


_REGISTRY: Registry[OptimizerSpec] = Registry("optimizer")


def register_optimizer(name: str, build: Callable[..., torch.optim.Optimizer], *,
                       matrix_keys: Sequence[str] = (), shape_aware: bool = False,
                       defaults: dict | None = None, description: str = "") -> OptimizerSpec:
    """Register ``build(param_groups, **kwargs)`` under ``name`` (lower-case)."""
    return _REGISTRY.add(name, OptimizerSpec(name.lower(), build, tuple(matrix_keys), shape_aware,
                                             dict(defaults or {}), description))


def list_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer` (and the config's ``optim.name``)."""
    return _REGISTRY.names()


def get_optimizer_spec(name: str) -> OptimizerSpec:
    return _REGISTRY.get(name)


ALL_LINEAR = "all-linear"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``transformers.Conv1D`` (GPT-2's projections): a linear
    whose weight is stored transposed, ``(in_features, out_features)``, computing ``x @ W + b``.

    Recognised by class name so that importing optimlib never imports transformers; subclasses
    (FSDP2's ``FSDPConv1D``) count too."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


def _is_target_candidate(module: nn.Module, conv1d: bool) -> bool:
    if not (isinstance(module, nn.Linear) or (conv1d and is_conv1d(module))):
        return False
    weight = linear_weight(module)
    return weight.requires_grad and len(getattr(weight, "ds_shape", weight.shape)) == 2


def _check_targets(target_modules) -> str | tuple[str, ...]:
    """``target_modules`` as :func:`match_target` reads it; a clear error for anything else."""
    if isinstance(target_modules, str):
        entries = (target_modules,)
    elif isinstance(target_modules, (list, tuple)) and target_modules \
            and all(isinstance(t, str) for t in target_modules):
        entries = tuple(target_modules)
    else:
        raise TypeError(f"target_modules must be a string (a regex, or {ALL_LINEAR!r}) or a non-empty list of "
                        f"module names or regexes, got {target_modules!r}")
    for entry in entries:
        try:
            re.compile(entry)
        except re.error as exc:
            raise ValueError(f"target_modules entry {entry!r} is not a valid regular expression ({exc}); "
                             f"escape it with re.escape to match it as a name") from None
    return target_modules if isinstance(target_modules, str) else entries


def is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == ALL_LINEAR


def match_target(target_modules: str | Sequence[str], name: str) -> bool:
    """Hugging Face's ``optim_target_modules`` rule for the module qualified ``name``: a string is
    a regex that must match the whole name (``"all-linear"`` matches every name); a list matches a
    name that equals an entry, contains an entry, or fully matches an entry as a regex."""
    if isinstance(target_modules, str):
        return is_all_linear(target_modules) or re.fullmatch(target_modules, name) is not None
    return any(name == t or t in name or re.fullmatch(t, name) is not None for t in target_modules)


# The default targets: every linear inside an attention or MLP block.
DEFAULT_TARGET_MODULES = (r"(.*\.)?(attn|attention|self_attn)(\..*)?", r"(.*\.)?(mlp|ffn|feed_forward)(\..*)?")


def linear_weight(module: nn.Module) -> nn.Parameter:
    """The trainable weight behind ``module.weight``: for a parametrized linear (N:M sparsity,
    compander) ``module.weight`` is computed, and the parameter is the latent original."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def target_linears(model: nn.Module, target_modules: str | Sequence[str] | None = None, *,
                   conv1d: bool = False) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of the trainable 2-D linears matched by ``target_modules``
    (:func:`match_target`; default: the attention and MLP linears).  Linears are ``nn.Linear``,
    and with ``conv1d=True`` also Hugging Face's ``Conv1D`` (:func:`is_conv1d`; the optimizer
    factory takes them, the reparameterizations, which replace ``nn.Linear`` modules, do not)."""
    targets = _check_targets(target_modules) if target_modules is not None else DEFAULT_TARGET_MODULES
    found = [(name, mod) for name, mod in model.named_modules()
             if name and _is_target_candidate(mod, conv1d) and match_target(targets, name)]
    if not found:
        shown = targets if isinstance(targets, str) else list(targets)
        kinds = "nn.Linear or transformers Conv1D" if conv1d else "nn.Linear"
        hint = ""
        if not conv1d and any(_is_target_candidate(m, True) and match_target(targets, n)
                              for n, m in model.named_modules() if n):
            hint = (" (it matched only transformers Conv1D layers, GPT-2's transposed linears, which this "
                    "does not convert)")
        raise ValueError(f"target_modules {shown!r} matched no trainable 2-D {kinds} in the model{hint}")
    return found


def conv1d_group_options(options: dict, shape: Sequence[int]) -> dict:
    """The targeted-matrix options for a ``Conv1D`` weight of stored shape ``(in, out)``.

    Options are written for the ``(out, in)`` orientation of ``nn.Linear``.  The only
    orientation-dependent one is GaLore's ``proj_type``: the side the ``(out, in)`` matrix would
    get is resolved and the opposite side forced on the stored transpose, so the projected
    update is the transpose of the one the equivalent ``nn.Linear`` gets (also for square
    weights, where ``std`` would otherwise keep the other dimension)."""
    if "proj_type" not in options:
        return options
    from optimlib.optim.galore.bases import resolve_side

    n_in, n_out = int(shape[0]), int(shape[1])
    linear_side = resolve_side(n_out, n_in, options["proj_type"])
    return {**options, "proj_type": "left" if linear_side == "right" else "right"}


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def param_groups(model: nn.Module, *, weight_decay: float = 0.0,
                 target_modules: str | Sequence[str] | None = None, matrix_options: dict | None = None,
                 per_parameter_groups: bool = False) -> list[dict]:
    """Split ``model``'s trainable parameters into targeted-matrix / decay / no-decay groups (in
    that order).  A weight shared with an ``nn.Embedding`` (a tied output layer) is an embedding;
    a targeted ``Conv1D`` weight gets :func:`conv1d_group_options` (a group of its own when they
    differ from the ``nn.Linear`` weights')."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrix = {"weight_decay": weight_decay, **(matrix_options or {})}
    targeted: dict[int, bool] = {}  # id(weight) -> is a Conv1D weight
    if matrix_options is not None:
        for _, mod in target_linears(model, target_modules, conv1d=True):
            if id(linear_weight(mod)) not in embeddings:
                targeted[id(linear_weight(mod))] = is_conv1d(mod)

    kinds = ("matrix", "decay", "no_decay")
    buckets: dict[tuple, tuple[dict, list[tuple[str, nn.Parameter]]]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in targeted:
            options = conv1d_group_options(matrix, _shape(p)) if targeted[id(p)] else matrix
            key, extra = ("matrix", options.get("proj_type")), options
        elif len(_shape(p)) < 2 or id(p) in embeddings:
            key, extra = ("no_decay",), {"weight_decay": 0.0}
        else:
            key, extra = ("decay",), {"weight_decay": weight_decay}
        buckets.setdefault(key, (extra, []))[1].append((name, p))

    def group(items, extra):
        return {"params": [p for _, p in items], "names": [n for n, _ in items],
                "shapes": [_shape(p) for _, p in items], **extra}

    groups = []
    for key in sorted(buckets, key=lambda k: kinds.index(k[0])):  # stable: first appearance within a kind
        extra, items = buckets[key]
        if per_parameter_groups:
            groups.extend(group([it], extra) for it in items)
        else:
            groups.append(group(items, extra))
    return groups


def create_optimizer(model: nn.Module, name: str = "adamw", *, lr: float = 1e-3,
                     weight_decay: float = 0.0, target_modules: str | Sequence[str] | None = None,
                     per_parameter_groups: bool = False, **kwargs) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``model``'s parameters.

    Keyword arguments listed in the spec's ``matrix_keys`` go on the targeted-matrix group; the
    rest go to the optimizer's constructor (which rejects unknown ones by name).
    """
    spec = get_optimizer_spec(name)
    options = {**spec.defaults, **kwargs}
    matrix_options = {k: options.pop(k) for k in list(options) if k in spec.matrix_keys}
    if target_modules is not None and not spec.matrix_keys:
        raise ValueError(f"optimizer {name!r} has no targeted-matrix group; "
                         f"target_modules applies only to {', '.join(matrix_optimizers())}")
    groups = param_groups(model, weight_decay=weight_decay, target_modules=target_modules,
                          matrix_options=matrix_options if spec.matrix_keys else None,
                          per_parameter_groups=per_parameter_groups)
    return spec.build(groups, lr=lr, **options)


def matrix_optimizers() -> list[str]:
    return [n for n in list_optimizers() if get_optimizer_spec(n).matrix_keys]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by ``optimizer``'s own state tensors on this rank (DTensors: local shard; the
    per-parameter sub-dicts of a DeepSpeed flat partition included)."""
    from optimlib.distributed.layout import to_local

    seen = set()

    def count(state: dict) -> int:
        total = 0
        for v in state.values():
            if isinstance(v, dict):
                total += count(v)
            elif isinstance(v, torch.Tensor):
                local = to_local(v)
                key = (local.untyped_storage().data_ptr(), local.data_ptr()) if local.numel() else id(local)
                if key not in seen:
                    seen.add(key)
                    total += local.numel() * local.element_size()
        return total

    return sum(count(state) for state in optimizer.state.values())


def _build_adamw(groups, lr, **kwargs):
    # Python-level groups keys ("names", "shapes") are carried along by torch.optim untouched.
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def _adam_state(group, place: Placement, state=None) -> list[StateSpec]:
    # torch.optim.Adam and AdamW: a 0-d float32 step, exp_avg and exp_avg_sq (max_exp_avg_sq with amsgrad)
    # like the parameter.
    specs = [step_spec(), elementwise("exp_avg", place, transform="linear"),
             elementwise("exp_avg_sq", place, transform="square")]
    if group.get("amsgrad"):
        specs.append(elementwise("max_exp_avg_sq", place, transform="square"))
    return specs


declare_state(torch.optim.Adam, _adam_state)  # AdamW derives from Adam
register_optimizer("adamw", _build_adamw, description="torch.optim.AdamW (the baseline)")
