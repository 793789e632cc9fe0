"""RowBlock on 2 and 3 CPU ranks: rows()/to_local()/gather()/all_reduce() are exact for slices
that start and end mid-row, slices shorter than a row, padding, and ranks that own no row."""

from pathlib import Path

import pytest
import torch

from conftest import launch
from optimlib.distributed import FlatSlice, RowBlock, near_square

WORKER = Path(__file__).with_name("row_block_worker.py")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 3])
def test_row_block_round_trips_on_ranks(nproc):
    proc = launch(WORKER, [], launcher="torchrun", nproc=nproc, timeout=180)
    assert proc.stdout.count("layouts ok") == nproc


def test_single_process_is_a_reshape():
    x = torch.arange(12.0)
    block = RowBlock((3, 4), FlatSlice.whole(12))
    rows = block.rows(x)
    assert rows.shape == (3, 4) and rows.data_ptr() == x.data_ptr()
    assert torch.equal(block.to_local(rows, like=x.view(2, 6)), x.view(2, 6))
    assert torch.equal(block.gather(rows), rows)


@pytest.mark.parametrize("numel, expect", [(12, (4, 3)), (16, (4, 4)), (13, (13, 1)), (1, (1, 1)), (96 * 37, (74, 48))])
def test_near_square(numel, expect):
    assert near_square(numel) == expect
