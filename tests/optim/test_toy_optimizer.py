"""A new optimizer needs no change to the library (tests/toy_optimizer.py: one row-sharded and one
replicated state entry, registered): the factory builds it, its state is what it declares, the
estimator counts its state to the byte, and its per-parameter state converts between one process and
FSDP2 ranks.  The property and contract tests (tests/reliability/test_optimizer_properties.py,
tests/optim/test_contracts.py) run it with the registered optimizers; the 2-rank checks (estimator
under FSDP2 and ZeRO-2, conversion) launch tests/bench/estimate_worker.py and
tests/distributed/toy_convert_worker.py."""

import json
from pathlib import Path

import pytest
import torch

import toy_optimizer
from optimlib import create_optimizer, optimizer_state_bytes
from optimlib.bench import estimate_memory
from optimlib.models import get_config
from optimlib.models.llama import Llama
from optimlib.optim.state_spec import Placement, state_specs

WORKER = Path(__file__).resolve().parents[1] / "bench" / "estimate_worker.py"
FSDP2_WORKER = Path(__file__).resolve().parents[1] / "distributed" / "toy_convert_worker.py"


def test_factory_builds_it_and_its_state_is_what_it_declares():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    with toy_optimizer.registered():
        opt = create_optimizer(model, toy_optimizer.NAME, lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, toy_optimizer.RowRMS)
    model(torch.randn(4, 7)).sum().backward()
    opt.step()
    for group in opt.param_groups:
        for p, shape in zip(group["params"], group["shapes"]):
            specs = state_specs(opt, group, Placement.whole(shape))
            held = opt.state[p]
            assert {s.key for s in specs} == set(held) == {"step", "row_sq"}
            for spec in specs:
                assert held[spec.key].numel() == spec.local_numel and tuple(held[spec.key].shape) == spec.shape
                assert held[spec.key].dtype == (spec.dtype or p.dtype)
            assert {s.layout for s in specs} == {"replicated", "sharded"}


def test_estimator_counts_its_state_to_the_byte():
    torch.manual_seed(0)
    model = Llama(get_config("llama_tiny"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with toy_optimizer.registered():
        opt = create_optimizer(model, toy_optimizer.NAME, lr=1e-6)
        opt.step()
        est = estimate_memory("llama_tiny", toy_optimizer.NAME)
        fsdp = estimate_memory("llama_tiny", toy_optimizer.NAME, engine="fsdp2", world_size=2)
    assert est.optimizer_states == optimizer_state_bytes(opt), est.state_breakdown
    rows = sum(p.shape[0] if p.dim() else 1 for p in model.parameters())
    assert est.optimizer_states == 4 * rows + 4 * len(list(model.parameters()))
    assert fsdp.optimizer_states < est.optimizer_states          # the row entry is sharded, the step is not


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine, kind, stage", [("fsdp2", "fsdp2", 0), ("ds2", "deepspeed", 2)])
def test_estimator_counts_its_state_on_two_ranks(engine, kind, stage, tmp_path):
    """Every rank's state bytes under FSDP2 (uneven Shard(0) rows) and ZeRO-2 (flat partitions starting
    mid-row), measured by tests/bench/estimate_worker.py on llama_tiny, are the estimator's."""
    from conftest import launch

    out = tmp_path / f"{engine}.json"
    launch(WORKER, [engine, str(out), "--toy", toy_optimizer.NAME], launcher="torchrun", nproc=2, timeout=600)
    res = json.loads(out.read_text())["llama_tiny"][toy_optimizer.NAME]
    with toy_optimizer.registered():
        for k, measured in enumerate(res["ranks"]):
            est = estimate_memory("llama_tiny", toy_optimizer.NAME, engine=kind, zero_stage=stage, world_size=2,
                                  process_rank=k, **res["kwargs"])
            assert est.optimizer_states == measured["state_bytes"], (engine, k, est.state_breakdown)


def _one_process(steps: range, model, opt) -> None:
    for step in steps:
        toy_optimizer.set_case_grads(model, step)
        opt.step()


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_converts_between_one_process_and_fsdp2(tmp_path):
    """A one-process checkpoint after 2 steps resumes under FSDP2 on 2 ranks (uneven rows) and takes
    2 more steps: the parameters are the uninterrupted one-process run's to the bit; the FSDP2
    checkpoint it writes reads back as that run's optimizer state, exactly."""
    from conftest import launch

    from optimlib.train import reshard

    half = toy_optimizer.CASE_STEPS // 2
    model = toy_optimizer.case_model()
    with toy_optimizer.registered():
        opt = create_optimizer(model, toy_optimizer.NAME, lr=1e-2, weight_decay=0.1)
    _one_process(range(half), model, opt)
    (tmp_path / "single").mkdir()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "meta": {"step": half},
                "rng": torch.get_rng_state()}, tmp_path / "single" / "state.pt")
    _one_process(range(half, toy_optimizer.CASE_STEPS), model, opt)

    launch(FSDP2_WORKER, [str(tmp_path)], launcher="torchrun", nproc=2, timeout=300)
    got = torch.load(tmp_path / "fsdp2_params.pt", weights_only=True)
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p.detach()), name

    names = reshard.optimizer_param_names(model, opt)
    back = reshard.read_whole(tmp_path / "fsdp2", {"engine": "fsdp2", "world_size": 2}, names, optimizer=opt)
    expect = reshard.keyed(opt.state_dict(), names, by_name=True)["state"]
    assert set(back["optimizer"]["state"]) == set(expect)
    for name, state in expect.items():
        assert set(back["optimizer"]["state"][name]) == set(state)
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(back["optimizer"]["state"][name][key]), value), (name, key)
