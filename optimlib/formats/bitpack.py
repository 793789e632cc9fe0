"""1-bit packing of boolean tensors into ``uint8`` bytes (8 elements per byte).

SMMF keeps the sign of its first moment as one bit per element; a ``torch.bool`` tensor costs a
whole byte per element, which caps SMMF's saving over Adam at ~87.5 %.  Packed, the sign costs
``N / 8`` bytes and the saving reaches ~98 % for large square matrices.

Layout: element ``i`` of the flattened input is bit ``i % 8`` (least significant first) of byte
``i // 8``; the last byte is zero-padded.  ``unpack_bits(pack_bits(x), x.numel())`` equals
``x.reshape(-1)``.  Both run on any device with plain tensor ops (no Python loop over elements).
"""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits", "packed_numel"]


def packed_numel(numel: int) -> int:
    """Bytes needed to hold ``numel`` bits."""
    return (int(numel) + 7) // 8


def _weights(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(bits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a boolean tensor (any shape) into ``packed_numel(bits.numel())`` bytes.

    ``out``: an optional ``uint8`` tensor of at least that many elements to write into (its
    first ``packed_numel`` elements are overwritten; it is returned).
    """
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {bits.dtype}")
    flat = bits.reshape(-1)
    n = flat.numel()
    nbytes = packed_numel(n)
    pad = nbytes * 8 - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # bool -> uint8 is a reinterpretation (0/1 bytes); a sum of distinct powers of two fits a byte.
    packed = (flat.view(torch.uint8).reshape(nbytes, 8) * _weights(flat.device)).sum(dim=1, dtype=torch.uint8)
    if out is None:
        return packed
    if out.dtype != torch.uint8 or out.numel() < nbytes:
        raise ValueError(f"out must be a uint8 tensor of at least {nbytes} elements")
    out.reshape(-1)[:nbytes].copy_(packed)
    return out


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of ``packed`` (``uint8``) as a flat boolean tensor."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects a uint8 tensor, got {packed.dtype}")
    numel = int(numel)
    nbytes = packed_numel(numel)
    flat = packed.reshape(-1)
    if flat.numel() < nbytes:
        raise ValueError(f"{flat.numel()} bytes cannot hold {numel} bits")
    bits = (flat[:nbytes, None] & _weights(flat.device)) != 0
    return bits.reshape(-1)[:numel]
