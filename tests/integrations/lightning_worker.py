"""Worker for test_lightning.py: a LightningModule whose ``configure_optimizers`` returns an optimlib
optimizer, trained by Lightning's ``Trainer``.

``python lightning_worker.py single OUT`` trains in one process; ``torchrun --nproc_per_node 2
lightning_worker.py ddp|fsdp2 OUT`` on 2 CPU ranks with Lightning's DDP strategy, or with its
``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``, data-parallel size 2).
Model: Linear(53->37) . Tanh . Linear(37->96) . LayerNorm . Linear(96->6) (odd, uneven shapes), a
global batch of 8, each rank on half of it (a ``DistributedSampler`` without shuffling, passed by
the worker: the one Lightning inserts shuffles), 12 steps.
Results, saved by rank 0: per optimizer the mean (over ranks) training loss of every step and the
final full parameters; the one-process run also trains each optimizer in a plain PyTorch loop
(``NAME/plain``), which Lightning must equal bit for bit.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lightning as L
import optimlib
from worker_common import finish, full_params

STEPS, GLOBAL_BATCH = 12, 8
LINEARS = ["net.0", "net.2", "net.4"]
# optimizer -> options of optimlib.create_optimizer
CASES = {
    "galore_adamw": {"lr": 3e-3, "weight_decay": 0.1, "rank": 8, "update_proj_gap": 3, "scale": 0.25,
                     "target_modules": LINEARS},
    "adamp": {"lr": 3e-3, "weight_decay": 0.1},
    "smmf": {"lr": 3e-3},
    "adamw": {"lr": 3e-3, "weight_decay": 0.1},  # the control: torch.optim.AdamW
}


class Net(L.LightningModule):
    def __init__(self, optimizer: str, fsdp2: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(53, 37), nn.Tanh(), nn.Linear(37, 96), nn.LayerNorm(96), nn.Linear(96, 6))
        self.optimizer, self.fsdp2, self.losses = optimizer, fsdp2, []

    def configure_model(self):
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return optimlib.create_optimizer(self, self.optimizer, **CASES[self.optimizer])


def loader(world: int) -> torch.utils.data.DataLoader:
    """The global batches in order; rank r takes samples r, r + world, ... of each."""
    g = torch.Generator().manual_seed(1)
    n = STEPS * GLOBAL_BATCH
    data = torch.utils.data.TensorDataset(torch.randn(n, 53, generator=g), torch.randn(n, 6, generator=g))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=int(os.environ.get("RANK", 0)),
                                                  shuffle=False)
    return torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def run(engine: str, optimizer: str, world: int) -> dict:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = {"single": "auto", "ddp": "ddp",
                "fsdp2": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)}[engine]
    module = Net(optimizer, fsdp2=engine == "fsdp2")
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(module, loader(world))
    losses = torch.stack(module.losses)
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
    return {"losses": losses.tolist(), "params": full_params(module)}


def plain_loop(optimizer: str) -> dict:
    """The same training without Lightning: forward, backward, step, zero_grad."""
    module = Net(optimizer)
    opt = module.configure_optimizers()
    losses = []
    for x, y in loader(1):
        loss = F.mse_loss(module.net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": full_params(module)}


def main() -> None:
    engine, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world = 1 if engine == "single" else 2
    results = {name: run(engine, name, world) for name in CASES}
    if engine == "single":
        results.update({f"{name}/plain": plain_loop(name) for name in CASES})
    finish(results, out)


if __name__ == "__main__":
    main()
