"""Worker for test_adamp_smmf_distributed.py: AdamP, SGDP, SMMF, GaLore-SMMF and GaLore-AdamP on
uneven shapes.

``python worker.py single OUT`` trains in one process; ``torchrun --nproc_per_node 2 worker.py
fsdp2 OUT`` shards every parameter with FSDP2 ``fully_shard`` (``Shard(0)``, uneven rows);
``torchrun ... worker.py ds1|ds2|ds3 OUT`` runs DeepSpeed ZeRO-1/2/3 with one parameter per
param group (flat partitions that start and end mid-row).  All runs see the same global batches
in fp32 and write the final full parameters and every rank's optimizer-state bytes to ``OUT``.
The FSDP2 run also checks exact resume: 5 steps, a ``torch.distributed.checkpoint`` save, a fresh
model and optimizer, a load and 5 more steps must give the uninterrupted run's parameters.

The model has 2-D weights of 37x53, 53x96 and 96x37 elements, biases of 96 and 37 (prime: SMMF
pads it) elements and a 4-D conv weight (7x3x3x3).  ``l1`` is followed by a LayerNorm (scale-
invariant as a whole: AdamP/SGDP take the layer-view projection) and ``conv`` by a per-channel
GroupNorm (each output channel is scale-invariant: the channel-view projection); the other
weights are not scale-invariant.  ``adamw`` (torch.optim.AdamW) is a control: its error shows
how much of the difference the data-parallel gradient averaging alone makes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parity_common import deepspeed_train, fsdp2_resume_diff, full_params, main, per_rank, rank_slice, train

STEPS = 10
GLOBAL_BATCH = 8

# name -> (registry name, constructor kwargs)
OPTIMIZERS = {
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=1e-2)),
    "adamp": ("adamp", dict(lr=1e-2, weight_decay=1e-2, nesterov=True)),
    "sgdp": ("sgdp", dict(lr=5e-2, momentum=0.9, weight_decay=1e-3)),
    "smmf": ("smmf", dict(lr=1e-2, weight_decay=1e-2, decay_rate=-0.8)),
    # GaLore with SMMF's factors / AdamP's rule inside the projected space (the three linears are
    # projected; the conv and the biases take the inner rule's full step).  Rank 3: the (53, 3)
    # low-rank moments of l1 are prime-lopsided (159 elements), so SMMF pads them to a 14 x 12
    # matrix whose rank pieces start mid-row.  DCT bases are refreshed every 3 steps and the
    # moments rotated into the new basis (rotate = decompress, rotate, re-factorize).
    "galore_smmf": ("galore_smmf", dict(lr=1e-2, weight_decay=1e-2, decay_rate=-0.8, eps=1e-8, rank=3,
                                        update_proj_gap=3, scale=0.5, projection="dct", on_refresh="rotate",
                                        target_modules=["l1", "l2", "l3"])),
    "galore_adamp": ("galore_adamp", dict(lr=1e-2, weight_decay=1e-2, eps=1e-8, nesterov=True, rank=5,
                                          update_proj_gap=4, scale=0.5, projection="random",
                                          target_modules=["l1", "l2", "l3"])),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(37, 53, bias=False)           # (53, 37): followed by a norm
        self.norm = nn.LayerNorm(53, elementwise_affine=False)
        self.l2 = nn.Linear(53, 96)                       # (96, 53) + bias 96
        self.l3 = nn.Linear(96, 37)                       # (37, 96) + bias 37 (prime)
        self.conv = nn.Conv2d(3, 7, 3, bias=False)       # (7, 3, 3, 3): followed by a per-channel norm
        self.cnorm = nn.GroupNorm(7, 7, affine=False)

    def forward(self, x, img):
        h = torch.tanh(self.l2(self.norm(self.l1(x))))
        return self.l3(h), torch.tanh(self.cnorm(self.conv(img)) + 0.5).mean(dim=(2, 3))


def batches():
    g = torch.Generator().manual_seed(1234)
    t1 = torch.randn(37, generator=g)
    t2 = torch.randn(7, generator=g)
    for _ in range(STEPS):
        yield torch.randn(GLOBAL_BATCH, 37, generator=g), torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g), t1, t2


def loss_fn(model, x, img, t1, t2):
    y, c = model(x, img)
    return F.mse_loss(y, t1.expand_as(y)) + F.mse_loss(c, t2.expand_as(c))


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def local_loss(model, batch, lo, hi):
    x, img, t1, t2 = batch
    return loss_fn(model, x[lo:hi], img[lo:hi], t1, t2)


def shard(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def _replicated_bytes(opt) -> int:
    """Bytes of state every rank holds in full (step counters, SMMF's column factors, DCT indices)."""
    from optimlib.distributed.layout import to_local

    return sum(to_local(v).numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if k in ("step", "exp_avg_col", "exp_avg_sq_col", "indices") and isinstance(v, torch.Tensor))


def run(engine: str, name: str, out: str) -> dict:
    from optimlib.optim import create_optimizer, optimizer_state_bytes

    opt_name, kwargs = OPTIMIZERS[name]
    kwargs = dict(kwargs)
    lr, wd = kwargs.pop("lr"), kwargs.pop("weight_decay")
    model = make_model()
    world, lo, hi = rank_slice(GLOBAL_BATCH)
    result = {}

    if engine in ("single", "fsdp2"):
        if engine == "fsdp2":
            shard(model, world)
        opt = create_optimizer(model, opt_name, lr=lr, weight_decay=wd, **kwargs)
        train(model, opt, batches(), local_loss, lo, hi)
        params = full_params(model)
        client = opt
        if engine == "fsdp2":
            def build(seed):
                model = shard(make_model(seed), world)
                return model, create_optimizer(model, opt_name, lr=lr, weight_decay=wd, **kwargs)

            result["resume_max_abs_diff"] = fsdp2_resume_diff(
                build, list(batches()), 5, local_loss, lo, hi, f"{out}.ckpt-{name}", params)
    else:
        opt = create_optimizer(model, opt_name, lr=lr, weight_decay=wd, per_parameter_groups=True, **kwargs)
        client, params = deepspeed_train(engine, model, opt, batches(), local_loss, GLOBAL_BATCH, lo, hi)
    state_bytes, replicated_bytes = per_rank([optimizer_state_bytes(client), _replicated_bytes(client)], world)
    result.update(params=params, state_bytes=state_bytes, replicated_bytes=replicated_bytes)
    return result


if __name__ == "__main__":
    main(run, lambda engine: tuple(OPTIMIZERS))
