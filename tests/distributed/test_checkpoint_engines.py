"""Optimizer state across checkpoints and engines, through ``launch/pretrain.py`` (2 CPU ranks).

* DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2 resume their own checkpoints exactly: 6 steps
  uninterrupted vs. the same run resumed (``resume=auto``) from its step-3 checkpoint, GaLore
  AdamW (projection bases, low-rank moments, step counters in the state, a basis refresh every 2
  steps so that the resumed run both uses a loaded basis and refreshes one): every loss of steps
  4-6 bit-identical.
* A crafted checkpoint (tests/checkpoint_tamper.py: a pickled ``os.system("touch marker")`` in
  one file, the manifest's checksums updated) is refused, for each kind of file each engine
  writes: the launcher stops naming the file and the global, the marker never appears, the run
  folder is byte-identical afterwards; ``convert`` refuses it too.
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

from checkpoint_tamper import (copy_checkpoint, craft_dcp_item, craft_dcp_metadata, craft_torch_file, launch_refused,
                               snapshot)
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


def _cached_runs(tmp_path_factory, kind, launcher, extra=()):
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"{kind}-{name}")
            launch(PRETRAIN, [*COMMON, *OPTIMIZERS[name], *extra, f"out_dir={out}"], launcher=launcher)
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


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """The same runs under DeepSpeed on 2 ranks: ``zero_runs[stage](name)``, ZeRO-2 and ZeRO-3."""
    return {stage: _cached_runs(tmp_path_factory, f"zero{stage}", "deepspeed", [f"deepspeed.zero_stage={stage}"])
            for stage in (2, 3)}


def _assert_steps_4_to_6_bit_exact(reference, out):
    ref, got = train_losses(reference), train_losses(out)
    assert sorted(got) == [4, 5, 6]
    assert all(got[s] == ref[s] for s in got), (ref, got)            # bit-exact, not approximately


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resumes_galore_exactly(zero_runs, tmp_path, stage):
    args = [*COMMON, *OPTIMIZERS["galore_adamw"], f"deepspeed.zero_stage={stage}"]
    full = zero_runs[stage]("galore_adamw")
    step3 = checkpoint.step_dir(full / "checkpoints", 3)
    assert checkpoint.read_manifest(step3)["engine"] == "deepspeed"
    files = sorted(step3.glob("*.pt"))
    assert len(files) == {2: 3, 3: 4}[stage], files                 # model states (ZeRO-3: per rank), optimizer per rank
    with torch.serialization.safe_globals(checkpoint.deepspeed_safe_globals()):
        for f in files:
            torch.load(f, weights_only=True)                          # no arbitrary unpickling
    _resume_from_step_3(full, tmp_path / "resumed", args, "deepspeed")
    _assert_steps_4_to_6_bit_exact(full, tmp_path / "resumed")


def test_fsdp2_resumes_its_own_checkpoint_exactly(fsdp2_runs, tmp_path):
    summary = _resume_from_step_3(fsdp2_runs("galore_adamw"), tmp_path, [*COMMON, *OPTIMIZERS["galore_adamw"]],
                                  "torchrun")
    assert summary["engine"] == "fsdp2" and summary["world_size"] == 2
    _assert_steps_4_to_6_bit_exact(fsdp2_runs("galore_adamw"), tmp_path)


# Each kind of file each engine writes: (engine, the file or DCP entry given the payload).
CRAFTED = [("fsdp2", ".metadata"), ("fsdp2", "optimizer.param_groups.0.lr"), ("fsdp2", "model.embed.weight"),
           ("fsdp2", "meta.pt"),
           (2, "mp_rank_00_model_states.pt"), (2, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
           (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"), (3, "zero_pp_rank_1_mp_rank_00_optim_states.pt")]


@pytest.mark.parametrize("engine, target", CRAFTED)
def test_crafted_checkpoint_is_refused_and_runs_nothing(fsdp2_runs, zero_runs, tmp_path, capsys, engine, target):
    """Every rank checks every file, so all refuse together: none enters the engine's load alone,
    which would leave the others waiting in its collectives until the launcher's timeout."""
    name = "galore_adamw"
    source = fsdp2_runs(name) if engine == "fsdp2" else zero_runs[engine](name)
    out, marker = tmp_path / "run", tmp_path / "marker"
    ckpt = copy_checkpoint(checkpoint.step_dir(source / "checkpoints", 3), out, 3)
    where = ""
    if target == ".metadata":
        crafted = craft_dcp_metadata(ckpt / "dcp", marker)
    elif target.endswith(".pt"):
        crafted = craft_torch_file(ckpt, target, marker)
    else:                                                             # an entry inside a .distcp file
        crafted, offset = craft_dcp_item(ckpt / "dcp", target, marker)
        where = f" (its item at byte {offset})"
    before = snapshot(out)
    args = [*COMMON, *OPTIMIZERS[name], f"out_dir={out}", "resume=auto"]
    extra, launcher = ([], "torchrun") if engine == "fsdp2" else ([f"deepspeed.zero_stage={engine}"], "deepspeed")
    text = launch_refused([*args, *extra], launcher=launcher)
    refusal = f"'{crafted}'{where} was refused: it holds the global 'posix.system'"
    assert refusal in text, text[-4000:]
    assert not marker.exists()
    assert snapshot(out) == before                                    # nothing loaded, nothing written

    assert convert.main([str(ckpt), str(tmp_path / "converted")]) == 1
    assert refusal in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "converted").exists()


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
