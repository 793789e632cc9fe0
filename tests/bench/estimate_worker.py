"""Worker for test_estimate.py: per-rank measured bytes under FSDP2 and DeepSpeed ZeRO on 2 CPU ranks,
and under FSDP2 x tensor parallelism on 4.

``torchrun --nproc_per_node 2 estimate_worker.py fsdp2|ds1|ds2|ds3 OUT.json [--models M1,M2]
[--randomized-basis] NAME...`` builds every model ``M`` (default ``llama_tiny``) for every
registered optimizer ``NAME``, wraps it the way ``launch/pretrain.py`` does (FSDP2:
``fully_shard`` on every block, then the root; DeepSpeed: ``deepspeed.initialize`` with the
optimizer as client, one parameter per group for shape-aware optimizers), runs one
forward/backward and one optimizer step on random tokens, and writes every rank's bytes to
``OUT.json`` as ``{model: {name: {"kwargs": ..., "ranks": [...]}}}`` (rank 0 writes).  Under FSDP2
each model is wrapped and differentiated once, and every optimizer steps those gradients (the
bytes do not depend on their values); DeepSpeed wraps model and optimizer together, so each
optimizer gets a fresh copy of the model (built once per model).

``fsdp2_tpN`` (e.g. ``fsdp2_tp2`` under ``--nproc_per_node 4``) builds the model as the launcher
does with ``parallel.tp=N``: a ``(world / N, N)`` mesh named ``("dp", "tp")``, the tensor-parallel
plan over ``mesh["tp"]`` (:func:`optimlib.models.tensor_parallel.apply_tensor_parallel`), then
``fully_shard`` over ``mesh["dp"]`` on every block and the root; the ``N`` ranks of one replica
read the same tokens.  Each rank also records ``activation_bytes``: what autograd saves during the
forward pass (distinct storages; the parameters FSDP2 gathers for the forward excluded).

Per rank:

* ``param_bytes``: the local parameters (FSDP2 shards, ZeRO-3 partitions);
* ``grad_bytes``: FSDP2 -- the sharded ``.grad`` DTensors after backward; DeepSpeed -- the
  gradients the client optimizer is handed at ``step()`` (the fp32 flat partitions of ZeRO-1/2,
  the per-parameter partitions of ZeRO-3; counted once per storage region by a step pre-hook);
* ``state_bytes``: ``optimlib.optimizer_state_bytes`` of the client optimizer after its step.

A model is a named config, or one with integer overrides: ``NAME:KEY=INT[:KEY=INT...]``
(``llama_tiny:hidden_dim=350``).

``--toy``: the toy optimizer of tests/toy_optimizer.py is registered for the run (name it among the
``NAME`` s).

``--randomized-basis``: low-rank methods use ``projection="randomized", power_iters=0`` (a basis
of the exact SVD's bytes at a fraction of its cost, as test_estimate.py does for 60M and 130M).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from optimlib.distributed.layout import to_local
from optimlib.distributed.teardown import exit_process, leave_process_group

SEQ, MICRO = 16, 2
CHEAP_BASIS = {"projection": "randomized", "power_iters": 0}
OWN_BASES = {"coap_adamw", "q_galore_adamw"}   # exact bases only (the bytes do not depend on the basis)


def cheap_basis(name: str, kwargs: dict) -> dict:
    """``kwargs`` with a randomized basis in place of the exact SVD where ``name`` offers one."""
    return {**kwargs, **CHEAP_BASIS} if "rank" in kwargs and name not in OWN_BASES else kwargs
BUCKET = 10 ** 7     # elements; DeepSpeed's default reduce bucket (5e8 fp32 = 2 GB per rank) would not fit here


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.randint(0, 320, (MICRO, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def model_spec(text: str) -> tuple[str, dict]:
    """``(named config, overrides)`` of a model given as ``NAME`` or ``NAME:KEY=INT[:KEY=INT...]``
    (``llama_tiny:hidden_dim=350``); the optimizer settings are the named config's."""
    base, *pairs = text.split(":")
    return base, {key: int(value) for key, value in (pair.split("=") for pair in pairs)}


def tp_degree(engine: str) -> int:
    """The tensor-parallel degree of an ``fsdp2_tpN`` engine (1 for the others)."""
    return int(engine[len("fsdp2_tp"):]) if engine.startswith("fsdp2_tp") else 1


_MESHES: dict = {}


def meshes(world: int, tp: int):
    """``(mesh FSDP2 shards over, tensor-parallel mesh or None)``, built once per process."""
    from torch.distributed.device_mesh import init_device_mesh

    if tp not in _MESHES:
        if tp > 1:
            mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
            _MESHES[tp] = (mesh["dp"], mesh["tp"])
        else:
            _MESHES[tp] = (init_device_mesh("cpu", (world,)), None)
    return _MESHES[tp]


def saved_forward_bytes(model, forward):
    """``forward()``'s result and the bytes autograd saves for backward while it runs (distinct
    storages).  A saved tensor that shares storage with one of the model's parameters at the time it
    is saved is a parameter: FSDP2 swaps the gathered parameters in for the forward."""
    sizes: dict = {}

    def pack(t):
        local = to_local(t)
        key = local.untyped_storage().data_ptr()
        if key not in {to_local(p).untyped_storage().data_ptr() for p in model.parameters()}:
            sizes[key] = max(sizes.get(key, 0), local.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(sizes.values())


_FSDP2_MODEL: dict = {}
_BUILT: dict = {}


def fresh_copy(model_name: str, build):
    """A new copy of the model ``model_name`` (``build()`` runs once per model: a copy takes a
    fifth of the time of LLaMA-130M's initialization)."""
    import copy

    if model_name not in _BUILT:
        _BUILT.clear()
        _BUILT[model_name] = build()
    return copy.deepcopy(_BUILT[model_name])


def fsdp2_model(engine: str, model_name: str, build, x, y):
    """``(model, {"grad_bytes", ["activation_bytes"]})``: the model ``model_name`` (``build()``)
    wrapped as the launcher wraps it and back-propagated once, or the one already wrapped for
    ``model_name``: every optimizer then steps the same gradients, whose values the bytes do
    not depend on (the model is built, sharded and differentiated once per model, not per optimizer)."""
    from optimlib.bench.accounting import grad_bytes

    key = (engine, model_name)
    if key not in _FSDP2_MODEL:
        from torch.distributed.fsdp import fully_shard

        _FSDP2_MODEL.clear()
        model, measured = build(), {}
        mesh, tp_mesh = meshes(dist.get_world_size(), tp_degree(engine))
        if tp_mesh is not None:
            from optimlib.models.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, tp_mesh)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if tp_mesh is not None:
            loss, measured["activation_bytes"] = saved_forward_bytes(model, lambda: loss_of(model, x, y))
        else:
            loss = loss_of(model, x, y)
        loss.backward()
        measured["grad_bytes"] = grad_bytes(model)
        _FSDP2_MODEL[key] = (model, measured)
    model, measured = _FSDP2_MODEL[key]
    return model, dict(measured)


def client(opt):
    while type(opt).__module__.startswith("deepspeed") and getattr(opt, "optimizer", None) not in (None, opt):
        opt = opt.optimizer
    return opt


def count_step_grads(opt, seen: dict) -> None:
    """Record the bytes of every gradient ``opt`` is handed at each ``step()`` (ZeRO-3 calls it
    once per sub-group); a region counted once however often it is seen."""
    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad
                    seen[(g.untyped_storage().data_ptr(), g.storage_offset(), g.numel())] = g.numel() * g.element_size()

    opt.register_step_pre_hook(hook)


def measure(engine: str, model_name: str, name: str, randomized_basis: bool) -> dict:
    from optimlib.bench.accounting import param_bytes, state_bytes
    from optimlib.bench.contenders import optimizer_kwargs
    from optimlib.models import build_model
    from optimlib.optim import create_optimizer, get_optimizer_spec, optimizer_state_bytes

    rank, world = dist.get_rank(), dist.get_world_size()
    base, overrides = model_spec(model_name)

    def build():
        torch.manual_seed(0)
        return build_model(base, **overrides)

    kwargs = optimizer_kwargs(name, base)
    if randomized_basis:
        kwargs = cheap_basis(name, kwargs)
    tp = tp_degree(engine)
    x, y = batch(rank // tp)
    out = {}
    if engine.startswith("fsdp2"):
        model, measured = fsdp2_model(engine, model_name, build, x, y)
        out.update(measured)
        opt = create_optimizer(model, name, lr=1e-3, **kwargs)
        opt.step()
        out["param_bytes"] = param_bytes(model)
        inner = opt
    else:
        import deepspeed

        stage = int(engine[2:])
        model = fresh_copy(model_name, build)
        opt = create_optimizer(model, name, lr=1e-3, per_parameter_groups=get_optimizer_spec(name).shape_aware,
                               **kwargs)
        config = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
                  "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET},
                  "steps_per_print": 10 ** 9}
        ds, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
        inner = client(ds_opt)
        seen: dict = {}
        count_step_grads(inner, seen)
        ds.backward(loss_of(ds, x, y))
        ds.step()
        out["param_bytes"] = param_bytes(ds.module)
        out["grad_bytes"] = sum(seen.values())
        ds.destroy()        # drops DeepSpeed's hooks and buffers; without it every measurement stays alive
    out["state_bytes"] = optimizer_state_bytes(inner)
    out["state_storage_bytes"] = state_bytes(inner).storage_bytes
    every = [None] * world
    dist.all_gather_object(every, out)
    return {"kwargs": kwargs, "ranks": every}


def main(engine: str, path: str, models: list[str], names: list[str], randomized_basis: bool) -> None:
    if engine.startswith("ds"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results: dict = {}
    for m in models:
        for name in names:
            tic = time.perf_counter()
            results.setdefault(m, {})[name] = measure(engine, m, name, randomized_basis)
            gc.collect()
            if dist.get_rank() == 0:
                print(f"{engine} {m} {name}: {time.perf_counter() - tic:.1f} s", flush=True)
    if dist.get_rank() == 0:
        with open(path, "w") as fh:
            json.dump(results, fh)
    leave_process_group()


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    models = ["llama_tiny"]
    if "--models" in argv:
        i = argv.index("--models")
        models = argv[i + 1].split(",")
        del argv[i:i + 2]
    cheap = "--randomized-basis" in argv
    toy = "--toy" in argv
    argv = [a for a in argv if a not in ("--randomized-basis", "--toy")]
    if toy:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import toy_optimizer

        with toy_optimizer.registered():
            main(argv[0], argv[1], models, argv[2:], cheap)
    else:
        main(argv[0], argv[1], models, argv[2:], cheap)
    exit_process(0)
