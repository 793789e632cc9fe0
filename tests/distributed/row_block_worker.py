"""Worker for test_row_block.py: every layout of a parameter round-trips through RowBlock."""

import math

import torch
import torch.distributed as dist

from optimlib.distributed import FlatSlice, RowBlock
from optimlib.distributed.teardown import exit_process, leave_process_group


def layouts(numel: int, world: int):
    """DeepSpeed-like equal partitions (padded), and row-aligned FSDP-like chunks."""
    size = -(-numel // world)
    yield "equal", tuple((min(k * size, numel), min((k + 1) * size, numel)) for k in range(world)), size
    aligned = size + 3  # padded like DeepSpeed's alignment
    yield "padded", tuple((min(k * aligned, numel), min((k + 1) * aligned, numel)) for k in range(world)), aligned


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    checked = 0
    for m, n in [(37, 53), (3, 3), (5, 1), (1, 7), (96, 37), (2, 50), (7, 4)]:
        g = torch.Generator().manual_seed(m * 1000 + n)
        full = torch.randn(m, n, generator=g, dtype=torch.float64)
        flat = full.reshape(-1)
        for name, bounds, psize in layouts(m * n, world):
            a, b = bounds[rank]
            local = torch.zeros(psize, dtype=torch.float64)
            local[: b - a] = flat[a:b]
            block = RowBlock((m, n), FlatSlice(m * n, bounds, rank))
            rows = block.rows(local)
            assert torch.equal(rows, full[block.row_start:block.row_end]), (name, m, n, rank)
            back = block.to_local(rows * 2, like=local)
            expect = torch.zeros(psize, dtype=torch.float64)
            expect[: b - a] = 2 * flat[a:b]
            assert torch.equal(back, expect), (name, m, n, rank, back, expect)
            assert torch.equal(block.gather(rows), full), (name, m, n)
            col = block.all_reduce(rows.sum(0))
            assert torch.allclose(col, full.sum(0)), (name, m, n)
            owned = torch.tensor([block.num_rows])
            dist.all_reduce(owned)
            assert owned.item() == m
            checked += 1
    print(f"rank {rank}: {checked} layouts ok", flush=True)
    leave_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)
