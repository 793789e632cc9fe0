"""Worker for test_tensor_parallel.py: every shape-aware optimizer on a (dp=2, tp=2) mesh.

``python worker.py single OUT`` trains in one process; ``torchrun --nproc_per_node 4 worker.py
tp OUT`` builds a (dp, tp) = (2, 2) mesh, applies a LLaMA-style tensor-parallel plan to a gated
MLP -- ``gate`` and ``up`` column-wise (``Shard(0)`` over tp), ``down`` row-wise (``Shard(1)``) --
then ``fully_shard`` over dp, so the weights arrive as ``(_StridedShard(0), Shard(0))`` (row
blocks in another order than the ranks) and ``(Shard(0), Shard(1))`` (blocks of rows and
columns); down's bias is ``(Shard(0), Replicate())``.  The dp ranks train on halves of
every global batch, the tp ranks of one dp group on the same half.  Shapes are uneven where
torch's tensor parallelism allows it: 54 hidden features (27 per tp rank -- a row-wise layer's
input must split evenly -- then 14 + 13 over dp), 37 model features (19 + 18 over dp).

Every run writes the final full parameters and every rank's optimizer-state bytes to ``OUT``.
``adamw`` (torch.optim.AdamW) is the control: what 2-D data-parallel rounding alone reaches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parity_common import full_params, main, per_rank, train

STEPS = 10
GLOBAL_BATCH = 8
TARGETS = ["gate", "up", "down"]

# name -> (registry name, constructor kwargs)
OPTIMIZERS = {
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=1e-2)),
    "adamp": ("adamp", dict(lr=1e-2, weight_decay=1e-2, nesterov=True)),
    "sgdp": ("sgdp", dict(lr=5e-2, momentum=0.9, weight_decay=1e-3)),
    "smmf": ("smmf", dict(lr=1e-2, weight_decay=1e-2, decay_rate=-0.8)),
    "galore_svd": ("galore_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=4, scale=0.5,
                                        projection="svd", target_modules=TARGETS)),
    "galore_randomized_rotate": ("galore_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=3,
                                                      scale=0.5, projection="randomized", on_refresh="rotate",
                                                      target_modules=TARGETS)),
    "galore_dct_int8": ("galore_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=3, scale=0.5,
                                             projection="dct", moments_dtype="int8", quant_block=4,
                                             target_modules=TARGETS)),
    "galore_random_sharded_basis": ("galore_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=3,
                                                         scale=0.5, projection="random", shard_basis=True,
                                                         target_modules=TARGETS)),
    "galore_smmf": ("galore_smmf", dict(lr=1e-2, weight_decay=1e-2, decay_rate=-0.8, eps=1e-8, rank=3,
                                        update_proj_gap=3, scale=0.5, projection="dct", on_refresh="rotate",
                                        target_modules=TARGETS)),
    "galore_adamp": ("galore_adamp", dict(lr=1e-2, weight_decay=1e-2, eps=1e-8, nesterov=True, rank=5,
                                          update_proj_gap=4, scale=0.5, projection="random",
                                          target_modules=TARGETS)),
    "apollo": ("apollo_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=3, target_modules=TARGETS)),
    "apollo_mini": ("apollo_mini", dict(lr=1e-2, weight_decay=1e-2, update_proj_gap=3, target_modules=TARGETS)),
    "fira": ("fira_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=3, target_modules=TARGETS)),
    "q_galore": ("q_galore_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=3,
                                        target_modules=TARGETS)),
    "coap": ("coap_adamw", dict(lr=1e-2, weight_decay=1e-2, rank=4, update_proj_gap=3, target_modules=TARGETS)),
}


# name -> (reparameterization, options), trained with AdamW in float64; the model is 40 -> 56 -> 40 so that
# N:M's groups of 4 inputs stay whole in every tensor-parallel block (down: 28 inputs per tp rank).
REPARAMS = {
    "nm_srste": ("nm", dict(n=2, m=4, recipe="srste")),
    "nm_mdgf": ("nm", dict(n=2, m=4, recipe="mdgf", dense_steps=2, decay_steps=4)),
    "compander": ("compander", dict(saturation=3.0, slope=2.0)),
    "sltrain": ("sltrain", dict(rank=4, density=0.1)),
    "lowrank": ("lowrank", dict(rank=4)),
    "lost": ("lost", dict(rank=4, density=0.2)),
    "lost_silu": ("lost", dict(rank=4, density=0.2, activation="silu")),
    # ranks 6 -> 4 -> 3 -> 2 (a truncation every 3 steps)
    "dynamic_rank": ("dynamic_rank", dict(rank=6, interval=3, tol=0.5)),
}


class GatedMLP(nn.Module):
    def __init__(self, dim: int = 37, hidden: int = 54):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)  # column-wise
        self.up = nn.Linear(dim, hidden, bias=False)    # column-wise
        self.down = nn.Linear(hidden, dim)              # row-wise; its bias is replicated over tp
        self.norm = nn.LayerNorm(dim)                   # down is scale-invariant as a whole (AdamP's layer view)

    def forward(self, x):
        return self.norm(self.down(F.silu(self.gate(x)) * self.up(x)))


def batches(dim: int = 37):
    g = torch.Generator().manual_seed(4321)
    target = torch.randn(dim, generator=g)
    for _ in range(STEPS):
        yield torch.randn(GLOBAL_BATCH, dim, generator=g), target


def local_loss(model, batch, lo, hi):
    x, target = batch
    y = model(x[lo:hi])
    return F.mse_loss(y, target.expand_as(y))


def make_model(seed=0, dim=37, hidden=54):
    torch.manual_seed(seed)
    return GatedMLP(dim, hidden)


def parallelize(model, reparameterize=lambda model: None):
    """(dp, tp) = (2, 2): the tensor-parallel plan on tp, ``reparameterize(model)``, then FSDP2
    over dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from optimlib.models.tensor_parallel import parallelize_linears

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_linears(model, mesh["tp"], {"gate": "colwise", "up": "colwise", "down": "rowwise"})
    reparameterize(model)
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh


def placements(model) -> dict:
    return {n: str(tuple(p.placements)) for n, p in model.named_parameters()}


def state_by_key(opt, world: int) -> list[dict]:
    """Every rank's optimizer-state bytes per ``"parameter/state key"``."""
    from optimlib.distributed.layout import to_local

    names = {p: n for g in opt.param_groups for p, n in zip(g["params"], g.get("names") or [])}
    mine = {f"{names[p]}/{k}": to_local(v).numel() * v.element_size()
            for p, s in opt.state.items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    if world == 1:
        return [mine]
    every = [None] * world
    dist.all_gather_object(every, mine)
    return every


def reparam_refusal(model, method: str, **options) -> str:
    """What optimlib.reparam.apply says of a tensor-parallel linear it must refuse."""
    from optimlib import reparam

    try:
        reparam.apply(model, method, targets=["down"], **options)
    except ValueError as err:
        return str(err)
    return "applied"


def register_toy_replacement() -> str:
    """A reparameterization that replaces the module and has no tensor-parallel form (a copy of
    the linear); its name."""
    import copy

    from optimlib import reparam

    if "toy_copy" not in reparam.list_reparams():
        reparam.register_reparam("toy_copy", lambda linear: copy.deepcopy(linear))
    return "toy_copy"


def run_reparam(engine: str, name: str) -> dict:
    """10 AdamW steps of the 40 -> 56 -> 40 model reparameterized by ``REPARAMS[name]``, the
    layers' step hooks after each step.  Parameters a layer declares replicated (dynamic rank's
    factors) are kept whole on every rank as the engines keep them: hidden from FSDP2, their
    gradients averaged over all ranks, stepped by a second AdamW."""
    from optimlib import reparam
    from optimlib.distributed.replicated import ReplicatedParams
    from optimlib.optim import create_optimizer

    method, options = REPARAMS[name]
    # float64: a mask is a discontinuous function of the weights, so float32 rounding differences
    # between the layouts can flip a near-tied N:M group at one step and move that weight by 1e-3.
    model = make_model(dim=40, hidden=56).double()

    def reparameterize(m):
        reparam.apply(m, method, targets=TARGETS, **options)

    lo, hi = 0, GLOBAL_BATCH
    # a parametrization acts on the tensor-parallel blocks; a replacement comes before the plan
    after_plan = reparam.get_reparam_spec(method).parametrization
    if engine == "single" or not after_plan:
        reparameterize(model)
    replicated = None
    if engine != "single":
        if reparam.replicated_parameters(model):
            replicated = ReplicatedParams(reparam.replicated_parameters(model), dist.get_world_size())
            replicated.broadcast_()
        model, mesh = parallelize(model, reparameterize if after_plan else lambda m: None)
        lo = mesh["dp"].get_local_rank() * (GLOBAL_BATCH // 2)
        hi = lo + GLOBAL_BATCH // 2
    opt = create_optimizer(model, "adamw", lr=1e-2, weight_decay=1e-2)
    if replicated is not None:
        replicated.optimizer = create_optimizer(replicated.param_view(), "adamw", lr=1e-2, weight_decay=1e-2)
    for x, target in batches(40):
        local_loss(model, (x.double(), target.double()), lo, hi).backward()
        opt.step()
        if replicated is not None:
            replicated.average_grads_()
            replicated.optimizer.step()
            replicated.optimizer.zero_grad(set_to_none=True)
        reparam.after_step(model, opt, replicated.optimizer if replicated is not None else None)
        opt.zero_grad(set_to_none=True)
    params = full_params(model)
    if replicated is not None:
        params.update({n: p.detach().clone() for n, p in replicated.named})
    return {"params": params}


def run(engine: str, name: str, out: str) -> dict:
    from optimlib.optim import create_optimizer, optimizer_state_bytes

    if name in REPARAMS:
        return run_reparam(engine, name)
    opt_name, kwargs = OPTIMIZERS[name]
    kwargs = dict(kwargs)
    lr, wd = kwargs.pop("lr"), kwargs.pop("weight_decay")
    model = make_model()
    result = {}
    if engine == "single":
        world, lo, hi = 1, 0, GLOBAL_BATCH
    else:
        model, mesh = parallelize(model)
        world = dist.get_world_size()
        half = GLOBAL_BATCH // 2
        lo = mesh["dp"].get_local_rank() * half
        hi = lo + half
        result["placements"] = placements(model)
        result["refusals"] = {"sltrain": reparam_refusal(model, "sltrain", rank=4),
                              "no_form": reparam_refusal(model, register_toy_replacement()),
                              "nm_1of2": reparam_refusal(model, "nm", n=1, m=2)}
    opt = create_optimizer(model, opt_name, lr=lr, weight_decay=wd, **kwargs)
    train(model, opt, batches(), local_loss, lo, hi)
    (state_bytes,) = per_rank([optimizer_state_bytes(opt)], world)
    result.update(params=full_params(model), state_bytes=state_bytes, by_key=state_by_key(opt, world))
    return result


if __name__ == "__main__":
    main(run, lambda engine: (*OPTIMIZERS, *REPARAMS))
