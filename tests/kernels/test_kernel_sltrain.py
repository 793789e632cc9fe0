"""SLTrain dense weight (B A_s + scattered S) and parameter gradients: kernels vs twins, twins vs
plain autograd, and the layer running through the ops."""

import pytest
import torch
import torch.nn.functional as F

from optimlib.kernels import _dispatch, sltrain_compose, sltrain_grads
from optimlib.kernels.sltrain import _compose_kernel, _sampled_kernel
from optimlib.reparam.sltrain import SparseLowRankLinear, sample_support


def _factors(m, n, r, nnz, dtype, device, seed=0):
    torch.manual_seed(seed)
    B = torch.randn(m, r, device=device).to(dtype)
    A = torch.randn(n, r, device=device).to(dtype).t()             # non-contiguous A_s
    idx = sample_support(m * n, nnz, torch.Generator().manual_seed(seed)).to(device)
    vals = torch.randn(nnz, device=device).to(dtype)
    return B, A, vals, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,r,nnz", [(37, 45, 5, 100), (70, 20, 3, 1400), (5, 3, 1, 1), (1, 1, 1, 1),
                                       (9, 17, 4, 0), (0, 4, 2, 0)])
def test_compose_matches_twin(device, dtype, m, n, r, nnz, tol):
    B, A, vals, idx = _factors(m, n, r, nnz, dtype, device)
    W_k = sltrain_compose(B, A, vals, idx, backend="triton")
    W_r = sltrain_compose(B, A, vals, idx, backend="reference")
    torch.testing.assert_close(W_k, W_r, **tol(dtype))


def test_compose_without_sparse_part(device, tol):
    B, A, _, _ = _factors(12, 9, 3, 0, torch.float32, device)
    torch.testing.assert_close(sltrain_compose(B, A, backend="triton"), B @ A, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,r,nnz,T", [(37, 45, 5, 100, 23), (20, 33, 2, 600, 1), (1, 1, 1, 1, 3),
                                         (8, 8, 2, 0, 5)])
def test_grads_match_twin(device, dtype, m, n, r, nnz, T):
    B, A, vals, idx = _factors(m, n, r, nnz, dtype, device, seed=1)
    dy = torch.randn(T, m, device=device).to(dtype)
    x = torch.randn(n, T, device=device).to(dtype).t()             # non-contiguous input
    got = sltrain_grads(dy, x, B, A, idx, backend="triton")
    want = sltrain_grads(dy, x, B, A, idx, backend="reference")
    # The kernel path associates the products differently (dy^T (x A^T) instead of (dy^T x) A^T),
    # so entries that cancel differ by rounding relative to the terms, not to the result: compare
    # relative to the whole tensor (fp32: 1e-5, bf16: 2^-6 -- a couple of bf16 ulps).
    bound = 1e-5 if dtype == torch.float32 else 2 ** -6
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        if b.numel():
            err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
            assert err < bound, float(err)
    dB, dA, dv = sltrain_grads(dy, x, B, A, idx, need_b=False, need_v=False, backend="triton")
    assert dB is None and dv is None and dA.shape == A.shape


def _trained_layer():
    torch.manual_seed(2)
    layer = SparseLowRankLinear(24, 16, rank=4, density=0.1, alpha=8.0, seed=3)
    with torch.no_grad():
        layer.B.normal_()
    return layer


def test_reference_path_is_plain_autograd_bitwise():
    """The twins against autograd through the dense ``(alpha/r) B A + S`` (``dense_weight``, the
    naive parametrization): the same products in the same order, so equal to the last bit in fp32."""
    layer = _trained_layer()
    x = torch.randn(2, 5, 24)
    dy = torch.randn(2, 5, 16)
    F.linear(x, layer.dense_weight(), layer.bias).backward(dy)
    A_s = layer.A.detach() * layer.scale
    W = sltrain_compose(layer.B.detach(), A_s, layer.values.detach(), layer.indices, backend="reference")
    assert torch.equal(W, layer.dense_weight().detach())
    dB, dA, dv = sltrain_grads(dy.reshape(-1, 16), x.reshape(-1, 24), layer.B.detach(), A_s, layer.indices,
                               backend="reference")
    assert torch.equal(dB, layer.B.grad)
    assert torch.equal(dA * layer.scale, layer.A.grad)            # autograd's A -> A * scale step
    assert torch.equal(dv, layer.values.grad)


def test_layer_runs_through_the_ops(monkeypatch, tol):
    """The layer has no maths of its own: with the Triton backend forced, its forward launches the
    compose kernel, its backward the compose kernel again (for dx) and the sampled-GEMM kernel,
    and the results are the reference path's within the kernels' tolerance."""
    layer = _trained_layer()
    x = torch.randn(3, 4, 24, requires_grad=True)
    dy = torch.randn(3, 4, 16)

    def run(backend):
        monkeypatch.setenv("OPTIMLIB_KERNELS", backend)
        for p in (x, *layer.parameters()):
            p.grad = None
        with _dispatch.recording_launches() as launches:
            y = layer(x)
            y.backward(dy)
        return [k for k, *_ in launches], [y.detach(), x.grad, *(p.grad for p in layer.parameters())]

    kernels, got = run("triton")
    assert kernels == [_compose_kernel, _compose_kernel, _sampled_kernel]
    none, want = run("reference")
    assert none == []
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(torch.float32, 10))


def test_ops_ignore_autocast_like_their_fake_implementations():
    """Under autocast the ops return the dtypes their fake implementations state (autocast would
    otherwise reach the twin's matmuls eagerly but not a compiled graph); the layer itself casts
    the factors to autocast's dtype, as autocast did to its ``B @ A``."""
    B, A, vals, idx = _factors(6, 7, 2, 9, torch.float32, "cpu", seed=5)
    layer = _trained_layer()
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sltrain_compose(B, A, vals, idx).dtype == torch.float32
        assert [t.dtype for t in sltrain_grads(torch.randn(3, 6), torch.randn(3, 7), B, A, idx)] == [torch.float32] * 3
        y = layer(x)
    assert y.dtype == torch.bfloat16
    W = sltrain_compose(layer.B.detach().bfloat16(), (layer.A.detach() * layer.scale).bfloat16(),
                        layer.values.detach(), layer.indices)
    assert W.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), W, layer.bias.detach().bfloat16()))


@pytest.mark.parametrize("op", ["compose", "grads"])
def test_opcheck(op):
    B, A, vals, idx = _factors(6, 7, 2, 9, torch.float32, "cpu", seed=4)
    if op == "compose":
        torch.library.opcheck(torch.ops.optimlib.sltrain_compose.default, (B, A, vals, idx, "triton"))
    else:
        torch.library.opcheck(torch.ops.optimlib.sltrain_grads.default,
                              (torch.randn(3, 6), torch.randn(3, 7), B, A, idx, True, True, True, "triton"))
