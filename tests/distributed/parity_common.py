"""What the parity workers (``adamp_smmf_parity_worker.py``, ``galore_parity_worker.py``) share.

A worker is run as a script (``python WORKER single OUT`` or ``torchrun ... WORKER ENGINE OUT``),
so this module is imported from the script's own folder.  Engines: ``single`` (one process),
``fsdp2`` (FSDP2 ``fully_shard`` on 2 CPU ranks) and ``ds1|ds2|ds3`` (DeepSpeed ZeRO-1/2/3).  Each
rank trains on its slice ``[lo, hi)`` of every global batch; a ``loss(model, batch, lo, hi)``
callable gives the loss of that slice.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from optimlib.distributed.teardown import exit_process, leave_process_group
from optimlib.train.engine import unwrap_optimizer


def rank_slice(global_batch: int) -> tuple[int, int, int]:
    """(world size, lo, hi): this rank's share of a global batch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per = global_batch // world
    return world, rank * per, (rank + 1) * per


def full_params(model) -> dict:
    """Every parameter in full (FSDP2 DTensors gathered), detached copies."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def train(model, opt, data, loss, lo, hi) -> None:
    """One optimizer step per batch of ``data`` on the slice ``[lo, hi)``."""
    for batch in data:
        loss(model, batch, lo, hi).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def fsdp2_resume_diff(build, data, split, loss, lo, hi, ckpt_dir, reference) -> float:
    """Train ``data[:split]``, save with torch.distributed.checkpoint, rebuild from another seed,
    load, train ``data[split:]``; returns the max |diff| to the uninterrupted run's ``reference``
    parameters.  ``build(seed)`` returns a fresh FSDP2-sharded (model, optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = build(0)
    train(model, opt, data[:split], loss, lo, hi)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    model, opt = build(99)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(model, opt, data[split:], loss, lo, hi)
    return max((p.full_tensor() - reference[n]).abs().max().item() for n, p in model.named_parameters())


def deepspeed_train(engine: str, model, opt, data, loss, global_batch: int, lo: int, hi: int):
    """Train under DeepSpeed ZeRO stage ``int(engine[2:])`` (fp32, clipping off, no accumulation);
    returns (the client optimizer inside the ZeRO wrapper, the full parameters)."""
    import deepspeed

    cfg = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": hi - lo,
           "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": int(engine[2:])},
           "steps_per_print": 10 ** 9}
    ds, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    for batch in data:
        ds.backward(loss(ds, batch, lo, hi))
        ds.step()
    params = {}
    for n, p in ds.module.named_parameters():
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                params[n] = p.detach().clone()
        else:
            params[n] = p.detach().clone()
    return unwrap_optimizer(ds_opt), params


def per_rank(values: list[int], world: int) -> list[list[int]]:
    """``values`` of every rank (all-gathered), one list per column: ``[[v0 of rank 0, ...], ...]``."""
    row = torch.tensor(values, dtype=torch.int64)
    if world > 1:
        every = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(every, row)
        table = torch.stack(every)
    else:
        table = row[None]
    return table.T.tolist()


def main(run, default_names) -> None:
    """Command line ``ENGINE OUT [NAME...]``: join the process group ``ENGINE`` needs, call
    ``run(engine, name, out)`` per name (``default_names(engine)`` when none is given), save the
    results dict to ``OUT`` from rank 0, leave the group and exit."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    engine, out = argv[0], argv[1]
    names = tuple(argv[2:]) or default_names(engine)
    if engine != "single":
        if engine.startswith("ds"):
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {name: run(engine, name, out) for name in names}
    if engine == "single" or dist.get_rank() == 0:
        torch.save(results, out)
    leave_process_group()
    exit_process(0)
