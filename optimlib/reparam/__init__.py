"""Weight reparameterizations: one file per method, one entry point.

    model = optimlib.reparam.apply(model, "sltrain", rank=128, density=0.03)
    ... train with any optimizer, calling optimlib.reparam.after_step(model, opt) after each step ...
    dense = optimlib.reparam.merge(model)      # plain nn.Linear layers with the same function

A method is registered with :func:`register_reparam` as a function ``convert(linear, **options)``
that receives one targeted ``nn.Linear`` and returns the module that replaces it: a new module
(SLTrain, LOST, dynamic rank: module replacement) or the same linear with a
``torch.nn.utils.parametrize`` parametrization registered on its weight (N:M, compander).

The protocol a reparameterized layer (or parametrization) follows:

* ``merged() -> nn.Linear`` — a replacement module returns the dense layer with the same
  function (parametrized linears need nothing: :func:`merge` bakes the parametrization in);
* ``after_step(optimizer)`` — optional; called by :func:`after_step` once per optimizer step,
  after ``optimizer.step()`` (schedules, rank truncation).  State that a resumed run needs
  (schedule position, current rank) lives in buffers, so it is part of the model's state_dict;
* ``after_skipped_step()`` — optional; called by :func:`after_skipped_step` instead of
  ``after_step`` when the optimizer step was *not* applied and its gradients were discarded (a
  non-finite step skipped by ``train.on_nonfinite``, an AMP ``GradScaler`` inf step): it restores
  what the discarded backward consumed, so that the next step's gradient is what it would have
  been without the skipped one, and advances nothing (a skipped step is not counted).  N:M
  re-arms its once-per-step SR-STE term here;
* ``replicated_parameters`` — optional class attribute: names of the layer's parameters that
  the step hook reshapes (in place, keeping the ``Parameter`` object).  The sharded engines
  (FSDP2, DeepSpeed ZeRO) keep those whole and identical on every rank instead of sharding them,
  and train them with a second instance of the optimizer (:mod:`optimlib.distributed.replicated`);
  the step hook then receives that optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import nn
from torch.nn.utils import parametrize

from optimlib.distributed.layout import is_dtensor
from optimlib.optim.factory import target_linears
from optimlib.registry import Registry


@dataclass(frozen=True)
class ReparamSpec:
    name: str
    convert: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    description: str = ""
    tensor_parallel: bool = False
    """Whether it works under tensor parallelism."""
    parametrization: bool = False
    """It parametrizes the linear's weight in place (``torch.nn.utils.parametrize``) instead of
    replacing the module.  Under tensor parallelism a parametrization is applied after the plan,
    to each rank's block of the weight; a replacement before it (the plan distributes the new
    layer)."""


_REGISTRY: Registry[ReparamSpec] = Registry("reparameterization")


def register_reparam(name: str, convert: Callable[..., nn.Module], *, defaults: dict | None = None,
                     description: str = "", tensor_parallel: bool = False,
                     parametrization: bool = False) -> ReparamSpec:
    """Register ``convert(linear, **options) -> nn.Module`` under ``name`` (lower-case); see
    :class:`ReparamSpec` for ``tensor_parallel`` and ``parametrization``."""
    return _REGISTRY.add(name, ReparamSpec(name.lower(), convert, dict(defaults or {}), description,
                                           tensor_parallel, parametrization))


def list_reparams() -> list[str]:
    """Names accepted by :func:`apply` (and the config's ``reparam.method``)."""
    return _REGISTRY.names()


def tensor_parallel_reparams() -> list[str]:
    """The registered reparameterizations that apply to tensor-parallel linears."""
    return [name for name in list_reparams() if get_reparam_spec(name).tensor_parallel]


def get_reparam_spec(name: str) -> ReparamSpec:
    return _REGISTRY.get(name)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply(model: nn.Module, method: str, targets: Sequence[str] | None = None, **options) -> nn.Module:
    """Reparameterize the ``targets`` linears of ``model`` (default: attention and MLP) with
    ``method``; returns ``model`` (changed in place).

    Apply it before ``fully_shard`` / DeepSpeed, which then shard the reparameterized layers like
    any module.  Under tensor parallelism, apply a parametrization (``nm``, ``compander``) after
    ``parallelize_module``: it acts on each rank's block of the weight.  Apply a module replacement
    (``sltrain``, ``lowrank``, ``lost``, ``dynamic_rank``) before the plan, and make the plan with
    :func:`optimlib.models.tensor_parallel.parallelize_linears`, which distributes the new layers.
    A linear whose weight is already a DTensor is refused for every replacement, naming it.
    """
    spec = get_reparam_spec(method)
    options = {**spec.defaults, **options}
    targeted = target_linears(model, targets)
    for name, linear in targeted:
        if is_dtensor(linear.weight) and not spec.parametrization:
            if spec.tensor_parallel:
                way_out = (f"{method} replaces the module: apply it to the plain model, then make the tensor-parallel "
                           f"plan with optimlib.models.tensor_parallel.parallelize_linears, which distributes the "
                           f"new layer")
            else:
                way_out = (f"{method} replaces the module, which has no tensor-parallel form.  Reparameterize the "
                           f"plain model, then shard it with fully_shard or DeepSpeed (leave its layers out of the "
                           f"tensor-parallel plan), or leave this linear out of the targets; "
                           f"{', '.join(tensor_parallel_reparams())} work under tensor parallelism")
            raise ValueError(
                f"optimlib.reparam.apply({method!r}): linear {name!r} is already distributed (its weight is a DTensor "
                f"placed {tuple(linear.weight.placements)}), and {way_out}")
    for name, linear in targeted:
        new = spec.convert(linear, **options)
        if new is not linear:
            _set_submodule(model, name, new)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Turn every reparameterized layer back into a plain dense ``nn.Linear`` (in place)."""
    for name, module in list(model.named_modules()):
        if name and hasattr(module, "merged") and callable(module.merged):
            _set_submodule(model, name, module.merged())
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def _hooks(model: nn.Module, name: str):
    """``(module, bound method)`` of every module of ``model`` that defines the hook ``name``."""
    for module in model.modules():
        hook = getattr(module, name, None)
        if callable(hook):
            yield module, hook


def after_step(model: nn.Module, optimizer=None, replicated_optimizer=None) -> None:
    """Run every reparameterized layer's ``after_step(optimizer)``; call it after each
    ``optimizer.step()`` (the training loop of ``launch/pretrain.py`` does).  Layers that declare
    ``replicated_parameters`` get ``replicated_optimizer`` when one is given (the sharded engines
    train those parameters with it)."""
    for module, hook in _hooks(model, "after_step"):
        replicated = replicated_optimizer is not None and getattr(module, "replicated_parameters", ())
        hook(replicated_optimizer if replicated else optimizer)


def after_skipped_step(model: nn.Module) -> None:
    """Run every reparameterized layer's ``after_skipped_step()``; call it, instead of
    :func:`after_step`, when an optimizer step was skipped and its gradients discarded (the
    training loop of ``launch/pretrain.py`` does on a non-finite step; a loop with an AMP
    ``GradScaler`` should when ``scaler.step`` skipped).  Advances no schedule."""
    for _, hook in _hooks(model, "after_skipped_step"):
        hook()


def replicated_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, attribute)`` of every parameter a layer of ``model`` declares
    replicated (``replicated_parameters`` class attribute), in module order."""
    found = []
    for prefix, module in model.named_modules():
        for attr in getattr(module, "replicated_parameters", ()):
            if isinstance(module._parameters.get(attr), nn.Parameter):
                found.append((f"{prefix}.{attr}" if prefix else attr, module, attr))
    return found


__all__ = ["ReparamSpec", "after_skipped_step", "after_step", "apply", "get_reparam_spec", "list_reparams", "merge",
           "register_reparam", "replicated_parameters", "tensor_parallel_reparams"]

from optimlib.reparam import sltrain  # noqa: E402,F401  (registers sltrain, lowrank)
from optimlib.reparam import nm  # noqa: E402,F401  (registers nm)
from optimlib.reparam import compander  # noqa: E402,F401  (registers compander)
from optimlib.reparam import lost  # noqa: E402,F401  (registers lost)
from optimlib.reparam import dynamic_rank  # noqa: E402,F401  (registers dynamic_rank)
