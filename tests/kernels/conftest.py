"""Kernel tests: every Triton kernel against its PyTorch twin.

On a machine without a GPU the kernels run in Triton's interpreter (``backend="triton"`` on CPU
tensors).  ``TRITON_INTERPRET=1`` is set per test (the user's opt-in that
:mod:`optimlib.kernels._dispatch` checks at call time); nothing depends on it being set before
``triton`` is imported, which ``import torch._dynamo`` may already have done.  Where CUDA is
available the same tests also run the compiled kernels (``device`` fixture).
"""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Tolerances of kernel vs twin, per dtype.  fp32: the kernels follow the twins' operation order
# and rounding (IEEE division and square root), and differ only by summation order in reductions
# and matmuls, by FMA contraction on a GPU and by our tanh; bf16: the same, plus one bf16 ulp
# (2^-8 relative) where eager PyTorch rounds an intermediate differently (CPU bf16 matmul
# accumulation, sums of bf16 tensors).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("OPTIMLIB_KERNELS", raising=False)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def tol():
    def get(dtype, scale: float = 1.0):
        t = TOL[dtype]
        return dict(rtol=t["rtol"] * scale, atol=t["atol"] * scale)
    return get
