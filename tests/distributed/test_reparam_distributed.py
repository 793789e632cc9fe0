"""SLTrain and LOST layers under FSDP2 and DeepSpeed ZeRO-2/3 (2 CPU ranks) match one process.

``launch/pretrain.py`` with ``reparam.method`` set, the same global batches on 1 and 2 ranks,
AdamW, fp32, clipping on and explicit.  Every step's loss and the final eval loss must agree to
2e-5 relative (the bar of tests/distributed/test_pretrain_parity.py), and each rank must hold
about half of the optimizer state (the factors, the sparse values and the channel block shard
like any parameter; the index buffers are replicated).

Dynamic-rank layers change parameter shapes, which FSDP2 and ZeRO cannot follow: the run must
stop at the first step with an error naming the limitation.  On one process they resume exactly
through the launcher's checkpoints.
"""

import json
import shutil

import pytest

from conftest import PRETRAIN, TINY_RUN, check_pretrain_parity, launch, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 2e-5
OPTIONS = {"sltrain": "{rank: 8, density: 0.05}", "lost": "{rank: 8, density: 0.1}"}
ENGINES = {"fsdp2": ("torchrun", []), "zero2": ("deepspeed", ["deepspeed.zero_stage=2"]),
           "zero3": ("deepspeed", ["deepspeed.zero_stage=3"])}


def _args(method: str, out) -> list[str]:
    return [*TINY_RUN, "train.grad_clip=0.5", f"reparam.method={method}", f"reparam.options={OPTIONS[method]}",
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


@pytest.mark.parametrize("engine, needle", [("fsdp2", "FSDP2"), ("zero2", "not one of the optimizer's parameters")])
def test_dynamic_rank_refuses_sharded_engines(tmp_path, engine, needle):
    launcher, extra = ENGINES[engine]
    args = [*TINY_RUN, "reparam.method=dynamic_rank", "reparam.options={rank: 8}", f"out_dir={tmp_path}", *extra]
    with pytest.raises(AssertionError) as failure:
        launch(PRETRAIN, args, launcher=launcher)
    assert needle in str(failure.value) and "single-process engine" in str(failure.value)


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
