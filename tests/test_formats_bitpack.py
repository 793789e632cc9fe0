"""1-bit sign packing (optimlib.formats.bitpack): exact round trips, layout and sizes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimlib.formats.bitpack import pack_bits, packed_numel, unpack_bits


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=300), st.integers(0, 3))
def test_round_trip(values, extra_bytes):
    bits = torch.tensor(values, dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(len(values)) == (len(values) + 7) // 8
    assert torch.equal(unpack_bits(packed, len(values)), bits)
    # Writing into a larger preallocated buffer gives the same leading bytes.
    out = torch.full((packed.numel() + extra_bytes,), 0xAB, dtype=torch.uint8)
    assert pack_bits(bits, out=out) is out
    assert torch.equal(out[: packed.numel()], packed)
    assert torch.equal(unpack_bits(out, len(values)), bits)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2 ** 31 - 1))
def test_round_trip_matrices(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, cols, generator=g) > 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), rows * cols).view(rows, cols), bits)
    assert torch.equal(unpack_bits(pack_bits(bits.t()), rows * cols).view(cols, rows), bits.t())  # non-contiguous


def test_layout_is_little_endian_within_a_byte():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [1, 6]
    assert pack_bits(torch.ones(8, dtype=torch.bool)).tolist() == [255]


def test_one_bit_per_element():
    bits = torch.rand(1000, 1000) > 0.5
    assert pack_bits(bits).numel() * 8 == bits.numel()


def test_rejects_wrong_dtypes_and_short_buffers():
    with pytest.raises(TypeError):
        pack_bits(torch.zeros(3))
    with pytest.raises(TypeError):
        unpack_bits(torch.zeros(3), 3)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        pack_bits(torch.ones(9, dtype=torch.bool), out=torch.zeros(1, dtype=torch.uint8))
