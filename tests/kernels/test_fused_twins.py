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
from optimlib.optim.galore.rules import _dense_tensor_fused

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


def _run_galore_dense(fused, shape):
    m, v, g, w = _tensors(shape)
    fused(_dense_tensor_fused)(w, g, m, v, beta1=0.9, beta2=0.999, eps=1e-6, step_size=1e-2, lr=1e-2,
                               weight_decay=0.1)
    return w, m, v


CASES = {"adamp": lambda f, s: _run_adamp(f, s, False), "adamp-nesterov": lambda f, s: _run_adamp(f, s, True),
         "adam": _run_adam, "galore-backproject": _run_backproject, "galore-dense": _run_galore_dense}
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


def test_a_changing_step_size_does_not_recompile_each_step():
    """A step size (or scheduled learning rate) reaches the compiled twin as a tensor: twelve
    distinct values stay within torch.compile's recompile limit (eight), so no fallback warns."""
    m, v, g, w = _tensors(LARGE)
    coef = torch.linspace(0, 0.05, LARGE[0])
    want = w.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 13):
            size = 1e-2 / (1 - 0.9 ** step)
            _apply_fused(w, m, v, g, coef, torch.tensor(0.999), step_size=size, beta1=0.9, eps=1e-8,
                         bias_correction2_sqrt=0.2, nesterov=False)
            _apply_fused.eager(want, m.clone(), v.clone(), g, coef, torch.tensor(0.999), step_size=size, beta1=0.9,
                               eps=1e-8, bias_correction2_sqrt=0.2, nesterov=False)
    assert not [str(x.message) for x in caught if "optimlib: compiling" in str(x.message)]
    torch.testing.assert_close(w, want, rtol=0, atol=2e-6 * float(want.abs().max()))


# ----------------------------------------------------------------------------- SMMF in row blocks
SMMF_LARGE = [(520, 261, None), (700, 513, 700 * 513 - 100)]   # >= MIN_NUMEL; odd width; virtual padding


def _smmf_case(R, n, momentum=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(R, n, generator=gen)
    state = dict(exp_avg_sq_row=torch.rand(R, generator=gen), exp_avg_sq_col=torch.rand(n, generator=gen))
    if momentum:
        state.update(exp_avg_row=torch.rand(R, generator=gen), exp_avg_col=torch.rand(n, generator=gen),
                     exp_avg_sign=torch.randint(0, 256, ((R * n + 7) // 8,), dtype=torch.uint8, generator=gen))
    return grad, state


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("R,n,pad", SMMF_LARGE)
def test_smmf_row_blocks_match_the_reference(R, n, pad, momentum):
    from optimlib.kernels._smmf_blocked import use_blocked
    from optimlib.kernels.smmf import smmf_update_, smmf_update_reference

    grad, got_state = _smmf_case(R, n, momentum)
    want_state = {k: t.clone() for k, t in got_state.items()}
    assert use_blocked(grad)
    beta1 = 0.9 if momentum else None
    d, col = smmf_update_(grad, beta1=beta1, beta2=0.99, eps=1e-8, pad_from=pad, **got_state)
    want_d, want_col = smmf_update_reference(
        grad, want_state["exp_avg_sq_row"], want_state["exp_avg_sq_col"], want_state.get("exp_avg_row"),
        want_state.get("exp_avg_col"), want_state.get("exp_avg_sign"), beta1=beta1 or 0.0, beta2=0.99, eps=1e-8,
        pad_from=R * n if pad is None else pad)
    for got, want in [(d, want_d), (col, want_col)] + [(got_state[k], want_state[k]) for k in got_state
                                                        if k.endswith("_row")]:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))
    if momentum:   # a sign may differ only where |M| rounds to about zero: none in random data
        assert torch.equal(got_state["exp_avg_sign"], want_state["exp_avg_sign"])


def test_smmf_switch_keeps_the_reference_bit_exact(monkeypatch):
    from optimlib.kernels.smmf import smmf_update_, smmf_update_reference

    monkeypatch.setenv(_compiled.ENV_VAR, "0")
    grad, got_state = _smmf_case(520, 261)
    want_state = {k: t.clone() for k, t in got_state.items()}
    d, col = smmf_update_(grad, beta1=0.9, beta2=0.99, eps=1e-8, **got_state)
    want_d, want_col = smmf_update_reference(grad, *(want_state[k] for k in (
        "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_row", "exp_avg_col", "exp_avg_sign")), beta1=0.9, beta2=0.99,
        eps=1e-8, pad_from=520 * 261)
    assert torch.equal(d, want_d) and torch.equal(col, want_col)
    assert all(torch.equal(got_state[k], want_state[k]) for k in got_state)


# ----------------------------------------------------------------------------- SGDP's two compiled passes
def _sgdp_run(orthogonal: bool, nesterov: bool):
    from optimlib.optim.adamp import SGDP

    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(LARGE, generator=gen))
    g = torch.randn(LARGE, generator=gen)
    if orthogonal:   # a scale-invariant-looking weight: every row's gradient orthogonal to it
        g -= w.detach() * ((g * w.detach()).sum(1, keepdim=True) / (w.detach() ** 2).sum(1, keepdim=True))
    else:
        g += 3 * w.detach()
    opt = SGDP([w], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-2)
    for _ in range(2):
        w.grad = g.clone()
        opt.step()
    return w.detach().clone(), opt.state[w]["momentum_buffer"].clone()


@pytest.mark.parametrize("orthogonal", [True, False], ids=["projected", "plain"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdp_large_matrices_match_the_eager_path(orthogonal, nesterov, monkeypatch):
    got = _sgdp_run(orthogonal, nesterov)
    monkeypatch.setenv(_compiled.ENV_VAR, "0")       # the eager path: the reference's own expressions
    want = _sgdp_run(orthogonal, nesterov)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * float(b.abs().max()))
    w0 = torch.randn(LARGE, generator=torch.Generator().manual_seed(3))
    assert (got[0] - w0).abs().max() > 1e-3           # the step moved the weight


@pytest.mark.parametrize("R,n,pad", SMMF_LARGE)
def test_smmf_apply_in_blocks_equals_applying_the_returned_direction(R, n, pad):
    from optimlib.kernels.smmf import smmf_update_

    grad, applied = _smmf_case(R, n)
    returned = {k: t.clone() for k, t in applied.items()}
    w = torch.randn(R, n, generator=torch.Generator().manual_seed(5))
    w_applied = w.clone()
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-8, pad_from=pad)
    d, col = smmf_update_(grad, **kw, **returned)
    w.mul_(1 - 1e-2 * 0.1).add_(d, alpha=-1e-2)
    none, col_applied = smmf_update_(grad, **kw, **applied, apply=(w_applied, 1e-2, 0.1))
    assert none is None
    assert torch.equal(w_applied, w) and torch.equal(col_applied, col)
    assert all(torch.equal(applied[k], returned[k]) for k in applied)
