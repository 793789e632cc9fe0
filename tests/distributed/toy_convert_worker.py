"""Worker for tests/optim/test_toy_optimizer.py: the toy optimizer's one-process checkpoint resumed
under FSDP2 on 2 CPU ranks, and the FSDP2 checkpoint it writes.

``torchrun --nproc_per_node 2 toy_convert_worker.py DIR``: builds the toy's case model
(tests/toy_optimizer.py), shards it (``fully_shard`` on each linear, then the root), builds the toy
optimizer, loads the single-engine checkpoint ``DIR/single`` through
:func:`optimlib.train.reshard.load_converted`, takes the remaining steps, and writes the full
parameters (``DIR/fsdp2_params.pt``, rank 0) and an FSDP2 checkpoint (``DIR/fsdp2/dcp``,
``DIR/fsdp2/meta.pt``) as the FSDP2 engine lays it out.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toy_optimizer  # noqa: E402
from optimlib.distributed.teardown import exit_process, leave_process_group  # noqa: E402


class Engine:
    """What load_converted reads of an FSDP2 engine."""
    name = "fsdp2"

    def __init__(self, model, optimizer):
        self.model = self.module = model
        self.optimizer = optimizer
        self.world_size = dist.get_world_size()


def main(out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from optimlib import create_optimizer
    from optimlib.train import reshard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = toy_optimizer.case_model()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with toy_optimizer.registered():
        opt = create_optimizer(model, toy_optimizer.NAME, lr=1e-2, weight_decay=0.1)
        reshard.load_converted(Engine(model, opt), out / "single", {"engine": "single", "world_size": 1})
        for step in range(toy_optimizer.CASE_STEPS // 2, toy_optimizer.CASE_STEPS):
            toy_optimizer.set_case_grads(model, step, lambda p, g: distribute_tensor(g, mesh, p.placements))
            opt.step()
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(out / "fsdp2" / "dcp"))
    if dist.get_rank() == 0:
        torch.save(full, out / "fsdp2_params.pt")
        torch.save({"meta": {"step": toy_optimizer.CASE_STEPS}, "rng": torch.get_rng_state()}, out / "fsdp2" / "meta.pt")
    leave_process_group()


if __name__ == "__main__":
    main(Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]))
    exit_process(0)
