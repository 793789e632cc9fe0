"""``torchrun --nproc_per_node 4 launch/pretrain.py ... parallel.tp=2`` matches one process.

The launcher's (dp=2, tp=2) mesh: the LLaMA blocks' q/k/v/gate/up column-wise and o/down
row-wise over tp, FSDP2 over dp (optimlib/models/tensor_parallel.py).  Same global batches, fp32,
gradient clipping on.  Tolerance: 2e-5 relative on every step's loss and the final eval loss;
observed AdamW 9e-8 (GaLore AdamW 5e-8 and SMMF 1.9e-7, run once the same way); GaLore AdamW
stepped in backward (``train.layerwise=true``), N:M SR-STE on the tensor-parallel linears
(``reparam.method=nm``), SLTrain layers distributed by the plan (``reparam.method=sltrain``:
losses 8.6e-8, gradient norms 1.0e-6) and dynamic-rank layers, whose replicated factors shrink
from rank 8 to 6 and 4 on the way (``reparam.method=dynamic_rank``: losses 5.7e-8, gradient norms
1.4e-6), within the same tolerance; the logged gradient norms too.  The
tensor-parallel run's own step-3 checkpoint resumes bit-exactly (GaLore AdamW in backward: bases,
low-rank moments, a refresh every 2 steps).  AdamP, SGDP, SMMF and the rest of the GaLore family on a 2-D
mesh: test_tensor_parallel.py; config errors and checkpoint refusals need no launch
(tests/test_tensor_parallel_config.py).
"""

import json
import shutil
from pathlib import Path

import pytest

from conftest import PRETRAIN, TINY_RUN, launch, read_metrics, train_losses
from optimlib.train import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 2e-5
COMMON = [*TINY_RUN, "train.grad_clip=0.5", "train.checkpoint_every=3"]
OPTIMIZERS = {
    "adamw": ["optim.name=adamw"],
    # GaLore stepped in backward: each parameter steps in its gradient hook, the norm summed block by block
    "galore_adamw_layerwise": ["optim.name=galore_adamw", "optim.kwargs={rank: 4, update_proj_gap: 2}",
                               "train.layerwise=true", "train.grad_clip=0"],
    # N:M on the tensor-parallel linears (applied after the plan, before FSDP2), AdamW
    "nm_srste": ["reparam.method=nm", "reparam.options={n: 2, m: 4, recipe: srste, srste_lambda: 0.01}"],
    # SLTrain layers (applied before the plan, which distributes them), AdamW
    "sltrain": ["reparam.method=sltrain", "reparam.options={rank: 8, density: 0.05}"],
    # dynamic rank: the factors replicated (a second optimizer), the rank truncated every 2 steps
    "dynamic_rank": ["reparam.method=dynamic_rank", "reparam.options={rank: 8, interval: 2, tol: 0.5}"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name, tp)``: the run directory of optimizer ``name`` in one process (tp=1) or on 4
    ranks with parallel.tp=2, launched once."""
    done = {}

    def get(name: str, tp: int) -> Path:
        if (name, tp) not in done:
            out = tmp_path_factory.mktemp(f"{name}_tp{tp}")
            args = [*COMMON, *OPTIMIZERS[name], f"out_dir={out}"]
            if tp == 1:
                launch(PRETRAIN, args, launcher="python")
            else:
                launch(PRETRAIN, [*args, f"parallel.tp={tp}"], launcher="torchrun", nproc=4, timeout=600)
            done[name, tp] = out
        return done[name, tp]
    return get


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tp2_on_four_ranks_matches_one_process(runs, name):
    single, tp = runs(name, 1), runs(name, 2)
    ref, got = train_losses(single), train_losses(tp)
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), (name, step, ref[step], got[step])
    norms = [{r["step"]: r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r} for run in (single, tp)]
    assert sorted(norms[0]) == sorted(norms[1]) == list(range(1, 7))
    for step, norm in norms[0].items():   # each element counted once, whatever holds copies of it
        assert norms[1][step] == pytest.approx(norm, rel=RTOL), (name, step, norm, norms[1][step])
    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((tp / "summary.json").read_text())
    assert (s2["engine"], s2["world_size"]) == ("fsdp2", 4)
    assert s2["final_eval_loss"] == pytest.approx(s1["final_eval_loss"], rel=RTOL)
    # Element-wise state: about a quarter (AdamW 0.27); more where every rank keeps a small part
    # whole (GaLore's right bases: 0.43; tp_parity_worker checks each state key), and for dynamic
    # rank, whose factors' state is whole on every rank (0.71).
    bound = {"adamw": 0.3, "dynamic_rank": 0.8}.get(name, 0.45)
    assert s2["optimizer_state_bytes"] / s1["optimizer_state_bytes"] < bound, name


def test_tp2_resumes_its_own_checkpoint_exactly(runs, tmp_path):
    source = runs("galore_adamw_layerwise", 2)
    root = tmp_path / "checkpoints"
    root.mkdir()
    shutil.copytree(checkpoint.step_dir(source / "checkpoints", 3), checkpoint.step_dir(root, 3))
    assert json.loads((root / checkpoint.step_dir(root, 3).name / checkpoint.MANIFEST).read_text())["tp"] == 2
    launch(PRETRAIN, [*COMMON, *OPTIMIZERS["galore_adamw_layerwise"], f"out_dir={tmp_path}", "resume=auto",
                      "parallel.tp=2"], launcher="torchrun", nproc=4, timeout=600)
    ref, got = train_losses(source), train_losses(tmp_path)
    assert sorted(got) == [4, 5, 6]
    assert all(got[step] == ref[step] for step in got), (ref, got)
