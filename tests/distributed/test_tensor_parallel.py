"""Every shape-aware optimizer on 4 CPU ranks, a (dp=2, tp=2) mesh, matches one process.

Model and data: ``tp_parity_worker.py`` (a gated MLP under a LLaMA-style tensor-parallel plan and
FSDP2 over dp: ``gate``/``up`` arrive as ``(_StridedShard(0), Shard(0))``, ``down`` as
``(Shard(0), Shard(1))``, its bias as ``(Shard(0), Replicate())``).  10 steps, fp32.

Tolerance: 1e-4 relative (max |diff| / max |param|, per tensor).  Observed on this harness:
torch.optim.AdamW, the control, 1.4e-6; AdamP 1.6e-6, SGDP 1.9e-7, SMMF 3.5e-7, GaLore (exact
SVD) 2.1e-6, GaLore with randomized bases rotated on refresh 3.3e-5 (the range finder's QR
amplifies the data-parallel rounding that AdamW shows), the rest of the family at most 1.4e-6.

Reparameterizations, trained with AdamW in float64: N:M (SR-STE; MDGF through its dense,
decaying and binary phases) and the compander, applied after the plan (they act on each rank's
block of the weight); SLTrain, its low-rank baseline, LOST (also with SiLU between its factors)
and dynamic rank (ranks 6 -> 2 over three truncations; its factors replicated as the engines keep
them), applied before it (the plan distributes the new layers: ``parallelize_linears``).
Tolerance 1e-9 relative; observed: N:M SR-STE 1.6e-11 (float32 would let a rounding difference
flip a near-tied N:M group at one step and move that one weight by 2e-3), LOST 1.5e-14, dynamic
rank 7.5e-15, the rest at most 4.0e-15.  SLTrain applied to an already tensor-parallel linear is
refused with the order that works; a replacement without a tensor-parallel form (a toy) by name,
as is an N:M pattern whose groups a tensor-parallel block would cut.

Optimizer-state bytes: every state tensor sharded like its weight holds about a quarter per
rank (tensors of a few hundred bytes: slot padding makes it up to 0.3), about a half for the
bias and the norm, sharded over dp only (up to 0.6 for their 28-byte SMMF row factors); the
small state every rank keeps whole by design -- step counters, SMMF's column factors, Q-GaLore's int8 basis and
its cosine history, APOLLO's limiter norm -- is listed in ``REPLICATED`` and checked to be so.
"""

from pathlib import Path

import pytest

from conftest import launch
from parity_checks import assert_params_close, run_worker, single_run_fixture

import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = Path(__file__).with_name("tp_parity_worker.py")
RTOL = 1e-4
RTOL_FLOAT64 = 1e-9
WEIGHTS = ("gate.weight", "up.weight", "down.weight")
REPLICATED = {"step", "exp_avg_col", "exp_avg_sq_col", "leading_vector", "basis_codes", "basis_scales",
              "basis_zeros", "cos_history", "limiter_norm", "indices"}
single = single_run_fixture(WORKER)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "tp.pt"
    launch(WORKER, ["tp", str(out)], launcher="torchrun", nproc=4, timeout=600)
    return torch.load(out, weights_only=True)


def test_placements_are_two_dimensional(four_ranks):
    placed = four_ranks["adamw"]["placements"]
    assert placed["gate.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placed["down.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placed["down.bias"] == "(Shard(dim=0), Replicate())"


def test_what_cannot_be_tensor_parallel_is_refused_by_name(four_ranks):
    said = four_ranks["adamw"]["refusals"]
    placed = "linear 'down' is already distributed (its weight is a DTensor placed (Shard(dim=0), Shard(dim=1))), "
    assert (placed + "and sltrain replaces the module: apply it to the plain model, then make the tensor-parallel "
            "plan with optimlib.models.tensor_parallel.parallelize_linears") in said["sltrain"]
    assert placed + "and toy_copy replaces the module, which has no tensor-parallel form" in said["no_form"]
    assert ("option 'm': the tensor-parallel blocks of this linear's weight (placements (Shard(dim=0), "
            "Shard(dim=1))) split its 54 inputs into pieces of [27], not whole groups of 2") in said["nm_1of2"]


@pytest.mark.parametrize("name", ["nm_srste", "nm_mdgf", "compander", "sltrain", "lowrank", "lost", "lost_silu",
                                  "dynamic_rank"])
def test_reparameterized_dp2_tp2_matches_one_process(single, four_ranks, name):
    assert_params_close(single[name]["params"], four_ranks[name]["params"], RTOL_FLOAT64, "tp", name)


@pytest.mark.parametrize("name", ["adamw", "adamp", "sgdp", "smmf", "galore_svd", "galore_randomized_rotate",
                                  "galore_dct_int8", "galore_random_sharded_basis", "galore_smmf", "galore_adamp",
                                  "apollo", "apollo_mini", "fira", "q_galore", "coap"])
def test_dp2_tp2_matches_one_process(single, four_ranks, name):
    assert_params_close(single[name]["params"], four_ranks[name]["params"], RTOL, "tp", name)
    whole = single[name]["by_key"][0]
    ranks = four_ranks[name]["by_key"]
    assert all(set(r) == set(whole) for r in ranks), name
    for key, one in whole.items():
        param, entry = key.split("/")
        held = [r[key] for r in ranks]
        if entry in REPLICATED:
            assert held == [one] * 4, (name, key, held, one)
        elif param in WEIGHTS:
            assert max(held) <= 0.3 * one and sum(held) >= one, (name, key, held, one)
        else:  # down.bias (replicated over tp) and the norm (1-D mesh): halves
            assert max(held) <= 0.6 * one and sum(held) >= 2 * one, (name, key, held, one)
