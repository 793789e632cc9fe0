"""What the benchmarks compare: every registered optimizer, the torch baseline and the peers.

A :class:`Contender` is a name and a function that builds an optimizer over a model.  Three kinds:

* ``ours``: every name in :func:`optimlib.list_optimizers` at the time of the call (so optimizers
  registered later show up without touching this file), built through the factory with
  :func:`optimizer_kwargs` -- low-rank methods get the GaLore paper's rank for the model;
* ``baseline``: ``torch.optim.AdamW(foreach=True)``, the denominator of every ratio (on a CPU
  torch's default for AdamW is the per-tensor loop, so ``foreach`` is asked for explicitly);
  with ``fused=True`` also ``torch.optim.AdamW(fused=True)`` (``torch_adamw_fused``), the fastest
  AdamW torch has on a GPU;
* ``peer``: the reference implementations users would otherwise run -- galore-torch's
  ``GaLoreAdamW``, pytorch_optimizer's ``GaLore`` and ``AdamP``, clovaai's ``adamp.AdamP`` --
  when importable, bitsandbytes' 8-bit Adam, torchao's ``AdamW8bit`` and apex's ``FusedAdam`` on
  CUDA only, when importable.  Peers get the same parameter split as ours (:func:`optimlib.optim.param_groups`:
  the attention and MLP linears are the low-rank group, the rest plain).

Contenders are rebuilt from their name (:func:`get_contender`), which is how a fresh worker
process measuring one of them finds it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from optimlib.models import CONFIGS, LlamaConfig
from optimlib.optim import create_optimizer, get_optimizer_spec, list_optimizers, param_groups

__all__ = ["Contender", "BASELINE", "FUSED", "PAPER_RANKS", "paper_rank", "optimizer_kwargs", "contenders",
           "get_contender", "is_low_rank"]

BASELINE = "torch_adamw_foreach"
FUSED = "torch_adamw_fused"
LR = 1e-3

# GaLore paper Table 2 / App. C (7B: the 8-bit GaLore run); llama_tiny: a quarter of its width.
PAPER_RANKS = {"llama_tiny": 32, "llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512,
               "llama_7b": 1024}

# Registered optimizers whose constructor defaults keep no state worth measuring.
_OVERRIDES = {"sgdp": {"momentum": 0.9}}   # torch-style default momentum=0 keeps no buffer


def paper_rank(model: str | LlamaConfig) -> int:
    """The GaLore paper's rank for a named model; otherwise a quarter of the model width."""
    if isinstance(model, str):
        if model in PAPER_RANKS:
            return PAPER_RANKS[model]
        if model not in CONFIGS:
            raise ValueError(f"unknown model {model!r}; known models: {', '.join(CONFIGS)}")
        model = CONFIGS[model]
    return max(1, model.dim // 4)


def is_low_rank(name: str) -> bool:
    """Whether a registered optimizer takes a GaLore-style ``rank`` on its targeted-matrix group."""
    return "rank" in get_optimizer_spec(name).matrix_keys


def optimizer_kwargs(name: str, model: str | LlamaConfig) -> dict:
    """The keyword arguments the benchmarks build registered optimizer ``name`` with.

    Low-rank methods: the GaLore paper's rank for ``model`` (not for a method whose registered
    rank is 1: APOLLO-Mini is defined by it), and ``update_proj_gap=200``, ``scale=0.25`` where the
    method takes them and registers no default of its own; SGDP: ``momentum=0.9``; everything
    else: its registered defaults.
    """
    spec = get_optimizer_spec(name)
    kwargs = dict(_OVERRIDES.get(spec.name, {}))
    if "rank" in spec.matrix_keys:
        if spec.defaults.get("rank") != 1:
            kwargs["rank"] = paper_rank(model)
        for key, value in (("update_proj_gap", 200), ("scale", 0.25)):
            if key in spec.matrix_keys and key not in spec.defaults:
                kwargs[key] = value
    return kwargs


@dataclass(frozen=True)
class Contender:
    """One optimizer to benchmark: ``build(model, **overrides)`` returns it over ``model``.

    ``low_rank``: it projects gradients and refreshes a basis every ``update_proj_gap`` steps
    (``overrides`` may then carry ``update_proj_gap`` to time refresh steps).
    """

    name: str
    kind: str                      # "ours", "baseline" or "peer"
    build: Callable[..., torch.optim.Optimizer] = field(repr=False)
    low_rank: bool = False
    note: str = ""
    module: str | None = None
    """The package a peer comes from (imported ahead of time by benchmarks that fork workers)."""
    rule: str | None = None
    """The registered optimizer whose update rule a peer runs (its memory-traffic floor is that
    rule's, :mod:`optimlib.bench.traffic`); ``None`` for a peer with state of its own kind."""


def _ours(name: str, model_name) -> Contender:
    kwargs = optimizer_kwargs(name, model_name)

    def build(model: nn.Module, **overrides):
        return create_optimizer(model, name, lr=LR, **{**kwargs, **overrides})

    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return Contender(name, "ours", build, low_rank=is_low_rank(name), note=shown, rule=name)


def _baseline(model_name) -> Contender:
    def build(model: nn.Module, **_):
        return create_optimizer(model, "adamw", lr=LR, foreach=True)

    return Contender(BASELINE, "baseline", build, note="torch.optim.AdamW(foreach=True)", rule="adamw")


def _fused_baseline(model_name) -> Contender:
    def build(model: nn.Module, **_):
        return create_optimizer(model, "adamw", lr=LR, fused=True)

    return Contender(FUSED, "baseline", build, note="torch.optim.AdamW(fused=True)", rule="adamw")


def _split(model: nn.Module, **matrix_options) -> list[dict]:
    """Our parameter split without our bookkeeping keys (peers see plain torch param groups)."""
    groups = param_groups(model, matrix_options=matrix_options or None)
    return [{k: v for k, v in g.items() if k not in ("names", "shapes")} for g in groups]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _peers(model_name, device: torch.device) -> list[Contender]:
    rank = paper_rank(model_name)
    found: list[Contender] = []
    if _importable("galore_torch"):
        def galore_torch_adamw(model, update_proj_gap=200, **_):
            import warnings

            from galore_torch import GaLoreAdamW

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return GaLoreAdamW(_split(model, rank=rank, update_proj_gap=update_proj_gap, scale=0.25,
                                          proj_type="std"), lr=LR)

        found.append(Contender("galore_torch.GaLoreAdamW", "peer", galore_torch_adamw, low_rank=True,
                               note=f"galore-torch, rank={rank}, update_proj_gap=200, scale=0.25",
                               module="galore_torch", rule="galore_adamw"))
    if _importable("pytorch_optimizer"):
        def pytorch_optimizer_galore(model, update_proj_gap=200, **_):
            from pytorch_optimizer import GaLore

            return GaLore(_split(model, rank=rank, update_proj_gap=update_proj_gap, scale=0.25,
                                 projection_type="std"), lr=LR)

        def pytorch_optimizer_adamp(model, **_):
            from pytorch_optimizer import AdamP

            return AdamP(_split(model), lr=LR)

        found.append(Contender("pytorch_optimizer.GaLore", "peer", pytorch_optimizer_galore, low_rank=True,
                               note=f"pytorch_optimizer, rank={rank}, update_proj_gap=200, scale=0.25",
                               module="pytorch_optimizer", rule="galore_adamw"))
        found.append(Contender("pytorch_optimizer.AdamP", "peer", pytorch_optimizer_adamp, note="pytorch_optimizer",
                               module="pytorch_optimizer", rule="adamp"))
    if _importable("adamp"):
        def clovaai_adamp(model, **_):
            from adamp import AdamP

            return AdamP(_split(model), lr=LR)

        found.append(Contender("adamp.AdamP", "peer", clovaai_adamp, note="clovaai adamp 0.3.0", module="adamp",
                               rule="adamp"))
    if device.type == "cuda" and _importable("bitsandbytes"):
        def bnb_adam8bit(model, **_):
            import bitsandbytes as bnb

            return bnb.optim.Adam8bit(_split(model), lr=LR)

        found.append(Contender("bitsandbytes.Adam8bit", "peer", bnb_adam8bit, note="8-bit blockwise Adam (CUDA)",
                               module="bitsandbytes"))
    if device.type == "cuda" and _importable("torchao"):
        def torchao_adamw8bit(model, **_):
            from torchao.optim import AdamW8bit

            return AdamW8bit(_split(model), lr=LR)

        found.append(Contender("torchao.AdamW8bit", "peer", torchao_adamw8bit, note="torchao 8-bit AdamW (CUDA)",
                               module="torchao"))
    if device.type == "cuda" and _importable("apex"):
        def apex_fused_adam(model, **_):
            from apex.optimizers import FusedAdam

            return FusedAdam(_split(model), lr=LR)

        found.append(Contender("apex.FusedAdam", "peer", apex_fused_adam, note="apex (CUDA)", module="apex",
                               rule="adamw"))
    return found


def contenders(model_name: str, device: torch.device | str = "cpu", names: list[str] | None = None,
               peers: bool = True, fused: bool = False) -> list[Contender]:
    """The baseline (with ``fused=True`` also :data:`FUSED`), every registered optimizer and
    (``peers=True``) the importable peers.

    ``names`` restricts the list (the baseline is always kept): registered names, peer names
    as listed (``galore_torch.GaLoreAdamW``, ...) or the baseline's; an unknown one is an error.
    """
    device = torch.device(device)
    every = [_baseline(model_name)] + ([_fused_baseline(model_name)] if fused else [])
    every += [_ours(n, model_name) for n in list_optimizers()]
    if peers:
        every += _peers(model_name, device)
    if names is None:
        return every
    known = {c.name: c for c in every}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(map(repr, unknown))} for --optimizers; "
                         f"known here: {', '.join(known)}")
    return [known[BASELINE]] + [known[n] for n in names if n != BASELINE]


def get_contender(model_name: str, name: str, device: torch.device | str = "cpu") -> Contender:
    """The contender called ``name`` (see :func:`contenders`)."""
    return contenders(model_name, device, names=[name], fused=name == FUSED)[-1]
