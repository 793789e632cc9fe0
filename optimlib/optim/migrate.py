"""Resume from a checkpoint written by the optimizer optimlib replaces.

``convert_state_dict(peer_state_dict, optimizer)`` turns the state dict of a peer optimizer into
``optimizer``'s own format; :meth:`OptimizerBase.load_state_dict
<optimlib.optim._common.OptimizerBase.load_state_dict>` calls it, so
``optimizer.load_state_dict(peer_state_dict)`` works directly.  Build ``optimizer`` over the same
parameters, grouped and ordered as the peer had them (the group options come from the
checkpoint, as with any ``load_state_dict``).

=====================================  ===============================  ==========================================
peer (``source``)                      optimlib optimizer                what is converted
=====================================  ===============================  ==========================================
``adamp.AdamP`` (``"adamp"``)          :class:`~optimlib.AdamP`          nothing: the same keys (its Python-number
                                                                         ``step`` becomes a float32 tensor)
``adamp.SGDP`` (``"adamp"``)           :class:`~optimlib.SGDP`           ``momentum`` -> ``momentum_buffer`` (none
                                                                         is kept with ``momentum=0``); it counts no
                                                                         steps, so ``step`` counts from the resume
``galore_torch.GaLoreAdamW``           :class:`~optimlib.GaLoreAdamW`    each ``projector`` object: its
(``"galore_torch"``)                                                     ``ortho_matrix`` becomes ``basis`` (with
                                                                         ``rank``, ``refreshes``, ``moment_step``,
                                                                         ``seed``); the moments are kept
``pytorch_optimizer`` ``AdamP``,       :class:`~optimlib.AdamP`,         the group's ``step`` becomes every
``SGDP``, ``GaLore``                   :class:`~optimlib.SGDP`,          parameter's; ``projection_type`` ->
(``"pytorch_optimizer"``)              :class:`~optimlib.GaLoreAdamW`    ``proj_type``; its refresh schedule (one
                                                                         step later than galore-torch's) is kept as
                                                                         ``refresh_offsets``; projectors as above
=====================================  ===============================  ==========================================

pytorch_optimizer's SGDP without Nesterov momentum projects a copy of its momentum buffer where
``adamp.SGDP`` (and optimlib) project the buffer itself: its state converts, and the resumed run
follows adamp's update (a ``UserWarning`` says so).

Refused with a ``ValueError`` naming the option or parameter: peer options optimlib does not
implement (``pytorch_optimizer``'s ``weight_decouple=False``, ``fixed_decay``, ``adanorm``,
``use_gc``, ``cautious``, ``adam_debias``; a ``full`` or ``random`` projection), a GaLore target
whose moments are not the peer's (``inner`` other than ``adamw``, a ``moments_dtype``), a state
that does not fit the parameter it would be loaded into, and sharded (DTensor) parameters (convert
in one process, save, then reshard).

Peers pickle their projectors as Python objects, which ``torch.load(weights_only=True)`` refuses.
:func:`load_peer_checkpoint` reads such a checkpoint with ``weights_only=True`` all the same: the
projector classes are mapped to :class:`PeerProjector`, a plain attribute holder, so neither the
peer package nor ``weights_only=False`` is needed (``torch.serialization.safe_globals(
peer_safe_globals())`` does the same around any ``torch.load``).
"""

from __future__ import annotations

import warnings

import torch

from optimlib.distributed.layout import is_dtensor

__all__ = ["PEERS", "PeerProjector", "convert_state_dict", "detect_source", "load_peer_checkpoint",
           "peer_safe_globals"]

PEERS = ("adamp", "galore_torch", "pytorch_optimizer")

# Where the peers' projector classes live (what their pickles name).
_PROJECTOR_CLASSES = ("galore_torch.galore_projector.GaLoreProjector",
                      "pytorch_optimizer.optimizer.utils.galore.GaLoreProjector")

# pytorch_optimizer's options, and the value optimlib's update has (anything else is refused).
_PYTORCH_OPTIMIZER_OPTIONS = {"weight_decouple": True, "fixed_decay": False, "adanorm": False, "use_gc": False,
                              "cautious": False, "adam_debias": False, "maximize": False}
_PYTORCH_OPTIMIZER_DROPPED = ("step", "foreach", "adanorm_r")


class PeerProjector:
    """A peer's pickled ``GaLoreProjector`` as :func:`load_peer_checkpoint` reads it: its attributes
    (``ortho_matrix``, ``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` or
    ``projection_type``), no behaviour."""

    def __repr__(self) -> str:
        return f"PeerProjector({', '.join(sorted(vars(self)))})"


def peer_safe_globals() -> list:
    """The ``(class, name)`` pairs that let ``torch.load(weights_only=True)`` read the peers'
    pickled projectors (as :class:`PeerProjector`): pass to ``torch.serialization.safe_globals``."""
    return [(PeerProjector, name) for name in _PROJECTOR_CLASSES]


def load_peer_checkpoint(f, map_location=None, **kwargs):
    """``torch.load(f, weights_only=True)`` of a peer's checkpoint, projector objects included."""
    with torch.serialization.safe_globals(peer_safe_globals()):
        return torch.load(f, map_location=map_location, weights_only=True, **kwargs)


# ----------------------------------------------------------------------------- detection
def _projector_kind(value) -> str | None:
    if not hasattr(value, "ortho_matrix"):
        return None
    return "pytorch_optimizer" if hasattr(value, "projection_type") else "galore_torch"


def detect_source(state_dict: dict) -> str | None:
    """The peer that wrote ``state_dict`` (one of :data:`PEERS`), or ``None`` for a state dict that
    loads as it is (optimlib's own, and ``adamp.AdamP``'s, whose keys are optimlib's)."""
    for state in state_dict.get("state", {}).values():
        for value in state.values():
            kind = _projector_kind(value)
            if kind is not None:
                return kind
    if any("step" in group for group in state_dict.get("param_groups", ())):
        return "pytorch_optimizer"  # it counts steps per group; optimlib and torch per parameter
    if any("momentum" in s and "momentum_buffer" not in s for s in state_dict.get("state", {}).values()):
        return "adamp"  # adamp.SGDP's buffer
    return None


# ----------------------------------------------------------------------------- conversion
def convert_state_dict(state_dict: dict, optimizer: torch.optim.Optimizer, *, source: str | None = None) -> dict:
    """``state_dict``, written by a peer optimizer, in ``optimizer``'s format (a new dict; the
    argument is not modified).  ``source``: one of :data:`PEERS`, or ``None`` to detect it
    (:func:`detect_source`) when ``optimizer`` replaces a peer (AdamP, SGDP, GaLoreAdamW); a state
    dict that needs no conversion is returned as it is.  See the module docstring for what is
    converted and what is refused."""
    # By class name (this module is imported by the optimizers' base class: it imports none of them).
    allowed = {"AdamP": ("adamp", "pytorch_optimizer"), "SGDP": ("adamp", "pytorch_optimizer"),
               "GaLoreAdamW": ("galore_torch", "pytorch_optimizer")}
    kind = next((cls.__name__ for cls in type(optimizer).__mro__ if cls.__name__ in allowed), None)
    if source is None:  # (another optimizer's own keys may look like a peer's: detect for the peers' heirs only)
        source = detect_source(state_dict) if kind is not None else None
        if source is None:
            return state_dict
    if source not in PEERS:
        raise ValueError(f"invalid source={source!r}: accepted values are None (detect), {', '.join(PEERS)}")
    if kind is None or source not in allowed[kind]:
        raise ValueError(f"convert_state_dict: a {source} state dict cannot be loaded into "
                         f"{type(optimizer).__name__}; optimlib resumes {_pairs_text(allowed)}")
    groups = [dict(g) for g in state_dict["param_groups"]]
    state = {pid: dict(s) for pid, s in state_dict["state"].items()}
    params = _matched_params(groups, optimizer)
    if source == "pytorch_optimizer":
        _per_parameter_steps(groups, state)
    for gi, (group, current) in enumerate(zip(groups, optimizer.param_groups)):
        if kind == "GaLoreAdamW" and source == "pytorch_optimizer" and "rank" in group:
            _pytorch_optimizer_lowrank_group(group, params[gi], gi)
        options = {**current, **group}
        if kind == "SGDP" and source == "pytorch_optimizer" and options["momentum"] and not options["nesterov"]:
            warnings.warn("pytorch_optimizer's SGDP projects a copy of its momentum buffer, adamp's and optimlib's "
                          "the buffer itself (without Nesterov momentum): the resumed run follows adamp's SGDP",
                          UserWarning, stacklevel=3)
        for index, (pid, param) in enumerate(zip(group["params"], params[gi])):
            if is_dtensor(param):
                raise ValueError(f"convert_state_dict: parameter {_label(options, gi, index)} is sharded "
                                 "(a DTensor); convert the peer's state dict in one process, save it, and load "
                                 "that checkpoint into the sharded run")
            entry = state.get(pid)
            if not entry:
                continue
            if kind == "GaLoreAdamW":
                _to_galore(entry, options, source, param, _label(options, gi, index))
            else:
                _to_adamp_family(entry, options, kind)
            _check_fits(entry, param, _label(options, gi, index), kind)
    return {**state_dict, "state": state, "param_groups": groups}


def _pairs_text(allowed: dict) -> str:
    return "; ".join(f"{name} from {' or '.join(peers)}" for name, peers in allowed.items())


def _label(options: dict, group_index: int, index: int) -> str:
    names = options.get("names") or options.get("param_names")
    if names is not None and index < len(names) and names[index] is not None:
        return str(names[index])
    return f"group{group_index}.param{index}"


def _matched_params(groups: list[dict], optimizer) -> list[list[torch.Tensor]]:
    """The optimizer's parameters, group by group, checked to pair with the saved ones."""
    current = optimizer.param_groups
    counts = [len(g["params"]) for g in groups], [len(g["params"]) for g in current]
    if counts[0] != counts[1]:
        raise ValueError(f"convert_state_dict: the state dict has param groups of {counts[0]} parameters, the "
                         f"optimizer {counts[1]}; build the optimizer over the same parameters, grouped and "
                         "ordered as the peer had them")
    return [list(g["params"]) for g in current]


def _per_parameter_steps(groups: list[dict], state: dict) -> None:
    """pytorch_optimizer: the group's step count becomes each stepped parameter's; its options are
    checked against optimlib's update and dropped."""
    for group in groups:
        for key, value in _PYTORCH_OPTIMIZER_OPTIONS.items():
            if key in group and group[key] != value:
                raise ValueError(f"convert_state_dict: pytorch_optimizer option {key}={group[key]!r} is not "
                                 f"implemented by optimlib (only {key}={value!r})")
            group.pop(key, None)
        step = int(group.get("step", 0))
        for key in _PYTORCH_OPTIMIZER_DROPPED:
            group.pop(key, None)
        if "projection_type" in group:
            group["proj_type"] = group.pop("projection_type")
        for pid in group["params"]:
            if state.get(pid):
                state[pid]["step"] = step


def _pytorch_optimizer_lowrank_group(group: dict, params: list[torch.Tensor], group_index: int) -> None:
    """A pytorch_optimizer GaLore group (one with a ``rank`` key) as optimlib's: ``rank=None`` (every
    singular vector) becomes the largest rank of its matrices, and its refresh schedule is kept --
    it refreshes when its step count *after* the increment is a multiple of the gap, one step later
    than galore-torch and optimlib, which count before it.  It projects 2-D parameters only."""
    for index, p in enumerate(params):
        if p.dim() > 2:
            raise ValueError(f"convert_state_dict: parameter {_label(group, group_index, index)} has shape "
                             f"{tuple(p.shape)} in a GaLore group; pytorch_optimizer steps it unprojected, optimlib "
                             "projects it, so its state cannot be continued (give it a group without 'rank')")
    if group["rank"] is None:
        group["rank"] = max([min(p.shape) for p in params if p.dim() == 2], default=1)
    group["refresh_offsets"] = [1] * len(params)


def _to_adamp_family(entry: dict, options: dict, kind) -> None:
    if "step" in entry:
        entry["step"] = torch.as_tensor(entry["step"], dtype=torch.float32)
    if kind == "SGDP" and "momentum" in entry:
        buf = entry.pop("momentum")
        if options["momentum"] != 0:  # optimlib keeps no buffer without momentum
            entry["momentum_buffer"] = buf


def _refresh_count(source: str, step: int, gap: int) -> int:
    """How many bases the peer computed in ``step`` steps (galore-torch: at steps 0, gap, 2 gap, ...
    before counting; pytorch_optimizer: at its first step and at counts gap, 2 gap, ...)."""
    if step <= 0:
        return 0
    if source == "galore_torch":
        return -(-step // gap)
    return len({1} | set(range(gap, step + 1, gap)))


def _to_galore(entry: dict, options: dict, source: str, param: torch.Tensor, name: str) -> None:
    # (At call time: the galore package's __init__ imports the optimizer base, which imports this module.)
    from optimlib.optim.galore.bases import name_seed, resolve_side

    step = int(entry.get("step", 0))
    entry["step"] = step
    entry.setdefault("seed", name_seed(name, int(options.get("seed", 0))))
    projector = entry.pop("projector", None)
    if projector is None or projector.ortho_matrix is None:
        return
    for key, value in (("inner", "adamw"), ("moments_dtype", None)):
        if options.get(key, value) != value:
            raise ValueError(f"convert_state_dict: {source}'s state holds AdamW's plain low-rank moments; build "
                             f"GaLoreAdamW with {key}={value!r} to resume it (got {key}={options[key]!r})")
    basis = projector.ortho_matrix
    proj_type = getattr(projector, "proj_type", None) or getattr(projector, "projection_type", None)
    if isinstance(basis, (tuple, list)) or proj_type not in ("std", "reverse_std", "left", "right"):
        raise ValueError(f"convert_state_dict: parameter {name} uses {source}'s proj_type={proj_type!r}; optimlib "
                         "projects one side only (std, reverse_std, left, right)")
    if param.dim() != 2:
        raise ValueError(f"convert_state_dict: parameter {name} has shape {tuple(param.shape)}; {source} "
                         "projects 2-D parameters only, so its state cannot be continued")
    m, n = param.shape
    side = resolve_side(m, n, proj_type)
    rank = basis.shape[0] if side == "right" else basis.shape[1]
    expected = (rank, n) if side == "right" else (m, rank)
    if tuple(basis.shape) != expected:
        raise ValueError(f"convert_state_dict: parameter {name}: {source}'s basis has shape {tuple(basis.shape)}, "
                         f"a {side} projection (proj_type={proj_type!r}) of a {m}x{n} matrix needs {expected}")
    gap = int(options["update_proj_gap"])
    # Column-major, the layout an optimlib refresh stores (the projections then take its BLAS path).
    entry["basis"] = basis.t().clone(memory_format=torch.contiguous_format).t()
    entry["rank"] = int(rank)
    entry["refreshes"] = _refresh_count(source, step, gap)
    entry["moment_step"] = step  # the peers never restart their moments


def _check_fits(entry: dict, param: torch.Tensor, name: str, kind) -> None:
    """Every converted moment fits ``param`` (a full-size one, or the low-rank ``(m, r)`` / ``(r, n)``)."""

    shape = tuple(param.shape)
    if "basis" in entry:
        m, n = shape
        r = entry["rank"]
        shape = (m, r) if tuple(entry["basis"].shape) == (r, n) else (r, n)
    for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        value = entry.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
            raise ValueError(f"convert_state_dict: parameter {name} has {key} of shape {tuple(value.shape)} in the "
                             f"checkpoint, {kind} needs {shape}; build the optimizer over the same "
                             "parameters, grouped and ordered as the peer had them")
