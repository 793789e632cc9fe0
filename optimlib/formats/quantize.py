r"""8-bit blockwise quantization of optimizer moments (codebook + per-block absmax).

Used by :class:`optimlib.optim.galore.GaLoreAdamW` (``moments_dtype="int8"``) for its low-rank
moments, which are stored as ``(K, r)`` matrices: ``K`` the kept dimension of the gradient (this
rank's rows or columns) and ``r`` the rank.

Format.  A tensor ``x`` of shape ``(K, r)`` is cut into blocks along its **last** dimension:
``r`` is split into ``ceil(r / block)`` chunks of ``block`` elements, so every block lies inside
one row.  Each block stores its absolute maximum ``a`` (fp32, shape ``(K, ceil(r / block))``) and
each element an 8-bit code ``c`` (``uint8``), an index into a fixed 256-entry codebook ``T`` of
values in ``[-1, 1]`` (``signed``) or ``[0, 1]``: ``x ~ a * T[c]``.  Because blocks never cross
rows, the encoding of a row does not depend on which rank holds it: sharding the ``K`` rows over
ranks (FSDP2, DeepSpeed) gives bit-identical codes to one process.

Codebooks (our own, logarithmic so that small entries of a block keep relative precision):

* signed: ``0`` and ``+-rho_s ** -j`` for ``j = 0..126`` (127 magnitudes from ``1e-5`` to 1,
  ratio ``rho_s = 10 ** (5 / 126) ~ 1.096``); 255 codes are used.
* unsigned: ``0`` and ``rho_u ** -j`` for ``j = 0..254`` (255 magnitudes from ``1e-6`` to 1,
  ratio ``rho_u = 10 ** (6 / 254) ~ 1.056``).

Rounding.  ``nearest`` rounds to the closest codebook entry; ``stochastic`` rounds up with
probability proportional to the distance from the entry below, which is unbiased
(``E[decode(encode(x))] = x``) -- that matters for slowly moving exponential averages, whose
per-step change (``1 - beta2 = 1e-3``) is far below one codebook step and would otherwise be
rounded away.  The random numbers are a counter-based hash of the element's *global* index, a
seed and a step, so they too are identical however the rows are sharded, and a run is exactly
reproducible (and resumable) without any generator state.

Error bound (per element, block maximum ``a``): ``|decode(encode(x)) - x|`` is at most one
codebook step below ``|x|`` -- ``(rho - 1) |x|`` when ``|x| >= a * T_min`` (``T_min`` the smallest
non-zero magnitude) and ``a * T_min`` otherwise; ``nearest`` halves that.  Unsigned encodings never
round a positive value to zero (it becomes ``a * T_min``): the second moment of a coordinate must
not vanish while its first moment does not.

Accuracy in an optimizer: requantizing an exponential average every step adds fresh rounding
noise each step.  With stochastic rounding it is unbiased and its standard deviation stays a few
times the codebook step (measured over 300 noisy steps with ``beta1=0.9``, ``beta2=0.999``:
median relative error 5 % for the first moment, 8 % for the second, 8 % for the Adam
direction).  With round-to-nearest a slow average can stick: a change of ``1 - beta2`` of the
value is always rounded away.
"""

from __future__ import annotations

import torch

__all__ = ["codebook", "quantize_blockwise", "dequantize_blockwise", "hash_uniform", "num_blocks", "quantized_bytes",
           "SIGNED_MIN", "UNSIGNED_MIN", "SIGNED_RATIO", "UNSIGNED_RATIO"]

SIGNED_MIN = 1e-5
UNSIGNED_MIN = 1e-6
SIGNED_RATIO = 10 ** (5 / 126)
UNSIGNED_RATIO = 10 ** (6 / 254)

_CODEBOOKS: dict[tuple, torch.Tensor] = {}


def codebook(signed: bool, device=None) -> torch.Tensor:
    """The sorted (ascending) fp32 codebook: 255 entries signed, 256 unsigned."""
    key = (bool(signed), str(torch.device(device) if device is not None else "cpu"))
    cb = _CODEBOOKS.get(key)
    if cb is None:
        if signed:
            mags = SIGNED_RATIO ** -torch.arange(126, -1, -1, dtype=torch.float64)   # 1e-5 .. 1
            mags[0] = SIGNED_MIN
            cb = torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])
        else:
            mags = UNSIGNED_RATIO ** -torch.arange(254, -1, -1, dtype=torch.float64)  # 1e-6 .. 1
            mags[0] = UNSIGNED_MIN
            cb = torch.cat([torch.zeros(1, dtype=torch.float64), mags])
        cb[-1] = 1.0
        cb = cb.to(torch.float32).to(device)
        _CODEBOOKS[key] = cb
    return cb


def num_blocks(r: int, block: int) -> int:
    return -(-int(r) // int(block)) if r else 0


# Odd multipliers below 2**31: a 32-bit value times one of them stays below 2**63 (no overflow).
_M1, _M2, _M3 = 0x5BD1E995, 0x6B43A9B5, 0x2C1B3C6D
_MASK = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK
    x = ((x ^ (x >> 16)) * _M1) & _MASK
    x = ((x ^ (x >> 15)) * _M2) & _MASK
    x = ((x ^ (x >> 13)) * _M3) & _MASK
    return x ^ (x >> 16)


def scalar_mix(*values: int) -> int:
    h = 0x243F6A88
    for v in values:
        h = (h ^ (int(v) & _MASK)) & _MASK
        h = _mix32(torch.tensor(h, dtype=torch.int64)).item()
        h = (h ^ ((int(v) >> 32) & _MASK)) & _MASK
    return int(h)


def hash_uniform(shape: tuple[int, int], row_offset: int, *, seed: int, step: int, device=None) -> torch.Tensor:
    """Uniform ``[0, 1)`` fp32 numbers for the rows ``[row_offset, row_offset + K)`` of a ``(*, r)``
    matrix, a pure function of (global element index, ``seed``, ``step``)."""
    k, r = shape
    key = scalar_mix(seed, step)
    rows = torch.arange(row_offset, row_offset + k, dtype=torch.int64, device=device)
    cols = torch.arange(r, dtype=torch.int64, device=device)
    idx = rows[:, None] * r + cols[None, :]
    h = _mix32((idx & _MASK) ^ key)
    h = _mix32(h ^ ((idx >> 32) * _M1 & _MASK))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """``x`` (K, r) zero-padded to (K, nb, block)."""
    k, r = x.shape
    nb = num_blocks(r, block)
    pad = nb * block - r
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(k, nb, block), pad


def quantize_blockwise(x: torch.Tensor, *, signed: bool, block: int = 256,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a ``(K, r)`` tensor: returns ``(codes uint8 (K, r), absmax fp32 (K, nb))``.

    ``noise``: uniform ``[0, 1)`` numbers of shape ``(K, r)`` for stochastic rounding (``None``:
    round to nearest).  Non-finite inputs give non-finite ``absmax`` (they are not hidden).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_blockwise expects a 2-D (K, r) tensor, got shape {tuple(x.shape)}")
    k, r = x.shape
    xf = x.float()
    xb, pad = _blocks(xf, block)
    absmax = xb.abs().amax(dim=-1)                                     # (K, nb)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    u = (xb / safe[..., None]).reshape(k, -1)[:, :r].clamp_(-1.0 if signed else 0.0, 1.0)
    cb = codebook(signed, x.device)
    hi = torch.searchsorted(cb, u.contiguous()).clamp_(1, cb.numel() - 1)   # cb[hi-1] < u <= cb[hi]
    lo = hi - 1
    c_lo, c_hi = cb[lo], cb[hi]
    frac = (u - c_lo) / (c_hi - c_lo)
    if noise is None:
        up = frac >= 0.5
    else:
        up = noise < frac
    codes = torch.where(up, hi, lo)
    if not signed:
        # Never round a positive value down to 0: for a second moment that would turn its
        # coordinate's Adam update into m / eps.  (Values below the smallest level round up.)
        codes = torch.where((codes == 0) & (u > 0), torch.ones_like(codes), codes)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool, block: int = 256,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ``(codes, absmax)`` from :func:`quantize_blockwise` into a ``(K, r)`` tensor."""
    k, r = codes.shape
    cb = codebook(signed, codes.device)
    vals = cb[codes.long()]
    nb = absmax.shape[-1] if absmax.dim() == 2 else 0
    if r == 0 or k == 0:
        return vals.to(dtype)
    scale = absmax.float().repeat_interleave(block, dim=-1)[:, :r] if nb else vals.new_zeros(k, r)
    return (vals * scale).to(dtype)


def quantized_bytes(k: int, r: int, block: int) -> int:
    """Bytes of one quantized ``(K, r)`` moment: codes plus fp32 block maxima."""
    return k * r + 4 * k * num_blocks(r, block)


