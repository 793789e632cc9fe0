"""DeepSpeed ZeRO-1/2/3 checkpoints across world sizes and engines.

A DeepSpeed checkpoint of ``launch/pretrain.py`` holds, per rank, the flat fp32 partitions ZeRO
keeps and the client optimizer's ``state_dict()`` over them (its state is the state of a flat
partition, not of a parameter).  :func:`read_whole` turns every rank's files into the one-process
form of :mod:`optimlib.train.reshard` (full fp32 weights, each parameter's optimizer state as the
single-process optimizer keeps it, keyed by parameter name); :func:`load_converted` loads a
checkpoint of another engine or world size into any engine, through that form: into a DeepSpeed
engine of any world size by cutting the whole state into the partitions that engine holds and
handing them to ZeRO's own ``load_state_dict`` (the path of a native resume from there on).

Where the elements lie (:class:`FlatLayout`; the launcher makes one param group per parameter for
shape-aware optimizers, ``optimlib.optim.factory.param_groups``):

* ZeRO-1/2: a param group's parameters are flattened back to back (each followed by its
  ``param_alignment_paddings``), the group is padded to a multiple of ``2 x world`` elements and
  rank ``k`` holds ``[k P, (k + 1) P)`` of it (its ``single_partition_of_fp32_groups`` entry, saved
  without the padding; ``param_shapes`` of the model file names the parameters in order;
  ``param_slice_mappings`` is checked against the layout).
* ZeRO-3: each parameter is cut on its own into ``ceil(numel / world)``-element pieces (the last
  padded); a sub-group's flat partition (``fp32_flat_groups``) is its parameters' pieces back to
  back.

The optimizer state of a flat partition follows the optimizer's declarations
(:mod:`optimlib.optim.state_spec`), placed as the optimizer saw the partition
(:meth:`FlatLayout.placement`): ``elementwise`` entries are laid out like the partition,
``sharded`` ones are every rank's piece along ``dim`` (each rank's extent from its declaration),
``per_rank`` ones each rank's owned rows (:class:`~optimlib.optim.state_spec.RankRows`),
``replicated`` ones and scalars the same on every rank.  A flat partition of several parameters
(optimizers that are not shape-aware) may hold only ``elementwise`` and ``replicated`` state.
Nothing here names an optimizer or a state key.

Not converted (a ``ValueError`` says so): ZeRO stage 0, elastic ZeRO checkpoints, frozen
parameters, and the replicated parameters of dynamic rank.  DeepSpeed checkpoints carry no RNG
state (a native DeepSpeed resume does not restore one either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from optimlib.optim.state_spec import ELEMENTWISE, PER_RANK, REPLICATED, SHARDED, Placement, state_specs
from optimlib.distributed.row_block import FlatSlice
from optimlib.train import reshard, safe_load

ENGINE = "deepspeed"


# ------------------------------------------------------------------ where the elements lie
@dataclass(frozen=True)
class FlatLayout:
    """The parameters ``names`` (global ``shapes``) of one flat fp32 partition of ``partition``
    elements per rank, on ``world`` ranks: ZeRO-3 (``per_param``) or ZeRO-1/2 (``paddings``: the
    alignment padding after each parameter)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    world: int
    partition: int
    per_param: bool
    paddings: tuple[int, ...] = ()

    def __post_init__(self):
        total = sum(self.numels) + sum(self.paddings)
        if self.per_param and self.partition != sum(-(-n // self.world) for n in self.numels):
            raise ValueError(f"a ZeRO-3 partition of {self.partition} elements does not hold pieces of "
                             f"{list(self.names)[:3]}... on {self.world} ranks")
        if not self.per_param and total > self.partition * self.world:
            raise ValueError(f"a ZeRO-1/2 partition of {self.partition} elements x {self.world} ranks does not "
                             f"hold {list(self.names)[:3]}... ({total} elements with their padding)")

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def segments(self, rank: int) -> list[tuple[int, int, int, int]]:
        """``(i, at, a, b)``: elements ``[a, b)`` of parameter ``i`` lie at ``[at, at + b - a)`` of
        rank ``rank``'s partition."""
        out, offset = [], 0
        for i, numel in enumerate(self.numels):
            if self.per_param:
                piece = -(-numel // self.world)
                a, b = min(rank * piece, numel), min((rank + 1) * piece, numel)
                if b > a:
                    out.append((i, offset, a, b))
                offset += piece
            else:
                lo, hi = rank * self.partition, (rank + 1) * self.partition
                a, b = max(offset, lo) - offset, min(offset + numel, hi) - offset
                if b > a:
                    out.append((i, offset + a - lo, a, b))
                offset += numel + (self.paddings[i] if self.paddings else 0)
        return out

    def placement(self, rank: int) -> Placement:
        """The parameter of a one-parameter partition as the optimizer is handed it on ``rank``
        (:func:`optimlib.distributed.layout.local_piece`)."""
        (shape,), (numel,), size = self.shapes, self.numels, self.partition
        bounds = tuple((min(k * size, numel), min((k + 1) * size, numel)) for k in range(self.world))
        return Placement(tuple(shape), FlatSlice(numel, bounds, rank), size)

    def whole(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every parameter's flattened elements from every rank's partition (``parts``)."""
        if len(parts) != self.world:
            raise ValueError(f"{len(parts)} partitions for {self.world} ranks")
        out = [parts[0].new_empty(n) for n in self.numels]
        for k, part in enumerate(parts):
            flat = part.reshape(-1)
            for i, at, a, b in self.segments(k):
                out[i][a:b] = flat[at:at + b - a]
        return out

    def local(self, wholes: list[torch.Tensor], rank: int) -> torch.Tensor:
        """Rank ``rank``'s partition (zero padding included) from every parameter's elements."""
        out = wholes[0].new_zeros(self.partition)
        for i, at, a, b in self.segments(rank):
            out[at:at + b - a] = wholes[i].reshape(-1)[a:b]
        return out


# ------------------------------------------------------------------ one partition's state <-> whole
def _specs(optimizer, group: dict, layout: FlatLayout, rank: int, state: dict | None) -> dict:
    place = layout.placement(rank) if len(layout.names) == 1 else Placement(None, None, layout.partition)
    return {s.key: s for s in state_specs(optimizer, group, place, state)}


def _extents(spec_by_rank: list, key: str) -> list[int]:
    """Every rank's extent along a ``sharded`` entry's ``dim``, from its declarations."""
    spec = spec_by_rank[0][key]
    across = math.prod(spec.shape) // max(spec.shape[spec.dim], 1)
    return [s[key].local_numel // max(across, 1) for s in spec_by_rank]


def _undeclared(key: str, names) -> ValueError:
    return ValueError(f"the optimizer state '{key}' of {list(names)[:3]} is a tensor its optimizer does not declare "
                      f"(optimlib.optim.state_spec), so it cannot be moved between world sizes or engines")


def whole_state(optimizer, group: dict, layout: FlatLayout, states: list[dict]) -> dict[str, dict]:
    """Each parameter's single-process state from every rank's state of the partition."""
    first = next((s for s in states if s), {})
    if not first:
        return {}
    if any(set(s) != set(first) for s in states):
        raise ValueError(f"the ranks hold different optimizer state entries for {list(layout.names)[:3]}")
    specs = [_specs(optimizer, group, layout, k, first) for k in range(layout.world)]
    out = {name: {} for name in layout.names}
    for key, value in first.items():
        spec = specs[0].get(key)
        if not isinstance(value, torch.Tensor) or (spec is None and value.dim() == 0) \
                or (spec is not None and spec.layout == REPLICATED):
            for name in layout.names:
                out[name][key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        if spec is None or (len(layout.names) > 1 and spec.layout != ELEMENTWISE):
            raise _undeclared(key, layout.names)
        parts = [s[key] for s in states]
        if spec.layout == ELEMENTWISE:
            for name, flat, shape in zip(layout.names, layout.whole(parts), layout.shapes):
                out[name][key] = flat.reshape(spec.shape if len(layout.names) == 1 else shape)
            continue
        if spec.layout == SHARDED:
            if [p.shape[spec.dim] for p in parts] != _extents(specs, key):
                raise ValueError(f"the pieces of '{key}' of '{layout.names[0]}' do not match its declaration")
            value = torch.cat(parts, dim=spec.dim)
        elif spec.layout == PER_RANK:
            rows = spec.rows
            slots = torch.stack([torch.cat([p.reshape(-1), p.new_zeros(rows.slot_numel() - p.numel())])
                                 for p in parts])
            value = rows.gather(slots)
        if tuple(value.shape) != tuple(spec.shape):
            raise ValueError(f"'{key}' of '{layout.names[0]}' assembles to {tuple(value.shape)}, "
                             f"declared {tuple(spec.shape)}")
        out[layout.names[0]][key] = value
    return out


def local_state(optimizer, group: dict, layout: FlatLayout, rank: int, wholes: list[dict]) -> dict:
    """Rank ``rank``'s state of the partition from its parameters' single-process states."""
    first = next((s for s in wholes if s), {})
    if not first:
        return {}
    specs = [_specs(optimizer, group, layout, k, first) for k in range(layout.world)]
    out = {}
    for key, value in first.items():
        spec = specs[rank].get(key)
        if not isinstance(value, torch.Tensor) or (spec is None and value.dim() == 0) \
                or (spec is not None and spec.layout == REPLICATED):
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
        elif spec is None or (len(layout.names) > 1 and spec.layout != ELEMENTWISE):
            raise _undeclared(key, layout.names)
        elif spec.layout == ELEMENTWISE:
            out[key] = layout.local([s[key] if key in s else torch.zeros(n, dtype=value.dtype)
                                     for s, n in zip(wholes, layout.numels)], rank)
        elif spec.layout == SHARDED:
            extents = _extents(specs, key)
            out[key] = value.narrow(spec.dim, sum(extents[:rank]), extents[rank]).clone()
        else:  # PER_RANK: this rank's owned rows, unpadded
            out[key] = spec.rows.scatter(value)[rank, :spec.local_numel].clone()
    return out


# ------------------------------------------------------------------ reading a checkpoint
def _load(path: Path, trusted: bool):
    return safe_load.load_file(path, allow=safe_load.deepspeed_safe_globals(), trusted=trusted)


def read_whole(path: Path, manifest: dict, *, optimizer=None, trusted: bool = False) -> dict:
    """The DeepSpeed ZeRO checkpoint at ``path`` in the one-process form of
    :func:`optimlib.train.reshard.read_whole` (``{"model", "optimizer", "meta"}``; no ``rng``).
    ``optimizer``: one whose declarations describe the state (default: the registered optimizer
    the manifest's run names).  Check the files first (:func:`optimlib.train.checkpoint.check_files`)."""
    from deepspeed.checkpoint import constants as C

    path, world = Path(path), int(manifest["world_size"])
    files = [path / f"zero_pp_rank_{k}_mp_rank_00_optim_states.pt" for k in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint '{path}' (engine=deepspeed on {world} rank(s)) lacks {missing[0]}: only "
                         f"ZeRO stage 1, 2 and 3 checkpoints convert; resume it under DeepSpeed on {world} rank(s)")
    model_file = path / "mp_rank_00_model_states.pt"
    model_file = model_file if model_file.is_file() else path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model_sd = _load(model_file, trusted)
    if model_sd.get("optimlib_replicated") is not None or model_sd.get(C.FROZEN_PARAM_SHAPES):
        raise ValueError(f"checkpoint '{path}' holds replicated (dynamic-rank) or frozen parameters, which are "
                         f"not converted: resume it under DeepSpeed on {world} rank(s)")
    optim = [_load(f, trusted)[C.OPTIMIZER_STATE_DICT] for f in files]
    stage = int(optim[0][C.ZERO_STAGE])
    shapes = [(tuple(g), tuple(tuple(s) for s in g.values())) for g in model_sd[C.PARAM_SHAPES]]
    if stage == 3:
        clients = [o[C.OPTIMIZER_STATE_DICT] for o in optim]
        fp32 = [o[C.FP32_FLAT_GROUPS] for o in optim]
        layouts = [FlatLayout(n, s, world, fp32[0][j].numel(), True) for j, (n, s) in enumerate(shapes)]
    else:
        clients = [o[C.BASE_OPTIMIZER_STATE] for o in optim]
        if not isinstance(clients[0], dict):
            raise ValueError(f"checkpoint '{path}' is an elastic ZeRO checkpoint, which is not converted")
        sizes = [[p.numel() + pad for p, pad in zip(o[C.SINGLE_PARTITION_OF_FP32_GROUPS], o[C.GROUP_PADDINGS])]
                 for o in optim]
        pads = optim[0].get(C.PARAM_ALIGNMENT_PADDINGS) or [[0] * len(n) for n, _ in shapes]
        layouts = [FlatLayout(n, s, world, sizes[0][i], False, tuple(pads[i])) for i, (n, s) in enumerate(shapes)]
        fp32 = [[torch.cat([p, p.new_zeros(size - p.numel())]) for p, size in zip(o[C.SINGLE_PARTITION_OF_FP32_GROUPS],
                                                                                  sizes[0])] for o in optim]
        _check_slices(path, layouts, [o.get(C.PARAM_SLICE_MAPPINGS) for o in optim])
    groups = clients[0]["param_groups"]
    if sorted(i for g in groups for i in g["params"]) != list(range(len(layouts))) or \
            any(len(f) != len(layouts) for f in fp32):
        raise ValueError(f"checkpoint '{path}': the optimizer's partitions do not match the recorded parameters")
    optimizer = optimizer or reshard._stand_in(manifest, clients[0])
    model = dict(model_sd["module"])
    state = {}
    for g in groups:
        for j in g["params"]:
            layout = layouts[j]
            for name, flat, shape in zip(layout.names, layout.whole([f[j] for f in fp32]), layout.shapes):
                model[name] = flat.reshape(shape)
            state.update(whole_state(optimizer, g, layout, [c["state"].get(j, {}) for c in clients]))
    param_groups = [{**{k: v for k, v in g.items() if k != "params"},
                     "params": list(g.get("names") or [n for j in g["params"] for n in layouts[j].names])}
                    for g in groups]
    return {"model": model, "optimizer": {"state": state, "param_groups": param_groups},
            "meta": model_sd["optimlib_meta"]}


def _check_slices(path: Path, layouts: list[FlatLayout], mappings: list) -> None:
    """ZeRO-1/2: each rank's ``param_slice_mappings`` (name -> where in its partition) must be the
    layout's segments; a layout is never guessed."""
    for k, per_group in enumerate(mappings):
        for layout, mapping in zip(layouts, per_group or ()):
            found = {layout.names[i]: (at, b - a) for i, at, a, b in layout.segments(k)}
            if {n: (int(f.start), int(f.numel)) for n, f in mapping.items()} != found:
                raise ValueError(f"checkpoint '{path}': rank {k}'s partition of {list(layout.names)[:3]}... is not "
                                 f"laid out as ZeRO-1/2 lays out a param group; it is not converted")


# ------------------------------------------------------------------ loading into an engine
def _engine_layouts(engine) -> tuple[list[FlatLayout], list[int], bool]:
    """This DeepSpeed engine's flat partitions: their layouts, each one's param group, and
    whether it is ZeRO-3."""
    ds_opt, world = engine.optimizer, engine.world_size
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    if hasattr(ds_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        layouts = [FlatLayout(tuple(name_of[id(p)] for p in sub), tuple(tuple(p.ds_shape) for p in sub), world,
                              flat.numel(), True)
                   for sub, flat in zip(ds_opt.fp16_groups, ds_opt.fp32_partitioned_groups_flat)]
        return layouts, [ds_opt.sub_group_to_group_id[j] for j in range(len(layouts))], True
    if not hasattr(ds_opt, "single_partition_of_fp32_groups"):
        raise ValueError(f"DeepSpeed's {type(ds_opt).__name__} is not ZeRO stage 1, 2 or 3: only those load a "
                         f"checkpoint of another engine or world size")
    layouts = [FlatLayout(tuple(name_of[id(p)] for p in params), tuple(tuple(p.shape) for p in params), world,
                          flat.numel(), False, tuple(pads))
               for params, pads, flat in zip(ds_opt.round_robin_bit16_groups, ds_opt.round_robin_bit16_padding,
                                             ds_opt.single_partition_of_fp32_groups)]
    return layouts, list(range(len(layouts))), False


def load_whole_into_deepspeed(engine, whole: dict) -> None:
    """Cut the one-process form ``whole`` into the partitions of this rank of the DeepSpeed
    ``engine`` and load them with ZeRO's own ``load_state_dict`` (the fp32 partitions, the 16-bit
    weights from them, the client optimizer's state)."""
    import deepspeed
    from deepspeed.checkpoint import constants as C

    ds_opt, client, rank = engine.optimizer, engine.client_optimizer(), engine.rank
    layouts, group_of, stage3 = _engine_layouts(engine)
    model, saved = whole["model"], whole["optimizer"]["state"]
    names = [n for layout in layouts for n in layout.names]
    absent = [n for n in names if n not in model]
    if absent:
        raise ValueError(f"the checkpoint holds no weights for {absent[:3]}: not the same model")
    fp32 = [layout.local([model[n].detach().float().reshape(-1) for n in layout.names], rank) for layout in layouts]
    state = {j: local_state(client, client.param_groups[group_of[j]], layout, rank,
                            [saved.get(n, {}) for n in layout.names])
             for j, layout in enumerate(layouts)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [j for j, gi in enumerate(group_of) if gi == i]}
              for i, g in enumerate(client.param_groups)]
    client_sd = {"state": {j: s for j, s in state.items() if s}, "param_groups": groups}
    common = {C.LOSS_SCALER: ds_opt.loss_scaler, "dynamic_loss_scale": ds_opt.dynamic_loss_scale, "overflow": False}
    if stage3:
        mine = {**common, C.OPTIMIZER_STATE_DICT: client_sd, C.FP32_FLAT_GROUPS: fp32}
    else:
        engine.module.load_state_dict({k: v for k, v in model.items()}, strict=True)
        mine = {**common, C.CLIP_GRAD: ds_opt.clip_grad, C.DS_VERSION: deepspeed.__version__,
                C.BASE_OPTIMIZER_STATE: client_sd, C.SINGLE_PARTITION_OF_FP32_GROUPS: fp32,
                C.PARAM_ALIGNMENT_PADDINGS: ds_opt.round_robin_bit16_padding}
    every = [mine if k == rank else None for k in range(engine.world_size)]
    ds_opt.load_state_dict(every, load_optimizer_states=True, load_from_fp32_weights=True)
    if hasattr(ds_opt, "checkpoint_event_epilogue"):
        ds_opt.checkpoint_event_epilogue()
    step = int(whole["meta"]["step"])
    engine.model.global_steps, engine.model.global_samples = step, step * engine.model.train_batch_size()


def load_converted(engine, path: Path, manifest: dict, *, trusted: bool = False) -> dict:
    """Restore ``engine`` from a checkpoint of another engine or world size where one side is
    DeepSpeed: a DeepSpeed checkpoint into one process, FSDP2 or DeepSpeed on another world size;
    a one-process or FSDP2 checkpoint into DeepSpeed.  Returns its metadata."""
    client = engine.client_optimizer()
    names = None if engine.name == ENGINE else reshard.optimizer_param_names(engine.module, client)
    if manifest["engine"] == ENGINE:
        whole = read_whole(path, manifest, optimizer=client, trusted=trusted)
    else:
        whole = reshard.read_whole(path, manifest, names, optimizer=client, trusted=trusted)
    if engine.name != ENGINE:
        return reshard.load_whole(engine, whole, names)
    load_whole_into_deepspeed(engine, whole)
    engine.load_replicated_state_dict(whole.get("replicated"))
    if "rng" in whole:
        torch.set_rng_state(whole["rng"].cpu())
    return whole["meta"]
