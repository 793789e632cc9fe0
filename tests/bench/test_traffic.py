"""The memory-traffic floor (optimlib.bench.traffic) against bytes counted by hand."""

import torch
from torch import nn

import optimlib
from optimlib.bench.traffic import copy_bandwidth, traffic_floor


def _linear(rows=64, cols=32):
    torch.manual_seed(0)
    return nn.Linear(cols, rows, bias=False)


def test_adamw_moves_28_bytes_per_fp32_parameter():
    layer = _linear()
    for opt in (torch.optim.AdamW(layer.parameters()), optimlib.create_optimizer(layer, "adamw", lr=1e-3)):
        # g read, p read + write, m and v read + write: 7 x 4 bytes; the step counter: 2 x 4
        assert traffic_floor(opt) == 28 * 64 * 32 + 8


def test_adamp_reads_the_weight_and_the_update_a_second_time():
    layer = _linear()
    assert traffic_floor(optimlib.create_optimizer(layer, "adamp", lr=1e-3)) == 36 * 64 * 32 + 8


def test_smmf_moves_its_signs_and_factors_not_moments():
    layer = _linear()
    # 2048 elements as a 64 x 32 matrix: 256 sign bytes, row factors 2 x 64 and column factors
    # 2 x 32 float32, a float32 step; each read and written once, plus g, p, p.
    state = 256 + 4 * (2 * 64 + 2 * 32) + 4
    assert traffic_floor(optimlib.create_optimizer(layer, "smmf", lr=1e-3)) == 3 * 4 * 2048 + 2 * state


def test_copy_bandwidth_is_a_rate():
    bw = copy_bandwidth(numel=1 << 20, reps=3)
    assert 1e8 < bw < 1e13     # bytes per second: between 0.1 GB/s and 10 TB/s
