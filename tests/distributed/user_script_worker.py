"""Worker for test_user_scripts.py: optimlib's optimizers as a user builds them, in their own script.

The optimizer is built the way a user swapping it into an existing script builds it -- over
``model.parameters()``, galore-torch's ``[rest, matrices]`` groups, per-parameter groups without
names, or the factory's groups with ``names``/``shapes`` -- and handed to plain
``deepspeed.initialize`` (ZeRO-1/2/3, fp32, clipping off) or used after FSDP2 ``fully_shard``.
So DeepSpeed hands it flat partitions that span several parameters and start and end mid-row.

``python worker.py single OUT`` trains in one process; ``torchrun --nproc_per_node 2 worker.py
ds1|ds2|ds3|fsdp2 OUT`` on 2 CPU ranks, each rank on its half of the global batch.  Model:
Linear(53->37) . Tanh . Linear(37->96) . LayerNorm . Linear(96->6), 12 steps.  Results: the final
full parameters of every case, every rank's optimizer-state bytes, and under ds2/ds3 the largest
difference between a run resumed from a DeepSpeed checkpoint after 6 steps and the uninterrupted run.

Other setups, run as engines of their own: DeepSpeed bf16, gradient accumulation, ``zero.Init``
and ZeRO-3 sub-groups (:data:`VARIANTS`), and FSDP2 without resharding after the forward
(:data:`FSDP2_VARIANTS`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import optimlib
from optimlib.optim.galore import ApolloAdamW, COAPAdamW, FiraAdamW
from optimlib.optim.factory import optimizer_state_bytes
from parity_common import full_params, main, per_rank, rank_slice

STEPS, SPLIT, GLOBAL_BATCH = 12, 6, 8


def _split(model):
    """galore-torch's convention: the matrices, and the rest (under ``deepspeed.zero.Init`` a
    parameter's shape is its ``ds_shape``)."""
    matrix = [len(getattr(p, "ds_shape", p.shape)) == 2 for p in model.parameters()]
    return ([p for p, m in zip(model.parameters(), matrix) if not m],
            [p for p, m in zip(model.parameters(), matrix) if m])


GALORE_MATRIX = {"rank": 8, "update_proj_gap": 3, "scale": 0.25}


def _galore(inner):
    def build(model):
        rest, mats = _split(model)
        return optimlib.GaLoreAdamW([{"params": rest}, {"params": mats, **GALORE_MATRIX}], lr=3e-3, inner=inner)
    return build


def _galore_per_param(model):
    rest, mats = _split(model)
    return optimlib.GaLoreAdamW([{"params": [p]} for p in rest] + [{"params": [p], **GALORE_MATRIX} for p in mats],
                                lr=3e-3)


def _member(cls, **kwargs):
    """A GaLore-family optimizer over galore-torch's ``[rest, matrices]`` groups."""
    def build(model):
        rest, mats = _split(model)
        return cls([{"params": rest}, {"params": mats, **GALORE_MATRIX}], lr=3e-3, **kwargs)
    return build


# name -> how the user builds the optimizer over the model
CASES = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01),
    "smmf": lambda m: optimlib.SMMF(m.parameters(), lr=3e-3),
    "adamp": lambda m: optimlib.AdamP(m.parameters(), lr=3e-3, weight_decay=0.01),
    "adamp_named": lambda m: optimlib.AdamP(m.named_parameters(), lr=3e-3, weight_decay=0.01, nesterov=True),
    "adamp_per_param": lambda m: optimlib.AdamP([{"params": [p]} for p in m.parameters()], lr=3e-3,
                                                weight_decay=0.01),
    "sgdp": lambda m: optimlib.SGDP(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "galore_adamw": _galore("adamw"),
    "galore_adamp": _galore("adamp"),
    "galore_smmf": _galore("smmf"),
    "galore_per_param": _galore_per_param,
    "smmf_factory": lambda m: optimlib.create_optimizer(m, "smmf", lr=3e-3, weight_decay=0.01),
    "galore_factory": lambda m: optimlib.create_optimizer(m, "galore_adamw", lr=3e-3, rank=4, update_proj_gap=4,
                                                          projection="random", target_modules=["0", "2", "4"]),
    "fira_adamw": _member(FiraAdamW),
    "apollo_adamw": _member(ApolloAdamW, weight_decay=0.01),
    "apollo_mini": lambda m: optimlib.create_optimizer(m, "apollo_mini", lr=3e-3, update_proj_gap=4,
                                                       target_modules=["0", "2", "4"]),
    "coap_adamw": _member(COAPAdamW, reproject_factor=2),
    "q_galore_adamw": lambda m: optimlib.create_optimizer(m, "q_galore_adamw", lr=3e-3, rank=4, update_proj_gap=2,
                                                          proj_group_size=16, cos_threshold=-1.0, queue_size=1,
                                                          target_modules=["0", "2", "4"]),
}

# DeepSpeed setups beside the plain fp32 one: name -> (engine, config changes, cases).  Under bf16
# (fp32 master weights) a case is compared with its per-parameter-group twin in the same setup.
VARIANTS = {
    "ds2_bf16": ("ds2", {"bf16": {"enabled": True}},
                 ("adamp", "adamp_per_param", "galore_adamw", "galore_per_param")),
    "ds2_accum": ("ds2", {"gradient_accumulation_steps": 2}, ("adamp", "galore_smmf")),
    "ds3_init": ("ds3", {}, ("adamp", "galore_adamw")),
    "ds2_offload": ("ds2", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                            "zero_force_ds_cpu_optimizer": False},
                    ("adamp", "galore_smmf")),
    "ds3_offload": ("ds3", {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                  "offload_param": {"device": "cpu"}},
                            "zero_force_ds_cpu_optimizer": False}, ("adamp", "galore_smmf")),
    "ds3_subgroups": ("ds3", {"zero_optimization": {"stage": 3, "sub_group_size": 1000}}, ("adamp_named",)),
}
FSDP2_VARIANTS = {"fsdp2_keep_unsharded": ("adamp", "smmf", "galore_adamw")}  # reshard_after_forward=False


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(53, 37), nn.Tanh(), nn.Linear(37, 96), nn.LayerNorm(96), nn.Linear(96, 6))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 53, generator=g), torch.randn(GLOBAL_BATCH, 6, generator=g))
            for _ in range(STEPS)]


def loss_of(model, batch, lo, hi):
    x, y = batch
    return F.mse_loss(model(x[lo:hi]), y[lo:hi])


def ds_config(micro: int, changes: dict, stage: int) -> dict:
    cfg = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
    cfg.update(changes)
    cfg["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // dist.get_world_size() // cfg["gradient_accumulation_steps"]
    return cfg


def ds_run(name: str, stage: int, data, lo: int, hi: int, changes: dict | None = None, *,
           zero_init: bool = False, load: str | None = None, save: str | None = None):
    """Train ``data`` under DeepSpeed; returns (engine, client optimizer)."""
    import deepspeed

    cfg = ds_config(hi - lo, changes or {}, stage)
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = build_model()
    else:
        model = build_model()
    opt = CASES[name](model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    if load:
        engine.load_checkpoint(load)
    accum = cfg["gradient_accumulation_steps"]
    dtype = torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else torch.float32
    for x, y in data:
        x, y = x.to(engine.device, dtype), y.to(engine.device, dtype)
        per = (hi - lo) // accum
        for k in range(accum):
            a = lo + k * per
            engine.backward(loss_of(engine, (x, y), a, a + per))
            engine.step()
    if save:
        engine.save_checkpoint(save)
    return engine, opt


def ds_params(engine) -> dict:
    import deepspeed

    out = {}
    for n, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[n] = p.detach().float().clone()
    return out


def _state(opt, world) -> list[int]:
    return per_rank([optimizer_state_bytes(opt)], world)[0]


def run(engine: str, name: str, out: str) -> dict:
    world, lo, hi = rank_slice(GLOBAL_BATCH)
    data = batches()
    if engine in VARIANTS:
        base, changes, _ = VARIANTS[engine]
        try:
            ds, opt = ds_run(name, int(base[2]), data, lo, hi, changes, zero_init=engine == "ds3_init")
        except ValueError as err:  # a layout the optimizer refuses
            return {"error": str(err)}
        return {"params": ds_params(ds)}
    if engine == "single":
        model = build_model()
        opt = CASES[name](model)
        for batch in data:
            loss_of(model, batch, lo, hi).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"params": full_params(model), "state_bytes": [optimizer_state_bytes(opt)]}
    if engine.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        model = build_model()
        reshard = engine not in FSDP2_VARIANTS
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        opt = CASES[name](model)
        for batch in data:
            loss_of(model, batch, lo, hi).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"params": full_params(model), "state_bytes": _state(opt, world)}
    stage = int(engine[2:])
    ds, opt = ds_run(name, stage, data, lo, hi)
    result = {"params": ds_params(ds), "state_bytes": _state(opt, world)}
    if stage >= 2:  # resume from a checkpoint after SPLIT steps: exact
        ckpt = os.path.join(os.path.dirname(out), f"{engine}_{name}_ckpt")
        ds_run(name, stage, data[:SPLIT], lo, hi, save=ckpt)
        resumed, _ = ds_run(name, stage, data[SPLIT:], lo, hi, load=ckpt)
        got = ds_params(resumed)
        result["resume_max_abs_diff"] = max((got[n] - p).abs().max().item() for n, p in result["params"].items())
    return result


def default_names(engine: str):
    if engine in VARIANTS:
        return VARIANTS[engine][2]
    return FSDP2_VARIANTS.get(engine, tuple(CASES))


if __name__ == "__main__":
    main(run, default_names)
