"""The pieces of checkpoint conversion (single <-> FSDP2, DeepSpeed ZeRO) that need no process group.

The end-to-end conversions (train under one engine, resume under the other, compare with an
uninterrupted run) are in tests/distributed/test_checkpoint_engines.py and
tests/distributed/test_zero_checkpoint_resharding.py.
"""

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimlib.distributed.row_block import FlatSlice
from optimlib.formats.bitpack import pack_bits, unpack_bits
from optimlib.optim import SMMF, GaLoreAdamW, create_optimizer
from optimlib.optim.smmf import SMMFLayout
from optimlib.optim.state_spec import PER_RANK, Placement, state_specs
from optimlib.train import checkpoint, convert, reshard
from optimlib.train.zero_checkpoint import FlatLayout, local_state, whole_state


def _per_rank(specs):
    return {s.key: s for s in specs if s.layout == PER_RANK}


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), world=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_smmf_slots_hold_each_ranks_owned_rows(rows, cols, world, seed):
    """SMMF's declared per-rank entries: whole -> FSDP2 slots -> whole is exact, and slot k holds
    what rank k's SMMFLayout owns: its rows' factors and the sign bits of those rows."""
    shape = (rows, cols)
    group = {"beta": 0.9, "vector_reshape": True}
    specs = _per_rank(SMMF.state_specs(group, Placement.fsdp2(shape, world)))
    row_spec, sign_spec = specs["exp_avg_row"], specs["exp_avg_sign"]
    owned, mcols = row_spec.rows.owned, sign_spec.rows.width
    layout = SMMFLayout(rows * cols, FlatSlice.whole(rows * cols))
    assert sum(owned) == layout.block.num_rows and mcols == layout.cols
    for k in range(world):   # rank k's own layout owns the rows its slot holds
        assert SMMFLayout(rows * cols, Placement.fsdp2(shape, world, k).piece).block.num_rows == owned[k]
    g = torch.Generator().manual_seed(seed)
    row = torch.rand(sum(owned), generator=g)
    bits = torch.rand(sum(owned) * mcols, generator=g) > 0.5
    sign = pack_bits(bits)
    row_slots, sign_slots = row_spec.rows.scatter(row), sign_spec.rows.scatter(sign)
    assert row_slots.shape[0] == sign_slots.shape[0] == world
    assert torch.equal(row_spec.rows.gather(row_slots), row)
    assert torch.equal(sign_spec.rows.gather(sign_slots), sign)
    start = 0
    for k, n in enumerate(owned):
        assert torch.equal(row_slots[k, :n], row[start:start + n])
        assert torch.equal(unpack_bits(sign_slots[k], n * mcols), bits[start * mcols:(start + n) * mcols])
        start += n


def test_lowrank_moments_are_split_along_the_kept_dimension():
    """GaLore-SMMF's (kept, r) low-rank moments: kept = m for a right projection, n for a left one."""
    opt = GaLoreAdamW([{"params": [torch.zeros(96, 32), torch.zeros(32, 96)], "rank": 4}], inner="smmf")
    group = opt.param_groups[0]
    right = _per_rank(state_specs(opt, group, Placement.fsdp2((96, 32), 2), {"rank": 4}))["exp_avg_row"]
    left = _per_rank(state_specs(opt, group, Placement.fsdp2((32, 96), 2), {"rank": 4}))["exp_avg_row"]
    whole = SMMFLayout(96 * 4, FlatSlice.whole(96 * 4)).block.num_rows
    assert sum(right.rows.owned) == sum(left.rows.owned) == whole
    assert len(right.rows.owned) == 2 and right.rows == left.rows


@pytest.mark.parametrize("name", ["smmf", "galore_smmf"])
def test_per_rank_state_goes_to_slots_and_back(name):
    """A one-process state dict, its declared per-rank entries cut into 3 ranks' slots and gathered
    back: the same tensors; the other entries untouched."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Linear(11, 7))
    extra = {"rank": 3, "target_modules": "all-linear"} if name.startswith("galore") else {}
    opt = create_optimizer(model, name, lr=1e-2, **extra)
    model(torch.randn(5, 13)).sum().backward()
    opt.step()
    names = reshard.optimizer_param_names(model, opt)
    whole = reshard.keyed(opt.state_dict(), names, by_name=True)
    work = copy.deepcopy(whole)
    reshard._convert_per_rank(opt, work, 3, to_slots=True)
    changed = {(n, k) for n, st_ in work["state"].items() for k, v in st_.items()
               if isinstance(v, torch.Tensor) and v.shape != whole["state"][n][k].shape}
    assert changed and all(work["state"][n][k].shape[0] == 3 for n, k in changed)
    reshard._convert_per_rank(opt, work, 3, to_slots=False)
    for n, st_ in whole["state"].items():
        for k, v in st_.items():
            assert torch.equal(torch.as_tensor(work["state"][n][k]), torch.as_tensor(v)), (n, k)


def test_optimizer_state_is_keyed_by_name_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = create_optimizer(model, "adamp", lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    names = reshard.optimizer_param_names(model, opt)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    sd = opt.state_dict()
    by_name = reshard.keyed(sd, names, by_name=True)
    assert set(by_name["state"]) == set(names)
    back = reshard.keyed(by_name, names, by_name=False)
    assert back["state"].keys() == sd["state"].keys()
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in sd["param_groups"]]
    with pytest.raises(ValueError, match="not the same model or optimizer"):
        reshard.keyed(sd, names[::-1], by_name=True)


def _deepspeed_dir(tmp_path):
    """A complete checkpoint directory of DeepSpeed on 2 ranks without ZeRO's optimizer files."""
    path = tmp_path / "step_00000003"
    path.mkdir()
    (path / checkpoint.MANIFEST).write_text(json.dumps({"step": 3, "engine": "deepspeed", "world_size": 2,
                                                        "files": {}, "sha256": {}}))
    return path


def test_deepspeed_checkpoint_under_ddp_is_a_clear_error(tmp_path):
    class Engine:
        name, world_size = "ddp", 2

    with pytest.raises(ValueError, match=r"engine=deepspeed on 2 rank\(s\); this run is engine=ddp on 2 rank\(s\)"
                                         r"\. Checkpoints convert between engines single, fsdp2, deepspeed"):
        checkpoint.load(Engine(), _deepspeed_dir(tmp_path))


def test_deepspeed_checkpoint_without_zero_files_is_not_converted(tmp_path, capsys):
    """ZeRO stage 0 writes no zero_pp_rank_* optimizer files: convert names the missing file."""
    assert convert.main([str(_deepspeed_dir(tmp_path)), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "lacks zero_pp_rank_0_mp_rank_00_optim_states.pt: only ZeRO stage 1, 2 and 3 checkpoints convert" in err
    assert not (tmp_path / "out").exists()


SHAPES = ((13, 11), (11,), (7, 11), (1,))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("zero3", [False, True])
def test_zero_partitions_cut_and_join(world, zero3):
    """ZeRO-1/2 (the group back to back, alignment padding after a parameter, padded to 2 x world)
    and ZeRO-3 (each parameter cut on its own): every rank's partition, joined, is every parameter."""
    numels = [math.prod(s) for s in SHAPES]
    pads = (0, 3, 0, 0)
    if zero3:
        layout = FlatLayout(("a", "b", "c", "d"), SHAPES, world, sum(-(-n // world) for n in numels), True)
    else:
        total = sum(numels) + sum(pads)
        layout = FlatLayout(("a", "b", "c", "d"), SHAPES, world, -(-total // (2 * world)) * 2, False, pads)
    wholes = [torch.randn(n) for n in numels]
    parts = [layout.local(wholes, k) for k in range(world)]
    assert all(p.numel() == layout.partition for p in parts)
    assert all(torch.equal(a, b) for a, b in zip(layout.whole(parts), wholes))
    if zero3:   # rank k holds [k s, (k + 1) s) of each parameter
        s = -(-numels[0] // world)
        assert torch.equal(parts[-1][:numels[0] - (world - 1) * s], wholes[0][(world - 1) * s:])
    else:       # rank k holds [k P, (k + 1) P) of the group, parameter b after a and its padding
        flat = torch.cat([wholes[0], wholes[1], torch.zeros(3), wholes[2], wholes[3]])
        assert torch.equal(torch.cat(parts)[:flat.numel()], flat)


@pytest.mark.parametrize("name", ["adamw", "adamp", "smmf", "galore_smmf", "galore_adamw"])
@pytest.mark.parametrize("zero3", [False, True])
def test_zero_state_cut_into_ranks_and_joined(name, zero3):
    """A one-process state cut into 3 ranks' ZeRO partitions (one parameter per partition for the
    shape-aware optimizers, the whole group for AdamW) and joined again: the same state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Linear(11, 7))
    extra = {"rank": 3, "target_modules": "all-linear"} if name.startswith("galore") else {}
    opt = create_optimizer(model, name, lr=1e-2, **extra)
    for _ in range(2):
        model(torch.randn(5, 13)).sum().backward()
        opt.step()
    names = reshard.optimizer_param_names(model, opt)
    whole = reshard.keyed(opt.state_dict(), names, by_name=True)
    world, done, cut = 3, 0, 0
    for group in whole["param_groups"]:
        members = [group["params"]] if name == "adamw" else [[n] for n in group["params"]]
        for fqns in members:
            shapes = tuple(tuple(s) for n, s in zip(group["params"], group["shapes"]) if n in fqns)
            numels = [math.prod(s) for s in shapes]
            size = sum(-(-n // world) for n in numels) if zero3 else -(-sum(numels) // (2 * world)) * 2
            layout = FlatLayout(tuple(fqns), shapes, world, size, zero3)
            saved = [whole["state"][n] for n in fqns]
            ranks = [local_state(opt, group, layout, k, saved) for k in range(world)]
            cut += sum(isinstance(v, torch.Tensor) and 0 < v.numel() < saved[0][key].numel()
                       for r in ranks for key, v in r.items())
            joined = whole_state(opt, group, layout, ranks)
            for n in fqns:
                assert joined[n].keys() == whole["state"][n].keys()
                for key, value in whole["state"][n].items():
                    assert torch.equal(torch.as_tensor(joined[n][key]), torch.as_tensor(value)), (n, key)
                done += 1
    assert cut > 0
    assert done == len(names)
