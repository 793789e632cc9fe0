"""The pieces of single <-> FSDP2 checkpoint conversion that need no process group.

The end-to-end conversions (train under one engine, resume under the other, compare with an
uninterrupted one-process run) are in tests/distributed/test_checkpoint_engines.py.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimlib.optim import create_optimizer
from optimlib.optim.smmf import SMMFLayout
from optimlib.distributed.row_block import FlatSlice
from optimlib.train import checkpoint, convert


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), world=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_smmf_slots_hold_each_ranks_owned_rows(rows, cols, world, seed):
    """Whole factors -> FSDP2 slots -> whole factors is exact, and slot k holds what rank k's
    SMMFLayout owns: its rows' factors and the sign bits of those rows."""
    shape = (rows, cols)
    owned, mcols = convert._smmf_owned_rows(shape, {}, {}, world)
    layout = SMMFLayout(rows * cols, FlatSlice.whole(rows * cols))
    assert sum(owned) == layout.block.num_rows and mcols == layout.cols
    g = torch.Generator().manual_seed(seed)
    row = torch.rand(sum(owned), generator=g)
    bits = torch.rand(sum(owned) * mcols, generator=g) > 0.5
    sign = convert.pack_bits(bits)
    row_slots = convert._slot(row, "exp_avg_row", owned, mcols)
    sign_slots = convert._slot(sign, "exp_avg_sign", owned, mcols)
    assert row_slots.shape[0] == sign_slots.shape[0] == world
    assert torch.equal(convert._unslot(row_slots, "exp_avg_row", owned, mcols), row)
    assert torch.equal(convert._unslot(sign_slots, "exp_avg_sign", owned, mcols), sign)
    start = 0
    for k, n in enumerate(owned):
        assert torch.equal(row_slots[k, :n], row[start:start + n])
        assert torch.equal(convert.unpack_bits(sign_slots[k], n * mcols), bits[start * mcols:(start + n) * mcols])
        start += n


def test_lowrank_moments_are_split_along_the_kept_dimension():
    """GaLore's (kept, r) low-rank moments: kept = m for a right projection, n for a left one."""
    group = {"rank": 4, "proj_type": "std"}
    right, _ = convert._smmf_owned_rows((96, 32), group, {"rank": 4}, 2)   # m >= n: right, (96, 4)
    left, _ = convert._smmf_owned_rows((32, 96), group, {"rank": 4}, 2)    # m < n: left, (96, 4) too
    whole = SMMFLayout(96 * 4, FlatSlice.whole(96 * 4)).block.num_rows
    assert sum(right) == sum(left) == whole
    assert len(right) == 2 and right == left


def test_optimizer_state_is_keyed_by_name_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = create_optimizer(model, "adamp", lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    names = convert.optimizer_param_names(model, opt)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    sd = opt.state_dict()
    by_name = convert._keyed(sd, names, by_name=True)
    assert set(by_name["state"]) == set(names)
    back = convert._keyed(by_name, names, by_name=False)
    assert back["state"].keys() == sd["state"].keys()
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in sd["param_groups"]]
    with pytest.raises(ValueError, match="not the same model or optimizer"):
        convert._keyed(sd, names[::-1], by_name=True)


def test_deepspeed_checkpoint_under_another_engine_is_a_clear_error(tmp_path):
    path = tmp_path / "step_00000003"
    path.mkdir()
    (path / checkpoint.MANIFEST).write_text(json.dumps({"step": 3, "engine": "deepspeed", "world_size": 2,
                                                        "files": {}, "sha256": {}}))

    class Engine:
        name, world_size = "fsdp2", 2

    with pytest.raises(ValueError, match=r"engine=deepspeed on 2 rank\(s\); this run is engine=fsdp2"):
        checkpoint.load(Engine(), path)
