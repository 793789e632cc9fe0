"""AdamP, SGDP, SMMF and GaLoreAdamW (every inner rule, and the factory names) reject
bad hyper-parameters at construction -- ``ValueError`` for a value out of range (negative,
non-finite, unknown name), ``TypeError`` for a non-number -- with a message that names the
argument and the accepted range.  Boundary values stay accepted."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import optimlib
from optimlib import GaLoreAdamW
from optimlib.optim import create_optimizer
from optimlib.optim.factory import matrix_optimizers

INF, NAN = math.inf, math.nan


def _param():
    return nn.Parameter(torch.zeros(4, 3))


def galore(**kw):
    group = {"params": [_param()], "rank": kw.pop("rank", 2)}
    for key in ("update_proj_gap", "projection", "proj_type", "on_refresh", "scale"):
        if key in kw:
            group[key] = kw.pop(key)
    return GaLoreAdamW([group], **kw)


BUILDERS = {
    "adamp": lambda **kw: optimlib.AdamP([_param()], **kw),
    "sgdp": lambda **kw: optimlib.SGDP([_param()], **{"lr": 0.1, **kw}),
    "smmf": lambda **kw: optimlib.SMMF([_param()], **kw),
    "galore_adamw": lambda **kw: galore(**kw),
    "galore_adamp": lambda **kw: galore(inner="adamp", **kw),
    "galore_smmf": lambda **kw: galore(inner="smmf", **kw),
}

# The hyper-parameters every optimizer has, with bad values.
COMMON = [("lr", -1e-3), ("lr", INF), ("lr", NAN), ("eps", -1e-8), ("eps", INF), ("eps", NAN),
          ("weight_decay", -0.1), ("weight_decay", INF), ("weight_decay", NAN)]
BETAS = [(1.0, 0.999), (0.9, -0.1), (NAN, 0.999), (0.9, INF), (0.9,)]


@pytest.mark.parametrize("opt", list(BUILDERS))
@pytest.mark.parametrize("arg, value", COMMON)
def test_negative_or_non_finite_common_arguments(opt, arg, value):
    with pytest.raises(ValueError, match=rf"invalid {arg}=.*accepted range"):
        BUILDERS[opt](**{arg: value})


@pytest.mark.parametrize("opt", ["adamp", "galore_adamw", "galore_adamp", "galore_smmf"])
@pytest.mark.parametrize("betas", BETAS)
def test_bad_betas(opt, betas):
    with pytest.raises(ValueError, match=r"invalid betas=.*accepted range is 2 numbers, each in \[0, 1\)"):
        BUILDERS[opt](betas=betas)


@pytest.mark.parametrize("opt", list(BUILDERS))
def test_non_numbers_are_type_errors(opt):
    with pytest.raises(TypeError, match=r"invalid lr='0\.1'.*accepted range"):
        BUILDERS[opt](lr="0.1")
    with pytest.raises(TypeError, match="invalid weight_decay=None"):
        BUILDERS[opt](weight_decay=None)


@pytest.mark.parametrize("kw, arg", [
    (dict(beta=1.0), "beta"), (dict(beta=NAN), "beta"), (dict(decay_rate=0.5), "decay_rate"),
    (dict(decay_rate=-INF), "decay_rate"), (dict(growth_rate=1.5), "growth_rate"),
    (dict(weight_decay_mode="l2"), "weight_decay_mode")])
def test_smmf_arguments(kw, arg):
    with pytest.raises(ValueError, match=rf"invalid {arg}=.*accepted range"):
        optimlib.SMMF([_param()], **kw)


@pytest.mark.parametrize("kw, arg", [
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"), (dict(dampening=INF), "dampening"),
    (dict(delta=-0.1), "delta"), (dict(wd_ratio=1.5), "wd_ratio"), (dict(wd_ratio=NAN), "wd_ratio")])
def test_sgdp_and_adamp_arguments(kw, arg):
    with pytest.raises(ValueError, match=rf"invalid {arg}=.*accepted range"):
        optimlib.SGDP([_param()], lr=0.1, **kw)
    if arg in ("delta", "wd_ratio"):
        with pytest.raises(ValueError, match=rf"invalid {arg}=.*accepted range"):
            optimlib.AdamP([_param()], **kw)


@pytest.mark.parametrize("kw, arg", [
    (dict(rank=0), "rank"), (dict(rank=-3), "rank"), (dict(rank=1.5), "rank"), (dict(rank="big"), "rank"),
    (dict(update_proj_gap=0), "update_proj_gap"), (dict(update_proj_gap=-5), "update_proj_gap"),
    (dict(update_proj_gap=2.5), "update_proj_gap"), (dict(projection="eig"), "projection"),
    (dict(proj_type="full"), "proj_type"), (dict(on_refresh="flip"), "on_refresh"),
    (dict(scale=0.0), "scale"), (dict(scale=INF), "scale"), (dict(inner="lion"), "inner"),
    (dict(inner="smmf", decay_rate=0.5), "decay_rate"), (dict(inner="smmf", growth_rate=-1.0), "growth_rate"),
    (dict(inner="smmf", moments_dtype="int8"), "moments_dtype"), (dict(inner="adamp", delta=-1.0), "delta"),
    (dict(inner="adamp", wd_ratio=2.0), "wd_ratio")])
def test_galore_arguments(kw, arg):
    with pytest.raises(ValueError, match=rf"invalid {arg}=.*accepted range"):
        galore(**kw)


def test_unknown_inner_lists_the_accepted_names():
    with pytest.raises(ValueError, match="'adamw', 'adamp', 'smmf'"):
        galore(inner="lion")


@pytest.mark.parametrize("cls, extra", [(optimlib.AdamP, {}), (optimlib.SGDP, {"lr": 0.1}), (optimlib.SMMF, {}),
                                        (GaLoreAdamW, {})])
def test_param_group_values_are_checked_too(cls, extra):
    with pytest.raises(ValueError, match="invalid lr=-1"):
        cls([{"params": [_param()], "lr": -1.0}], **extra)
    opt = cls([_param()], **extra)
    with pytest.raises(ValueError, match="invalid weight_decay=nan"):
        opt.add_param_group({"params": [_param()], "weight_decay": NAN})


@pytest.mark.parametrize("name, kw, arg", [
    ("galore_smmf", dict(rank=0), "rank"), ("galore_adamp", dict(update_proj_gap=0), "update_proj_gap"),
    ("galore_adamw", dict(projection="qr"), "projection"), ("galore_smmf", dict(lr=-1.0), "lr"),
    ("adamp", dict(eps=NAN), "eps"), ("smmf", dict(decay_rate=1.0), "decay_rate")])
def test_factory_names_validate(name, kw, arg):
    model = nn.Sequential(nn.Linear(4, 3))
    if name.startswith("galore"):
        kw = {"target_modules": ["0"], **kw}
    with pytest.raises(ValueError, match=rf"invalid {arg}="):
        create_optimizer(model, name, **{"lr": 1e-3, **kw})


@pytest.mark.parametrize("opt", list(BUILDERS))
def test_boundary_values_are_accepted(opt):
    BUILDERS[opt](lr=0.0, eps=0.0, weight_decay=0.0)
    BUILDERS[opt](lr=torch.tensor(1e-3))
    if opt in ("adamp", "galore_adamw", "galore_adamp", "galore_smmf"):
        BUILDERS[opt](betas=(0.0, 0.0))
    if opt.startswith("galore"):
        BUILDERS[opt](rank=1, update_proj_gap=1)
        galore(rank="auto", projection="svd")


# ----------------------------------------------------------------------------- shape changes mid-training
OURS = [name for name in optimlib.list_optimizers() if name != "adamw"]   # "adamw" is torch.optim.AdamW


def _where(opt, p):
    return next((gi, i) for gi, g in enumerate(opt.param_groups) for i, q in enumerate(g["params"]) if q is p)


def _shape_case(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    kw = {"target_modules": ["0", "1"], "rank": 2} if name in matrix_optimizers() else {}
    opt = create_optimizer(model, name, lr=1e-3, **kw)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    weight = model[0].weight
    weight.data = torch.randn(7, 6)            # e.g. model surgery that grew the layer
    weight.grad = torch.randn(7, 6)
    return model, opt, weight


def test_every_registered_optimizer_but_torchs_own_is_covered():
    assert set(OURS) == {"adamp", "sgdp", "smmf", "galore_adamw", "galore_adamp", "galore_smmf", "fira_adamw",
                         "apollo_adamw", "apollo_mini", "coap_adamw",
                         "q_galore_adamw"}


@pytest.mark.parametrize("name", OURS)
def test_parameter_that_changed_shape_is_a_clear_error(name):
    """A parameter whose shape no longer matches its state raises ValueError naming the
    group and parameter index, both shapes and the remedy -- before any state is touched."""
    model, opt, weight = _shape_case(name)
    gi, i = _where(opt, weight)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[weight].items()}
    with pytest.raises(ValueError, match=rf"param group {gi}, parameter {i}\b.*changed shape from \(5, 6\) to "
                                         rf"\(7, 6\).*Re-create the optimizer.*remap optimizer.state"):
        opt.step()
    for key, value in before.items():                          # nothing was half-updated
        now = opt.state[weight][key]
        assert torch.equal(now, value) if torch.is_tensor(value) else now == value, key
    # Deleting the parameter's state is the documented way to restart it with the new shape.
    del opt.state[weight]
    shapes = opt.param_groups[gi].get("shapes")     # (the factory records global shapes)
    if shapes is not None:
        shapes[i] = (7, 6)
    opt.step()
    assert torch.isfinite(weight).all()


def test_galore_layerwise_mode_checks_the_shape_too():
    model, opt, weight = _shape_case("galore_adamw")
    stepper = opt.layerwise()
    with pytest.raises(ValueError, match=r"changed shape from \(5, 6\) to \(7, 6\)"):
        stepper.step()


@pytest.mark.parametrize("opt", list(BUILDERS))
def test_sparse_gradient_is_refused_naming_the_optimizer(opt):
    optimizer = BUILDERS[opt]()
    p = optimizer.param_groups[0]["params"][0]
    p.grad = torch.zeros(p.shape).to_sparse()
    with pytest.raises(RuntimeError, match=f"{type(optimizer).__name__} does not support sparse gradients"):
        optimizer.step()


@pytest.mark.parametrize("opt", list(BUILDERS))
def test_step_returns_the_closure_loss_computed_with_grad(opt):
    """``step(closure)``: the closure runs with autograd on (inside the step's no_grad) and its
    loss is returned; the step then uses the gradient the closure made."""
    optimizer = BUILDERS[opt]()
    p = optimizer.param_groups[0]["params"][0]
    before = p.detach().clone()

    def closure():
        optimizer.zero_grad()
        loss = (p - 1).square().sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == pytest.approx(12.0) and p.grad is not None
    assert not torch.equal(p.detach(), before)
