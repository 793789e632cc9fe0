"""Weight compander (optimlib.reparam.compander): shape of the map, inverse, learned
hyper-parameters, variance-preserving initialisation, composability with AdamP."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import optimlib
from optimlib import reparam
from optimlib.models import build_model
from optimlib.reparam.compander import Compander, compand


def test_map_is_odd_monotone_bounded_and_steepest_at_zero():
    c = Compander(scale=0.5, slope=3.0).double()
    theta = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64, requires_grad=True)  # k*theta/a in [-3, 3]
    w = c(theta)
    torch.testing.assert_close(c(-theta), -w)  # odd
    assert (w.diff() > 0).all()  # strictly monotone (until tanh rounds to 1 in double, |k theta / a| > ~19)
    assert w.abs().max() < 0.5  # bounded by the saturation level a
    huge = c(torch.tensor([1e6, -1e6], dtype=torch.float64))
    torch.testing.assert_close(huge.abs(), torch.full((2,), 0.5, dtype=torch.float64))
    (slope,) = torch.autograd.grad(w.sum(), theta)
    assert slope.argmax() == 10000 and abs(theta[10000].item()) < 1e-12  # steepest at zero ...
    assert slope[10000].item() == pytest.approx(3.0)  # ... with slope k there
    assert (slope[10001:].diff() < 0).all()  # and flattening away from it


def test_right_inverse_round_trips_and_clamps_beyond_saturation():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    compand(lin, saturation=3.0, slope=2.0)
    a = float(lin.parametrizations.weight[0].scale)
    w = (torch.rand(32, 64) * 2 - 1) * 0.99 * a
    lin.weight = w  # parametrize calls right_inverse
    torch.testing.assert_close(lin.weight, w, rtol=1e-5, atol=1e-7)
    lin.weight = torch.full((32, 64), 10 * a)
    assert (lin.weight <= a).all() and (lin.weight > 0.999 * a).all()


def test_gradcheck_in_double_through_weight_and_hyper_parameters():
    c = Compander(scale=0.3, slope=1.7, learnable=True).double()
    theta = (torch.randn(5, 7, dtype=torch.float64) * 0.2).requires_grad_(True)

    def f(t, log_a, log_k):
        a, k = log_a.exp(), log_k.exp()
        return a * torch.tanh(t * k / a)

    assert torch.autograd.gradcheck(f, (theta, c.log_scale, c.log_slope))
    torch.testing.assert_close(c(theta), f(theta, c.log_scale, c.log_slope))


def test_learned_hyper_parameters_get_gradients_and_no_weight_decay():
    torch.manual_seed(0)
    model = build_model("llama_tiny")
    reparam.apply(model, "compander", learnable=True)
    q = model.layers[0].attn.q_proj.parametrizations.weight
    x = torch.randint(0, 256, (2, 16))
    model(x).square().mean().backward()
    for p in (q[0].log_scale, q[0].log_slope, q.original):
        assert p.grad is not None and p.grad.abs().sum() > 0
    opt = optimlib.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    decay_of = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    hyper = [n for n in decay_of if "log_scale" in n or "log_slope" in n]
    assert len(hyper) == 2 * 7 * 4  # two per targeted linear (7 per block, 4 blocks)
    assert all(decay_of[n] == 0.0 for n in hyper)
    assert decay_of["layers.0.attn.q_proj.parametrizations.weight.original"] == 0.1


def test_fixed_hyper_parameters_are_buffers_in_the_state_dict():
    lin = nn.Linear(16, 8)
    compand(lin)
    names = [n for n, _ in lin.named_parameters()]
    assert names == ["bias", "parametrizations.weight.original"]
    assert "parametrizations.weight.0.log_scale" in lin.state_dict()


@pytest.mark.parametrize("init,saturation", [("kaiming", 3.0), ("normal", 3.0), ("normal", 1.5)])
def test_initialisation_keeps_the_initialisers_variance(init, saturation):
    """The effective weights' std equals the initialiser's nominal std within 1 % (sampling error
    of a 512x1024 tensor is ~0.1 %); without the correction clamping would lose variance."""
    torch.manual_seed(0)
    lin = nn.Linear(1024, 512)
    if init == "kaiming":
        nominal = 1 / math.sqrt(3 * 1024)  # nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    else:
        nominal = 0.02
        nn.init.normal_(lin.weight, 0.0, nominal)
    original = lin.weight.detach().clone()
    compand(lin, saturation=saturation, slope=2.0)
    with torch.no_grad():
        eff = lin.weight
    assert eff.std().item() == pytest.approx(nominal, rel=0.01)
    assert eff.std().item() == pytest.approx(original.std().item(), rel=1e-4)  # exact on the sample
    a = lin.parametrizations.weight[0].scale.item()
    assert a == pytest.approx(saturation * original.std().item(), rel=1e-6)
    if init == "normal" and saturation == 1.5:
        clamped = original.clamp(-a, a)
        assert clamped.std().item() < 0.95 * original.std().item()  # what the correction makes up for


def test_bad_options_are_rejected_naming_the_option():
    with pytest.raises(ValueError, match="'saturation'"):
        compand(nn.Linear(8, 4), saturation=1.0)
    with pytest.raises(ValueError, match="'slope'"):
        compand(nn.Linear(8, 4), slope=-1.0)
    with pytest.raises(ValueError, match="'learnable'"):
        compand(nn.Linear(8, 4), learnable="yes")
    with torch.device("meta"):
        lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="'init_std'"):
        compand(lin)
    compand(lin, init_std=0.02)  # meta with a stated std is fine
    assert lin.weight.is_meta


def test_merge_gives_a_plain_linear_with_the_same_function():
    torch.manual_seed(0)
    model = build_model("llama_tiny")
    reparam.apply(model, "compander", learnable=True)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(x)
    reparam.merge(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_compander_trains_with_adamp():
    torch.manual_seed(0)
    model = build_model("llama_tiny")
    reparam.apply(model, "compander", learnable=True)
    opt = optimlib.create_optimizer(model, "adamp", lr=3e-3, weight_decay=0.1)
    x = torch.randint(0, 256, (2, 33))
    losses = []
    for _ in range(6):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    hyper = model.layers[0].mlp.up_proj.parametrizations.weight[0]
    assert hyper.log_scale.item() != pytest.approx(math.log(3.0 * 0.02), abs=1e-6)  # it learned
