"""Adam moment update + direction (plain and 8-bit blockwise): Triton kernel vs its twin."""

import pytest
import torch

from optimlib.kernels import adam8bit_lowrank_update_, adam_lowrank_update_
from optimlib.formats.quantize import dequantize_blockwise, num_blocks, quantize_blockwise

HP = dict(beta1=0.9, beta2=0.999, eps=1e-6)


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, every other column of a wider buffer (non-contiguous, in-place writable)."""
    buf = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype, device=t.device)
    view = buf[:, 1::2]
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 21), (3, 300), (1, 1), (0, 7)])
@pytest.mark.parametrize("variant", ["galore", "adamp_nesterov", "adam"])
def test_plain_matches_twin(device, dtype, shape, variant, tol):
    torch.manual_seed(0)
    K, r = shape
    m = torch.randn(K, r, device=device).to(dtype)
    v = torch.rand(K, r, device=device).to(dtype)
    g = torch.randn(r, K, device=device).to(dtype).t()            # non-contiguous (left projection's view)
    kw = dict(HP)
    if variant == "adamp_nesterov":
        kw.update(bias_correction2_sqrt=0.3, nesterov=True)
    elif variant == "adam":
        kw.update(bias_correction1=0.1, bias_correction2_sqrt=0.2)
    m_k, v_k = strided(m), strided(v)                              # in-place writes through strides
    m_r, v_r = m.clone(), v.clone()
    n_k = adam_lowrank_update_(m_k, v_k, g, backend="triton", **kw)
    n_r = adam_lowrank_update_(m_r, v_r, g, backend="reference", **kw)
    assert n_k.shape == (K, r) and n_k.dtype == dtype and n_k.is_contiguous()
    torch.testing.assert_close(m_k, m_r, **tol(dtype))
    torch.testing.assert_close(v_k, v_r, **tol(dtype))
    torch.testing.assert_close(n_k, n_r, **tol(dtype, 4))


def test_reference_is_galores_expression_bitwise():
    torch.manual_seed(1)
    m, v, g = torch.randn(9, 4), torch.rand(9, 4), torch.randn(9, 4)
    m2, v2 = m.clone(), v.clone()
    n = adam_lowrank_update_(m, v, g, backend="reference", **HP)
    m2.mul_(0.9).add_(g, alpha=1.0 - 0.9)                          # galore_lowrank_'s lines
    v2.mul_(0.999).addcmul_(g, g, value=1.0 - 0.999)
    assert torch.equal(n, m2 / v2.sqrt().add_(1e-6)) and torch.equal(m, m2) and torch.equal(v, v2)


def _quantized_state(K, r, block, device):
    if K * r == 0:
        nb = num_blocks(r, block)
        codes, absmax = torch.zeros(K, r, dtype=torch.uint8), torch.zeros(K, nb)
        return [codes, absmax, codes.clone(), absmax.clone()]
    cm, am = quantize_blockwise(torch.randn(K, r, device=device) * 0.1, signed=True, block=block)
    cv, av = quantize_blockwise(torch.rand(K, r, device=device) * 0.05, signed=False, block=block)
    return [cm, am, cv, av]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,r,block", [(13, 21, 8), (6, 40, 256), (5, 12, 5), (1, 1, 4), (0, 6, 4)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_8bit_matches_twin(device, dtype, K, r, block, stochastic, tol):
    torch.manual_seed(2)
    state = _quantized_state(K, r, block, device)
    g = (torch.randn(r, K, device=device) * 0.1).to(dtype).t()
    noise = (7, 20, 21, 3) if stochastic else None
    s_k, s_r = [t.clone() for t in state], [t.clone() for t in state]
    n_k = adam8bit_lowrank_update_(*s_k, g, block=block, noise=noise, backend="triton", **HP)
    n_r = adam8bit_lowrank_update_(*s_r, g, block=block, noise=noise, backend="reference", **HP)
    torch.testing.assert_close(n_k, n_r, **tol(dtype, 4))
    assert s_k[1].shape == (K, num_blocks(r, block))
    if dtype == torch.float32:
        # Same codebook search, same hash: identical codes (block maxima to rounding).
        assert torch.equal(s_k[0], s_r[0]) and torch.equal(s_k[2], s_r[2])
        torch.testing.assert_close(s_k[1], s_r[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(s_k[3], s_r[3], rtol=1e-6, atol=0)
    else:
        # bf16 moments: a different last bit of an updated moment can move it across a level
        # boundary (or, near zero, across many levels of the logarithmic codebook): compare
        # what the codes mean, relative to each block's maximum (levels are ~10 % apart).
        for codes, absmax, signed in ((0, 1, True), (2, 3, False)):
            a = dequantize_blockwise(s_k[codes], s_k[absmax], signed=signed, block=block)
            b = dequantize_blockwise(s_r[codes], s_r[absmax], signed=signed, block=block)
            scale = s_r[absmax].repeat_interleave(block, dim=1)[:, :r]
            assert ((a - b).abs() <= 0.12 * scale + 1e-12).all()
            assert (s_k[codes] != s_r[codes]).float().mean() < 0.1 if K * r else True


def test_8bit_reference_roundtrips_the_format():
    """The twin is quantize.py's own dequantize -> update -> quantize (second moment as sqrt)."""
    torch.manual_seed(3)
    K, r, block = 4, 10, 4
    state = _quantized_state(K, r, block, "cpu")
    m = dequantize_blockwise(state[0], state[1], signed=True, block=block)
    root = dequantize_blockwise(state[2], state[3], signed=False, block=block)
    v = root * root
    g = torch.randn(K, r)
    n = adam8bit_lowrank_update_(*state, g, block=block, backend="reference", **HP)
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.999).addcmul_(g, g, value=1.0 - 0.999)
    assert torch.equal(n, m / v.sqrt().add_(1e-6))
    assert torch.equal(state[0], quantize_blockwise(m, signed=True, block=block)[0])
    assert torch.equal(state[2], quantize_blockwise(v.sqrt(), signed=False, block=block)[0])


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        adam_lowrank_update_(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2), **HP)
    cm = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        adam8bit_lowrank_update_(cm, torch.zeros(2, 2), cm.clone(), torch.zeros(2, 1), torch.zeros(2, 3), block=4,
                                 **HP)


@pytest.mark.parametrize("op", ["plain", "8bit"])
def test_opcheck(op):
    torch.manual_seed(4)
    if op == "plain":
        args = (torch.randn(5, 3), torch.rand(5, 3), torch.randn(5, 3), 0.9, 0.999, 1e-6, 1.0, 0.5, True, "triton")
        torch.library.opcheck(torch.ops.optimlib.adam_update_.default, args)
    else:
        args = (*_quantized_state(5, 6, 4, "cpu"), torch.randn(5, 6), 0.9, 0.999, 1e-6, 1.0, 1.0, False, 4, True, 1,
                2, 3, 0, "triton")
        torch.library.opcheck(torch.ops.optimlib.adam8bit_update_.default, args)
