"""Checkpoints across engines, in one world-independent form: a single-process checkpoint resumes
under FSDP2, an FSDP2 one under one process or another number of FSDP2 ranks.

:func:`load_converted` (what :func:`optimlib.train.checkpoint.load` calls when the manifest of a
checkpoint names another engine or FSDP2 world size than the run's) reads the checkpoint into that
form with :func:`read_whole` and loads it into the run's engine.  The form is what the single
engine saves (``state.pt``: the model's and the optimizer's ``state_dict()``, full tensors), keyed
here by parameter name (FQN) as ``torch.distributed.checkpoint.state_dict.get_state_dict`` keys it.

Reading an FSDP2 checkpoint: DCP's ``_EmptyStateDictLoadPlanner`` (what
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` uses) assembles every DTensor
from its shards, through the checked reader of :mod:`optimlib.train.safe_load`.  Loading into
FSDP2: ``set_state_dict`` with ``full_state_dict=True`` cuts each full tensor along the
placements of the optimizer's own (DTensor) state.  Both are exact copies, and for every state
entry an optimizer declares ``elementwise``, ``sharded`` or ``replicated``
(:mod:`optimlib.optim.state_spec`) that is all it takes: under FSDP2 such an entry is a DTensor
(or a plain replicated tensor) whose global shape is the single-process tensor.

The entries declared ``per_rank`` are not slices of a global tensor: each rank keeps the rows it
owns in its own zero-padded slot, and FSDP2 stores them as ``(world, k)`` DTensors.  Their
declaration (:class:`optimlib.optim.state_spec.RankRows`) says how many rows each rank owns, so
the single-process tensor is the concatenation of the slots' owned parts (bit-packed entries
unpacked, concatenated and packed again), and the slots are cut back out of it for any world size.
Nothing here names an optimizer or a state key.

Cost: every rank holds the whole model and optimizer state in host memory once, at load time
(as torch's ``format_utils`` do); native resumes (same engine, same world size) never do.

DeepSpeed ZeRO checkpoints are read into the same form, and that form is cut into a DeepSpeed
engine's partitions, by :mod:`optimlib.train.zero_checkpoint`.  :func:`regroup` puts a checkpoint
grouped otherwise (DeepSpeed's one param group per parameter) into the loading optimizer's groups.
"""

from __future__ import annotations

from pathlib import Path

import torch

from optimlib.optim import get_optimizer_spec
from optimlib.optim.state_spec import PER_RANK, Placement, state_specs
from optimlib.train import safe_load

CONVERTIBLE = ("single", "fsdp2")


# ------------------------------------------------------------------ per-rank slots <-> whole tensors
def _convert_per_rank(optimizer, optim_sd: dict, world: int, *, to_slots: bool) -> None:
    """In place on an FQN-keyed optimizer state dict: the ``per_rank`` entries ``optimizer``
    declares, from FSDP2 slots (of ``world`` ranks) to whole tensors, or back (``to_slots``)."""
    for group in optim_sd["param_groups"]:
        shapes = group.get("shapes")
        for i, fqn in enumerate(group["params"]):
            state = optim_sd["state"].get(fqn)
            if not state:
                continue
            if shapes is None:
                raise ValueError(f"cannot convert the optimizer state of '{fqn}': its param group records no "
                                 f"'shapes' (build the optimizer with optimlib.optim.create_optimizer)")
            for entry in state_specs(optimizer, group, Placement.fsdp2(shapes[i], world), state):
                if entry.layout == PER_RANK and entry.key in state:
                    value = state[entry.key]
                    state[entry.key] = entry.rows.scatter(value) if to_slots else entry.rows.gather(value)


def _stand_in(manifest: dict, optim_sd: dict):
    """The optimizer the manifest's run names, over meta tensors of the shapes its saved groups
    record: its declarations describe the saved state without the model."""
    name = (manifest.get("run") or {}).get("config", {}).get("optim.name")
    if name is None:
        raise ValueError("the checkpoint's manifest names no optimizer (run.config['optim.name']), whose state "
                         "declarations the conversion needs; resume it under the run's launcher instead")
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [torch.empty(tuple(s), device="meta") for s in g["shapes"]]}
              for g in optim_sd["param_groups"]]
    return get_optimizer_spec(name).build(groups, lr=groups[0]["lr"])


# ------------------------------------------------------------------ parameter ids <-> names
def keyed(optim_sd: dict, names: list[str], *, by_name: bool) -> dict:
    """``optimizer.state_dict()`` (parameters numbered in optimizer order) <-> the same keyed by
    the parameters' names (``names``: in optimizer order)."""
    to_key = (lambda k: names[k]) if by_name else {n: i for i, n in enumerate(names)}.__getitem__
    groups = []
    for group in optim_sd["param_groups"]:
        recorded = group.get("names")
        keys = [to_key(k) for k in group["params"]]
        if recorded is not None and list(recorded) != (keys if by_name else [names[k] for k in keys]):
            raise ValueError(f"the checkpoint's optimizer groups hold parameters {list(recorded)[:4]}..., "
                             f"this run's optimizer {(keys if by_name else [names[k] for k in keys])[:4]}...: "
                             f"not the same model or optimizer")
        groups.append({**group, "params": keys})
    return {"state": {to_key(k): v for k, v in optim_sd["state"].items()}, "param_groups": groups}


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The FQN of each of ``optimizer``'s parameters, in the optimizer's order."""
    name_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name_of.setdefault(id(p), name)
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


# ------------------------------------------------------------------ read any, load into any
def read_whole(path: Path, manifest: dict, names: list[str] | None = None, *, optimizer=None,
               trusted: bool = False) -> dict:
    """The checkpoint at ``path`` in single-process form: ``{"model", "optimizer", "rng", "meta"}``
    with full tensors on the CPU and the optimizer state keyed by parameter name.

    ``names``: the optimizer's parameter names in order, needed for a single-engine checkpoint
    whose groups do not record them.  ``optimizer``: the one whose declarations describe the state
    (default: the registered optimizer the manifest's run names, built over stand-in tensors).  The files are read the safe way
    (:mod:`optimlib.train.safe_load`) unless ``trusted``; check them first
    (:func:`optimlib.train.checkpoint.check_files`) so that a refusal loads nothing."""
    path = Path(path)
    if manifest["engine"] == "single":
        state = safe_load.load_file(path / "state.pt", trusted=trusted)
        optim = state["optimizer"]
        if names is None:
            names = [n for group in optim["param_groups"] for n in group["names"]]
        return {**state, "optimizer": keyed(optim, names, by_name=True)}
    if int(manifest.get("tp", 1)) > 1:
        raise ValueError(f"checkpoint '{path}' was written with parallel.tp={manifest['tp']} (a 2-D mesh), which "
                         f"resumes only with the parallel.tp and number of ranks that wrote it; no converter reads it")
    if manifest["engine"] != "fsdp2":
        raise ValueError(f"checkpoint '{path}' was written by engine={manifest['engine']}, which resumes only "
                         f"under the same engine and world size; conversion covers {' and '.join(CONVERTIBLE)}")
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    reader = safe_load.dcp_reader(path / "dcp", trusted=trusted)
    with safe_load.guarded_loads(path / "dcp", trusted=trusted, reader=reader):
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    _convert_per_rank(optimizer or _stand_in(manifest, state["optimizer"]), state["optimizer"],
                      int(manifest["world_size"]), to_slots=False)
    extra = safe_load.load_file(path / "meta.pt", trusted=trusted)
    return {**state, "rng": extra["rng"], "meta": extra["meta"]}


def load_converted(engine, path: Path, manifest: dict, *, trusted: bool = False) -> dict:
    """Restore ``engine`` (single or FSDP2, any world size) from a single or FSDP2 checkpoint of
    another engine or world size; returns its metadata (files read as :func:`read_whole` does)."""
    if engine.name not in CONVERTIBLE:
        raise ValueError(f"checkpoint '{path}' was written by engine={manifest['engine']} on "
                         f"{manifest['world_size']} rank(s); engine={engine.name} resumes only its own "
                         f"checkpoints on the same world size")
    names = optimizer_param_names(engine.module, engine.optimizer)
    return load_whole(engine, read_whole(path, manifest, names, optimizer=engine.optimizer, trusted=trusted), names)


def load_whole(engine, state: dict, names: list[str]) -> dict:
    """Load the single-process form ``state`` (:func:`read_whole`) into ``engine`` (single or
    FSDP2; ``names``: its optimizer's parameter names in order); returns the metadata."""
    state = {**state, "optimizer": regroup(state["optimizer"], names, engine.optimizer)}
    if engine.name == "single":
        engine.model.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(keyed(state["optimizer"], names, by_name=False))
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        _convert_per_rank(engine.optimizer, state["optimizer"], engine.world_size, to_slots=True)
        set_state_dict(engine.model, engine.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
    if "rng" in state:  # DeepSpeed checkpoints carry none
        torch.set_rng_state(state["rng"].cpu())
    return state["meta"]


def regroup(optim_sd: dict, names: list[str], optimizer) -> dict:
    """A name-keyed optimizer state dict in ``optimizer``'s param groups (``names``: its parameter
    names in order): a checkpoint grouped otherwise (DeepSpeed's one group per parameter) takes, for
    each of this optimizer's groups, the options of the saved groups of its parameters, which must
    agree.  Unchanged when the grouping is the same."""
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    members = [names[a:b] for a, b in zip(bounds, bounds[1:])]
    if [list(g["params"]) for g in optim_sd["param_groups"]] == members:
        return optim_sd
    group_of = {n: g for g in optim_sd["param_groups"] for n in g["params"]}
    groups = []
    for current, fqns in zip(optimizer.param_groups, members):
        absent = [n for n in fqns if n not in group_of]
        if absent:
            raise ValueError(f"the checkpoint's optimizer groups do not hold {absent[:3]}: not the same model")
        options = [{k: v for k, v in group_of[n].items() if k not in ("params", "names", "shapes")} for n in fqns]
        if any(o != options[0] for o in options):
            raise ValueError(f"the checkpoint's optimizer options differ among {fqns[:3]}..., which this run's "
                             f"optimizer holds in one param group: not the same optimizer config")
        extra = {k: current[k] for k in ("names", "shapes") if k in current}
        groups.append({**(options[0] if fqns else {}), **extra, "params": list(fqns)})
    return {"state": optim_sd["state"], "param_groups": groups}


def fit_groups(optim_sd: dict, model: torch.nn.Module, optimizer) -> dict:
    """``optim_sd`` (an ``optimizer.state_dict()`` of a checkpoint, numbered) in ``optimizer``'s
    param groups when it was grouped otherwise (:func:`regroup`; its groups must record ``names``)."""
    if [len(g["params"]) for g in optim_sd["param_groups"]] == [len(g["params"]) for g in optimizer.param_groups]:
        return optim_sd
    if not all("names" in g for g in optim_sd["param_groups"]):
        return optim_sd  # torch's load_state_dict names the mismatch
    saved = [n for g in optim_sd["param_groups"] for n in g["names"]]
    names = optimizer_param_names(model, optimizer)
    return keyed(regroup(keyed(optim_sd, saved, by_name=True), names, optimizer), names, by_name=False)
