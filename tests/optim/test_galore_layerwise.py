"""Layer-wise (optimizer-in-backward) GaLore stepping, one process: same parameters as the normal
mode under gradient accumulation, one LR clock, gradients freed as they are used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimlib import GaLoreAdamW
from optimlib.optim.layerwise import LayerwiseStepper

ACC = 4


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 17), nn.Tanh(), nn.Linear(17, 3))


def groups(model):
    mats = [p for p in model.parameters() if p.dim() == 2]
    return [{"params": mats, "rank": 4, "update_proj_gap": 3},
            {"params": [p for p in model.parameters() if p.dim() < 2]}]


def data(steps):
    g = torch.Generator().manual_seed(7)
    return [[(torch.randn(6, 10, generator=g), torch.randn(6, 3, generator=g)) for _ in range(ACC)]
            for _ in range(steps)]


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))


@pytest.mark.parametrize("kw", [dict(projection="svd"), dict(projection="randomized", proj_type="left"),
                                dict(projection="dct", moments_dtype="int8", quant_block=2)])
def test_layerwise_with_accumulation_matches_normal_mode(kw):
    batches = data(5)
    model = make()
    opt = GaLoreAdamW(groups(model), lr=1e-2, weight_decay=0.01, **kw)
    sched = schedule(opt)
    for window in batches:
        for x, y in window:
            ((model(x) - y).pow(2).mean() / ACC).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    normal = [p.detach().clone() for p in model.parameters()]

    model = make()
    opt = GaLoreAdamW(groups(model), lr=1e-2, weight_decay=0.01, **kw)
    sched = schedule(opt)
    stepper = opt.layerwise(ACC)
    seen_grads = []
    for window in batches:
        for k, (x, y) in enumerate(window):
            ((model(x) - y).pow(2).mean() / ACC).backward()
            seen_grads.append(sum(p.grad is not None for p in model.parameters()))
            stepped = stepper.step()
            assert stepped == (k == ACC - 1)
            if stepped:
                sched.step()
    # gradients accumulate on the first ACC - 1 micro-batches and are consumed (freed) in the last
    assert seen_grads[:ACC] == [6, 6, 6, 0]
    for a, b in zip(normal, model.parameters()):
        assert torch.equal(a, b.detach())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 6)          # 5 optimizer steps: one clock
    assert all(opt.state[p]["step"] == 5 for p in model.parameters())


def test_frees_each_gradient_during_backward():
    model = make()
    opt = GaLoreAdamW(groups(model), lr=1e-2)
    stepper = LayerwiseStepper(opt, accumulation_steps=1)
    alive = []

    def probe(p):
        alive.append(sum(q.grad is not None for q in model.parameters()))

    # runs after the stepper's hook on the same parameter: at most this parameter's gradient
    # (none, already consumed) plus gradients of layers not reached yet are alive.
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(probe)
    x, y = torch.randn(4, 10), torch.randn(4, 3)
    (model(x) - y).pow(2).mean().backward()
    assert stepper.step()
    assert max(alive) <= 1 and all(p.grad is None for p in model.parameters())
    stepper.remove()
    (model(x) - y).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_step_catches_parameters_whose_hook_did_not_fire():
    model = make()
    opt = GaLoreAdamW(groups(model), lr=1e-2)
    stepper = opt.layerwise(1)
    w = model[0].weight
    w.grad = torch.randn_like(w)                  # set by hand: no backward, no hook
    before = w.detach().clone()
    assert stepper.step()
    assert w.grad is None and not torch.equal(before, w.detach()) and opt.state[w]["step"] == 1


def test_accumulation_steps_is_validated():
    with pytest.raises(ValueError, match="accumulation_steps"):
        GaLoreAdamW(groups(make())).layerwise(0)
