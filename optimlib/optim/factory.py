"""Optimizer registry and factory, in the style of ``timm.optim``.

``create_optimizer(model, "adamw", lr=3e-3, weight_decay=0.1)`` builds the param groups and the
optimizer:

* norms, biases and embeddings (every parameter with fewer than two dimensions, and every
  ``nn.Embedding`` weight) go to a group with ``weight_decay=0``;
* for methods registered with ``matrix_keys`` (projected / low-rank methods), the 2-D weights of
  the attention and MLP linears (``target_modules`` overrides: names or regexes matched against
  the module's qualified name, as Hugging Face's ``optim_target_modules``) go to their own group
  carrying those keys (``rank``, ``update_proj_gap``, ...);
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
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from optimlib.registry import Registry

DEFAULT_TARGET_MODULES = (r"(^|\.)(attn|attention|self_attn)\.", r"(^|\.)(mlp|ffn|feed_forward)\.")


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


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) or re.search(p, name + ".") for p in patterns)


def linear_weight(module: nn.Linear) -> nn.Parameter:
    """The trainable weight behind ``module.weight``: for a parametrized linear (N:M sparsity,
    compander) ``module.weight`` is computed, and the parameter is the latent original."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def target_linears(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """``(qualified name, module)`` of the trainable 2-D ``nn.Linear`` layers matched by
    ``target_modules`` (names or regexes; default: the attention and MLP linears)."""
    targets = tuple(target_modules) if target_modules is not None else DEFAULT_TARGET_MODULES
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and linear_weight(mod).requires_grad and linear_weight(mod).dim() == 2
             and _matches(name, targets)]
    if not found:
        raise ValueError(f"target_modules {list(targets)} matched no nn.Linear in the model")
    return found


def param_groups(model: nn.Module, *, weight_decay: float = 0.0,
                 target_modules: Sequence[str] | None = None, matrix_options: dict | None = None,
                 per_parameter_groups: bool = False) -> list[dict]:
    """Split ``model``'s trainable parameters into decay / no-decay / targeted-matrix groups."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrix_ids = set()
    if matrix_options is not None:
        matrix_ids = {id(linear_weight(mod)) for _, mod in target_linears(model, target_modules)}

    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "decay": [], "no_decay": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in matrix_ids:
            buckets["matrix"].append((name, p))
        elif p.dim() < 2 or id(p) in embeddings:
            buckets["no_decay"].append((name, p))
        else:
            buckets["decay"].append((name, p))

    def group(items, **extra):
        return {"params": [p for _, p in items], "names": [n for n, _ in items],
                "shapes": [tuple(getattr(p, "ds_shape", p.shape)) for _, p in items], **extra}

    extras = {"matrix": {"weight_decay": weight_decay, **(matrix_options or {})},
              "decay": {"weight_decay": weight_decay},
              "no_decay": {"weight_decay": 0.0}}
    groups = []
    for kind in ("matrix", "decay", "no_decay"):
        items = buckets[kind]
        if not items:
            continue
        if per_parameter_groups:
            groups.extend(group([it], **extras[kind]) for it in items)
        else:
            groups.append(group(items, **extras[kind]))
    return groups


def create_optimizer(model: nn.Module, name: str = "adamw", *, lr: float = 1e-3,
                     weight_decay: float = 0.0, target_modules: Sequence[str] | None = None,
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


register_optimizer("adamw", _build_adamw, description="torch.optim.AdamW (the baseline)")
