"""AdamP fused step (stats pass, coefficients, apply pass): kernel vs twin, twin vs the ``adamp``
package (optimlib.AdamP runs these ops: tests/optim/test_adamp.py checks it against the package)."""

import pytest
import torch

from optimlib.kernels import adamp_coefficients, adamp_update_

HP = dict(beta1=0.9, beta2=0.999, lr=0.1, weight_decay=0.01, eps=1e-8, delta=0.1, wd_ratio=0.1)


def _case(kind: str, R: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and gradient for which AdamP's channel view fires, the layer view fires, or none."""
    w = torch.randn(R, n, device=device)
    g = torch.randn(R, n, device=device)
    if kind in ("channel", "layer"):
        g = g - w * ((g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True))   # each row orthogonal to w
    if kind == "layer":                                                             # rows 0, 1 aligned, sum 0
        g[0] += 2 * w[0]
        g[1] -= 2 * w[1] * (w[0] * w[0]).sum() / (w[1] * w[1]).sum()
    return w, g


def _fired(stats, R, n):
    coef, decay = adamp_coefficients(stats, num_rows=R, num_cols=n, lr=HP["lr"], weight_decay=HP["weight_decay"],
                                     delta=HP["delta"], wd_ratio=HP["wd_ratio"], eps=HP["eps"])
    return coef, float(decay)


@pytest.mark.parametrize("kind", ["none", "channel", "layer"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_twin(device, kind, nesterov, dtype, tol):
    torch.manual_seed(0)
    R, n = 11, 19
    w, g = _case(kind, R, n, device)
    w, g = w.to(dtype), g.to(dtype)
    m = (torch.randn(R, n, device=device) * 0.1).to(dtype)
    v = (torch.rand(R, n, device=device) * 0.01).to(dtype)
    out = {}
    for backend in ("triton", "reference"):
        W, M, V = w.t().contiguous().t(), m.clone(), v.clone()     # the weight non-contiguous
        stats = adamp_update_(W, g, M, V, step=3, nesterov=nesterov, backend=backend, **HP)
        out[backend] = (W, M, V, stats)
    coef, decay = _fired(out["reference"][3], R, n)
    if dtype == torch.float32:   # the construction makes the intended view fire
        expect = {"none": 1 - 1e-3, "channel": 1 - 1e-4, "layer": 1 - 1e-4}[kind]
        assert decay == pytest.approx(expect, rel=1e-6)
        assert (coef != 0).any() == (kind != "none")
    for a, b in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(a, b, **tol(dtype, 4))


@pytest.mark.parametrize("kind", ["none", "channel", "layer"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_reference_path_against_adamp(kind, nesterov):
    """One step from the same state as the ``adamp`` package's AdamP 0.3.0 (the oracle): moments
    bit-identical; the weight bit-identical when no projection fires, and within 2e-7 otherwise
    (the op projects as u - w <w,u>/(|w|+eps)^2 instead of u - unit <unit,u>: ~1 ulp).
    (Imported here: the kernel tests of this module also run where the oracle is not installed,
    e.g. on a GPU machine with only torch and Triton.)"""
    adamp_pkg = pytest.importorskip("adamp")
    torch.manual_seed(1)
    R, n = 11, 19
    w, g = _case(kind, R, n, "cpu")
    m, v = torch.randn(R, n) * 0.1, torch.rand(R, n) * 0.01
    W, M, V = w.clone(), m.clone(), v.clone()
    adamp_update_(W, g, M, V, step=3, nesterov=nesterov, backend="reference", **HP)
    ref = torch.nn.Parameter(w.clone())
    opt = adamp_pkg.AdamP([ref], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                          weight_decay=HP["weight_decay"], delta=HP["delta"], wd_ratio=HP["wd_ratio"],
                          nesterov=nesterov)
    opt.state[ref].update(step=2, exp_avg=m.clone(), exp_avg_sq=v.clone())
    ref.grad = g.clone()
    opt.step()
    assert torch.equal(M, opt.state[ref]["exp_avg"]) and torch.equal(V, opt.state[ref]["exp_avg_sq"])
    if kind == "none":
        assert torch.equal(W, ref.detach())
    else:
        torch.testing.assert_close(W, ref.detach(), rtol=2e-7, atol=2e-7)


def test_vector_and_tiny_parameters(device, tol):
    """1-D parameters (no projection), a single element, an empty tensor, a 3-D weight."""
    torch.manual_seed(2)
    for shape in [(7,), (1, 1), (0, 3), (4, 3, 5)]:
        w, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
        res = {}
        for backend in ("triton", "reference"):
            W, M, V = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
            adamp_update_(W, g, M, V, step=1, backend=backend, **HP)
            res[backend] = W
        torch.testing.assert_close(res["triton"], res["reference"], **tol(torch.float32))


@pytest.mark.parametrize("op", ["stats", "apply"])
def test_opcheck(op):
    torch.manual_seed(3)
    m, v, g, w = torch.randn(5, 6), torch.rand(5, 6), torch.randn(5, 6), torch.randn(5, 6)
    if op == "stats":
        torch.library.opcheck(torch.ops.optimlib.adamp_stats_.default,
                              (m, v, g, w, 0.9, 0.999, 1e-8, 0.5, False, "triton"))
    else:
        torch.library.opcheck(torch.ops.optimlib.adamp_apply_.default,
                              (w, m, v, g, torch.rand(5), torch.tensor(0.99), 0.1, 0.9, 1e-8, 0.5, True, "triton"))
