"""optimlib's optimizers in a user's own script: plain ``deepspeed.initialize`` (ZeRO-1/2/3) and
FSDP2 ``fully_shard`` on 2 CPU ranks match one process, whatever the param grouping.

Cases and model: ``user_script_worker.py``.  The optimizer is built over ``model.parameters()``
(one group), galore-torch's ``[rest, matrices]`` groups, per-parameter groups without names,
``model.named_parameters()``, or the factory's decay/no-decay groups; DeepSpeed then hands it flat
partitions spanning several parameters that start and end mid-row, which it maps back to rows.

Tolerance: 2e-6 relative (max |diff| / max |param|, per tensor).  Observed: at most 8.0e-7 over
every case and engine; torch.optim.AdamW, the control, 3.1e-7.  Before the mapping existed the same
scripts trained something else without a warning (SMMF under ZeRO-2: 7.7e-1).  Resuming a ZeRO-2
or ZeRO-3 checkpoint (saved after 6 of 12 steps) gives the uninterrupted run's parameters exactly.
Per-rank optimizer state is at most 0.75 of one process's (element-wise state halves; SMMF's
column factors and GaLore's bases are replicated by design).
"""

from pathlib import Path

import pytest

from parity_checks import assert_params_close, run_worker, single_run_fixture

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = Path(__file__).with_name("user_script_worker.py")
RTOL = 2e-6
CASES = ("adamw", "smmf", "adamp", "adamp_named", "adamp_per_param", "sgdp", "galore_adamw", "galore_adamp",
         "galore_smmf", "galore_per_param", "smmf_factory", "galore_factory", "fira_adamw", "apollo_adamw",
         "apollo_mini", "coap_adamw", "q_galore_adamw")
single = single_run_fixture(WORKER)


def test_every_case_is_run(single):
    assert tuple(single) == CASES


@pytest.mark.parametrize("engine", ["ds1", "ds2", "ds3", "fsdp2"])
def test_user_scripts_match_one_process(single, tmp_path, engine):
    got = run_worker(WORKER, engine, tmp_path / f"{engine}.pt")
    for name in CASES:
        ref, res = single[name], got[name]
        assert_params_close(ref["params"], res["params"], RTOL, engine, name)
        for rank_bytes in res["state_bytes"]:
            assert 0 < rank_bytes <= 0.75 * ref["state_bytes"][0], (engine, name, res["state_bytes"])
        if engine in ("ds2", "ds3"):
            assert res["resume_max_abs_diff"] == 0.0, (engine, name, res["resume_max_abs_diff"])


@pytest.mark.parametrize("variant", ["ds2_accum", "ds3_init", "ds2_offload", "ds3_offload", "fsdp2_keep_unsharded"])
def test_deepspeed_and_fsdp2_setups_match_one_process(single, tmp_path, variant):
    """Gradient accumulation 2 (ZeRO-2), a model built under ``deepspeed.zero.Init`` (ZeRO-3),
    ZeRO-Offload of the optimizer (ZeRO-2) and of optimizer and parameters (ZeRO-3) to the CPU, and
    FSDP2 with ``reshard_after_forward=False``."""
    got = run_worker(WORKER, variant, tmp_path / f"{variant}.pt")
    assert got
    for name, res in got.items():
        assert_params_close(single[name]["params"], res["params"], RTOL, variant, name)


def test_bf16_with_fp32_master_weights_matches_per_parameter_groups(tmp_path):
    """DeepSpeed bf16 (fp32 master weights, ZeRO-2): a one-group or [rest, matrices] optimizer
    steps exactly like its per-parameter-group twin, whose partitions are one parameter each."""
    got = run_worker(WORKER, "ds2_bf16", tmp_path / "bf16.pt")
    for name, twin in (("adamp", "adamp_per_param"), ("galore_adamw", "galore_per_param")):
        assert_params_close(got[twin]["params"], got[name]["params"], 1e-6, "bf16", name)


def test_zero3_sub_groups_are_refused_naming_the_parameters(tmp_path):
    """ZeRO-3 splitting a param group into sub-groups (``sub_group_size``) is refused at the first
    step, naming the optimizer, the group's parameters and the two ways out."""
    got = run_worker(WORKER, "ds3_subgroups", tmp_path / "sub.pt")
    message = got["adamp_named"]["error"]
    for text in ("AdamP, param group 0", "0.weight", "4.bias", "sub_group_size", "per_parameter_groups=True"):
        assert text in message, (text, message)
