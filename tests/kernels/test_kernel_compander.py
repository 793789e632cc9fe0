"""Weight compander forward/backward: kernel vs twin, twin vs the module's autograd."""

import pytest
import torch

from optimlib.kernels import compander
from optimlib.reparam.compander import Compander


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


def test_reference_path_is_the_module_bitwise():
    torch.manual_seed(1)
    mod = Compander(0.7, 2.5, learnable=True)
    theta = (torch.randn(8, 12) * 0.5).requires_grad_()
    g = torch.randn(8, 12)
    W = mod(theta)
    W.backward(g)
    got = _run(theta, g, mod.log_scale, mod.log_slope, "reference")
    assert torch.equal(got[0], W.detach())
    assert torch.equal(got[1], theta.grad)
    assert torch.equal(got[2], mod.log_scale.grad) and torch.equal(got[3], mod.log_slope.grad)


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
