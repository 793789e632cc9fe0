"""The compiled reference twins (:mod:`optimlib.kernels._compiled`) against the eager twins.

Large CPU calls run through ``torch.compile``; the results must equal the eager twin's up to
float rounding, and small calls (every parity test's sizes) must stay bit-identical."""

import warnings

import pytest
import torch

from optimlib.kernels import _compiled
from optimlib.kernels.adam import _adam_fused
from optimlib.kernels.adamp import _apply_fused, _stats_fused
from optimlib.kernels.galore import _backproject_fused

pytestmark = pytest.mark.slow        # compiles (seconds, once per process)

LARGE = (384, 352)                   # 135,168 elements >= MIN_NUMEL
SMALL = (37, 53)
ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction2_sqrt=0.2)


def _tensors(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, grad, w = (torch.randn(shape, generator=g) for _ in range(3))
    v = torch.rand(shape, generator=g) * 1e-2
    return m, v, grad, w


def _run_adamp(fused, shape, nesterov):
    m, v, g, w = _tensors(shape)
    stats = fused(_stats_fused)(m, v, g, w, nesterov=nesterov, **ADAM)
    coef = torch.linspace(0, 0.05, shape[0])
    fused(_apply_fused)(w, m, v, g, coef, torch.tensor(0.999), step_size=1e-2, beta1=0.9, eps=1e-8,
                        bias_correction2_sqrt=0.2, nesterov=nesterov)
    return stats, w, m, v


def _run_adam(fused, shape):
    m, v, g, _ = _tensors(shape)
    n = fused(_adam_fused)(m, v, g, bias_correction1=0.5, nesterov=False, **ADAM)
    return n, m, v


def _run_backproject(fused, shape):
    gen = torch.Generator().manual_seed(1)
    W, A, B = torch.randn(shape, generator=gen), torch.randn(shape[0], 16, generator=gen), torch.randn(16, shape[1], generator=gen)
    fused(_backproject_fused)(W, A, B, scale=0.25, step_size=1e-2, lr=1e-2, weight_decay=0.1)
    return (W,)


CASES = {"adamp": lambda f, s: _run_adamp(f, s, False), "adamp-nesterov": lambda f, s: _run_adamp(f, s, True),
         "adam": _run_adam, "galore-backproject": _run_backproject}
FUSED, EAGER = (lambda op: op), (lambda op: op.eager)


@pytest.mark.parametrize("case", list(CASES))
def test_large_cpu_calls_compile_and_match_the_eager_twin(case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = CASES[case](FUSED, LARGE)
    fallbacks = [str(w.message) for w in caught if "optimlib: compiling" in str(w.message)]
    assert not fallbacks, fallbacks                # a compile failure warns and runs the eager twin
    want = CASES[case](EAGER, LARGE)
    for g, w in zip(got, want):
        scale = w.abs().max()
        assert not torch.equal(g, torch.zeros_like(g))
        torch.testing.assert_close(g, w, rtol=0, atol=2e-6 * float(scale))


@pytest.mark.parametrize("case", list(CASES))
def test_small_calls_and_the_switch_keep_the_eager_twin_bit_exact(case, monkeypatch):
    for got, want in zip(CASES[case](FUSED, SMALL), CASES[case](EAGER, SMALL)):
        assert torch.equal(got, want)
    monkeypatch.setenv(_compiled.ENV_VAR, "0")
    for got, want in zip(CASES[case](FUSED, LARGE), CASES[case](EAGER, LARGE)):
        assert torch.equal(got, want)
