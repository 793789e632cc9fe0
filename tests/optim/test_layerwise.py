"""LayerwiseStepper on optimizers that have no ``step_param`` (torch's own), its ``prepare``
callback and its gradient-memory count, one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optimlib.optim.layerwise import LayerwiseStepper, step_one

ACC = 2


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 17), nn.Tanh(), nn.Linear(17, 3))


def batches(steps):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 10, generator=g), torch.randn(5, 3, generator=g)) for _ in range(steps * ACC)]


def loss(model, x, y):
    return (model(x) - y).pow(2).mean() / ACC


@pytest.mark.parametrize("build", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD([{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.05}], momentum=0.9),
], ids=["adamw", "sgd_two_groups"])
def test_torch_optimizers_step_layerwise_bit_for_bit(build):
    data = batches(3)
    model = make()
    opt = build(list(model.parameters()))
    for i, (x, y) in enumerate(data):
        loss(model, x, y).backward()
        if i % ACC == ACC - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
    normal = [p.detach().clone() for p in model.parameters()]

    model = make()
    opt = build(list(model.parameters()))
    prepared = []
    stepper = LayerwiseStepper(opt, ACC, prepare=lambda p: prepared.append(p.shape))
    for x, y in data:
        loss(model, x, y).backward()
        stepper.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(normal, model.parameters()))
    assert len(prepared) == 3 * len(normal)            # each parameter once per step, on the last micro-batch
    every = sum(p.numel() * 4 for p in model.parameters())
    assert stepper.grad_bytes_peak == every            # accumulation keeps every gradient between micro-batches


def test_without_accumulation_one_layer_of_gradients_is_alive_at_a_time():
    model = make()
    stepper = LayerwiseStepper(torch.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = batches(1)[0]
    loss(model, x, y).backward()
    stepper.step()
    layers = [sum(p.numel() * 4 for p in m.parameters()) for m in model if isinstance(m, nn.Linear)]
    assert stepper.grad_bytes_peak <= max(layers) + max(layers[1:]), (stepper.grad_bytes_peak, layers)
    assert all(p.grad is None for p in model.parameters())


def test_step_one_refuses_a_foreign_tensor():
    opt = torch.optim.AdamW(make().parameters())
    with pytest.raises(ValueError, match="not a parameter of this AdamW"):
        step_one(opt, torch.zeros(3, requires_grad=True))
