"""What an engine of ``launch/pretrain.py`` is, and the one-process and FSDP2 engines.

The engines (:data:`optimlib.train.engines.ENGINES`): one process, DDP
(:mod:`~optimlib.train.engine_ddp`), FSDP2, DeepSpeed ZeRO (:mod:`~optimlib.train.engine_deepspeed`).
Each engine owns the wrapped model and the optimizer and offers the same small surface to the
training loop: ``forward_backward`` for one micro-batch, ``step`` at the accumulation boundary,
``after_step`` / ``after_skipped_step`` (the reparameterizations' step hooks, after an
applied or a skipped step), ``set_lr``, ``save``/``load`` and the
memory counters.  The loop itself (``loop.py``) is the same for all of them.

With ``train.layerwise`` (one process, DDP, FSDP2) the engine's optimizer steps each parameter
inside the last micro-batch's backward pass (:class:`~optimlib.optim.layerwise.LayerwiseStepper`,
set up by :meth:`Engine.start_layerwise`) and ``step`` only checks the gradient norm, which the
stepper's ``prepare`` added up from the gradients it stepped.

Parameters a reparameterized layer declares replicated (``replicated_parameters``: shapes that
change between steps, e.g. dynamic-rank factors) are kept out of FSDP2's and ZeRO's sharding by
the two sharded engines and trained by a second instance of the optimizer, on every rank, with
gradients averaged over the ranks and clipped by the global norm over all parameters
(:mod:`optimlib.distributed.replicated`).  Checkpoints carry them through
:meth:`Engine.replicated_state_dict`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from optimlib import reparam
from optimlib.distributed.layout import copies, to_local
from optimlib.distributed.replicated import ReplicatedParams
from optimlib.distributed.teardown import leave_process_group
from optimlib.optim import create_optimizer, get_optimizer_spec, optimizer_state_bytes, param_groups
from optimlib.optim.layerwise import LayerwiseStepper
from optimlib.train.config import ConfigError, RunConfig, micro_batch_for


def detect_engine(cfg: RunConfig, argv_local_rank: int | None) -> str:
    """``auto``: deepspeed under the deepspeed launcher, fsdp2 under torchrun, else single."""
    if cfg.engine != "auto":
        return cfg.engine
    if argv_local_rank is not None or "CROSS_RANK" in os.environ:
        return "deepspeed"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "fsdp2"
    return "single"


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group the launcher described (env://); returns (rank, world_size).

    Under ``torchrun --max-restarts``, a restarted attempt joins through keys of its own
    (``TORCHELASTIC_RESTART_COUNT``): torchrun's static rendezvous (``--master_port``) keeps one
    store for every attempt, and the process group's keys in it still hold the addresses the
    previous attempt's ranks published, so the new ranks would connect to dead ones (gloo:
    ``connectFullMesh`` refused or waiting until its timeout)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt == "0":
            dist.init_process_group(backend=backend)
        else:
            store, rank, world = next(dist.rendezvous("env://"))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"optimlib/attempt_{attempt}", store),
                                    rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size()


def unwrap_optimizer(opt) -> torch.optim.Optimizer:
    """The client optimizer inside DeepSpeed's ZeRO / mixed-precision wrappers."""
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__module__.startswith("deepspeed"):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            break
        opt = inner
    return opt


def param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (local shard under FSDP2 / ZeRO-3)."""
    total = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = to_local(p) if t is None else t
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, the same on every rank: DTensors are normed per
    device mesh (tensor parallelism puts the blocks' linears on a 2-D mesh and the rest on its
    data-parallel dimension; DTensor counts each replicated copy once), then combined."""
    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(id(g.device_mesh) if hasattr(g, "device_mesh") else None, []).append(g)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, foreach=True)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale ``grads`` by ``min(1, max_norm / (total_norm + 1e-6))`` when ``max_norm > 0``: the
    rule (and fp32 coefficient) of ``torch.nn.utils.clip_grads_with_norm_``, applied as a scalar,
    so that DTensor and plain gradients can be scaled by one global norm."""
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, float(torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)))


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or inf and ``train.on_nonfinite`` is ``stop``."""


@dataclass
class StepResult:
    grad_norm: float | None
    skipped: bool = False
    """The step was not applied: a gradient was non-finite and ``train.on_nonfinite=skip``."""


class Engine:
    """Shared behaviour; subclasses wrap the model and optimizer their way."""

    name = "single"
    shards_gradients = False
    """Each rank holds its own part of every gradient (FSDP2's shards), not a whole copy."""

    def __init__(self, cfg: RunConfig, device: torch.device, rank: int, world_size: int):
        self.cfg = cfg
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.tp = cfg.parallel.tp
        """Tensor-parallel degree: ranks ``d * tp .. d * tp + tp - 1`` hold one model replica's shards
        and train on the same data (the data-parallel rank ``d``)."""
        self.reparameterize = None
        """With ``tp`` > 1: what reparameterizes the model once its linears are tensor parallel
        (N:M and the compander act on each rank's block), before FSDP2 shards it."""
        self.model: nn.Module | None = None
        self.optimizer = None
        self.replicated: ReplicatedParams | None = None
        """The declared replicated parameters (sharded engines only; None when there are none)."""
        self.layerwise: LayerwiseStepper | None = None
        """The optimizer-in-backward stepper (``train.layerwise``; see :meth:`start_layerwise`)."""
        self._layerwise_sq: torch.Tensor | None = None
        self._grad_bytes_peak = 0
        dtype = cfg.train.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    # -------------------------------------------------------------- construction
    def _optimizer_kwargs(self, per_parameter_groups: bool = False) -> dict:
        o = self.cfg.optim
        kwargs = dict(lr=o.lr, weight_decay=o.weight_decay, **o.kwargs)
        if o.betas is not None:
            kwargs["betas"] = tuple(o.betas)
        if o.eps is not None:
            kwargs["eps"] = o.eps
        if o.target_modules is not None:
            kwargs["target_modules"] = o.target_modules
        if per_parameter_groups:
            kwargs["per_parameter_groups"] = True
        return kwargs

    @contextlib.contextmanager
    def _optim_kwargs_checked(self):
        """A constructor's ``TypeError`` (an unknown or mistyped keyword) becomes a config error."""
        try:
            yield
        except TypeError as exc:
            raise ConfigError(f"config section 'optim' (optim.kwargs) does not fit optimizer "
                              f"{self.cfg.optim.name!r}: {exc}") from None

    def build_optimizer(self, model: nn.Module, per_parameter_groups: bool = False):
        with self._optim_kwargs_checked():
            return create_optimizer(model, self.cfg.optim.name, **self._optimizer_kwargs(per_parameter_groups))

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        t = self.cfg.train
        return t.batch_size // (micro_batch_for(t, self.data_world) * self.data_world)

    @property
    def data_world(self) -> int:
        """Data-parallel ranks: those that take different shares of each global batch."""
        return self.world_size // self.tp

    def setup(self, model: nn.Module) -> None:
        self.model = model.to(self.device)
        self.optimizer = self.build_optimizer(self.model)
        self.start_layerwise()

    def start_layerwise(self, reduce_grad=None) -> None:
        """With ``train.layerwise``, after the optimizer is built: hook its parameters so that each
        one steps in the last micro-batch's backward pass.  ``reduce_grad(grad)``, if given, first
        makes the gradient final in place (DDP: the average over the ranks); then the gradient's
        sum of squares is added to this step's norm."""
        if not self.cfg.train.layerwise:
            return

        def prepare(p: torch.Tensor) -> None:
            if reduce_grad is not None:
                reduce_grad(p.grad)
            sq = to_local(p.grad).detach().float().square().sum()
            if self.tp > 1:  # the norm sums every rank's blocks: count each element once
                sq = sq / copies(p.grad)
            self._layerwise_sq = sq if self._layerwise_sq is None else self._layerwise_sq + sq

        self.layerwise = LayerwiseStepper(self.optimizer, self.accumulation, prepare)

    def split_replicated(self, model: nn.Module, per_parameter_groups: bool = False) -> None:
        """Sharded engines, before wrapping ``model``: hide the declared replicated parameters from
        it, make them equal on every rank and build their optimizer (the run's optimizer class and
        options; param groups by the factory's rules, so each parameter gets the weight decay it
        gets in a one-process run).  No targeted-matrix group: replicated parameters are not
        ``nn.Linear`` weights, so a one-process run does not put them in one either."""
        entries = reparam.replicated_parameters(model)
        if not entries:
            return
        self.replicated = ReplicatedParams(entries, self.world_size)
        self.replicated.broadcast_()
        spec = get_optimizer_spec(self.cfg.optim.name)
        kwargs = {k: v for k, v in {**spec.defaults, **self._optimizer_kwargs()}.items()
                  if k not in spec.matrix_keys and k != "target_modules"}
        lr, weight_decay = kwargs.pop("lr"), kwargs.pop("weight_decay")
        groups = param_groups(self.replicated.param_view(), weight_decay=weight_decay,
                              per_parameter_groups=per_parameter_groups)
        with self._optim_kwargs_checked():
            self.replicated.optimizer = spec.build(groups, lr=lr, **kwargs)

    def after_step(self) -> None:
        """The reparameterized layers' step hooks (rank truncation, schedules), after a step."""
        reparam.after_step(self.module, self.client_optimizer(),
                           replicated_optimizer=self.replicated.optimizer if self.replicated else None)

    def after_skipped_step(self) -> None:
        """The reparameterized layers' skip hooks, after a step that :meth:`step` skipped (its
        gradients discarded): restore per-step state the discarded backward consumed (N:M's
        SR-STE term), advancing nothing."""
        reparam.after_skipped_step(self.module)

    # -------------------------------------------------------------- training
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float, last: bool) -> torch.Tensor:
        loss = self.loss(x, y)
        (loss * scale).backward()
        if self.layerwise is not None:
            self.layerwise.step()
        return loss.detach()

    def step(self) -> StepResult:
        """Clip, check and apply the accumulated gradients (the accumulation boundary).

        The global gradient norm is computed once (over the sharded and the replicated
        parameters): it drives clipping and the non-finite policy (``train.on_nonfinite``):
        ``skip`` drops the step's gradients and leaves the parameters and the optimizer state
        untouched; ``stop`` raises :class:`NonFiniteGradientError` naming the step's parameters
        that hold NaN/inf.
        """
        if self.layerwise is not None:
            optimizers, grads, total = [], [], self._layerwise_norm()
        else:
            optimizers = [self.optimizer]
            grads = [[p.grad for p in self.model.parameters() if p.grad is not None]]
            self._grad_bytes_peak = max(self._grad_bytes_peak, sum(to_local(g).nbytes for g in grads[0]))
            total = total_grad_norm(grads[0])
        if self.replicated is not None:
            self.replicated.average_grads_()
            total = torch.linalg.vector_norm(torch.stack([total, self.replicated.grad_norm().to(total)]))
            grads.append(self.replicated.grads())  # plain tensors: not in one foreach call with DTensors
            optimizers.append(self.replicated.optimizer)
        norm = float(total)
        if not math.isfinite(norm):
            if self.layerwise is not None:  # the parameters were stepped in the backward pass
                raise NonFiniteGradientError(f"non-finite gradient (norm {norm}); with train.layerwise=true the "
                                             f"parameters were already stepped with it, so the run stops")
            if self.cfg.train.on_nonfinite == "stop":  # "auto" means skip here
                raise NonFiniteGradientError(f"non-finite gradient (norm {norm}) in {self._nonfinite_names()}; "
                                             f"train.on_nonfinite=stop ended the run")
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return StepResult(norm, skipped=True)
        for group in grads:
            clip_grads_(group, self.cfg.train.grad_clip, total)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return StepResult(norm)

    def _layerwise_norm(self) -> torch.Tensor:
        """The norm of the gradients the layer-wise stepper consumed since the last step."""
        sq, self._layerwise_sq = self._layerwise_sq, None
        if sq is None:
            sq = torch.zeros((), device=self.device)
        if self.shards_gradients and self.world_size > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    def _nonfinite_names(self) -> str:
        """The parameters whose gradient holds NaN/inf, on any rank (a collective)."""
        mine = [n for n, p in self.module.named_parameters()
                if p.grad is not None and not bool(torch.isfinite(to_local(p.grad)).all())]
        mine += self.replicated.nonfinite_names() if self.replicated is not None else []
        if self.world_size > 1:
            every: list = [None] * self.world_size
            dist.all_gather_object(every, mine)
            mine = sorted({n for names in every for n in names})
        return ", ".join(mine) or "(no parameter: the norm overflowed)"

    def param_groups(self):
        return self.optimizer.param_groups + (self.replicated.optimizer.param_groups if self.replicated else [])

    def set_lr(self, factor: float) -> None:
        """Every group's lr = ``optim.lr * factor``.  The base comes from the config, never from
        the groups: a resumed optimizer's groups hold the lr of the step it was saved at (and
        DCP's optimizer state dict does not carry extra group keys such as ``initial_lr``)."""
        for group in self.param_groups():
            group["lr"] = self.cfg.optim.lr * factor

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            return self.loss(x, y)
        finally:
            self.model.train()

    @property
    def module(self) -> nn.Module:
        """The user's model inside the engine's wrapper (FSDP2 shards in place, so it is itself)."""
        return self.model

    # -------------------------------------------------------------- accounting
    def client_optimizer(self) -> torch.optim.Optimizer:
        return unwrap_optimizer(self.optimizer)

    def optimizer_state_bytes(self) -> int:
        extra = optimizer_state_bytes(self.replicated.optimizer) if self.replicated is not None else 0
        return optimizer_state_bytes(self.client_optimizer()) + extra

    def param_bytes(self) -> int:
        return param_bytes(self.module) + (self.replicated.param_bytes() if self.replicated is not None else 0)

    def grad_bytes(self) -> tuple[int, int] | None:
        """``(peak, all)`` on this rank: the most bytes the ``.grad`` tensors of the optimizer's
        parameters held at once during the run (layer-wise: while the backward pass consumed them;
        else: all of them at the step), and the bytes of all of them together (one gradient per
        trainable parameter, this rank's shards).  The replicated parameters' gradients, stepped at
        the boundary, are not counted."""
        every = sum(to_local(p).nbytes for group in self.optimizer.param_groups for p in group["params"]
                    if p.requires_grad)
        peak = self.layerwise.grad_bytes_peak if self.layerwise is not None else self._grad_bytes_peak
        return peak, every

    # -------------------------------------------------------------- checkpoints
    def replicated_state_dict(self) -> dict | None:
        """What a checkpoint must carry besides the wrapped model and optimizer: the replicated
        parameters (absent from the model's ``state_dict``) and their optimizer's state; None
        when there are none.  The same on every rank: rank 0's copy is enough."""
        return self.replicated.state_dict() if self.replicated is not None else None

    def load_replicated_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`replicated_state_dict` (after the model and optimizer are loaded)."""
        if (state is None) != (self.replicated is None):
            raise ValueError("the checkpoint " + ("lacks the replicated parameters (and their optimizer state) this "
                                                  "model declares" if state is None else
                                                  "holds replicated parameters this model does not declare"))
        if state is not None:
            self.replicated.load_state_dict(state)

    def all_reduce_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        t = tensor.detach().to(self._comm_device(), torch.float64).clone()
        dist.all_reduce(t)
        return t / self.world_size

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective)."""
        if self.world_size == 1:
            return bool(flag)
        return self.all_reduce_sum(float(bool(flag))) > 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group together (see :mod:`optimlib.distributed.teardown`)."""
        leave_process_group()


class SingleEngine(Engine):
    name = "single"


class FSDP2Engine(Engine):
    """``fully_shard`` on every transformer block, then on the root (torchrun).  With
    ``parallel.tp`` > 1, the blocks are first tensor-parallel over the mesh's ``tp`` dimension
    (:mod:`optimlib.models.tensor_parallel`) and FSDP2 shards over its ``dp`` dimension."""

    name = "fsdp2"
    shards_gradients = True

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = model.to(self.device)
        self.split_replicated(model)
        if self.tp > 1:
            from optimlib.models.tensor_parallel import apply_tensor_parallel

            mesh_2d = init_device_mesh(self.device.type, (self.data_world, self.tp), mesh_dim_names=("dp", "tp"))
            apply_tensor_parallel(model, mesh_2d["tp"])
            if self.reparameterize is not None:
                model = self.reparameterize(model)
            mesh = mesh_2d["dp"]
        else:
            mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.optimizer = self.build_optimizer(model)
        self.start_layerwise()  # FSDP2 runs the hooks on the sharded parameters, after the reduce-scatter

    def forward_backward(self, x, y, scale, last):
        # Skip the reduce-scatter on all but the last micro-batch of the step.
        self.model.set_requires_gradient_sync(last)
        return super().forward_backward(x, y, scale, last)
