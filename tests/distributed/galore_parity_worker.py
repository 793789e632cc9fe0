"""Worker for test_galore_distributed.py: GaLoreAdamW on uneven shapes, 1 process vs 2 ranks.

``python galore_parity_worker.py single OUT [CONFIG...]`` trains in one process;
``torchrun --nproc_per_node 2 galore_parity_worker.py fsdp2|ds1|ds2|ds3 OUT [CONFIG...]`` shards
every parameter with FSDP2 ``fully_shard`` (``Shard(0)``, uneven rows) or runs DeepSpeed
ZeRO-1/2/3 with one parameter per param group (flat fp32 partitions that start and end
mid-row).  Every run sees the same global batches in fp32 and writes, per config, the final full
parameters and every rank's optimizer-state bytes to ``OUT``.  ``layerwise_acc4`` (one process and
FSDP2) trains with 4 accumulated micro-batches per step in the normal mode and in the layer-wise
(optimizer-in-backward) mode, whose hooks run on FSDP2's sharded parameters after the
reduce-scatter.  Under FSDP2 the ``resume`` entry
checks an exact resume through ``torch.distributed.checkpoint`` (4 steps, save, fresh model and
optimizer, load, 4 more).

Model: weights of 53x37 (right projection), 96x53 (right) and 37x96 (left: ``std`` keeps the
larger dimension), biases of 53, 96 and 37 elements (plain AdamW).  Rows 53 and 37 are odd, so
FSDP2 shards are uneven and DeepSpeed slices start mid-row.  The batch (64 samples) makes every
weight gradient of full numerical rank, so every basis is well defined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parity_common import deepspeed_train, fsdp2_resume_diff, full_params, main, per_rank, rank_slice, train

STEPS = 8
GLOBAL_BATCH = 64
BASE = dict(lr=1e-2, weight_decay=1e-2, rank=8, update_proj_gap=3, scale=0.5)

# name -> GaLore options (the factory puts the low-rank keys on the matrix group)
CONFIGS = {
    "svd": dict(projection="svd"),
    "randomized": dict(projection="randomized"),
    "dct": dict(projection="dct"),
    "random": dict(projection="random"),
    "randomized_rotate_stagger": dict(projection="randomized", on_refresh="rotate", stagger=True),
    "svd_adaptive_reset": dict(projection="svd", rank="auto", energy=0.6, min_rank=2, max_rank=12,
                               on_refresh="reset"),
    # rank 40 exceeds a dimension of two weights; reverse_std swaps every side.
    "randomized_reverse_std": dict(projection="randomized", proj_type="reverse_std", rank=40),
    "randomized_int8": dict(projection="randomized", moments_dtype="int8", quant_block=4),
    "dct_int8_rotate": dict(projection="dct", moments_dtype="int8", quant_block=4, on_refresh="rotate"),
}
# Layer-wise (optimizer-in-backward) stepping with 4 micro-batches per step, against the normal
# mode with the same accumulation (single process and FSDP2 only).
LAYERWISE = {"layerwise_acc4": dict(projection="randomized")}
ACCUMULATION = 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(37, 53)        # weight (53, 37): right projection
        self.mlp = nn.Linear(53, 96)         # weight (96, 53): right
        self.out = nn.Linear(96, 37)         # weight (37, 96): left

    def forward(self, x):
        return self.out(torch.tanh(self.mlp(torch.tanh(self.attn(x)))))


TARGETS = ("attn", "mlp", "out")


def batches(steps=STEPS):
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(37, 37, generator=g) / 6
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, 37, generator=g)
        yield x, torch.sin(x @ w)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def build(model, cfg, per_parameter_groups=False):
    from optimlib.optim import create_optimizer

    kw = {**BASE, **cfg}
    lr, wd = kw.pop("lr"), kw.pop("weight_decay")
    return create_optimizer(model, "galore_adamw", lr=lr, weight_decay=wd, target_modules=TARGETS,
                            per_parameter_groups=per_parameter_groups, **kw)


def shard(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for mod in (model.attn, model.mlp, model.out):
        fully_shard(mod, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_loss(model, batch, lo, hi):
    x, y = batch
    return F.mse_loss(model(x[lo:hi]), y[lo:hi])


def train_accumulated(model, opt, data, lo, hi, layerwise: bool):
    """ACCUMULATION micro-batches per optimizer step; layer-wise steps inside the last backward."""
    stepper = opt.layerwise(ACCUMULATION) if layerwise else None
    per = (hi - lo) // ACCUMULATION
    for x, y in data:
        for k in range(ACCUMULATION):
            a, b = lo + k * per, lo + (k + 1) * per
            (F.mse_loss(model(x[a:b]), y[a:b]) / ACCUMULATION).backward()
            if stepper is not None:
                assert stepper.step() == (k == ACCUMULATION - 1)
        if stepper is None:
            opt.step()
            opt.zero_grad(set_to_none=True)


def run(engine: str, name: str, out: str) -> dict:
    from optimlib.optim import optimizer_state_bytes

    cfg = CONFIGS[name] if name in CONFIGS else LAYERWISE[name]
    world, lo, hi = rank_slice(GLOBAL_BATCH)
    if name in LAYERWISE:
        out_params = {}
        for mode in ("normal", "layerwise"):
            model = make_model()
            if engine == "fsdp2":
                shard(model, world)
            opt = build(model, cfg)
            train_accumulated(model, opt, batches(), lo, hi, layerwise=(mode == "layerwise"))
            out_params[mode] = full_params(model)
        return {"params": out_params["layerwise"], "normal_params": out_params["normal"]}
    model = make_model()
    result = {}
    if engine in ("single", "fsdp2"):
        if engine == "fsdp2":
            shard(model, world)
        opt = build(model, cfg)
        train(model, opt, batches(), local_loss, lo, hi)
        params = full_params(model)
        client = opt
        if engine == "fsdp2" and name in ("svd", "randomized_int8", "dct_int8_rotate"):
            def rebuild(seed):
                model = shard(make_model(seed), world)
                return model, build(model, cfg)

            result["resume_max_abs_diff"] = fsdp2_resume_diff(
                rebuild, list(batches()), 4, local_loss, lo, hi, f"{out}.ckpt-{name}", params)
    else:
        opt = build(model, cfg, per_parameter_groups=True)
        client, params = deepspeed_train(engine, model, opt, batches(), local_loss, GLOBAL_BATCH, lo, hi)
    ranks = [int(s["rank"]) for s in client.state.values() if "rank" in s]
    state_bytes, rank_sum = per_rank([optimizer_state_bytes(client), sum(ranks)], world)
    result.update(params=params, state_bytes=state_bytes, rank_sum=rank_sum)
    return result


if __name__ == "__main__":
    main(run, lambda engine: tuple(CONFIGS) + (tuple(LAYERWISE) if engine in ("single", "fsdp2") else ()))
