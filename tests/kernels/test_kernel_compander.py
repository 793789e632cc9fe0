"""Weight compander forward/backward: kernel vs twin, twin vs autograd of the plain expression,
and the parametrization running through the op."""

import pytest
import torch
from torch import nn

from optimlib.kernels import _dispatch, compander
from optimlib.kernels.compander import _backward_kernel, _forward_kernel
from optimlib.reparam.compander import compand


def _run(theta0, g, log_a, log_k, backend):
    theta = theta0.detach().clone().requires_grad_()
    la, lk = log_a.detach().clone().requires_grad_(), log_k.detach().clone().requires_grad_()
    W = compander(theta, la.exp(), lk.exp(), backend=backend)
    W.backward(g)
    return W.detach(), theta.grad, la.grad, lk.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(19, 13), (300,), (1, 1), (0, 4)])
def test_matches_twin(device, dtype, shape, tol):
    torch.manual_seed(0)
    theta = (torch.randn(shape, device=device) * 0.5).to(dtype)
    if len(shape) == 2:
        theta = theta.t().contiguous().t()                         # non-contiguous
    g = torch.randn(shape, device=device).to(dtype)
    log_a = torch.tensor([-0.3], device=device)
    log_k = torch.tensor([0.9], device=device)
    got = _run(theta, g, log_a, log_k, "triton")
    want = _run(theta, g, log_a, log_k, "reference")
    torch.testing.assert_close(got[0], want[0], **tol(dtype))
    torch.testing.assert_close(got[1], want[1], **tol(dtype, 2))
    # The two scalar gradients are sums over all entries (the twin sums bf16 tensors in bf16).
    torch.testing.assert_close(got[2], want[2], **tol(dtype, 10))
    torch.testing.assert_close(got[3], want[3], **tol(dtype, 10))


def test_kernel_tanh_accuracy():
    x = torch.linspace(-12, 12, 20001)
    W = compander(x, torch.tensor([1.0]), torch.tensor([1.0]), backend="triton")
    err = (W - torch.tanh(x)).abs() / torch.tanh(x).abs().clamp_min(1e-30)
    assert float(err.max()) < 4e-7                                 # a few ulp


def test_reference_path_is_autograd_of_the_expression_bitwise():
    """The twin against autograd of ``a * tanh(theta * (k / a))`` with ``a = exp(log a)``,
    ``k = exp(log k)`` (what the compander computed before the op): equal to the last bit."""
    torch.manual_seed(1)
    log_a = torch.tensor([0.7]).log().requires_grad_()
    log_k = torch.tensor([2.5]).log().requires_grad_()
    theta = (torch.randn(8, 12) * 0.5).requires_grad_()
    g = torch.randn(8, 12)
    a = log_a.exp()
    W = a * torch.tanh(theta * (log_k.exp() / a))
    W.backward(g)
    got = _run(theta, g, log_a, log_k, "reference")
    assert torch.equal(got[0], W.detach())
    assert torch.equal(got[1], theta.grad)
    assert torch.equal(got[2], log_a.grad) and torch.equal(got[3], log_k.grad)


def test_parametrization_runs_through_the_op(monkeypatch, tol):
    """With the Triton backend forced, the compander's forward and backward launch the kernels
    (the parametrization has no maths of its own), agreeing with the reference path."""
    def run(backend):
        monkeypatch.setenv("OPTIMLIB_KERNELS", backend)
        torch.manual_seed(0)
        lin = compand(nn.Linear(12, 6), saturation=3.0, slope=2.0, learnable=True)
        with _dispatch.recording_launches() as launches:
            (lin(torch.randn(4, 12)) * torch.randn(4, 6)).sum().backward()
        return [k for k, *_ in launches], [p.grad for p in lin.parametrizations.weight.parameters()]

    kernels, got = run("triton")
    assert kernels == [_forward_kernel, _backward_kernel]
    none, want = run("reference")
    assert none == [] and len(want) == 3                          # theta, log a, log k
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol(torch.float32, 10))


def test_frozen_hyperparameters_skip_their_sums():
    theta = torch.randn(5, 6, requires_grad=True)
    W = compander(theta, torch.tensor([0.5]), torch.tensor([2.0]), backend="triton")
    W.sum().backward()
    assert theta.grad is not None


def test_opcheck():
    theta = torch.randn(5, 6, requires_grad=True)
    a, k = torch.tensor([0.5], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    torch.library.opcheck(torch.ops.optimlib.compander_fwd.default, (theta, a, k, "triton"))
    torch.library.opcheck(torch.ops.optimlib.compander_bwd.default,
                          (torch.randn(5, 6), theta.detach(), a.detach(), k.detach(), True, "triton"))
