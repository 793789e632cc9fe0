"""Worker for test_pretrain_tensor_parallel.py: the launcher's runs, several in one process.

``python tp_launcher_sweep.py ROOT [NAME...]`` (one process) and ``torchrun --nproc_per_node 4
tp_launcher_sweep.py ROOT [NAME...]`` (``parallel.tp=2``: a (dp=2, tp=2) mesh) run, for each
``NAME`` of :data:`RUNS` (default: all), what ``launch/pretrain.py`` runs for the overrides
``COMMON + RUNS[NAME] + out_dir=ROOT/NAME`` -- the same ``pretrain`` (config, loop, engine,
tensor-parallel plan, checkpoints) -- one after the other in one process, so that the imports and
the process group are paid once.  Between runs the ranks keep the process group (the engine's
``close()`` is a barrier here); each run builds its own device mesh.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TINY_RUN  # noqa: E402
from optimlib.distributed.teardown import exit_process, leave_process_group  # noqa: E402
from optimlib.train.config import load_config  # noqa: E402
from optimlib.train.loop import pretrain  # noqa: E402

# 4 steps and one evaluation, at the end (GaLore's refreshes at steps 1 and 3, dynamic rank's
# truncations at 2 and 4); the layer-wise run keeps TINY_RUN's 6 steps for the resume test
COMMON = [*TINY_RUN, "train.grad_clip=0.5", "train.steps=4", "train.eval_every=0"]
LOW_RANK = "optim.kwargs={rank: 8, update_proj_gap: 2}"
RUNS = {
    "adamw": ["optim.name=adamw"],
    "adamp": ["optim.name=adamp"],
    "sgdp": ["optim.name=sgdp", "optim.kwargs={momentum: 0.9}"],
    "smmf": ["optim.name=smmf"],
    **{name: [f"optim.name={name}", LOW_RANK] for name in (
        "galore_adamw", "galore_adamp", "galore_smmf", "fira_adamw", "apollo_adamw", "coap_adamw", "q_galore_adamw")},
    "apollo_mini": ["optim.name=apollo_mini", "optim.kwargs={update_proj_gap: 2}"],
    # GaLore stepped in backward: each parameter steps in its gradient hook, the norm summed block
    # by block; its step-3 checkpoint is the resume test's
    "galore_adamw_layerwise": ["optim.name=galore_adamw", "optim.kwargs={rank: 4, update_proj_gap: 2}",
                               "train.layerwise=true", "train.grad_clip=0", "train.steps=6", "train.eval_every=3",
                               "train.checkpoint_every=3"],
    # reparameterizations, AdamW: N:M and the compander on the tensor-parallel linears (after the
    # plan); SLTrain, low-rank, LOST and dynamic-rank layers distributed by the plan
    "nm_srste": ["reparam.method=nm", "reparam.options={n: 2, m: 4, recipe: srste, srste_lambda: 0.01}"],
    "compander": ["reparam.method=compander"],
    "sltrain": ["reparam.method=sltrain", "reparam.options={rank: 8, density: 0.05}"],
    "lowrank": ["reparam.method=lowrank", "reparam.options={rank: 8}"],
    "lost": ["reparam.method=lost", "reparam.options={rank: 8, density: 0.05}"],
    # the factors replicated (a second optimizer), the rank truncated every 2 steps
    "dynamic_rank": ["reparam.method=dynamic_rank", "reparam.options={rank: 8, interval: 2, tol: 0.5}"],
}


def overrides(name: str, out_dir: Path, tp: int) -> list[str]:
    """The command line of run ``name``: ``launch/pretrain.py`` with these overrides."""
    return [*COMMON, *RUNS[name], f"out_dir={out_dir}", *([f"parallel.tp={tp}"] if tp > 1 else [])]


def main(root: Path, names: list[str]) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    with mock.patch("optimlib.train.engine.leave_process_group", dist.barrier if distributed else lambda: None):
        for name in names:
            pretrain(load_config(None, overrides(name, root / name, 2 if distributed else 1)))
    leave_process_group()


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(Path(argv[0]), argv[1:] or list(RUNS))
    exit_process(0)
