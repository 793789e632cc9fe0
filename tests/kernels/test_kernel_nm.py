"""N:M mask + application and the SR-STE / gradient-flow backward: kernels vs twins vs optimlib.reparam.nm."""

import pytest
import torch

from torch import nn

from optimlib import reparam
from optimlib.kernels import _dispatch, nm_grad, nm_mask_apply
from optimlib.kernels.nm import _grad_kernel, _mask_kernel
from optimlib.reparam.nm import nm_sparsify


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beta_as_a_tensor_equals_beta_as_a_float(device, dtype):
    """The ops take beta as a 0-d tensor (what the N:M layer passes, so a compiled graph is not
    tied to its value); a float gives the same bits, and so does the hand formula
    ``W * where(mask, 1, beta)`` with ``s`` rounded to the weight's dtype."""
    W = _weight(13, 24, dtype, device)
    g = torch.randn(24, 13, device=device).to(dtype).t()
    for backend in ("triton", "reference"):
        out_f, mask = nm_mask_apply(W, 2, 4, 0.3, backend=backend)
        out_t, mask_t = nm_mask_apply(W, 2, 4, torch.tensor(0.3, dtype=torch.float64, device=device), backend=backend)
        assert torch.equal(mask, mask_t) and torch.equal(out_f, out_t)
        assert torch.equal(out_t, W * torch.where(mask, 1.0, torch.tensor(0.3)).to(device=device, dtype=dtype))
        d_f = nm_grad(g, W, mask, beta=0.3, exact=True, backend=backend)
        d_t = nm_grad(g, W, mask, beta=torch.tensor(0.3, device=device), exact=True, backend=backend)
        assert torch.equal(d_f, d_t)


@pytest.mark.parametrize("beta", [torch.ones(2), torch.tensor(1)])
def test_beta_must_be_a_float_or_0d_float_tensor(beta):
    with pytest.raises(ValueError, match="beta must be a float or a 0-d floating tensor"):
        nm_mask_apply(torch.zeros(3, 8), 2, 4, beta)


def test_a_float_beta_becomes_a_device_fill_not_a_host_copy():
    """A float beta (the N:M layer's evaluation forward passes 0.0) is made on the weight's device
    by ``aten.full``, not built on the host and copied (``torch.tensor(..., device=...)``: a copy
    from pageable host memory, which on CUDA waits for the stream's queued work at every call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    W, g, seen = torch.randn(4, 8), torch.randn(4, 8), []
    with Ops():
        _, mask = nm_mask_apply(W, 2, 4, 0.3, backend="reference")
        nm_grad(g, W, mask, beta=0.3, exact=True, backend="reference")
    aten = torch.ops.aten
    assert seen == [aten.full.default, torch.ops.optimlib.nm_mask_apply.default,
                    aten.full.default, torch.ops.optimlib.nm_grad.default]


def test_tie_rule_and_library_mask():
    W = _weight(6, 8, torch.float32, "cpu")
    _, mask = nm_mask_apply(W, 2, 4, backend="triton")
    assert mask[0, :4].tolist() == [True, True, False, False]      # equal magnitudes: lower index wins
    assert mask[1, :4].tolist() == [True, True, False, False]
    kept = W[2:].abs().reshape(-1, 4).topk(2, dim=1).indices       # no ties: torch.topk's mask
    assert torch.equal(mask[2:].reshape(-1, 4), torch.zeros(kept.shape[0], 4, dtype=torch.bool).scatter_(1, kept, True))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("due", [True, False])
def test_pending_flag_gates_the_srste_term_and_is_cleared(device, dtype, due):
    W = _weight(9, 16, dtype, device, seed=2)
    g = torch.randn(9, 16, device=device).to(dtype)
    _, mask = nm_mask_apply(W, 2, 4, backend="reference")
    want = nm_grad(g, W, mask, lam=0.01 if due else 0.0, backend="reference")
    for backend in ("triton", "reference"):
        pending = torch.tensor(due, device=device)
        got = nm_grad(g, W, mask, lam=0.01, pending=pending, backend=backend)
        assert torch.equal(got, want) and not bool(pending)


@pytest.mark.parametrize("exact,lam,beta", [(False, 2e-4, 0.0), (True, 2e-4, 0.25), (True, 0.0, 0.25)])
def test_reference_path_is_the_hand_formula_bitwise(exact, lam, beta):
    """The twins against the rule written out with plain tensor ops (autograd of ``W * s`` for
    ``exact``) and a ``torch.topk`` mask (no ties in a random weight)."""
    W = torch.randn(8, 16, requires_grad=True)
    g = torch.randn(8, 16)
    groups = W.detach().abs().reshape(-1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    mask = mask.reshape(W.shape)
    s = torch.where(mask, 1.0, beta)
    (W * s).backward(g)
    out, our_mask = nm_mask_apply(W.detach(), 2, 4, beta, backend="reference")
    assert torch.equal(our_mask, mask) and torch.equal(out, W.detach() * s)
    want = (W.grad if exact else g) + lam * W.detach() * ~mask
    assert torch.equal(nm_grad(g, W.detach(), mask, beta=beta, lam=lam, exact=exact, backend="reference"), want)


def test_parametrization_runs_through_the_ops(monkeypatch):
    """The N:M layer has no maths of its own: with the Triton backend forced its forward launches
    the mask kernel and its backward the gradient kernel, with the reference path's results bit
    for bit -- and SR-STE's term once per optimizer step, in the first backward."""
    torch.manual_seed(0)
    x, c = torch.randn(5, 16), torch.randn(5, 8)

    def run(backend):
        monkeypatch.setenv("OPTIMLIB_KERNELS", backend)
        lin = nm_sparsify(nn.Linear(16, 8), n=2, m=4, recipe="srste", srste_lambda=0.1)
        with torch.no_grad():
            lin.parametrizations.weight.original.copy_(torch.arange(128.0).reshape(8, 16).sin())
        weight, grads = lin.parametrizations.weight.original, []
        with _dispatch.recording_launches() as launches:
            for step in range(2):
                for _ in range(2):                        # two micro-batches per step
                    (lin(x) * c).sum().backward()
                grads.append(weight.grad.clone())
                weight.grad = None
                reparam.after_step(lin)
        return [k for k, *_ in launches], grads

    kernels, got = run("triton")
    assert kernels == [_mask_kernel, _grad_kernel] * 4
    none, want = run("reference")
    assert none == [] and all(torch.equal(a, b) for a, b in zip(got, want))
    g_once = 2 * (c.t() @ x)                                    # straight-through: sum of dL/dW~
    W = torch.arange(128.0).reshape(8, 16).sin()
    _, mask = nm_mask_apply(W, 2, 4, backend="reference")
    for grad in want:                                          # the term once per step, not twice
        torch.testing.assert_close(grad, g_once + 0.1 * W * ~mask)


def test_errors():
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask_apply(torch.zeros(3, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < n <= m"):
        nm_mask_apply(torch.zeros(3, 8), 5, 4)


@pytest.mark.parametrize("op", ["mask", "grad"])
def test_opcheck(op):
    W, beta = torch.randn(4, 8), torch.tensor(0.1)       # beta: the ops take a 0-d float32 tensor
    if op == "mask":
        torch.library.opcheck(torch.ops.optimlib.nm_mask_apply.default, (W, 2, 4, beta, "triton"))
    else:
        _, mask = nm_mask_apply(W, 2, 4, backend="reference")
        torch.library.opcheck(torch.ops.optimlib.nm_grad.default, (torch.randn(4, 8), W, mask, beta, 2e-4, True,
                                                                   "triton"))
        torch.library.opcheck(torch.ops.optimlib.nm_grad_once.default,
                              (torch.randn(4, 8), W, mask, torch.tensor(True), beta, 2e-4, True, "triton"))
