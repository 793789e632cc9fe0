"""SMMF one-pass step on factors + packed signs: kernel vs twin, twin vs SMMF's equations."""

import pytest
import torch

from optimlib.distributed.row_block import FlatSlice, RowBlock
from optimlib.kernels import smmf_update_
from optimlib.formats.bitpack import unpack_bits
from optimlib.optim.smmf import init_smmf_state, smmf_direction


def _state(R, n, momentum, device):
    st = init_smmf_state(R, n, momentum=momentum, device=device)
    st["exp_avg_sq_row"].uniform_(0.1, 1.0)
    st["exp_avg_sq_col"].uniform_(0.1, 1.0)
    if momentum:
        st["exp_avg_row"].uniform_(0.1, 1.0)
        st["exp_avg_col"].uniform_(0.1, 1.0)
        st["exp_avg_sign"].random_(0, 256)
    return st


# n covers every wide-row width L = 8 / gcd(n, 8): 8 -> 1, 12 -> 2, 10 -> 4, 7 -> 8.
@pytest.mark.parametrize("R,n", [(13, 7), (16, 24), (9, 10), (5, 12), (21, 40), (1, 1), (0, 5)])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("pad", [0, 3])
def test_matches_twin(device, R, n, momentum, pad, tol):
    torch.manual_seed(0)
    st = _state(R, n, momentum, device)
    g = torch.randn(n, R, device=device).t()                       # non-contiguous rows
    kw = dict(beta1=0.9 if momentum else None, beta2=0.6, eps=1e-8, pad_from=max(R * n - pad, 0))
    k, r = {k: v.clone() for k, v in st.items()}, {k: v.clone() for k, v in st.items()}
    d_k, s_k = smmf_update_(g, backend="triton", **kw, **k)
    d_r, s_r = smmf_update_(g, backend="reference", **kw, **r)
    assert d_k.shape == (R, n) and s_k.shape == ((2 if momentum else 1), n)
    torch.testing.assert_close(d_k, d_r, **tol(torch.float32))
    torch.testing.assert_close(s_k, s_r, **tol(torch.float32))
    for key in ("exp_avg_sq_row", "exp_avg_row"):
        if key in k:
            torch.testing.assert_close(k[key], r[key], **tol(torch.float32))
    if momentum:
        assert torch.equal(k["exp_avg_sign"], r["exp_avg_sign"])


def test_bf16_gradient(device, tol):
    torch.manual_seed(1)
    R, n = 17, 12
    st = _state(R, n, True, device)
    g = torch.randn(R, n, device=device).bfloat16()
    k, r = {k: v.clone() for k, v in st.items()}, {k: v.clone() for k, v in st.items()}
    d_k, s_k = smmf_update_(g, beta1=0.9, beta2=0.5, eps=1e-8, backend="triton", **k)
    d_r, s_r = smmf_update_(g, beta1=0.9, beta2=0.5, eps=1e-8, backend="reference", **r)
    torch.testing.assert_close(d_k, d_r, **tol(torch.float32))   # the moments are fp32 whatever the grad
    torch.testing.assert_close(s_k, s_r, **tol(torch.float32))
    assert torch.equal(k["exp_avg_sign"], r["exp_avg_sign"])


@pytest.mark.parametrize("momentum", [True, False])
def test_reference_path_is_smmf_equations(momentum):
    """The twin (what optimlib.SMMF and GaLore's inner="smmf" run on CPU, via smmf_direction) against
    SMMF's equations written out in float64 (Park & Lee 2025, eqs. for decompression, update and the
    rank-1 NNMF): direction, factors 1e-6 relative, sign bits exact, padding held at zero."""
    torch.manual_seed(2)
    R, n, valid = 9, 10, 86
    st = _state(R, n, momentum, "cpu")
    before = {k: v.clone() for k, v in st.items()}
    g = torch.randn(R, n)
    g.view(-1)[valid:] = 0
    block = RowBlock((R, n), FlatSlice(R * n, ((0, R * n),), 0, None))
    b1, b2, eps = (0.9 if momentum else None), 0.6, 1e-8
    d = smmf_direction(g, block, beta1=b1, beta2=b2, eps=eps, valid_numel=valid, **st)

    keep = (torch.arange(R * n) < valid).view(R, n)
    G = g.double()
    V = b2 * torch.outer(before["exp_avg_sq_row"], before["exp_avg_sq_col"]).double() + (1 - b2) * G * G
    V = torch.where(keep, V, 0.0)
    want = {"exp_avg_sq_row": V.sum(1), "exp_avg_sq_col": V.sum(0) / V.sum()}
    if momentum:
        sign = torch.where(unpack_bits(before["exp_avg_sign"], R * n).view(R, n), 1.0, -1.0).double()
        M = b1 * sign * torch.outer(before["exp_avg_row"], before["exp_avg_col"]).double() + (1 - b1) * G
        M = torch.where(keep, M, 0.0)
        want.update(exp_avg_row=M.abs().sum(1), exp_avg_col=M.abs().sum(0) / M.abs().sum())
        assert torch.equal(unpack_bits(st["exp_avg_sign"], R * n).view(R, n), M > 0)
        D = M / (V.sqrt() + eps)
    else:
        D = G / (V.sqrt() + eps)
    torch.testing.assert_close(d.double(), D, rtol=1e-6, atol=1e-7)
    for key, value in want.items():
        torch.testing.assert_close(st[key].double(), value, rtol=1e-6, atol=1e-9, msg=key)


def test_argument_errors():
    st = _state(3, 4, True, "cpu")
    with pytest.raises(ValueError, match="beta1 together"):
        smmf_update_(torch.zeros(3, 4), beta2=0.5, eps=1e-8, **st)
    with pytest.raises(ValueError, match="exp_avg_sq_col"):
        smmf_update_(torch.zeros(3, 5), beta2=0.5, eps=1e-8, exp_avg_sq_row=torch.zeros(3),
                     exp_avg_sq_col=torch.zeros(4))


def test_opcheck():
    torch.manual_seed(3)
    st = _state(6, 5, True, "cpu")
    args = (torch.randn(6, 5), st["exp_avg_sq_row"], st["exp_avg_sq_col"], st["exp_avg_row"], st["exp_avg_col"],
            st["exp_avg_sign"], 0.9, 0.5, 1e-8, 28, "triton")
    torch.library.opcheck(torch.ops.optimlib.smmf_update_.default, args)
