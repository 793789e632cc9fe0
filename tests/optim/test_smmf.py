"""SMMF against a from-scratch reference written here from the paper's equations (Park & Lee,
AAAI 2025, arXiv:2412.08894), plus the rank-1 anchor, memory, checkpoints and validation.

The reference below uses full matrices in float64, boolean sign matrices and no code from
optimlib.optim.smmf; the optimizer runs in float32.  Tolerance: 1e-5 relative on parameters
and factors after 6 steps (observed ~1e-7).
"""

import io
import math

import pytest
import torch
from torch import nn

import optimlib
from optimlib.distributed import FlatSlice, RowBlock
from optimlib.optim import create_optimizer, optimizer_state_bytes
from optimlib.formats.bitpack import unpack_bits
from optimlib.optim.smmf import init_smmf_state, smmf_direction, smmf_matrix_shape

# parameter shape -> the (rows, cols) matrix the docstring promises (padded where marked)
SHAPES = {
    (6, 4): (6, 4),
    (2, 3, 5): (6, 5),
    (12,): (4, 3),
    (4, 3, 3, 3): (12, 9),
    (2, 3, 2, 2, 2): (8, 6),
    (): (1, 1),
    (97,): (11, 9),        # prime: padded (exact would be 97 x 1)
    (2, 1009): (46, 44),   # 2 * prime: padded (exact would be 1009 x 2)
    (7,): (7, 1),          # small prime: padding would not halve the factors
}


class Reference:
    """SMMF for one parameter, straight from the equations (float64, full matrices)."""

    def __init__(self, shape, matrix, *, lr, beta, eps, weight_decay, decay_rate, growth_rate, mode,
                 factored=True):
        self.shape, (self.rows, self.cols) = shape, matrix
        self.numel = math.prod(shape)
        self.lr, self.beta, self.eps, self.wd = lr, beta, eps, weight_decay
        self.c, self.gamma, self.mode, self.factored = decay_rate, growth_rate, mode, factored
        z = torch.zeros
        self.rM, self.cM, self.rV, self.cV = z(self.rows), z(self.cols), z(self.rows), z(self.cols)
        self.S = torch.zeros(self.rows, self.cols, dtype=torch.bool)
        self.M, self.V = z(self.numel), z(self.numel)  # unfactored (vector_reshape=False) moments
        self.t = 0

    def step(self, w, g):
        w, g = w.double(), g.double()
        self.t += 1
        beta1 = None if self.beta is None else self.beta * self.gamma ** (self.t - 1)
        beta2 = 1 - self.t ** self.c
        if self.wd and self.mode == "adam":
            g = g + self.wd * w
        if not self.factored:
            self.V = beta2 * self.V + (1 - beta2) * g.reshape(-1) ** 2
            num = g.reshape(-1) if beta1 is None else None
            if beta1 is not None:
                self.M = beta1 * self.M + (1 - beta1) * g.reshape(-1)
                num = self.M
            u = (num / (self.V.sqrt() + self.eps)).view(self.shape)
        else:
            G = torch.zeros(self.rows * self.cols, dtype=torch.float64)
            G[: self.numel] = g.reshape(-1)
            G = G.view(self.rows, self.cols)
            V = beta2 * torch.outer(self.rV, self.cV) + (1 - beta2) * G * G
            V.view(-1)[self.numel:] = 0
            self.rV, self.cV = V.sum(1), V.sum(0) / V.sum() if V.sum() > 0 else V.sum(0)
            if beta1 is None:
                num = G
            else:
                M_hat = torch.where(self.S, 1.0, -1.0).double() * torch.outer(self.rM, self.cM)
                M = beta1 * M_hat + (1 - beta1) * G
                M.view(-1)[self.numel:] = 0
                self.S = M > 0
                A = M.abs()
                self.rM, self.cM = A.sum(1), A.sum(0) / A.sum() if A.sum() > 0 else A.sum(0)
                num = M
            u = (num / (V.sqrt() + self.eps)).reshape(-1)[: self.numel].view(self.shape)
        if self.wd and self.mode == "adamw":
            w = w * (1 - self.lr * self.wd)
        return w - self.lr * u


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() if a.numel() else 0.0


@pytest.mark.parametrize("shape, matrix", list(SHAPES.items()))
def test_matrix_shape_rule(shape, matrix):
    assert smmf_matrix_shape(math.prod(shape)) == matrix


def test_padding_keeps_the_saving_for_primes():
    for n in (10007, 2 * 10007, 99991):
        rows, cols = smmf_matrix_shape(n)
        assert rows * cols >= n and rows * cols - n < cols and rows + cols <= 2 * math.isqrt(n) + 4


CONFIGS = {
    "default": dict(),
    "adamw-decay": dict(weight_decay=0.1, decay_rate=-0.8),
    "adam-decay": dict(weight_decay=0.1, weight_decay_mode="adam"),
    "no-momentum": dict(beta=None),
    "no-vector-reshape": dict(vector_reshape=False, weight_decay=0.05),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference_equations(config):
    kw = dict(lr=1e-2, beta=0.9, eps=1e-8, weight_decay=0.0, decay_rate=-0.5, growth_rate=0.999,
              weight_decay_mode="adamw", vector_reshape=True)
    kw.update(CONFIGS[config])
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = optimlib.SMMF(params, **kw)
    refs = [Reference(s, m, lr=kw["lr"], beta=kw["beta"], eps=kw["eps"], weight_decay=kw["weight_decay"],
                      decay_rate=kw["decay_rate"], growth_rate=kw["growth_rate"], mode=kw["weight_decay_mode"],
                      factored=len(s) >= 2 or kw["vector_reshape"])
            for s, m in SHAPES.items()]
    ref_w = [p.detach().double().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        ref_w = [r.step(w, gr) for r, w, gr in zip(refs, ref_w, grads)]
    for p, w, ref in zip(params, ref_w, refs):
        assert rel(w, p.detach()) < 1e-5, (p.shape, rel(w, p.detach()))
        state = opt.state[p]
        assert state["step"].item() == 6
        if not ref.factored:
            assert "exp_avg_row" not in state and rel(ref.V, state["exp_avg_sq"].reshape(-1)) < 1e-5
            continue
        assert rel(ref.rV, state["exp_avg_sq_row"]) < 1e-5 and rel(ref.cV, state["exp_avg_sq_col"]) < 1e-5
        if kw["beta"] is None:
            assert "exp_avg_sign" not in state
            continue
        assert rel(ref.rM, state["exp_avg_row"]) < 1e-5 and rel(ref.cM, state["exp_avg_col"]) < 1e-5
        sign = unpack_bits(state["exp_avg_sign"], ref.rows * ref.cols).view(ref.rows, ref.cols)
        assert torch.equal(sign, ref.S)


def test_rank_one_moments_are_reconstructed_exactly():
    """Anchor: with a perfect-square size and a rank-1 |G|, the factors reproduce M and V."""
    torch.manual_seed(0)
    u, v = torch.randn(16), torch.randn(16)
    grad = torch.outer(u, v)                     # its (16, 16) view is rank 1 (signs included)
    p = nn.Parameter(torch.randn(4, 64))         # 256 elements -> a 16 x 16 square
    p.grad = grad.reshape(4, 64).clone()
    opt = optimlib.SMMF([p], beta=0.9)
    opt.step()
    s = opt.state[p]
    m_hat = torch.where(unpack_bits(s["exp_avg_sign"], 256).view(16, 16), 1.0, -1.0) * \
        torch.outer(s["exp_avg_row"], s["exp_avg_col"])
    v_hat = torch.outer(s["exp_avg_sq_row"], s["exp_avg_sq_col"])
    assert torch.allclose(m_hat, 0.1 * grad, rtol=1e-5, atol=1e-7)   # M_1 = (1 - beta1) G
    assert torch.allclose(v_hat, grad * grad, rtol=1e-5, atol=1e-7)  # V_1 = G^2 (beta2_1 = 0)
    # A rank-2 |G| is only approximated.
    p2 = nn.Parameter(torch.randn(16, 16))
    p2.grad = torch.outer(u, v) + torch.outer(v, u)
    opt2 = optimlib.SMMF([p2])
    opt2.step()
    s2 = opt2.state[p2]
    assert not torch.allclose(torch.outer(s2["exp_avg_sq_row"], s2["exp_avg_sq_col"]), p2.grad ** 2, rtol=1e-3)


def test_core_runs_on_arbitrary_rows():
    """smmf_direction works on any (R, n) rows + RowBlock (e.g. a projected low-rank gradient)."""
    torch.manual_seed(0)
    grad = torch.randn(10, 3)
    state = init_smmf_state(10, 3)
    block = RowBlock((10, 3), FlatSlice.whole(30))
    upd = smmf_direction(grad, block, beta1=0.9, beta2=0.0, eps=1e-8, **state)
    assert torch.allclose(upd, 0.1 * grad / (grad.abs() + 1e-8), rtol=1e-5)  # first step: 0.1 sign(G)
    assert torch.allclose(state["exp_avg_sq_col"].sum(), torch.tensor(1.0)) and state["exp_avg_sign"].numel() == 4


def test_state_is_under_three_percent_of_adam_for_a_large_matrix():
    p = nn.Parameter(torch.zeros(1024, 1024))
    p.grad = torch.randn(1024, 1024)
    opt = optimlib.SMMF([p])
    opt.step()
    n = p.numel()
    state = opt.state[p]
    assert state["exp_avg_sign"].dtype == torch.uint8 and state["exp_avg_sign"].numel() == n // 8
    used = optimizer_state_bytes(opt)
    assert used <= 0.03 * 8 * n, used / (8 * n)  # ~1.76 %: a 98 % saving over Adam's 8N bytes


def test_any_rank_and_prime_tensors_train():
    torch.manual_seed(0)
    shapes = [(), (5,), (97,), (3, 4, 5), (2, 3, 4, 5), (1, 2, 3, 2, 2), (0, 3)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    start = [p.detach().norm() for p in params]
    opt = optimlib.SMMF(params, lr=0.05)
    for _ in range(60):  # minimise sum(p^2): every tensor shrinks
        for p in params:
            p.grad = 2 * p.detach()
        opt.step()
    for p, s in zip(params, start):
        if p.numel():
            assert p.detach().norm() < 0.6 * s, p.shape
    prime = opt.state[params[2]]
    assert prime["exp_avg_sq_row"].numel() + prime["exp_avg_sq_col"].numel() == 20  # 11 + 9, not 97 + 1


def test_flat_padded_pieces_match_shaped_parameters():
    """A DeepSpeed-like flat, padded partition (shape from the group) gives the same result."""
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (12, 7), (97,), (5,)]
    shaped = [torch.randn(s, requires_grad=True) for s in shapes]
    flat = [torch.zeros(p.numel() + 5, requires_grad=True) for p in shaped]
    with torch.no_grad():
        for f, p in zip(flat, shaped):
            f[: p.numel()] = p.reshape(-1)
    kw = dict(lr=1e-2, weight_decay=0.1)
    opt_a = optimlib.SMMF(shaped, **kw)
    opt_b = optimlib.SMMF([{"params": [f], "shapes": [s]} for f, s in zip(flat, shapes)], **kw)
    for _ in range(4):
        for f, p in zip(flat, shaped):
            g = torch.randn(p.shape)
            p.grad, f.grad = g, torch.cat([g.reshape(-1), torch.zeros(5)])
        opt_a.step()
        opt_b.step()
    for f, p in zip(flat, shaped):
        assert torch.equal(f.detach()[: p.numel()], p.detach().reshape(-1))
        assert torch.equal(f.detach()[p.numel():], torch.zeros(5))


def _train(opt_factory, steps, resume_at=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 37), nn.Tanh(), nn.Linear(37, 3))
    opt = opt_factory(net.parameters())
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == resume_at:
            buf = io.BytesIO()
            torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            net[0].reset_parameters()  # scramble, then restore
            net.load_state_dict(saved["model"])
            opt = opt_factory(net.parameters())
            opt.load_state_dict(saved["opt"])
        x = torch.randn(4, 3, 6, 6, generator=g)
        loss = (net(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, opt


def test_checkpoint_round_trip_resumes_exactly():
    make = lambda p: optimlib.SMMF(p, lr=1e-2, weight_decay=1e-2)  # noqa: E731
    ref, _ = _train(make, 6)
    got, opt = _train(make, 6, resume_at=3)
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
    for state in opt.state.values():
        assert state["exp_avg_sign"].dtype == torch.uint8
        assert state["exp_avg_row"].dtype == torch.float32 and state["step"].dtype == torch.float32


def test_bf16_parameters_keep_float32_factors():
    p = nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    p.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    opt = optimlib.SMMF([p])
    opt.step()
    assert opt.state[p]["exp_avg_row"].dtype == torch.float32 and p.dtype == torch.bfloat16
    sd = opt.state_dict()
    opt2 = optimlib.SMMF([p])
    opt2.load_state_dict(sd)
    assert opt2.state[p]["exp_avg_row"].dtype == torch.float32
    assert opt2.state[p]["exp_avg_sign"].dtype == torch.uint8


@pytest.mark.parametrize("kw, arg", [
    (dict(lr=-1.0), "lr"), (dict(beta=1.0), "beta"), (dict(beta=-0.1), "beta"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(decay_rate=0.5), "decay_rate"),
    (dict(decay_rate=-1.5), "decay_rate"), (dict(growth_rate=1.5), "growth_rate"),
    (dict(weight_decay_mode="l2"), "weight_decay_mode")])
def test_validation(kw, arg):
    with pytest.raises(ValueError, match=rf"{arg}=.*accepted range"):
        optimlib.SMMF([nn.Parameter(torch.zeros(2))], **kw)


def test_factory():
    net = nn.Linear(4, 3)
    opt = create_optimizer(net, "smmf", lr=1e-3, weight_decay=0.01, decay_rate=-0.8)
    assert isinstance(opt, optimlib.SMMF) and opt.param_groups[0]["decay_rate"] == -0.8
    from optimlib.optim import get_optimizer_spec
    assert get_optimizer_spec("smmf").shape_aware
