"""N:M mask + application and the SR-STE / gradient-flow backward: kernels vs twins vs optimlib.reparam.nm."""

import pytest
import torch

from optimlib.kernels import nm_grad, nm_mask_apply
from optimlib.reparam.nm import _MaskedWeight, nm_mask


def _weight(rows, cols, dtype, device, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(cols, rows, device=device).to(dtype).t()       # non-contiguous (rows, cols)
    if rows >= 2 and cols >= 4:                                    # ties inside groups
        W[0, :4] = 0.5
        W[1, :4] = torch.tensor([0.5, -0.5, 0.5, -0.5])
    return W


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (3, 6), (4, 4)])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_mask_apply_matches_twin_bitwise(device, dtype, n, m, beta):
    W = _weight(13, 24, dtype, device)
    out_k, mask_k = nm_mask_apply(W, n, m, beta, backend="triton")
    out_r, mask_r = nm_mask_apply(W, n, m, beta, backend="reference")
    assert torch.equal(mask_k, mask_r) and torch.equal(out_k, out_r)
    assert (mask_r.reshape(-1, m).sum(1) == n).all()


def test_tie_rule_and_library_mask():
    W = _weight(6, 8, torch.float32, "cpu")
    _, mask = nm_mask_apply(W, 2, 4, backend="triton")
    assert mask[0, :4].tolist() == [True, True, False, False]      # equal magnitudes: lower index wins
    assert mask[1, :4].tolist() == [True, True, False, False]
    assert torch.equal(mask[2:], nm_mask(W, 2, 4)[2:])            # no ties: torch.topk's mask


@pytest.mark.parametrize("shape", [(1, 4), (0, 8), (3, 5, 8)])
def test_tiny_empty_and_3d(device, shape):
    W = torch.randn(shape, device=device)
    out_k, mask_k = nm_mask_apply(W, 1, 4, backend="triton")
    out_r, mask_r = nm_mask_apply(W, 1, 4, backend="reference")
    assert out_k.shape == W.shape and torch.equal(mask_k, mask_r) and torch.equal(out_k, out_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact,lam,beta", [(False, 2e-4, 0.0), (True, 0.0, 0.25), (True, 2e-4, 0.25),
                                            (False, 0.0, 0.0)])
def test_grad_matches_twin_bitwise(device, dtype, exact, lam, beta):
    W = _weight(9, 16, dtype, device, seed=1)
    g = torch.randn(16, 9, device=device).to(dtype).t()
    _, mask = nm_mask_apply(W, 2, 4, beta, backend="reference")
    d_k = nm_grad(g, W, mask, beta=beta, lam=lam, exact=exact, backend="triton")
    d_r = nm_grad(g, W, mask, beta=beta, lam=lam, exact=exact, backend="reference")
    assert torch.equal(d_k, d_r)
    if not lam:                                                    # the weight is optional then
        assert torch.equal(nm_grad(g, None, mask, beta=beta, exact=exact, backend="triton"), d_r)


@pytest.mark.parametrize("exact,lam,beta", [(False, 2e-4, 0.0), (True, 2e-4, 0.25)])
def test_reference_path_is_the_parametrization_bitwise(exact, lam, beta):
    W = torch.randn(8, 16, requires_grad=True)
    g = torch.randn(8, 16)

    class Owner:
        _decay_pending = True

    mask = nm_mask(W, 2, 4)
    out = _MaskedWeight.apply(W, mask, beta, lam, exact, Owner())
    out.backward(g)
    ours, our_mask = nm_mask_apply(W.detach(), 2, 4, beta, backend="reference")
    assert torch.equal(our_mask, mask) and torch.equal(ours, out.detach())
    assert torch.equal(nm_grad(g, W.detach(), mask, beta=beta, lam=lam, exact=exact, backend="reference"), W.grad)


def test_errors():
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask_apply(torch.zeros(3, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n <= m"):
        nm_mask_apply(torch.zeros(3, 8), 5, 4)


@pytest.mark.parametrize("op", ["mask", "grad"])
def test_opcheck(op):
    W = torch.randn(4, 8)
    if op == "mask":
        torch.library.opcheck(torch.ops.optimlib.nm_mask_apply.default, (W, 2, 4, 0.1, "triton"))
    else:
        mask = nm_mask(W, 2, 4)
        torch.library.opcheck(torch.ops.optimlib.nm_grad.default, (torch.randn(4, 8), W, mask, 0.1, 2e-4, True,
                                                                   "triton"))
