"""Backend selection (argument, OPTIMLIB_KERNELS, auto) and tracing the ops with torch.compile."""

import pytest
import torch

from optimlib import kernels
from optimlib.kernels import _dispatch


def test_resolution_order(monkeypatch):
    assert _dispatch.resolve_backend(None) == "auto"
    monkeypatch.setenv("OPTIMLIB_KERNELS", "Reference")
    assert _dispatch.resolve_backend(None) == "reference"
    assert _dispatch.resolve_backend("triton") == "triton"        # the argument wins
    monkeypatch.setenv("OPTIMLIB_KERNELS", "cuda")
    with pytest.raises(ValueError, match="OPTIMLIB_KERNELS"):
        _dispatch.resolve_backend(None)
    with pytest.raises(ValueError, match="backend"):
        _dispatch.resolve_backend("fast")


def test_auto_runs_the_twin_on_cpu_and_triton_on_cuda():
    cpu = torch.zeros(2)
    assert not _dispatch.use_triton("auto", (cpu,))
    assert not _dispatch.use_triton("reference", (cpu,))
    assert _dispatch.use_triton("triton", (cpu,))                  # the interpreter (opted in by conftest)
    if torch.cuda.is_available():
        assert _dispatch.use_triton("auto", (cpu.cuda(),)) == _dispatch.HAS_TRITON


def test_triton_on_cpu_needs_the_interpreter_opt_in(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(kernels.KernelUnavailable, match="TRITON_INTERPRET=1"):
        kernels.nm_mask_apply(torch.randn(2, 4), 2, 4, backend="triton")


def test_environment_variable_forces_the_kernel(monkeypatch):
    """OPTIMLIB_KERNELS=triton sends CPU tensors through the (interpreted) kernel: proven by a
    launch counter, since the two paths give the same numbers."""
    launches = []
    real = _dispatch.launch
    monkeypatch.setattr("optimlib.kernels.nm.launch", lambda *a, **k: (launches.append(a[0]), real(*a, **k)))
    W = torch.randn(3, 8)
    kernels.nm_mask_apply(W, 2, 4)
    assert launches == []
    monkeypatch.setenv("OPTIMLIB_KERNELS", "triton")
    kernels.nm_mask_apply(W, 2, 4)
    assert len(launches) == 1


def test_interpretation_does_not_depend_on_import_time_environment():
    """The kernels were decorated when this module was collected, without TRITON_INTERPRET
    (``import torch._dynamo`` imports triton too): they are compiled-mode JITFunctions, and still
    run on CPU tensors."""
    from triton.runtime.jit import JITFunction
    from optimlib.kernels.adam import _adam_kernel
    assert isinstance(_adam_kernel, JITFunction)
    m, v, g = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    n = kernels.adam_lowrank_update_(m, v, g, beta1=0.9, beta2=0.999, eps=1e-8, backend="triton")
    torch.testing.assert_close(n, torch.full((2, 3), 0.1 / (0.001 ** 0.5 + 1e-8)))


def test_ops_compile_without_graph_breaks():
    """A step calling several ops (mutating and functional) compiles with CPU inductor,
    fullgraph=True, and computes what eager does."""
    torch._dynamo.reset()

    def step(W, m, v, G, P, theta):
        low = G @ P.t()
        n = kernels.adam_lowrank_update_(m, v, low, beta1=0.9, beta2=0.999, eps=1e-6)
        kernels.galore_backproject_update_(W, n, P, scale=0.25, step_size=1e-2, lr=1e-2, weight_decay=0.1)
        sparse, mask = kernels.nm_mask_apply(W, 2, 4)
        return sparse.sum() + kernels.compander(theta, torch.ones(1), torch.full((1,), 2.0)).sum()

    torch.manual_seed(0)
    args = [torch.randn(6, 8), torch.zeros(6, 3), torch.zeros(6, 3), torch.randn(6, 8), torch.randn(3, 8),
            torch.randn(4, 4)]
    eager = [a.clone() for a in args]
    out_c = torch.compile(step, fullgraph=True, backend="inductor")(*args)
    out_e = step(*eager)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(args, eager):                                  # the in-place updates happened too
        torch.testing.assert_close(a, b)
