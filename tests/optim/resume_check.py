"""Exact state_dict resume, shared by the GaLore tests (test_galore.py, test_galore_inner.py)."""

from __future__ import annotations

import io

import torch


def _tensor_dtypes(opt) -> dict:
    return {(i, k): v.dtype for i, st in enumerate(opt.state.values()) for k, v in st.items()
            if isinstance(v, torch.Tensor)}


def assert_resumes_exactly(make_model, make_optimizer) -> None:
    """6 uninterrupted steps == 3 steps, save, ``torch.load(weights_only=True)`` into a fresh model
    (``make_model()``, 9 inputs) and optimizer (``make_optimizer(model)``), 3 more steps -- bit for
    bit; every state tensor keeps its dtype through the load.  Loss: mean of the squared outputs
    on seeded batches of 16."""
    data = [torch.randn(16, 9, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def train(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    model = make_model()
    opt = make_optimizer(model)
    train(model, opt, data)
    full = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = make_optimizer(model)
    train(model, opt, data[:3])
    dtypes = _tensor_dtypes(opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model = make_model()
    model.load_state_dict(ckpt["model"])
    opt = make_optimizer(model)
    opt.load_state_dict(ckpt["opt"])
    assert dtypes == _tensor_dtypes(opt)
    train(model, opt, data[3:])
    for a, b in zip(full, model.parameters()):
        assert torch.equal(a, b.detach())
