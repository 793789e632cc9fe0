"""Optimizer state across checkpoints and engines, through ``launch/pretrain.py`` (2 CPU ranks).

* DeepSpeed ZeRO-2 resumes its own checkpoint exactly: 6 steps uninterrupted vs. the same run
  resumed (``resume=auto``) from its step-3 checkpoint, GaLore AdamW (projection bases, low-rank
  moments, step counters in the state, a basis refresh every 2 steps so that the resumed run both
  uses a loaded basis and refreshes one): every loss of steps 4-6 bit-identical.
* single <-> FSDP2 conversion (:mod:`optimlib.train.convert`): 3 steps under one engine, its
  step-3 checkpoint resumed under the other (``resume=auto`` converts by itself), compared with an
  uninterrupted 6-step single-process run (and once from 2 to 4 FSDP2 ranks), for GaLore AdamW, GaLore with SMMF's rule, SMMF and
  AdamP, whose state is not elementwise (full-shape projection bases, factorized moments,
  bit-packed signs in per-rank slots).  Tolerance: 2e-6 relative on each loss.  The FSDP2 half
  of each run differs from one process by reduction order only (gradient reduce-scatter, SMMF's
  all-reduced column sums, GaLore's all-reduced left projections): measured at most 1.2e-7
  relative on these losses, the size of the 2-rank parity differences.  A wrong conversion is far
  outside: swapping the two ranks' SMMF sign slots of GaLore-SMMF moved the step-5 loss by 1e-2.
  (Steps 4-6 are checked; the step-4 loss is taken before the first resumed step, so it checks
  the weights, steps 5 and 6 the optimizer state.)
"""

import json
import shutil

import pytest
import torch

from conftest import PRETRAIN, TINY_RUN, launch, train_losses
from optimlib.train import checkpoint, convert

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 2e-6
COMMON = [*TINY_RUN, "train.grad_clip=0.5", "train.checkpoint_every=3"]
OPTIMIZERS = {
    "galore_adamw": ["optim.name=galore_adamw", "optim.kwargs={rank: 4, update_proj_gap: 2}"],
    "galore_smmf": ["optim.name=galore_smmf", "optim.kwargs={rank: 4, update_proj_gap: 2}"],
    "smmf": ["optim.name=smmf"],
    "adamp": ["optim.name=adamp"],
}


def _resume_from_step_3(src, out, args, launcher, nproc=2):
    """Resume ``args`` in ``out`` from the step-3 checkpoint of the run in ``src``; its summary."""
    root = out / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(checkpoint.step_dir(src / "checkpoints", 3), checkpoint.step_dir(root, 3))
    launch(PRETRAIN, [*args, f"out_dir={out}", "resume=auto"], launcher=launcher, nproc=nproc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000003") and summary["steps_this_run"] == 3
    return summary


def _assert_steps_4_to_6_match(reference, out):
    ref, got = train_losses(reference), train_losses(out)
    assert sorted(got) == [4, 5, 6], sorted(got)
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), (step, ref[step], got[step])


def _cached_runs(tmp_path_factory, kind, launcher):
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"{kind}-{name}")
            launch(PRETRAIN, [*COMMON, *OPTIMIZERS[name], f"out_dir={out}"], launcher=launcher)
            runs[name] = out
        return runs[name]
    return get


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """Uninterrupted 6-step one-process runs (with checkpoints at steps 3 and 6), per optimizer."""
    return _cached_runs(tmp_path_factory, "single", "python")


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    """The same runs under FSDP2 on 2 ranks."""
    return _cached_runs(tmp_path_factory, "fsdp2", "torchrun")


def test_deepspeed_zero2_resumes_galore_exactly(tmp_path):
    args = [*COMMON, *OPTIMIZERS["galore_adamw"], "deepspeed.zero_stage=2"]
    full = tmp_path / "full"
    launch(PRETRAIN, [*args, f"out_dir={full}"], launcher="deepspeed")
    step3 = checkpoint.step_dir(full / "checkpoints", 3)
    assert checkpoint.read_manifest(step3)["engine"] == "deepspeed"
    files = sorted(step3.glob("*.pt"))
    assert len(files) == 3, files                                     # model states + one optimizer file per rank
    with torch.serialization.safe_globals(checkpoint.deepspeed_safe_globals()):
        for f in files:
            torch.load(f, weights_only=True)                          # no arbitrary unpickling
    _resume_from_step_3(full, tmp_path / "resumed", args, "deepspeed")
    ref, got = train_losses(full), train_losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    assert all(got[s] == ref[s] for s in got), (ref, got)            # bit-exact, not approximately


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_single_checkpoint_resumes_under_fsdp2(single_runs, tmp_path, name):
    reference = single_runs(name)
    summary = _resume_from_step_3(reference, tmp_path, [*COMMON, *OPTIMIZERS[name]], "torchrun")
    assert summary["engine"] == "fsdp2" and summary["world_size"] == 2
    _assert_steps_4_to_6_match(reference, tmp_path)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_checkpoint_resumes_under_single(single_runs, fsdp2_runs, tmp_path, name):
    args = [*COMMON, *OPTIMIZERS[name]]
    fsdp = fsdp2_runs(name)
    src = checkpoint.step_dir(fsdp / "checkpoints", 3)
    assert checkpoint.read_manifest(src)["engine"] == "fsdp2"
    summary = _resume_from_step_3(fsdp, tmp_path / "single", args, "python")
    assert summary["engine"] == "single"
    _assert_steps_4_to_6_match(single_runs(name), tmp_path / "single")
    if name != "galore_smmf":                  # the converter's command line: once, on the richest state
        return
    dst = tmp_path / "converted" / "checkpoints" / "step_00000003"
    assert convert.main([str(src), str(dst)]) == 0
    assert checkpoint.verify(dst) is None and checkpoint.read_manifest(dst)["engine"] == "single"
    launch(PRETRAIN, [*args, f"out_dir={tmp_path / 'converted'}", "resume=auto"])
    assert train_losses(tmp_path / "converted") == train_losses(tmp_path / "single")


def test_fsdp2_checkpoint_resumes_on_four_ranks(single_runs, fsdp2_runs, tmp_path):
    """Another FSDP2 world size: SMMF's per-rank slots are cut again for 4 ranks."""
    name = "galore_smmf"
    summary = _resume_from_step_3(fsdp2_runs(name), tmp_path, [*COMMON, *OPTIMIZERS[name]], "torchrun", nproc=4)
    assert summary["engine"] == "fsdp2" and summary["world_size"] == 4
    _assert_steps_4_to_6_match(single_runs(name), tmp_path)
