"""Checkpoints across engines: a single-process checkpoint resumes under FSDP2, and back.

``resume`` does this by itself: when the manifest of the checkpoint names another engine (or
another FSDP2 world size) than the run's, :func:`load_converted` reads it into one
world-independent form and loads that into the run's engine.  That form is what the single
engine saves (``state.pt``: the model's and the optimizer's ``state_dict()``, full tensors),
keyed here by parameter name (FQN) as ``torch.distributed.checkpoint.state_dict.get_state_dict``
keys it.  ``python -m optimlib.train.convert SRC DST`` writes it out as a single-engine
checkpoint, e.g. to consolidate an FSDP2 checkpoint for evaluation on one device.

Reading an FSDP2 checkpoint: DCP's ``_EmptyStateDictLoadPlanner`` (what
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` uses) assembles every DTensor
from its shards, through the checked reader of :mod:`optimlib.train.safe_load`.  Loading into
FSDP2: ``set_state_dict`` with ``full_state_dict=True`` cuts each full tensor along the
placements of the optimizer's own (DTensor) state.  Both are exact copies.  For most of our optimizers' state that is all it takes,
because under FSDP2 every state tensor is a DTensor whose global shape is the single-process
tensor: AdamW / AdamP moments (``Shard(0)`` like the parameter), GaLore's low-rank moments
(``Shard`` on the kept dimension) and projection bases (left ``(m, r)``: ``Shard(0)``; right
``(r, n)``: ``Shard(1)`` with ``shard_basis``, else replicated), DCT indices and the
per-parameter integers (replicated).

One kind of state is not a slice of a global tensor: SMMF's rank-local factors (SMMF itself,
GaLore with ``inner="smmf"`` and SMMF on GaLore's dense parameters).  SMMF views a tensor as a
near-square ``(rows, cols)`` matrix; a rank keeps the row factors ``exp_avg_row`` /
``exp_avg_sq_row`` of the rows it owns and the 1-bit packed signs ``exp_avg_sign`` of those
rows, and FSDP2 stores them as ``(world, k)`` DTensors with one zero-padded slot per rank
(:class:`optimlib.optim.smmf.SMMFLayout`).  The ranks own consecutive rows, so the
single-process factors are the concatenation of the slots' owned parts (the sign bits unpacked,
concatenated and packed again), and the slots are cut back out of them for any world size.
The owned rows follow from the tensor SMMF factorizes and the FSDP2 ``torch.chunk`` split:

* a parameter (SMMF, or a dense parameter of GaLore ``inner="smmf"``): the flattened parameter,
  split by rows of its first dimension;
* GaLore's low-rank moments: the ``(kept, r)`` matrix (``kept = m`` for a right projection,
  ``n`` for a left one) flattened, split by rows of the kept dimension.

The column factors are equal on every rank (all-reduced) and copied as they are.

Cost: every rank holds the whole model and optimizer state in host memory once, at load time
(as torch's ``format_utils`` do); native resumes (same engine, same world size) never do.

DeepSpeed checkpoints resume under DeepSpeed on the same world size only (its ZeRO partitions are
flat slices of padded parameter groups; DeepSpeed's ``zero_to_fp32.py`` recovers the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from optimlib.distributed.row_block import FlatSlice
from optimlib.formats.bitpack import pack_bits, packed_numel, unpack_bits
from optimlib.optim.galore import is_lowrank_group
from optimlib.distributed.row_block import chunk_bounds
from optimlib.optim.galore.bases import matrix_shape, resolve_side
from optimlib.optim.smmf import SMMFLayout

CONVERTIBLE = ("single", "fsdp2")
_ROW_KEYS = ("exp_avg_row", "exp_avg_sq_row")
_SIGN_KEY = "exp_avg_sign"


# ------------------------------------------------------------------ SMMF slots <-> whole factors
def _smmf_owned_rows(shape, group: dict, state: dict, world: int) -> tuple[list[int], int]:
    """Rows of SMMF's matrix view that each FSDP2 rank owns, and its number of columns.

    ``shape``: the parameter's global shape; ``state``: its optimizer state (GaLore's ``rank``
    tells a low-rank moment from a parameter's own factors)."""
    numel = math.prod(shape)
    if is_lowrank_group(group) and len(shape) >= 2 and numel > 0 and "rank" in state:
        m, n = matrix_shape(shape)
        kept = m if resolve_side(m, n, group["proj_type"]) == "right" else n
        r = int(state["rank"])
        total, bounds = kept * r, [(a * r, b * r) for a, b in chunk_bounds(kept, world)]
    else:  # FSDP2 shards the parameter by rows of its first dimension (torch.chunk)
        rows = int(shape[0]) if len(shape) else 1
        per_row = numel // max(rows, 1)
        total, bounds = numel, [(a * per_row, b * per_row) for a, b in chunk_bounds(rows, world)]
    layouts = [SMMFLayout(total, FlatSlice(total, tuple(bounds), k)) for k in range(world)]
    return [layout.block.num_rows for layout in layouts], layouts[0].cols


def _unslot(slots: torch.Tensor, key: str, owned: list[int], cols: int) -> torch.Tensor:
    """The single-process factor from FSDP2's ``(world, k)`` per-rank slots."""
    if key == _SIGN_KEY:
        return pack_bits(torch.cat([unpack_bits(slots[k], rows * cols) for k, rows in enumerate(owned)]))
    return torch.cat([slots[k, :rows] for k, rows in enumerate(owned)])


def _slot(whole: torch.Tensor, key: str, owned: list[int], cols: int) -> torch.Tensor:
    """FSDP2's ``(world, k)`` per-rank slots from the single-process factor (zero-padded)."""
    most = max(owned)
    if key == _SIGN_KEY:
        bits = unpack_bits(whole, sum(owned) * cols)
        out = torch.zeros(len(owned), packed_numel(most * cols), dtype=torch.uint8, device=whole.device)
    else:
        bits = whole
        out = whole.new_zeros(len(owned), most)
    start = 0
    for k, rows in enumerate(owned):
        count = rows * cols if key == _SIGN_KEY else rows
        piece = bits[start:start + count]
        if key == _SIGN_KEY:
            piece = pack_bits(piece)
        out[k, :piece.numel()] = piece
        start += count
    return out


def _convert_smmf_slots(optim_sd: dict, world: int, *, to_slots: bool) -> None:
    """In place on an FQN-keyed optimizer state dict: FSDP2 slots (of ``world`` ranks) to whole
    factors, or whole factors to slots (``to_slots``)."""
    for group in optim_sd["param_groups"]:
        for i, fqn in enumerate(group["params"]):
            state = optim_sd["state"].get(fqn)
            if not state or not any(k in state for k in (*_ROW_KEYS, _SIGN_KEY)):
                continue
            shapes = group.get("shapes")
            if shapes is None:
                raise ValueError(f"cannot convert the SMMF state of '{fqn}': its param group records no "
                                 f"'shapes' (build the optimizer with optimlib.optim.create_optimizer)")
            owned, cols = _smmf_owned_rows(tuple(shapes[i]), group, state, world)
            for key in (*_ROW_KEYS, _SIGN_KEY):
                if key in state:
                    state[key] = (_slot if to_slots else _unslot)(state[key], key, owned, cols)


# ------------------------------------------------------------------ parameter ids <-> names
def _keyed(optim_sd: dict, names: list[str], *, by_name: bool) -> dict:
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
def read_whole(path: Path, manifest: dict, names: list[str] | None = None, *, trusted: bool = False) -> dict:
    """The checkpoint at ``path`` in single-process form: ``{"model", "optimizer", "rng", "meta"}``
    with full tensors on the CPU and the optimizer state keyed by parameter name.

    ``names``: the optimizer's parameter names in order, needed for a single-engine checkpoint
    whose groups do not record them.  The files are read the safe way
    (:mod:`optimlib.train.safe_load`) unless ``trusted``; check them first
    (:func:`optimlib.train.checkpoint.check_files`) so that a refusal loads nothing."""
    from optimlib.train import safe_load

    path = Path(path)
    if manifest["engine"] == "single":
        state = safe_load.load_file(path / "state.pt", trusted=trusted)
        optim = state["optimizer"]
        if names is None:
            names = [n for group in optim["param_groups"] for n in group["names"]]
        return {**state, "optimizer": _keyed(optim, names, by_name=True)}
    if manifest["engine"] != "fsdp2":
        raise ValueError(f"checkpoint '{path}' was written by engine={manifest['engine']}, which resumes only "
                         f"under the same engine and world size; conversion covers {' and '.join(CONVERTIBLE)}")
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    reader = safe_load.dcp_reader(path / "dcp", trusted=trusted)
    with safe_load.guarded_loads(path / "dcp", trusted=trusted, reader=reader):
        _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    _convert_smmf_slots(state["optimizer"], int(manifest["world_size"]), to_slots=False)
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
    state = read_whole(path, manifest, names, trusted=trusted)
    if engine.name == "single":
        engine.model.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(_keyed(state["optimizer"], names, by_name=False))
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        _convert_smmf_slots(state["optimizer"], engine.world_size, to_slots=True)
        set_state_dict(engine.model, engine.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["rng"].cpu())
    return state["meta"]


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """``python -m optimlib.train.convert SRC DST``: write checkpoint SRC as a single-engine one."""
    parser = argparse.ArgumentParser(description="Write an optimlib checkpoint (single or FSDP2) as a "
                                                 "single-engine checkpoint: one state.pt of full tensors.")
    parser.add_argument("src", type=Path, help="a checkpoint directory (…/checkpoints/step_XXXXXXXX)")
    parser.add_argument("dst", type=Path, help="the directory to create")
    parser.add_argument("--trusted", action="store_true",
                        help="read SRC without the safety checks (weights_only=False): only for a checkpoint you "
                             "trust like code (the launcher's resume_trusted=true)")
    args = parser.parse_args(argv)
    from optimlib.train import checkpoint

    problem = checkpoint.verify(args.src)
    if problem is not None:
        print(f"error: '{args.src}' is not a usable checkpoint ({problem})", file=sys.stderr)
        return 1
    if args.dst.exists():
        print(f"error: '{args.dst}' exists; choose a new directory", file=sys.stderr)
        return 1
    manifest = checkpoint.read_manifest(args.src)
    try:
        if not args.trusted:
            checkpoint.check_files(args.src, manifest)
        state = read_whole(args.src, manifest, trusted=args.trusted)
    except (checkpoint.CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    groups = state["optimizer"]["param_groups"]
    names = [n for group in groups for n in group["params"]]
    state["optimizer"] = _keyed(state["optimizer"], names, by_name=False)
    state["meta"] = {**state["meta"], "engine": "single", "world_size": 1, "converted_from": manifest["engine"]}
    checkpoint.write_single(args.dst, state, run=manifest.get("run"))
    print(json.dumps({"src": str(args.src), "dst": str(args.dst), "from": manifest["engine"],
                      "world_size": manifest["world_size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
