"""DeepSpeed ZeRO checkpoints on another world size and under one process, through
``launch/pretrain.py`` (CPU ranks; :mod:`optimlib.train.zero_checkpoint`).

Per ZeRO stage, one uninterrupted 2-rank run of 5 steps (a checkpoint after every step) is the
oracle, and three runs continue from its checkpoints or their descendants:

* 2 -> 1: its step-2 checkpoint resumed by ``deepspeed --num_gpus 1`` (steps 3-5);
* 1 -> 2: that 1-rank run's own step-3 checkpoint resumed on 2 ranks again (steps 4-5);
* convert: ``python -m optimlib.train.convert`` writes its step-2 checkpoint as a one-process
  checkpoint, which the one-process engine resumes (steps 3-5).

Every loss of the continued steps matches the oracle within 1e-5 relative (the first resumed
step's loss checks the weights, the later ones the optimizer state too); the differences left are
reduction order (measured at most 6e-8).  A wrong conversion is far outside: the two ranks' SMMF
row-factor pieces swapped when a ZeRO-3 checkpoint was read moved the second resumed step's loss by
6e-3.  ZeRO-2 runs GaLore with SMMF's rule (full-shape
bases cut by columns, low-rank moments factorized into per-rank row factors, packed sign bits and
replicated column factors, one param group per parameter); ZeRO-3 runs torch's AdamW (element-wise
moments in multi-parameter flat partitions, each parameter cut on its own).
"""

import json
import shutil

import pytest
import torch

from conftest import PRETRAIN, TINY_RUN, launch, train_losses
from optimlib.train import checkpoint, convert

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 1e-5
STEPS = 5
OPTIMIZER = {2: ["optim.name=galore_smmf", "optim.kwargs={rank: 4, update_proj_gap: 2}"],
             3: ["optim.name=adamw"]}


def _args(stage: int) -> list[str]:
    return [*TINY_RUN, f"train.steps={STEPS}", "train.grad_clip=0.5", "train.checkpoint_every=1",
            "train.keep_checkpoints=0", *OPTIMIZER[stage]]


def _continue(src, step: int, out, args: list[str], launcher: str, nproc: int) -> dict:
    """Run ``args`` in ``out`` from the step-``step`` checkpoint of the run in ``src``; its summary."""
    root = out / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(checkpoint.step_dir(src / "checkpoints", step), checkpoint.step_dir(root, step))
    launch(PRETRAIN, [*args, f"out_dir={out}", "resume=auto"], launcher=launcher, nproc=nproc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{step:08d}") and summary["steps_this_run"] == STEPS - step
    return summary


def _assert_matches(reference, out, first: int) -> None:
    ref, got = train_losses(reference), train_losses(out)
    assert sorted(got) == list(range(first, STEPS + 1)), sorted(got)
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), (step, ref[step], got[step])
    final = [json.loads((d / "summary.json").read_text())["final_eval_loss"] for d in (reference, out)]
    assert final[1] == pytest.approx(final[0], rel=RTOL)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """``zero_runs(stage)``: the directories of the 2-rank oracle, the 1-rank continuation of its
    step 2 and the 2-rank continuation of that run's step 3 (run once per stage)."""
    cache = {}

    def get(stage):
        if stage not in cache:
            base, args = tmp_path_factory.mktemp(f"zero{stage}"), [*_args(stage), f"deepspeed.zero_stage={stage}"]
            full, one, two = base / "full", base / "one", base / "two"
            launch(PRETRAIN, [*args, f"out_dir={full}"], launcher="deepspeed", nproc=2)
            summaries = (_continue(full, 2, one, args, "deepspeed", nproc=1),
                         _continue(one, 3, two, args, "deepspeed", nproc=2))
            cache[stage] = full, one, two, summaries
        return cache[stage]
    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_to_one(zero_runs, stage):
    full, one, _, (summary, _) = zero_runs(stage)
    assert checkpoint.read_manifest(checkpoint.step_dir(full / "checkpoints", 2))["world_size"] == 2
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 1
    _assert_matches(full, one, 3)


@pytest.mark.parametrize("stage", [2, 3])
def test_one_rank_to_two(zero_runs, stage):
    full, one, two, (_, summary) = zero_runs(stage)
    manifest = checkpoint.read_manifest(checkpoint.step_dir(one / "checkpoints", 3))
    assert (manifest["engine"], manifest["world_size"]) == ("deepspeed", 1)
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 2
    _assert_matches(full, two, 4)


@pytest.mark.parametrize("stage", [2, 3])
def test_convert_then_resume_on_one_process(zero_runs, tmp_path, capsys, stage):
    full = zero_runs(stage)[0]
    src = checkpoint.step_dir(full / "checkpoints", 2)
    dst = checkpoint.step_dir(tmp_path / "checkpoints", 2)
    assert convert.main([str(src), str(dst)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["from"] == "deepspeed"
    manifest = checkpoint.read_manifest(dst)
    assert checkpoint.verify(dst) is None and (manifest["engine"], manifest["world_size"]) == ("single", 1)
    assert manifest["run"] == checkpoint.read_manifest(src)["run"]
    state = torch.load(dst / "state.pt", weights_only=True)
    if stage == 2:  # ZeRO-1/2 also write the whole model (fp32 here): the converted weights are those, bit for bit
        with torch.serialization.safe_globals(checkpoint.deepspeed_safe_globals()):
            module = torch.load(src / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert state["model"].keys() == module.keys()
        assert all(torch.equal(state["model"][k], module[k]) for k in module)
    summary = _continue(tmp_path, 2, tmp_path / "single", _args(stage), "python", nproc=1)
    assert summary["engine"] == "single"
    _assert_matches(full, tmp_path / "single", 3)
