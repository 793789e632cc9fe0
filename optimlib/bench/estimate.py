"""Analytic per-rank memory of training a LLaMA model with a given optimizer, engine and sharding.

``estimate_memory(model="llama_7b", optimizer="galore_adamw", engine="fsdp2", world_size=8,
dtype="bfloat16", rank=1024)`` returns a :class:`MemoryEstimate` with the bytes one rank holds
for weights, gradients, optimizer states (by component), master weights and activations.

How it is computed, without allocating anything:

1. the model is built on the meta device (any named config, or a user-given
   :class:`~optimlib.models.LlamaConfig` such as a 13B or 70B shape), optionally reparameterized
   (``reparam``, through :func:`optimlib.reparam.apply`), and cast to ``dtype``;
2. the optimizer is built over it with :func:`optimlib.create_optimizer` -- so the parameter
   split (which linears are low-rank, which groups decay) and every option, defaults included,
   are exactly the factory's and the optimizer's own;
3. each parameter is placed the way the engine places it on each rank: whole (``single``);
   ``torch.chunk`` rows of dim 0 (``fsdp2``, ``fully_shard``); with ``tp`` > 1 (``fsdp2`` only, the
   launcher's ``parallel.tp``) the blocks' projections tensor parallel over ``tp`` ranks and
   FSDP2 over the ``world / tp`` data-parallel ones (:mod:`optimlib.bench.mesh_placement`);
   DeepSpeed ZeRO flat partitions
   (stage 1/2: the parameter group flattened and padded to a multiple of ``2 x world`` elements,
   stage 3: each parameter padded to a multiple of ``world``).  Shape-aware optimizers get one
   parameter per group under DeepSpeed, as ``launch/pretrain.py`` gives them;
4. each tensor's state is what the optimizer declares for it (:func:`optimlib.optim.state_spec.state_specs`:
   every entry's elements on that rank, times its itemsize, summed by component), and activations
   come from :mod:`optimlib.bench.activations` (under ``tp`` each rank keeps its share of the
   heads and MLP features).

Engines and what is divided by the world size (per rank):

========================  =========  =========  ================  ==================
engine                    weights    gradients  optimizer states  master weights
========================  =========  =========  ================  ==================
single                    full       full       full              --
fsdp2                     / world    / world    / world           --
fsdp2, tp > 1             / world*   / world*   / world*          --
deepspeed, zero_stage 0   full       full       full              fp32 copy if not fp32
deepspeed, zero_stage 1   full       full       / world           fp32, / world
deepspeed, zero_stage 2   full       / world    / world           fp32, / world
deepspeed, zero_stage 3   / world    / world    / world           fp32, / world
========================  =========  =========  ================  ==================

``*``: under ``tp`` > 1 the attention and MLP projections are divided over all ``world`` ranks (rows
and columns of one mesh), and every other parameter (embeddings, norms, LM head) over the
``world / tp`` data-parallel ranks only: the ``tp`` ranks of one replica hold copies.  Row-wise
projections (``o_proj``, ``down_proj``) hold a block of columns; a shape-aware optimizer (the
factory's ``shape_aware``) keeps their state by rows, the layout it steps them in, and
``torch.optim.AdamW`` like the weight.

Weights include the model's buffers (e.g. SLTrain's sparse support), replicated on every rank.
Under DeepSpeed the client optimizer steps fp32 partitions (its states are fp32 whatever
``dtype``) and the partitioned gradients are fp32.  ``layerwise=True`` (optimizer in backward,
:meth:`optimlib.optim.galore.GaLoreAdamW.layerwise`) keeps one parameter's gradient at a time.

Not included (say so when you quote a total): communication buckets (DeepSpeed's reduce and
all-gather buckets, FSDP2's all-gathered blocks in flight), the CUDA context and allocator
fragmentation, and transient workspaces (SVD, SMMF's per-parameter temporaries, the 8-bit
quantizers).  :mod:`optimlib.bench.fit` leaves headroom for them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from optimlib.bench.activations import activation_bytes
from optimlib.bench.mesh_placement import MeshPlacement, tp_style
from optimlib.distributed.row_block import FlatSlice
from optimlib.models import LlamaConfig, get_config
from optimlib.models.llama import Llama
from optimlib.models.tensor_parallel import tensor_parallel_problem
from optimlib.optim import create_optimizer, get_optimizer_spec
from optimlib.optim.state_spec import Placement, state_specs

__all__ = ["MemoryEstimate", "estimate_memory", "ENGINES", "DTYPES"]

ENGINES = ("single", "fsdp2", "deepspeed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DS_ALIGNMENT = 2          # DeepSpeed ZeRO-1/2's nccl_start_alignment_factor


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank bytes (see :func:`estimate_memory`); ``total`` sums the components."""

    model: str
    optimizer: str
    engine: str
    zero_stage: int
    world_size: int
    process_rank: int
    dtype: str
    num_parameters: int
    weights: int
    gradients: int
    optimizer_states: int
    master_weights: int
    activations: int
    state_breakdown: dict = field(default_factory=dict)
    per_rank_total: tuple = ()
    notes: tuple = ()
    tp: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.master_weights + self.activations

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d["per_rank_total"] = list(self.per_rank_total)
        d["notes"] = list(self.notes)
        return d


# ----------------------------------------------------------------------------- placement
def _rows_bounds(shape: tuple[int, ...], world: int) -> tuple[tuple[int, int], ...]:
    """FSDP2 ``Shard(0)``: ``torch.chunk`` of dim 0 (the last ranks may get fewer or no rows)."""
    numel = math.prod(shape)
    rows = shape[0] if shape else 1
    per_row = numel // max(rows, 1)
    chunk = -(-rows // world)
    return tuple((min(k * chunk, rows) * per_row, min((k + 1) * chunk, rows) * per_row) for k in range(world))


def _partition(numel: int, world: int, stage: int) -> int:
    """Elements of one rank's DeepSpeed flat partition (padding included)."""
    if stage == 3:
        return -(-numel // world)
    align = _DS_ALIGNMENT * world
    return -(-numel // align) * align // world


def _flat_bounds(numel: int, size: int, world: int) -> tuple[tuple[int, int], ...]:
    return tuple((min(k * size, numel), min((k + 1) * size, numel)) for k in range(world))


class _Placement:
    """Where each parameter's elements lie on each rank, for one engine (``mesh``: the
    :class:`~optimlib.bench.mesh_placement.MeshPlacement` of FSDP2 over tensor parallelism, or
    ``None``).  ``name`` is the parameter's name in the model, which the tensor-parallel plan reads."""

    def __init__(self, engine: str, stage: int, world: int, mesh: MeshPlacement | None = None):
        self.engine, self.stage, self.world, self.mesh = engine, stage, world, mesh

    @property
    def partitioned(self) -> bool:
        return self.engine == "deepspeed" and self.stage >= 1

    def pieces(self, shape: tuple[int, ...], name: str = "") -> list[tuple[FlatSlice, int]]:
        """``(piece, local numel)`` of the tensor the optimizer steps for a parameter of ``shape``,
        on every rank."""
        if self.mesh is not None:
            return self.mesh.pieces(shape, tp_style(name))
        numel = math.prod(shape)
        w = self.world
        if self.engine == "fsdp2" and w > 1:
            bounds = _rows_bounds(shape, w)
            return [(FlatSlice(numel, bounds, k), b - a) for k, (a, b) in enumerate(bounds)]
        if self.partitioned and w > 1:
            size = _partition(numel, w, self.stage)
            bounds = _flat_bounds(numel, size, w)
            return [(FlatSlice(numel, bounds, k), size) for k in range(w)]
        return [(FlatSlice.whole(numel), numel)] * w

    def group_numel(self, shapes: list[tuple[int, ...]]) -> int:
        """Local elements of a DeepSpeed flat group buffer holding parameters of ``shapes``."""
        if self.stage == 3:
            return sum(_partition(math.prod(s), self.world, 3) for s in shapes)
        return _partition(sum(math.prod(s) for s in shapes), self.world, self.stage)

    def weight_numel(self, shape: tuple[int, ...], name: str = "") -> list[int]:
        if self.mesh is not None:
            return self.mesh.weight_numel(shape, tp_style(name))
        if self.engine == "fsdp2" or (self.engine == "deepspeed" and self.stage == 3):
            return [n for _, n in self.pieces(shape)]
        return [math.prod(shape)] * self.world

    def grad_numel(self, shape: tuple[int, ...], name: str = "") -> list[int]:
        if self.mesh is not None:
            return self.mesh.weight_numel(shape, tp_style(name))
        if self.engine == "fsdp2" or (self.engine == "deepspeed" and self.stage >= 2):
            return [n for _, n in self.pieces(shape)]
        return [math.prod(shape)] * self.world


# ----------------------------------------------------------------------------- the estimator
def _resolve_model(model) -> tuple[str, LlamaConfig]:
    if isinstance(model, LlamaConfig):
        return f"custom(dim={model.dim}, layers={model.n_layers})", model
    if isinstance(model, str):
        return model, get_config(model)
    raise TypeError(f"model must be a named config (str) or a LlamaConfig, got {type(model).__name__}")


def _dtype(name: str, what: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"invalid {what}={name!r}: accepted values are {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_engine(engine: str, zero_stage: int, world_size: int) -> None:
    if engine not in ENGINES:
        raise ValueError(f"invalid engine={engine!r}: accepted values are {', '.join(ENGINES)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"invalid world_size={world_size!r}: accepted range is an integer >= 1")
    if engine == "single" and world_size != 1:
        raise ValueError(f"invalid world_size={world_size} for engine='single': it runs one process (world_size=1)")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"invalid zero_stage={zero_stage!r}: accepted values are 0, 1, 2, 3")
    if engine != "deepspeed" and zero_stage != 0:
        raise ValueError(f"invalid zero_stage={zero_stage} for engine={engine!r}: ZeRO stages apply to "
                         "engine='deepspeed' only")


def _check_tp(tp, engine: str, world_size: int, name: str, cfg: LlamaConfig, reparam, layerwise: bool) -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"invalid tp={tp!r}: accepted range is an integer >= 1")
    if tp == 1:
        return
    if engine != "fsdp2":
        raise ValueError(f"invalid tp={tp} for engine={engine!r}: tensor parallelism runs under engine='fsdp2'")
    if world_size % tp:
        raise ValueError(f"invalid tp={tp} for world_size={world_size}: tp must divide it (the mesh is "
                         "world_size / tp data-parallel x tp tensor-parallel ranks)")
    problem = tensor_parallel_problem(cfg, tp)
    if problem:
        raise ValueError(f"invalid tp={tp} for model {name}: {problem}")
    for what, value in (("reparam", reparam), ("layerwise", layerwise)):
        if value:
            raise ValueError(f"invalid tp={tp} with {what}={value!r}: the estimate under tensor parallelism "
                             f"covers plain linears stepped after the backward pass; estimate {what} with tp=1")


def _meta_model(cfg: LlamaConfig, dtype: torch.dtype, reparam, reparam_options):
    model = Llama(cfg, device="meta").to(dtype)
    if reparam is not None:
        from optimlib.reparam import apply, list_reparams

        if reparam.lower() not in list_reparams():
            raise ValueError(f"invalid reparam={reparam!r}: registered reparameterizations are "
                             f"{', '.join(list_reparams()) or 'none'}")
        apply(model, reparam, **(reparam_options or {}))
    return model


def _build_optimizer(model, optimizer: str, per_parameter_groups: bool, kwargs: dict):
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", 1e-3)
    try:
        return create_optimizer(model, optimizer, lr=lr, per_parameter_groups=per_parameter_groups, **kwargs)
    except TypeError as exc:
        raise TypeError(f"optimizer_kwargs do not fit optimizer {optimizer!r}: {exc}") from None


def estimate_memory(model: str | LlamaConfig = "llama_60m", optimizer: str = "adamw", reparam: str | None = None,
                    engine: str = "single", zero_stage: int = 0, world_size: int = 1, dtype: str = "float32",
                    micro_batch: int = 1, seq_len: int = 256, activation_checkpointing: bool = False, *,
                    process_rank: int | None = None, activation_dtype: str | None = None, layerwise: bool = False,
                    tp: int = 1, reparam_options: dict | None = None, **optimizer_kwargs) -> MemoryEstimate:
    """Per-rank bytes of training ``model`` with ``optimizer`` (see the module docstring).

    Args:
        model: a named config (``llama_60m`` ... ``llama_7b``) or a :class:`LlamaConfig`.
        optimizer: a registered optimizer name; ``optimizer_kwargs`` are its factory keyword
            arguments (``rank``, ``projection``, ``moments_dtype``, ``momentum``, ...).
        reparam, reparam_options: a registered reparameterization applied to the targeted linears.
        engine: ``single``, ``fsdp2`` or ``deepspeed`` (with ``zero_stage`` 0-3); ``world_size``.
        tp: tensor-parallel degree under ``fsdp2`` (the launcher's ``parallel.tp``): a
            ``(world_size / tp, tp)`` mesh; ``tp`` must divide ``world_size``, the heads and the MLP width.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``); ``bfloat16`` everywhere
            is the GaLore paper's accounting.  ``activation_dtype``: the autocast dtype (default
            ``dtype``).
        micro_batch, seq_len, activation_checkpointing: the activation term.
        process_rank: the rank (process) to report (default: the one with the largest total).
        layerwise: optimizer-in-backward stepping (one parameter's gradient at a time).
    """
    name, cfg = _resolve_model(model)
    _check_engine(engine, zero_stage, world_size)
    _check_tp(tp, engine, world_size, name, cfg, reparam, layerwise)
    if layerwise and engine == "deepspeed":
        raise ValueError("invalid layerwise=True with engine='deepspeed': DeepSpeed owns the gradients; "
                         "layer-wise stepping runs in one process or under FSDP2")
    pdtype = _dtype(dtype, "dtype")
    adtype = _dtype(activation_dtype or dtype, "activation_dtype")
    if process_rank is not None and not (isinstance(process_rank, int) and 0 <= process_rank < world_size):
        raise ValueError(f"invalid process_rank={process_rank!r}: accepted range is 0 .. world_size-1 "
                         f"({world_size - 1})")
    spec = get_optimizer_spec(optimizer)
    place = _Placement(engine, zero_stage, world_size)
    meta = _meta_model(cfg, pdtype, reparam, reparam_options)
    opt = _build_optimizer(meta, spec.name, place.partitioned and spec.shape_aware, optimizer_kwargs)
    if tp > 1:      # shape-aware optimizers step row-wise projections by rows, others as they are
        place.mesh = MeshPlacement(world_size, tp, by_rows=spec.shape_aware)
    names = {id(p): n for n, p in meta.named_parameters()}

    deepspeed = engine == "deepspeed"
    opt_dtype = torch.float32 if deepspeed and (zero_stage >= 1 or pdtype != torch.float32) else pdtype
    w = world_size
    weights, grads, states, master = [0] * w, [0] * w, [0] * w, [0] * w
    breakdown = [dict() for _ in range(w)]
    notes = []
    largest_grad = [0] * w

    def add_state(k: int, group: dict, place: Placement) -> None:
        for entry in state_specs(opt, group, place):
            nbytes = entry.local_bytes(opt_dtype)
            breakdown[k][entry.component] = breakdown[k].get(entry.component, 0) + nbytes
            states[k] += nbytes

    params = [p for p in meta.parameters() if p.requires_grad]
    for p in params:
        shape = tuple(p.shape)
        size = p.element_size()
        for k, n in enumerate(place.weight_numel(shape, names[id(p)])):
            weights[k] += n * size
        gsize = 4 if deepspeed and zero_stage >= 2 else size
        for k, n in enumerate(place.grad_numel(shape, names[id(p)])):
            grads[k] += n * gsize
            largest_grad[k] = max(largest_grad[k], n * gsize)

    for group in opt.param_groups:
        resolved = {k: v for k, v in group.items() if k != "params"}
        members = [tuple(p.shape) for p in group["params"]]
        labels = [names.get(id(p), "") for p in group["params"]]
        if place.partitioned and w > 1 and len(members) > 1:
            numel = place.group_numel(members)
            for k in range(w):
                add_state(k, resolved, Placement(None, None, numel))
                master[k] += numel * 4
            continue
        for shape, label in zip(members, labels):
            for k, (piece, numel) in enumerate(place.pieces(shape, label)):
                add_state(k, resolved, Placement(shape, piece, numel, engine == "fsdp2" and w > 1))
                if place.partitioned:
                    master[k] += numel * 4
    buffers = sum(b.numel() * b.element_size() for b in meta.buffers())   # e.g. SLTrain's support: replicated
    weights = [x + buffers for x in weights]
    if deepspeed and zero_stage == 0 and pdtype != torch.float32:
        master = [sum(math.prod(p.shape) for p in params) * 4] * w
    if layerwise:
        grads = largest_grad
        notes.append("layerwise: one parameter's gradient at a time")
    if any(group.get("rank") == "auto" or group.get("energy") is not None for group in opt.param_groups):
        notes.append("adaptive rank counted at its cap (an upper bound)")

    act = activation_bytes(cfg, micro_batch, seq_len, adtype, activation_checkpointing, tp=tp)
    totals = [weights[k] + grads[k] + states[k] + master[k] + act for k in range(w)]
    pick = max(range(w), key=lambda k: totals[k]) if process_rank is None else process_rank
    return MemoryEstimate(
        model=name, optimizer=spec.name, engine=engine, zero_stage=zero_stage, world_size=w, process_rank=pick,
        dtype=dtype, num_parameters=sum(math.prod(p.shape) for p in params), weights=weights[pick],
        gradients=grads[pick], optimizer_states=states[pick], master_weights=master[pick], activations=act,
        state_breakdown=dict(breakdown[pick]), per_rank_total=tuple(totals), notes=tuple(notes), tp=tp)
