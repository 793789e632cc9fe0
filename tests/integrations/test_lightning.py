"""Lightning with ``configure_optimizers`` returning an optimlib optimizer: DDP and FSDP2 (Lightning's
``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``) on 2 CPU ranks match one process.

Worker, model and cases: ``lightning_worker.py`` (GaLore, AdamP, SMMF, and torch AdamW as the
control; 12 steps on odd, uneven shapes).  Tolerances, relative to the one-process run: the
training loss of every step (averaged over the ranks) within 1e-6 (observed at most 2.0e-7), the
final parameters within 5e-6 (max |diff| / max |param| per tensor; observed at most 1.6e-6, GaLore).
In one process, Lightning equals a plain PyTorch loop bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import launch

WORKER = Path(__file__).with_name("lightning_worker.py")
LOSS_RTOL, PARAM_RTOL = 1e-6, 5e-6
CASES = ("galore_adamw", "adamp", "smmf", "adamw")


def run_lightning(engine: str, out: Path) -> dict:
    launch(WORKER, [engine, str(out)], launcher="python" if engine == "single" else "torchrun", nproc=2, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_lightning("single", tmp_path_factory.mktemp("lightning") / "single.pt")


@pytest.mark.slow
def test_one_process_is_the_plain_loop(single):
    """Lightning's loop around ``configure_optimizers`` steps exactly like a plain PyTorch loop."""
    for name in CASES:
        ref, got = single[f"{name}/plain"], single[name]
        assert got["losses"] == ref["losses"], name
        for pname, p in ref["params"].items():
            assert torch.equal(p, got["params"][pname]), (name, pname)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(single, tmp_path, engine):
    got = run_lightning(engine, tmp_path / f"{engine}.pt")
    assert set(got) == set(CASES)
    for name, res in got.items():
        ref = single[name]
        assert len(ref["losses"]) == len(res["losses"]) == 12 and ref["losses"][-1] < ref["losses"][0]
        for step, (a, b) in enumerate(zip(ref["losses"], res["losses"])):
            assert b == pytest.approx(a, rel=LOSS_RTOL), (engine, name, step, a, b)
        for pname, a in ref["params"].items():
            err = ((a - res["params"][pname]).abs().max() / a.abs().max()).item()
            assert err <= PARAM_RTOL, (engine, name, pname, err)
