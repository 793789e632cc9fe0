"""The SLTrain, N:M and compander linears under ``torch.compile`` (CPU inductor).

Their forward and backward are optimlib's custom ops (``optimlib.kernels``), which carry fake
implementations, so Dynamo must trace each layer's forward -- the autograd function included,
whose backward it traces ahead -- as one graph: ``torch._dynamo.explain`` reports no graph break
and ``fullgraph=True`` compiles.  The compiled layer is then run for two accumulated micro-batches,
an optimizer-step boundary (``after_step``) and one more micro-batch, and its outputs and
gradients are compared with eager's.  The custom ops run the same eager twins in both; inductor
only compiles the PyTorch around them (``A * scale``, the GEMM, the bias gradient, the ``exp`` of
the compander's hyper-parameters), and may fuse or reorder those reductions, so fp32 results are
compared at ``rtol = 1e-5, atol = 1e-6``.  The N:M case runs SR-STE with a large lambda and
checks the step's gradient against the hand formula: a term added twice, or not at all, under
compile would show.
"""

import copy
import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn

from optimlib import reparam
from optimlib.reparam.compander import compand
from optimlib.reparam.nm import nm_sparsify
from optimlib.reparam.sltrain import SparseLowRankLinear

D_IN, D_OUT = 48, 40
TOL = dict(rtol=1e-5, atol=1e-6)


def _sltrain():
    layer = SparseLowRankLinear(D_IN, D_OUT, rank=4, density=0.1, alpha=8.0, seed=0)
    with torch.no_grad():  # B starts at zero: give it values so its gradient paths matter
        layer.B.normal_(generator=torch.Generator().manual_seed(1))
    return layer


def _nm():
    return nm_sparsify(nn.Linear(D_IN, D_OUT), n=2, m=4, recipe="srste", srste_lambda=0.5)


def _nm_mdgf_exact():
    lin = nm_sparsify(nn.Linear(D_IN, D_OUT), n=1, m=4, recipe="mdgf", decay="stepwise", decay_stages=2,
                      decay_steps=10, grad_mode="exact")
    for _ in range(5):  # beta = 0.5 for steps 5-9: pruned weights scaled, exact gradient
        reparam.after_step(lin)
    assert lin.parametrizations.weight[0].current().beta == 0.5
    return lin


def _compander():
    return compand(nn.Linear(D_IN, D_OUT), saturation=3.0, slope=2.0, learnable=True)


LAYERS = {"sltrain": _sltrain, "nm-srste": _nm, "nm-mdgf-exact": _nm_mdgf_exact, "compander": _compander}


def _micro_batches(n=3):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(2, 5, D_IN, generator=gen), torch.randn(2, 5, D_OUT, generator=gen)) for _ in range(n)]


def _run(layer, call, batches):
    """Two accumulated micro-batches, ``after_step``, a third: outputs, the input gradients, and
    each parameter's gradient after the first step's accumulation and after the third batch."""
    outs, x_grads, grads = [], [], []
    for i, (x, c) in enumerate(batches):
        x = x.clone().requires_grad_()
        y = call(x)
        (y * c).sum().backward()
        outs.append(y.detach())
        x_grads.append(x.grad)
        if i == 1:
            grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
            for p in layer.parameters():
                p.grad = None
            reparam.after_step(layer)
    grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    return outs, x_grads, grads


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_compiles_without_graph_breaks_and_matches_eager(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x, c = _micro_batches(1)[0]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: (layer(x) * c).sum())(x.clone().requires_grad_())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1

    eager, compiled = copy.deepcopy(layer), copy.deepcopy(layer)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    fn = torch.compile(compiled, backend=counter, fullgraph=True)
    batches = _micro_batches()
    want = _run(eager, eager, batches)
    got = _run(compiled, fn, batches)
    # One graph, no recompilation across micro-batches and the step boundary.
    assert counter.frame_count == 1
    for w, g in zip(want[0] + want[1], got[0] + got[1]):
        torch.testing.assert_close(g, w, **TOL)
    for w, g in zip(want[2], got[2]):
        assert w.keys() == g.keys()
        for key in w:
            torch.testing.assert_close(g[key], w[key], **TOL, msg=key)
    if name == "nm-srste":
        # By hand: SR-STE's weight gradient over the step's two micro-batches is the sum of the
        # straight-through gradients dL/dW~ = c^T x plus lam (1 - mask) W once -- not twice.
        W = layer.parametrizations.weight.original.detach()
        groups = W.abs().reshape(-1, 4)
        kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
        expected = sum(c.reshape(-1, D_OUT).t() @ x.reshape(-1, D_IN) for x, c in batches[:2])
        expected = expected + 0.5 * W * (~kept).reshape(W.shape)
        torch.testing.assert_close(got[2][0]["parametrizations.weight.original"], expected, **TOL)


def test_mdgf_schedule_recompiles_only_when_the_mask_structure_changes():
    """MDGF's beta changes every optimizer step of its decay window.  It reaches the ops as each
    layer's ``pruned_scale`` buffer, not as a Python float baked into the graph, so a model
    compiled whole compiles once for its dense step, recompiles once when the mask switches on,
    and never again: not over the 8-step exponential window, nor into the binary phase
    (``error_on_recompile`` from then on).  With a float, every window step recompiled and after
    8 recompiles dynamo ran the frame eagerly for good.  Exact-mode gradients (which use beta)
    with an SR-STE term; outputs and gradients match eager at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.ReLU(), nn.Linear(D_IN, D_OUT))
    for lin in (model[0], model[2]):
        nm_sparsify(lin, n=2, m=4, recipe="mdgf", decay="exponential", decay_steps=8, dense_steps=1,
                    grad_mode="exact", srste_lambda=0.1)
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    fn = torch.compile(compiled, backend=counter, fullgraph=True)
    frames, betas = [], []
    for step, (x, c) in enumerate(_micro_batches(12)):
        betas.append(compiled[2].parametrizations.weight[0].current().beta)
        with torch._dynamo.config.patch(error_on_recompile=step >= 2):
            got = fn(x)
        want = eager(x)
        torch.testing.assert_close(got, want, **TOL)
        (want * c).sum().backward()
        (got * c).sum().backward()
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, **TOL, msg=name)
            pe.grad = pc.grad = None
        reparam.after_step(eager)
        reparam.after_step(compiled)
        frames.append(counter.frame_count)
    # dense, the window's 8 steps (beta = exp(-5 s / 8), s = 0..7), binary
    assert betas == pytest.approx([1.0] + [math.exp(-5 * s / 8) for s in range(8)] + [0.0] * 3, rel=1e-12)
    assert frames == [1] + [2] * 11
