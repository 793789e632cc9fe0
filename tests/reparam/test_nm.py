"""N:M sparse training (optimlib.reparam.nm): masks, recipes' gradients, schedules, resume, export.

Every expected value below is written out by hand from the rule in the module docstring, not
recomputed with the library's own helpers.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import optimlib
from optimlib import reparam
from optimlib.models import build_model
from optimlib.reparam.nm import nm_mask, nm_sparsify
from optimlib.reparam.nm_export import SemiStructuredUnavailable, to_semi_structured

PATTERNS = [(2, 4), (1, 4), (2, 8), (1, 8), (1, 16), (1, 32)]


class Net(nn.Module):
    """Two MLP linears (the default targets), the first with a bias, inputs multiple of 32."""

    def __init__(self, d_in=64, hidden=96, d_out=32, bias=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, d_out, bias=False))

    def forward(self, x):
        return self.mlp(x)


def groups_nonzeros(weight, m):
    return (weight.reshape(-1, m) != 0).sum(dim=1)


def hand_mask(w, n, m):
    """Keep the n largest |w| of each group of m, by sorting (independent of nm_mask's topk)."""
    g = w.detach().abs().reshape(-1, m)
    order = g.argsort(dim=1, descending=True)
    mask = torch.zeros_like(g)
    for r in range(g.size(0)):
        mask[r, order[r, :n]] = 1.0
    return mask.reshape(w.shape)


def nm_linear(d_in=8, d_out=4, seed=0, **options):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=False).double()
    nm_sparsify(lin, **options)
    return lin, lin.parametrizations.weight.original, lin.parametrizations.weight[0]


# ----------------------------------------------------------------------------- masks and export
@pytest.mark.parametrize("n,m", PATTERNS)
def test_every_pattern_has_exactly_n_nonzeros_per_group_after_merge(n, m):
    torch.manual_seed(n * 100 + m)
    net = Net()
    bias = net.mlp[0].bias.detach().clone()
    reparam.apply(net, "nm", n=n, m=m, recipe="srste")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(16, 64)
    for _ in range(3):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        reparam.after_step(net, opt)
    net.eval()
    with torch.no_grad():
        before = net(x)
    reparam.merge(net)
    for lin in (net.mlp[0], net.mlp[2]):
        assert not parametrize.is_parametrized(lin) and isinstance(lin.weight, nn.Parameter)
        counts = groups_nonzeros(lin.weight, m)
        assert counts.eq(n).all(), counts.unique()
    assert not torch.equal(net.mlp[0].bias, bias)  # the bias trained (it is used) ...
    assert net.mlp[0].bias.shape == bias.shape  # ... and kept
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)


def test_mdgf_mid_schedule_still_merges_to_exact_zeros():
    torch.manual_seed(1)
    net = Net()
    reparam.apply(net, "nm", n=1, m=8, recipe="mdgf", decay="linear", decay_steps=100)
    for _ in range(10):
        reparam.after_step(net)
    p = net.mlp[0].parametrizations.weight[0]
    assert p.current().beta == pytest.approx(0.9)
    reparam.merge(net)
    assert groups_nonzeros(net.mlp[0].weight, 8).eq(1).all()


def test_mask_runs_along_the_input_dimension():
    lin, w, _ = nm_linear(d_in=8, d_out=3, n=2, m=4, recipe="ste")
    with torch.no_grad():
        w.copy_(torch.tensor([[1., 2, 3, 4, 8, 7, 6, 5], [-9, 1, 1, 9, 0.5, -0.1, 0.2, 0.3],
                              [4, 3, 2, 1, 1, 2, 3, 4]], dtype=torch.float64))
        expected = torch.tensor([[0., 0, 3, 4, 8, 7, 0, 0], [-9, 0, 0, 9, 0.5, 0, 0, 0.3],
                                 [4, 3, 0, 0, 0, 0, 3, 4]], dtype=torch.float64)
        torch.testing.assert_close(lin.weight, expected)


def test_ties_go_to_the_lower_index():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 1.0, -1.0, 0.5, -2.0, 0.5, 0.5]])
    expected = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(w, 2, 4), expected)


@pytest.mark.parametrize("options,match", [
    (dict(n=5, m=4), "'n'"),
    (dict(n=4, m=4), "'n'"),
    (dict(n=0, m=4), "'n'"),
    (dict(n=1, m=32), "'m'.*in_features=48"),
    (dict(n=2, m=4, recipe="magic"), "'recipe'"),
    (dict(n=2, m=4, recipe="mdgf"), "'decay_steps'"),
    (dict(n=2, m=4, recipe="srste", decay_steps=10), "'decay_steps'"),
    (dict(n=2, m=4, recipe="srste", decay="linear"), "'decay'"),
    (dict(n=2, m=4, recipe="mdgf", decay_steps=10, decay="sigmoid"), "'decay'"),
    (dict(n=2, m=4, recipe="mdgf", decay_steps=10, decay="linear", decay_coef=0.1), "'decay_coef'"),
    (dict(n=1, m=8, recipe="sdgf", decay_steps=10, structure="geometric"), "'structure'.*8:64"),
    (dict(n=1, m=8, recipe="sdgf", decay_steps=10, structure=["4:8", "2:8"]), "'structure'.*end"),
    (dict(n=1, m=8, recipe="sdgf", decay_steps=2), "'decay_steps'"),
    (dict(n=2, m=4, grad_mode="fancy"), "'grad_mode'"),
    (dict(n=2, m=4, srste_lambda=-1.0), "'srste_lambda'"),
    (dict(n=2, m=4, dense_steps=-1), "'dense_steps'"),
])
def test_bad_options_are_rejected_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        nm_sparsify(nn.Linear(48, 16), **options)


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="sparsity"):
        nm_sparsify(nn.Linear(8, 4), n=2, m=4, sparsity=0.5)


# ----------------------------------------------------------------------------- recipes' gradients
def test_ste_forward_masks_and_gradient_passes_straight_through():
    lin, w, _ = nm_linear(n=2, m=4, recipe="ste")
    c = torch.randn(4, 8, dtype=torch.float64)
    mask = hand_mask(w, 2, 4)
    torch.testing.assert_close(lin.weight, w.detach() * mask)
    (lin.weight * c).sum().backward()
    torch.testing.assert_close(w.grad, c)


def test_srste_gradient_is_g_plus_lambda_times_pruned_weights():
    lam = 2e-4
    lin, w, p = nm_linear(n=2, m=4, recipe="srste")
    assert p.srste_lambda == lam  # the paper's default
    c = torch.randn(4, 8, dtype=torch.float64)
    mask = hand_mask(w, 2, 4)
    (lin.weight * c).sum().backward()
    torch.testing.assert_close(w.grad, c + lam * (1 - mask) * w.detach())
    lin2, w2, _ = nm_linear(n=2, m=4, recipe="srste", srste_lambda=0.5)
    (lin2.weight * c).sum().backward()
    torch.testing.assert_close(w2.grad, c + 0.5 * (1 - mask) * w2.detach())


def test_srste_term_is_added_once_per_optimizer_step_under_accumulation():
    lam = 2e-4
    lin, w, p = nm_linear(n=2, m=4, recipe="srste")
    c = torch.randn(4, 8, dtype=torch.float64)
    mask = hand_mask(w, 2, 4)
    for _ in range(3):  # three micro-batches of one step, each scaled by 1/3
        (lin.weight * c / 3).sum().backward()
    torch.testing.assert_close(w.grad, c + lam * (1 - mask) * w.detach())
    w.grad = None
    p.after_step()
    (lin.weight * c).sum().backward()  # re-armed by after_step
    torch.testing.assert_close(w.grad, c + lam * (1 - mask) * w.detach())


@pytest.mark.parametrize("options", [dict(recipe="srste"), dict(recipe="srste", srste_lambda=0.5),
                                     dict(recipe="mdgf", decay_steps=10, srste_lambda=0.5)])
def test_a_skipped_step_re_arms_the_srste_term_without_advancing_the_schedule(options):
    """A step whose gradients are discarded (non-finite, skipped) must not take the SR-STE term
    of the next step with it: after ``after_skipped_step`` the next gradient is the paper's
    ``g + lam * (1 - m) * W`` (term once, as a fresh layer's first step), and the schedule stays."""
    lin, w, p = nm_linear(n=2, m=4, **options)
    for _ in range(2):
        p.after_step()
    state, lam = p.current(), p.srste_lambda
    c = torch.randn(4, 8, dtype=torch.float64)
    expected = c + lam * (1 - hand_mask(w, 2, 4)) * w.detach()  # SR-STE, Zhou et al. 2021, eq. (5)
    fresh, w_fresh, p_fresh = nm_linear(n=2, m=4, **options)
    for _ in range(2):
        p_fresh.after_step()
    (fresh.weight * c).sum().backward()
    torch.testing.assert_close(w_fresh.grad, expected, rtol=0, atol=1e-15)  # float64, the same two operations

    (lin.weight * c).sum().backward()  # the step that turns out non-finite ...
    w.grad = None                      # ... is skipped: its gradients are discarded
    reparam.after_skipped_step(lin)
    (lin.weight * c).sum().backward()  # the next step
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=1e-15)
    assert (int(p.step), p.current()) == (2, state)  # the skipped step is not counted


@pytest.mark.parametrize("grad_mode", ["ste", "exact"])
def test_mdgf_forward_and_gradient_match_the_hand_formula(grad_mode):
    lin, w, p = nm_linear(n=1, m=4, recipe="mdgf", decay="exponential", decay_steps=20, grad_mode=grad_mode)
    for _ in range(3):
        p.after_step()
    beta = math.exp(-5.0 / 20 * 3)  # default c = 5 / decay_steps, t = 3
    assert p.current().beta == pytest.approx(beta, rel=1e-12)
    mask = hand_mask(w, 1, 4)
    scale = mask + (1 - mask) * beta
    torch.testing.assert_close(lin.weight, w.detach() * scale)
    c = torch.randn(4, 8, dtype=torch.float64)
    (lin.weight * c).sum().backward()
    torch.testing.assert_close(w.grad, c if grad_mode == "ste" else c * scale)


def test_exact_grad_mode_passes_gradcheck_in_double():
    _, w, p = nm_linear(d_in=16, d_out=3, n=2, m=8, recipe="mdgf", decay="linear", decay_steps=10,
                        grad_mode="exact")
    for _ in range(4):
        p.after_step()
    assert 0 < p.current().beta < 1
    theta = w.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(p, (theta,), eps=1e-7, atol=1e-9)
    # the straight-through recipes are estimators, deliberately not the forward's Jacobian
    _, w_ste, p_ste = nm_linear(d_in=16, d_out=3, n=2, m=8, recipe="ste")
    theta = w_ste.detach().clone().requires_grad_(True)
    assert not torch.autograd.gradcheck(p_ste, (theta,), eps=1e-7, atol=1e-9, raise_exception=False)


def test_eval_and_no_grad_use_the_binary_target_mask():
    lin, w, p = nm_linear(n=1, m=4, recipe="mdgf", decay="linear", decay_steps=10)
    target = w.detach() * hand_mask(w, 1, 4)
    assert not torch.equal(lin.weight, target)  # beta = 1 at t = 0: dense in training
    with torch.no_grad():
        torch.testing.assert_close(lin.weight, target)
    lin.eval()
    torch.testing.assert_close(lin.weight, target)


def test_mdgf_beta_buffer_stays_float32_under_dtype_casts():
    """mdgf's beta reaches the ops as a 0-d buffer; ``module.to(dtype)`` casts floating buffers,
    but this one stays float32 and exact, so a bf16 layer scales its pruned weights by beta
    rounded once to bf16, bit for bit as with a Python float beta (``where(mask, 1, beta)``), and
    a round trip through bf16 does not leave beta rounded (2/3 is not a bf16 number).  The
    buffer is not in the state dict."""
    lin, w, p = nm_linear(d_in=16, d_out=8, n=1, m=4, recipe="mdgf", decay="stepwise", decay_stages=3,
                          decay_steps=9, grad_mode="exact")
    for _ in range(3):
        p.after_step()
    beta = p.current().beta
    assert beta == pytest.approx(2 / 3, rel=1e-15)
    exact = torch.tensor(beta, dtype=torch.float32)
    lin.to(torch.bfloat16)
    assert torch.equal(p.pruned_scale, exact)
    s = torch.where(hand_mask(w, 1, 4).bool(), 1.0, beta).to(torch.bfloat16)
    assert torch.equal(lin.weight, w.detach() * s)
    c = torch.randn(8, 16).to(torch.bfloat16)
    (lin.weight * c).sum().backward()
    assert torch.equal(w.grad, c * s)                 # exact mode: g * s
    lin.double()
    assert torch.equal(p.pruned_scale, exact)
    assert not any("pruned_scale" in key for key in lin.state_dict())


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("decay,extra,expected", [
    ("linear", {}, [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    ("cosine", {}, [1.0, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2,
                    0.0, 0.0]),
    ("stepwise", {"decay_stages": 2}, [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0]),
    ("exponential", {}, [1.0, 1.0, 1.0, math.exp(-1.25), math.exp(-2.5), math.exp(-3.75), 0.0, 0.0]),
    ("exponential", {"decay_coef": 0.1}, [1.0, 1.0, 1.0, math.exp(-0.1), math.exp(-0.2), math.exp(-0.3),
                                          0.0, 0.0]),
])
def test_mdgf_decay_follows_the_schedule_step_by_step(decay, extra, expected):
    # dense_steps=2 (dense, beta reported as 1), then a 4-step window, then binary.
    _, w, p = nm_linear(n=2, m=4, recipe="mdgf", decay=decay, decay_steps=4, dense_steps=2, **extra)
    got, dense = [], []
    for _ in expected:
        st = p.current()
        got.append(st.beta)
        dense.append(st.dense)
        p.after_step()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert dense == [True, True] + [False] * 6
    assert int(p.step) == len(expected)


def pattern_sequence(p, steps):
    seq = []
    for _ in range(steps):
        st = p.current()
        seq.append(f"{st.n}:{st.m}")
        p.after_step()
    return seq


@pytest.mark.parametrize("structure,expected", [
    ("stepwise", ["7:8", "7:8", "4:8", "4:8", "2:8", "2:8", "1:8", "1:8", "1:8"]),
    ("geometric", ["8:64", "8:64", "4:32", "4:32", "2:16", "2:16", "1:8", "1:8", "1:8"]),
    ("densify", ["1:64", "1:64", "1:32", "1:32", "1:16", "1:16", "1:8", "1:8", "1:8"]),
    (["6:8", "3:8", "1:8"], ["6:8", "6:8", "6:8", "3:8", "3:8", "3:8", "1:8", "1:8", "1:8"]),
])
def test_sdgf_pattern_sequence_follows_the_schedule(structure, expected):
    decay_steps = 8 if isinstance(structure, str) else 9
    lin, w, p = nm_linear(d_in=128, d_out=4, n=1, m=8, recipe="sdgf", decay_steps=decay_steps, structure=structure)
    got = []
    for _ in expected:
        st = p.current()
        got.append(f"{st.n}:{st.m}")
        n, m = st.n, st.m
        weight = lin.weight  # training forward: the frame's binary mask
        assert groups_nonzeros(weight, m).eq(n).all()
        torch.testing.assert_close(weight, w.detach() * hand_mask(w, n, m))
        p.after_step()
    assert got == expected


def test_sdgf_stepwise_sequences_for_other_targets():
    cases = {(1, 16): ["15:16", "8:16", "4:16", "2:16", "1:16"], (2, 4): ["3:4", "2:4"],
             (1, 32): ["31:32", "16:32", "8:32", "4:32", "2:32", "1:32"]}
    for (n, m), expected in cases.items():
        _, _, p = nm_linear(d_in=64, n=n, m=m, recipe="sdgf", decay_steps=len(expected))
        assert pattern_sequence(p, len(expected) + 1) == expected + [f"{n}:{m}"]


def test_the_loop_hook_advances_every_layer_once_per_step():
    net = Net()
    reparam.apply(net, "nm", n=2, m=4, recipe="sdgf", decay_steps=4)
    for _ in range(3):
        reparam.after_step(net, None)
    steps = [int(p.step) for _, _, p in optimlib.reparam.nm_export.nm_parametrizations(net)]
    assert steps == [3, 3]


def _train(net, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 64, generator=g)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        reparam.after_step(net, opt)


@pytest.mark.parametrize("options", [
    dict(n=1, m=8, recipe="mdgf", decay="cosine", decay_steps=12, dense_steps=2),
    dict(n=1, m=8, recipe="sdgf", decay_steps=12, dense_steps=2),
])
def test_resume_mid_schedule_continues_exactly(options):
    torch.manual_seed(0)
    ref = Net()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    reparam.apply(ref, "nm", **options)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _train(ref, opt, 6, seed=1)  # mid-window: 4 steps into 12
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    osd = copy.deepcopy(opt.state_dict())
    assert int(sd["mlp.0.parametrizations.weight.0.step"]) == 6
    state_before = ref.mlp[0].parametrizations.weight[0].current()
    _train(ref, opt, 8, seed=2)  # crosses frames / decay into the binary phase

    resumed = Net()
    resumed.load_state_dict(init)
    reparam.apply(resumed, "nm", **options)
    resumed.load_state_dict(sd)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(osd)
    assert resumed.mlp[0].parametrizations.weight[0].current() == state_before
    _train(resumed, opt2, 8, seed=2)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- 2:4 export
def test_to_semi_structured_on_cpu_warns_and_keeps_exact_dense_zeros():
    torch.manual_seed(0)
    net = Net()
    reparam.apply(net, "nm", n=2, m=4, recipe="srste")
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = net(x)
    with pytest.raises(SemiStructuredUnavailable, match="CUDA GPU"):
        to_semi_structured(net, strict=True)
    assert parametrize.is_parametrized(net.mlp[0])  # strict: nothing changed
    with pytest.warns(UserWarning, match=r"kept dense with exact N:M zeros.*CUDA GPU"):
        converted = to_semi_structured(net)
    assert converted == []
    assert not parametrize.is_parametrized(net.mlp[0]) and not parametrize.is_parametrized(net.mlp[2])
    assert groups_nonzeros(net.mlp[0].weight, 4).eq(2).all()
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected)


def test_to_semi_structured_names_patterns_that_are_not_2_of_4_compatible():
    net = Net()
    reparam.apply(net, "nm", n=3, m=4, recipe="ste")
    with pytest.warns(UserWarning, match="3:4 leaves more than 2 non-zeros"):
        to_semi_structured(net)


# ----------------------------------------------------------------------------- composability
def _losses_on_fixed_batch(model, opt, steps=6):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 33))
    losses = []
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        reparam.after_step(model, opt)
        losses.append(loss.item())
    return losses


def test_nm_trains_with_galore():
    torch.manual_seed(0)
    model = build_model("llama_tiny")
    reparam.apply(model, "nm", n=2, m=4, recipe="mdgf", decay_steps=4)
    opt = optimlib.create_optimizer(model, "galore_adamw", lr=3e-3, rank=8, update_proj_gap=4)
    losses = _losses_on_fixed_batch(model, opt)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_galore_projects_the_nm_latent_weights():
    model = build_model("llama_tiny")
    reparam.apply(model, "nm", n=2, m=4, recipe="srste")
    opt = optimlib.create_optimizer(model, "galore_adamw", lr=3e-3, rank=8)
    projected = {n for g in opt.param_groups if "rank" in g for n in g["names"]}
    assert "layers.0.attn.q_proj.parametrizations.weight.original" in projected
