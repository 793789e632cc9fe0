"""Checks shared by the SLTrain / LOST / dynamic-rank tests (one copy, three callers).

* :func:`check_merge` — ``reparam.merge`` gives dense ``nn.Linear`` layers whose model output
  equals the reparameterized model's within fp32 round-off;
* :func:`check_state_dict_round_trip` — a differently-seeded fresh model that loads the state
  dict computes the same function and holds the same buffers;
* :func:`check_exact_resume` — k steps, save model + optimizer state dicts, load both into a
  fresh model and optimizer, continue: bitwise equal to the uninterrupted run;
* :func:`gradcheck_layer` — ``torch.autograd.gradcheck`` (double) of a layer with respect to
  its input and every trainable parameter.
"""

from __future__ import annotations

import copy
import io

import torch
from torch import nn
from torch.func import functional_call

from optimlib import reparam
from optimlib.models import build_model

SMALL = dict(dim=64, hidden_dim=96, n_heads=2, n_layers=2, vocab_size=64, max_seq_len=16)


def small_model(method: str, seed: int, **options) -> nn.Module:
    """A 2-layer LLaMA (d=64, MLP 96) with ``method`` applied to attention and MLP."""
    torch.manual_seed(seed)
    return reparam.apply(build_model("llama_tiny", **SMALL), method, **options)


def batches(n: int, seed: int = 123, batch: int = 4, seq: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SMALL["vocab_size"], (batch, seq + 1), generator=gen) for _ in range(n)]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> list[float]:
    """Plain steps with the loop's order: forward/backward, step, zero_grad, ``after_step``."""
    losses = []
    for tokens in data:
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        reparam.after_step(model, opt)
        losses.append(loss.item())
    return losses


def check_merge(method: str, steps: int = 3, **options) -> None:
    model = small_model(method, 0, **options)
    train(model, make_optimizer(model), batches(steps))
    tokens = batches(1, seed=7)[0][:, :-1]
    with torch.no_grad():
        expected = model(tokens)
        dense = reparam.merge(copy.deepcopy(model))
        got = dense(tokens)
    assert not any(hasattr(m, "merged") for m in dense.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in dense.modules())
    assert n_linear == 1 + 7 * SMALL["n_layers"]  # lm_head + every attention / MLP projection
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def check_state_dict_round_trip(method: str, **options) -> None:
    source = small_model(method, 0, **options)
    train(source, make_optimizer(source), batches(2))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = small_model(method, 1, **options)  # different seed: different init and supports
    target.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    tokens = batches(1, seed=9)[0][:, :-1]
    with torch.no_grad():
        assert torch.equal(source(tokens), target(tokens))


def check_exact_resume(method: str, k: int = 3, m: int = 3, **options) -> None:
    data = batches(k + m)
    reference = small_model(method, 0, **options)
    ref_opt = make_optimizer(reference)
    ref_losses = train(reference, ref_opt, data)

    first = small_model(method, 0, **options)
    opt = make_optimizer(first)
    losses = train(first, opt, data[:k])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = small_model(method, 1, **options)  # different seed: everything must come from the files
    opt2 = make_optimizer(resumed)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    losses += train(resumed, opt2, data[k:])

    assert losses == ref_losses
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for p, q in zip(reference.parameters(), resumed.parameters()):
        for key, value in ref_opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def gradcheck_layer(layer: nn.Module, batch: tuple[int, ...] = (2, 3)) -> None:
    """``gradcheck`` in double of ``layer(x)`` w.r.t. ``x`` and every trainable parameter."""
    layer = layer.double()
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]
    x = torch.randn(*batch, layer.in_features, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)
