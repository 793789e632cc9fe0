"""SLTrain, LOST and dynamic-rank layers under FSDP2 and DeepSpeed ZeRO-2/3 (2 CPU ranks) match
one process.

``launch/pretrain.py`` with ``reparam.method`` set, the same global batches on 1 and 2 ranks,
AdamW, fp32, clipping on and explicit.  Every step's loss and the final eval loss must agree to
2e-5 relative (the bar of tests/distributed/test_pretrain_parity.py).  SLTrain / LOST: each rank
holds about half of the optimizer state (the factors, the sparse values and the channel block
shard like any parameter; the index buffers are replicated).

Dynamic rank: the factors ``U``, ``S``, ``V`` are replicated on every rank (their shapes change
at the truncations at steps 2, 4 and 6), the rest sharded.  Besides the losses, the final
checkpoint of every engine must hold the same ranks and the same merged weights
``U S Vᵀ`` (and every other tensor) as the one-process run, and a distributed run resumed from a
mid-run checkpoint must reproduce itself exactly.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import PRETRAIN, TINY_RUN, check_pretrain_parity, launch, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 2e-5
OPTIONS = {"sltrain": "{rank: 8, density: 0.05}", "lost": "{rank: 8, density: 0.1}"}
DYNAMIC = "{rank: 16, tol: 0.5, interval: 2}"  # width 16 + 4 candidates; tol 0.5 truncates at once
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-6)  # final weights after 6 steps: summation-order round-off
ENGINES = {"fsdp2": ("torchrun", []), "zero2": ("deepspeed", ["deepspeed.zero_stage=2"]),
           "zero3": ("deepspeed", ["deepspeed.zero_stage=3"])}


def _args(method: str, out) -> list[str]:
    options = DYNAMIC if method == "dynamic_rank" else OPTIONS[method]
    return [*TINY_RUN, "train.grad_clip=0.5", f"reparam.method={method}", f"reparam.options={options}",
            f"out_dir={out}"]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """One-process reference runs, launched on first use and shared by the engines."""
    done = {}

    def get(method: str):
        if method not in done:
            out = tmp_path_factory.mktemp(f"single_{method}")
            launch(PRETRAIN, _args(method, out), launcher="python")
            done[method] = out
        return done[method]

    return get


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("method", list(OPTIONS))
def test_two_ranks_match_one_process(single_runs, tmp_path, method, engine):
    launcher, extra = ENGINES[engine]
    launch(PRETRAIN, [*_args(method, tmp_path), *extra], launcher=launcher)
    ratio = check_pretrain_parity(single_runs(method), tmp_path, "fsdp2" if engine == "fsdp2" else "deepspeed", RTOL)
    assert 0.45 < ratio < 0.56, ratio


def final_state(out: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model at the newest checkpoint under ``out``, as one process holds it
    (full tensors, the replicated factors included), whatever engine wrote it."""
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    if (ckpt / "state.pt").exists():
        return torch.load(ckpt / "state.pt", weights_only=True)["model"]
    if (ckpt / "dcp").exists():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(ckpt / "dcp", scratch / "full.pt")
        state = torch.load(scratch / "full.pt", weights_only=False)["model"]
        replicated = torch.load(ckpt / "meta.pt", weights_only=True)["replicated"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        model_states = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))[0]  # ZeRO-3: one per rank, rank 0 first
        replicated = torch.load(model_states, weights_only=False)["optimlib_replicated"]
    return {**state, **replicated["params"]}


def check_same_model(ref: dict, got: dict) -> None:
    """Same keys, same ranks, same merged weights U S Vᵀ and same other tensors."""
    assert sorted(ref) == sorted(got)
    for key in ref:
        if key.endswith("current_rank") or key.endswith(".steps"):
            assert torch.equal(got[key], ref[key]), key
        elif key.endswith(".U"):
            prefix = key[:-1]
            dense = [d[prefix + "U"] @ d[prefix + "S"] @ d[prefix + "V"].T for d in (ref, got)]
            torch.testing.assert_close(dense[1], dense[0], **WEIGHT_TOL, msg=key)
        elif not key.endswith((".S", ".V")):
            torch.testing.assert_close(got[key].float(), ref[key].float(), **WEIGHT_TOL, msg=key)


@pytest.fixture(scope="module")
def dynamic_reference(single_runs, tmp_path_factory):
    """The one-process dynamic-rank run: its final tensors, with the ranks checked to have changed."""
    out = single_runs("dynamic_rank")
    state = final_state(out, tmp_path_factory.mktemp("dynamic_ref"))
    ranks = {k: int(v) for k, v in state.items() if k.endswith("current_rank")}
    assert ranks and all(r != 16 for r in ranks.values()), ranks  # truncated from the initial 16
    assert all(state[k[:-len("current_rank")] + "U"].shape[1] < 20 for k in ranks)  # memory fell
    return out, state


@pytest.mark.parametrize("engine", list(ENGINES))
def test_dynamic_rank_two_ranks_match_one_process(dynamic_reference, tmp_path, engine):
    single_dir, ref = dynamic_reference
    launcher, extra = ENGINES[engine]
    out = tmp_path / "run"
    launch(PRETRAIN, [*_args("dynamic_rank", out), *extra], launcher=launcher)
    ratio = check_pretrain_parity(single_dir, out, "fsdp2" if engine == "fsdp2" else "deepspeed", RTOL)
    check_same_model(ref, final_state(out, tmp_path))
    # Per rank: half of the sharded parameters' Adam state, all of the replicated factors' (two
    # moments of U, S, V in fp32): between one half and the whole of the one-process state.
    factors = sum(v.numel() for k, v in ref.items() if k.endswith((".U", ".S", ".V")))
    whole = json.loads((single_dir / "summary.json").read_text())["optimizer_state_bytes"]
    expected = (whole - 8 * factors) / 2 + 8 * factors
    assert ratio == pytest.approx(expected / whole, rel=0.01), (ratio, expected / whole)


def test_dynamic_rank_resumes_exactly_under_fsdp2(tmp_path):
    """FSDP2, 2 ranks: resuming from the step-3 checkpoint (fresh model at the initial width; the
    replicated factors and their optimizer state come back at the saved width) reproduces the
    run exactly."""
    args = [*_args("dynamic_rank", tmp_path), "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    launch(PRETRAIN, args, launcher="torchrun")
    full, first = train_losses(tmp_path), json.loads((tmp_path / "summary.json").read_text())
    before = final_state(tmp_path, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    launch(PRETRAIN, [*args, "resume=auto"], launcher="torchrun")
    again, second = train_losses(tmp_path), json.loads((tmp_path / "summary.json").read_text())
    assert second["resumed_from"].endswith("step_00000003")
    assert again == full and second["final_eval_loss"] == first["final_eval_loss"]
    after = final_state(tmp_path, tmp_path)
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_dynamic_rank_resumes_exactly_through_the_launcher(tmp_path):
    """One process: ranks change at steps 2, 4, 6; resuming from the step-3 checkpoint (a fresh
    model at the initial width loads the smaller saved factors) reproduces the run bit for bit."""
    args = [*TINY_RUN, "reparam.method=dynamic_rank", "reparam.options={rank: 16, tol: 0.5, interval: 2}",
            "train.checkpoint_every=3", "train.keep_checkpoints=5", f"out_dir={tmp_path}"]
    launch(PRETRAIN, args)
    full, first = train_losses(tmp_path), json.loads((tmp_path / "summary.json").read_text())
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    launch(PRETRAIN, [*args, "resume=auto"])
    again, second = train_losses(tmp_path), json.loads((tmp_path / "summary.json").read_text())
    assert second["resumed_from"].endswith("step_00000003")
    assert again == full and second["final_eval_loss"] == first["final_eval_loss"]
