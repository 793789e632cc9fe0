"""Rank-adaptive factorized layers (optimlib.reparam.dynamic_rank)."""

import warnings

import pytest
import torch
from torch import nn

from lowrank_cases import (SMALL, batches, check_exact_resume, check_merge, check_state_dict_round_trip,
                           gradcheck_layer, make_optimizer, small_model, train)
from optimlib import reparam
from optimlib.models import build_model
from optimlib.optim import optimizer_state_bytes
from optimlib.reparam.dynamic_rank import DynamicRankLinear, select_rank

OPTIONS = dict(rank=12, augment=4, tol=0.5, interval=2)  # tol 0.5: ranks fall at once
D_OUT, D_IN, K = 24, 20, 4


def _target():
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(D_OUT, K, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(D_IN, K, generator=gen))[0]
    return U @ torch.diag(torch.tensor([3.0, 2.5, 2.0, 1.5])) @ V.T


def _fit(layer, target, steps, lr=0.02, seed=1):
    """Regress ``layer`` onto the linear map ``target`` with Adam; ``after_step`` every step."""
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ranks = []
    for _ in range(steps):
        x = torch.randn(64, D_IN, generator=gen)
        loss = (layer(x) - x @ target.T).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        layer.after_step(opt)
        ranks.append(layer.rank)
    return opt, ranks, loss.item()


def _param_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("start", [12, 2])
def test_settles_at_the_target_rank_and_memory_shrinks(start):
    torch.manual_seed(0)
    layer = DynamicRankLinear.from_linear(nn.Linear(D_IN, D_OUT, bias=False), rank=start, augment=2,
                                          tol=0.05, interval=10, min_rank=1, max_rank=16)
    width0 = layer.width
    assert width0 == start + 2
    opt0 = torch.optim.Adam(layer.parameters(), lr=0.02)
    x = torch.randn(8, D_IN)
    layer(x).sum().backward()
    opt0.step()  # state at the starting width, to compare bytes with
    bytes0 = optimizer_state_bytes(opt0), _param_bytes(layer)
    opt0.zero_grad(set_to_none=True)

    opt, ranks, loss = _fit(layer, _target(), 300)
    assert loss < 1e-6
    assert ranks[-100:] == [K] * 100  # settled at the target's rank
    assert all(1 <= r <= 16 for r in ranks)
    w = K + 2
    assert layer.width == w and layer.U.shape == (D_OUT, w) and layer.V.shape == (D_IN, w) and layer.S.shape == (w, w)
    expected_params = 4 * ((D_OUT + D_IN) * w + w * w)
    assert _param_bytes(layer) == expected_params
    # Adam: two moments per element (+ a scalar step per parameter), all at the new width.
    assert optimizer_state_bytes(opt) == 2 * expected_params + 3 * 4
    if start > K:
        assert optimizer_state_bytes(opt) < bytes0[0] and _param_bytes(layer) < bytes0[1]
    else:
        assert optimizer_state_bytes(opt) > bytes0[0]  # grew to fit the target


def test_rank_respects_bounds():
    torch.manual_seed(0)
    layer = DynamicRankLinear.from_linear(nn.Linear(D_IN, D_OUT, bias=False), rank=8, augment=2,
                                          tol=0.05, interval=5, min_rank=6, max_rank=8)
    _, ranks, _ = _fit(layer, _target(), 60)
    assert all(6 <= r <= 8 for r in ranks) and ranks[-1] == 6  # the target's 4 is below min_rank


def test_select_rank_tail_rule():
    sigma = torch.tensor([4.0, 3.0, 0.4, 0.3, 0.0])
    # tails: |s[1:]| = 3.04, |s[2:]| = 0.5; 0.5 <= 0.1 * |s| = 0.5016  -> r = 2
    assert select_rank(sigma, 0.1, 1, 5) == 2
    assert select_rank(sigma, 0.05, 1, 5) == 4  # |s[3:]| = 0.3 > 0.25, |s[4:]| = 0 -> r = 4
    assert select_rank(sigma, 0.1, 3, 5) == 3 and select_rank(sigma, 0.05, 1, 3) == 3
    ranks = [select_rank(sigma, t, 1, 5) for t in (0.01, 0.05, 0.1, 0.5, 0.9)]
    assert ranks == sorted(ranks, reverse=True)  # monotone in the tolerance


def _trained_layer(**kw):
    torch.manual_seed(0)
    layer = DynamicRankLinear.from_linear(nn.Linear(D_IN, D_OUT), **{"rank": 6, "augment": 3, "interval": 1000, **kw})
    _fit(layer, _target(), 20)  # no truncation yet (interval 1000): U, V drift off orthonormal
    return layer


def test_truncation_error_within_tolerance_and_bases_orthonormal():
    layer = _trained_layer(tol=0.3)
    W = layer.dense_weight().detach().double()
    sigma = torch.linalg.svdvals(W)
    r = layer.truncate()
    W_new = layer.dense_weight().detach().double()
    assert torch.linalg.matrix_rank(W_new, atol=1e-5) == r
    # The change is the dropped tail: at most tol * ||W||_F (fp32 round-off aside).
    assert torch.linalg.norm(W - W_new) <= 0.3 * torch.linalg.norm(sigma) + 1e-4
    torch.testing.assert_close(torch.linalg.norm(W - W_new), torch.linalg.norm(sigma[r:]), atol=1e-4, rtol=1e-4)
    eye = torch.eye(layer.width)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-5, rtol=0)


def test_optimizer_first_moments_follow_the_change_of_basis():
    """With nothing truncated, the remapped first moment of each factor is exactly the gradient
    the same batch gives in the new basis (gradients transform like that)."""
    layer = _trained_layer(tol=1e-9)
    k = layer.width
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(5))
    y = x @ _target().T

    def grads():
        loss = (layer(x) - y).pow(2).mean()
        return torch.autograd.grad(loss, [layer.U, layer.S, layer.V])

    before = grads()
    opt = torch.optim.Adam([layer.U, layer.S, layer.V, layer.bias], lr=0.0)
    for p, g in zip((layer.U, layer.S, layer.V), before):
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": g.clone(), "exp_avg_sq": g.square()}
    W = layer.dense_weight().detach()
    assert layer.truncate(opt) == k  # nothing dropped (the rank grows to the full width)
    torch.testing.assert_close(layer.dense_weight().detach(), W, atol=1e-5, rtol=1e-5)  # same function
    after = grads()
    params = (layer.U, layer.S, layer.V)
    assert [p for g in opt.param_groups for p in g["params"]][:3] == list(params)  # swapped in
    for p, g in zip(params, after):
        m = opt.state[p]["exp_avg"]
        assert m.shape == p.shape
        block = (slice(None), slice(0, k)) if p is not layer.S else (slice(0, k), slice(0, k))
        torch.testing.assert_close(m[block], g[block], atol=1e-5, rtol=1e-4)
        assert torch.count_nonzero(m[..., k:]) == 0  # new candidate columns start at zero
        assert (opt.state[p]["exp_avg_sq"] >= 0).all()


def test_odd_shaped_optimizer_state_is_reset_with_a_warning():
    layer = _trained_layer(tol=0.3)
    opt = torch.optim.Adam(layer.parameters(), lr=0.0)
    opt.state[layer.U] = {"step": torch.tensor(1.0), "row_factor": torch.ones(D_OUT)}
    with pytest.warns(RuntimeWarning, match="cannot follow the rank change"):
        layer.truncate(opt)
    assert layer.U not in opt.state or not opt.state[layer.U]


def test_resize_on_load_then_continue():
    """A fresh layer (initial width) loads a state dict saved after a rank change."""
    layer = _trained_layer(tol=0.3)
    layer.truncate()
    fresh = DynamicRankLinear.from_linear(nn.Linear(D_IN, D_OUT), rank=6, augment=3, interval=1000)
    assert fresh.width != layer.width
    ids = [id(p) for p in fresh.parameters()]
    fresh.load_state_dict(layer.state_dict())
    assert [id(p) for p in fresh.parameters()] == ids  # resized in place: optimizers stay valid
    assert fresh.rank == layer.rank and fresh.width == layer.width
    x = torch.randn(3, D_IN)
    assert torch.equal(fresh(x), layer(x))


def test_gradcheck():
    gradcheck_layer(_trained_layer(tol=0.3))


def test_merge_matches():
    check_merge("dynamic_rank", **OPTIONS)


def test_state_dict_round_trip():
    check_state_dict_round_trip("dynamic_rank", **OPTIONS)


def test_exact_resume_across_rank_changes():
    check_exact_resume("dynamic_rank", k=3, m=3, **OPTIONS)
    # The same 3 + 3 steps change the ranks before and after the save (steps 2, 4 and 6).
    model = small_model("dynamic_rank", 0, **OPTIONS)
    opt = make_optimizer(model)
    layers = [m for m in model.modules() if isinstance(m, DynamicRankLinear)]
    widths = []
    for tokens in batches(6):
        train(model, opt, [tokens])
        widths.append(sorted({m.width for m in layers}))
    assert widths[0] == [16] and widths[1] != widths[0] and widths[3] != widths[1], widths


def test_sharded_or_flattened_parameters_raise():
    layer = _trained_layer()
    stranger = torch.optim.Adam([nn.Parameter(torch.zeros(3))])  # e.g. ZeRO's flat partitions
    with pytest.raises(RuntimeError, match="not one of the parameters of the optimizer"):
        layer.after_step(stranger)
    layer.U.ds_id = 0  # what deepspeed.zero.Init / ZeRO-3 attaches to a partitioned parameter
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        layer.after_step(None)


def test_replicated_factors_stay_hidden_across_rank_changes():
    """What the sharded engines do (optimlib.distributed.replicated), on one process: the declared
    factors leave the module's registered parameters and state_dict, a truncation replaces them
    where they live (still hidden, swapped into the replicated optimizer with its state), and the
    replicated state dict restores values and widths into a fresh layer."""
    from optimlib.distributed.replicated import ReplicatedParams

    layer = _trained_layer(tol=0.3)
    model = nn.Sequential(layer)
    entries = reparam.replicated_parameters(model)
    assert [fqn for fqn, _, _ in entries] == ["0.U", "0.S", "0.V"]
    replicated = ReplicatedParams(entries, world_size=1)
    assert [n for n, _ in model.named_parameters()] == ["0.bias"] and "0.U" not in model.state_dict()
    main = torch.optim.Adam([layer.bias], lr=0.01)
    replicated.optimizer = torch.optim.Adam(replicated.params, lr=0.01)
    x = torch.randn(16, D_IN)
    layer(x).pow(2).mean().backward()
    main.step()
    replicated.optimizer.step()
    width = layer.width
    reparam.after_step(model, main, replicated_optimizer=replicated.optimizer)  # interval 1000: no change
    layer.truncate(replicated.optimizer)
    assert layer.width < width and [n for n, _ in model.named_parameters()] == ["0.bias"]
    assert replicated.params == [layer.U, layer.S, layer.V] == replicated.optimizer.param_groups[0]["params"]
    assert replicated.optimizer.state[layer.U]["exp_avg"].shape == layer.U.shape

    fresh = DynamicRankLinear.from_linear(nn.Linear(D_IN, D_OUT), rank=6, augment=3, interval=1000)
    copy = ReplicatedParams(reparam.replicated_parameters(nn.Sequential(fresh)), world_size=1)
    copy.optimizer = torch.optim.Adam(copy.params, lr=0.01)
    fresh.load_state_dict(layer.state_dict())  # bias and buffers: the factors are not in it
    copy.load_state_dict(replicated.state_dict())
    assert fresh.width == layer.width and torch.equal(fresh(x), layer(x))
    assert torch.equal(copy.optimizer.state[fresh.V]["exp_avg_sq"], replicated.optimizer.state[layer.V]["exp_avg_sq"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(rank=65), "rank"), (dict(min_rank=0), "min_rank"),
    (dict(max_rank=4), "rank"), (dict(tol=0.0), "tol"), (dict(tol=1.0), "tol"),
    (dict(interval=0), "interval"), (dict(augment=-1), "augment"),
])
def test_bad_options_name_the_argument(kwargs, match):
    model = build_model("llama_tiny", **SMALL)
    with pytest.raises(ValueError, match=match):
        reparam.apply(model, "dynamic_rank", **{**OPTIONS, **kwargs})


def test_no_warning_in_a_plain_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_merge("dynamic_rank", steps=4, **OPTIONS)
