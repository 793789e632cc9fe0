"""Worker for test_estimate.py: per-rank measured bytes under FSDP2 and DeepSpeed ZeRO on 2 CPU ranks.

``torchrun --nproc_per_node 2 estimate_worker.py fsdp2|ds1|ds2|ds3 OUT.json NAME...`` builds
``llama_tiny`` for every registered optimizer ``NAME``, wraps it the way ``launch/pretrain.py``
does (FSDP2: ``fully_shard`` on every block, then the root; DeepSpeed: ``deepspeed.initialize``
with the optimizer as client, one parameter per group for shape-aware optimizers), runs one
forward/backward and one optimizer step on random tokens, and writes every rank's parameter,
gradient (FSDP2) and optimizer-state bytes to ``OUT.json`` (rank 0 writes).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from optimlib.distributed.teardown import exit_process, leave_process_group

MODEL = "llama_tiny"
SEQ, MICRO = 16, 2


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.randint(0, 320, (MICRO, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def client(opt):
    while type(opt).__module__.startswith("deepspeed") and getattr(opt, "optimizer", None) not in (None, opt):
        opt = opt.optimizer
    return opt


def measure(engine: str, name: str) -> dict:
    from optimlib.bench.accounting import grad_bytes, param_bytes, state_bytes
    from optimlib.bench.contenders import optimizer_kwargs
    from optimlib.models import build_model
    from optimlib.optim import create_optimizer, get_optimizer_spec, optimizer_state_bytes

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(MODEL)
    kwargs = optimizer_kwargs(name, MODEL)
    x, y = batch(rank)
    out = {}
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = create_optimizer(model, name, lr=1e-3, **kwargs)
        loss_of(model, x, y).backward()
        out["grad_bytes"] = grad_bytes(model)
        opt.step()
        out["param_bytes"] = param_bytes(model)
        inner = opt
    else:
        import deepspeed

        stage = int(engine[2:])
        opt = create_optimizer(model, name, lr=1e-3, per_parameter_groups=get_optimizer_spec(name).shape_aware,
                               **kwargs)
        config = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
                  "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
        ds, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
        ds.backward(loss_of(ds, x, y))
        ds.step()
        out["param_bytes"] = param_bytes(ds.module)
        inner = client(ds_opt)
    out["state_bytes"] = optimizer_state_bytes(inner)
    out["state_storage_bytes"] = state_bytes(inner).storage_bytes
    every = [None] * world
    dist.all_gather_object(every, out)
    return {"kwargs": kwargs, "ranks": every}


def main(engine: str, path: str, names: list[str]) -> None:
    if engine.startswith("ds"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {name: measure(engine, name) for name in names}
    if dist.get_rank() == 0:
        with open(path, "w") as fh:
            json.dump(results, fh)
    leave_process_group()


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(argv[0], argv[1], argv[2:])
    exit_process(0)
