"""The pytest side of the parity workers (``*_parity_worker.py``, see ``parity_common.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import launch

ENGINES = ["fsdp2", "ds1", "ds2", "ds3"]


def run_worker(worker: Path, engine: str, out: Path) -> dict:
    """Run ``worker`` for ``engine`` (``single``: one process; otherwise torchrun with 2 CPU ranks)
    and load the results it saved to ``out``."""
    if engine == "single":
        launch(worker, [engine, str(out)], launcher="python", timeout=180)
    else:
        launch(worker, [engine, str(out)], launcher="torchrun", nproc=2, timeout=300)
    return torch.load(out, weights_only=True)


def single_run_fixture(worker: Path):
    """A module-scoped fixture ``single``: the results of ``worker`` run in one process."""
    @pytest.fixture(scope="module")
    def single(tmp_path_factory):
        return run_worker(worker, "single", tmp_path_factory.mktemp(worker.stem) / "single.pt")
    return single


def assert_params_close(ref: dict, got: dict, rtol: float, *label) -> None:
    """Every tensor of ``ref`` matches ``got``: max |diff| / max |ref| <= ``rtol``."""
    for pname, a in ref.items():
        err = ((a - got[pname]).abs().max() / a.abs().max()).item()
        assert err <= rtol, (*label, pname, err)
