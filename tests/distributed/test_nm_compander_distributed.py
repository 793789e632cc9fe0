"""2-rank FSDP2 and DeepSpeed ZeRO-2 runs of launch/pretrain.py with N:M sparsity (every recipe)
and the weight compander match one process.

Same harness and tolerance as test_pretrain_parity.py (TINY_RUN: 6 steps, 2 micro-batches per
rank, so gradient accumulation is exercised; gradient clipping on and explicit).  The schedules
are shortened so that they change within the 6 steps: mdgf has one dense step, then a 4-step
cosine window, then the binary mask; sdgf walks 7:8 -> 4:8 -> 2:8 -> 1:8, one pattern per step.
Each recipe costs three launches (one process, FSDP2, ZeRO-2), kept to that to bound the suite's time; ste is
kept although it is srste with lambda = 0, because it is the one recipe without a saved weight.
"""

import pytest

from conftest import PRETRAIN, TINY_RUN, check_pretrain_parity, launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 2e-5
COMMON = [*TINY_RUN, "train.grad_clip=0.5"]
CASES = {
    "ste": ["reparam.method=nm", "reparam.options={n: 2, m: 4, recipe: ste}"],
    "srste": ["reparam.method=nm", "reparam.options={n: 2, m: 4, recipe: srste, srste_lambda: 0.01}"],
    "mdgf": ["reparam.method=nm",
             "reparam.options={n: 2, m: 4, recipe: mdgf, decay: cosine, dense_steps: 1, decay_steps: 4}"],
    "sdgf": ["reparam.method=nm", "reparam.options={n: 1, m: 8, recipe: sdgf, decay_steps: 4}"],
    "compander": ["reparam.method=compander", "reparam.options={saturation: 3.0, slope: 2.0, learnable: true}"],
}


@pytest.fixture(scope="module", params=list(CASES))
def single(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"single_{request.param}")
    launch(PRETRAIN, [*COMMON, *CASES[request.param], f"out_dir={out}"], launcher="python")
    return request.param, out


def test_fsdp2_two_ranks_match_one_process(single, tmp_path):
    case, single_dir = single
    launch(PRETRAIN, [*COMMON, *CASES[case], f"out_dir={tmp_path}"], launcher="torchrun")
    ratio = check_pretrain_parity(single_dir, tmp_path, "fsdp2", RTOL)
    assert 0.45 < ratio < 0.56, ratio


def test_deepspeed_zero2_two_ranks_match_one_process(single, tmp_path):
    case, single_dir = single
    launch(PRETRAIN, [*COMMON, *CASES[case], f"out_dir={tmp_path}", "deepspeed.zero_stage=2"],
           launcher="deepspeed")
    ratio = check_pretrain_parity(single_dir, tmp_path, "deepspeed", RTOL)
    assert 0.45 < ratio < 0.56, ratio
