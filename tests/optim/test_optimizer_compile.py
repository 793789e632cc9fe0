"""Optimizer steps built on the ``optimlib.kernels`` ops compile under ``torch.compile`` (CPU
inductor) with no graph break from our code, and give the eager results.

* GaLore-AdamW: the whole ``optimizer.step()`` (projection, the fused Adam op on the low-rank
  moments, the fused back-projection + weight update, and the multi-tensor AdamW of the other
  parameters) compiles with ``fullgraph=True`` on steps between basis refreshes.
* SMMF and AdamP keep ``torch.optim``'s convention of a tensor step counter, and read it on the
  host once per parameter (``step.item()``: the bias corrections and SMMF's schedules are Python
  numbers handed to the ops), which is a graph break by design; after it, dynamo resumes with
  symbolic shapes and Python arithmetic on them (SMMF's ``math.isqrt`` of the matrix view) breaks
  again.  ``torch._dynamo.explain`` of their ``step()`` shows that no break is inside an op call,
  and the per-parameter update they run (:func:`optimlib.optim.smmf.smmf_direction` -- the op plus the column normalisation --
  and :func:`optimlib.optim.adamp.adamp_param_` -- stats op, coefficients, apply op) compiles
  with ``fullgraph=True``.

Tolerance against eager: 1e-6 relative (inductor may fuse the small eager expressions around
the ops -- the matmuls of the projection, the coefficient arithmetic -- in another order);
the ops themselves run the same reference code in both.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import optimlib
from optimlib.distributed.row_block import FlatSlice, RowBlock
from optimlib.optim.adamp import adamp_param_
from optimlib.optim.smmf import init_smmf_state, smmf_direction

RTOL = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(24, 16, generator=g)), nn.Parameter(torch.randn(10, 20, generator=g)),
            nn.Parameter(torch.randn(16, generator=g))]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(24, 16, generator=g), torch.randn(10, 20, generator=g), torch.randn(16, generator=g)]


def test_galore_adamw_step_compiles_fullgraph():
    """4 steps (refresh at step 0, eager; then 3 compiled ones of the same basis): parameters
    and moments equal the eager run within 1e-6 relative."""
    def make(ps):
        return optimlib.GaLoreAdamW([{"params": ps[:2], "rank": 4, "update_proj_gap": 50, "projection": "svd"},
                                     {"params": ps[2:]}], lr=1e-2, weight_decay=0.01)

    eager_ps, comp_ps = _params(), _params()
    eager, comp = make(eager_ps), make(comp_ps)
    step = torch.compile(comp.step, fullgraph=True)
    for t in range(4):
        for ps in (eager_ps, comp_ps):
            for p, g in zip(ps, _grads(t)):
                p.grad = g.clone()
        eager.step()
        (comp.step if t == 0 else step)()          # step 0 computes the bases (SVD), eagerly
    for a, b in zip(eager_ps, comp_ps):
        assert rel(a.detach(), b.detach()) <= RTOL
    for a, b in zip(eager_ps[:2], comp_ps[:2]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel(eager.state[a][key], comp.state[b][key]) <= RTOL, key


@pytest.mark.parametrize("name", ["smmf", "adamp"])
def test_no_graph_break_inside_the_ops(name):
    """``explain`` of a whole step: at most one break per parameter -- the host read
    (``.item()``) of its tensor step counter -- and none inside an op call (no frame in
    ``optimlib/kernels``) or in shape arithmetic (SMMF's square matricization folds to constants)."""
    ps = _params()
    opt = optimlib.SMMF(ps, lr=1e-2) if name == "smmf" else optimlib.AdamP(ps, lr=1e-2)
    for t in range(2):
        for p, g in zip(ps, _grads(t)):
            p.grad = g
        if t == 0:
            opt.step()
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count <= len(ps) - 1, explained.graph_break_count
    for b in explained.break_reasons:
        frame = b.user_stack[-1]
        assert "/kernels/" not in frame.filename, (b.reason, frame.filename, frame.lineno)
        assert ".item()" in (frame.line or ""), (b.reason, frame)


def test_smmf_update_compiles_fullgraph():
    """SMMF's per-parameter core (the op, then the column normalisation) with ``fullgraph=True``."""
    torch.manual_seed(0)
    R, n = 12, 7
    block = RowBlock((R, n), FlatSlice.whole(R * n))

    def core(g, factors):
        return smmf_direction(g, block, beta1=0.9, beta2=0.5, eps=1e-8, valid_numel=80, **factors)

    eager = init_smmf_state(R, n)
    for t in eager.values():
        if t.dtype == torch.float32:
            t.uniform_(0.1, 1.0)
    eager["exp_avg_sign"].random_(0, 256)
    comp = {k: v.clone() for k, v in eager.items()}
    compiled = torch.compile(core, fullgraph=True)
    for _ in range(3):
        g = torch.randn(R, n)
        d_eager, d_comp = core(g, eager), compiled(g, comp)
        assert rel(d_eager, d_comp) <= RTOL
    for key in eager:
        if key == "exp_avg_sign":
            assert torch.equal(eager[key], comp[key])
        else:
            assert rel(eager[key], comp[key]) <= RTOL, key


@pytest.mark.parametrize("kind", ["none", "channel"])
def test_adamp_update_compiles_fullgraph(kind):
    """AdamP's per-parameter step (stats op, coefficients, apply op) with ``fullgraph=True``, with and
    without a projection firing."""
    torch.manual_seed(0)
    R, n = 6, 9
    w = torch.randn(R, n)
    hp = dict(beta1=0.9, beta2=0.999, lr=0.1, weight_decay=0.01, eps=1e-8, delta=0.1, wd_ratio=0.1, nesterov=False)
    piece = FlatSlice.whole(R * n)

    def core(w, g, m, v, step: int):
        adamp_param_(w, g, m, v, step, (R, n), piece, **hp)

    compiled = torch.compile(core, fullgraph=True)
    eager = [w.clone(), torch.zeros(R, n), torch.zeros(R, n)]
    comp = [w.clone(), torch.zeros(R, n), torch.zeros(R, n)]
    for step in (1, 2, 3):
        g = torch.randn(R, n)
        if kind == "channel":    # each row orthogonal to its weight row: AdamP's channel view fires
            g = g - eager[0] * ((g * eager[0]).sum(1, keepdim=True) / (eager[0] * eager[0]).sum(1, keepdim=True))
        core(eager[0], g, eager[1], eager[2], step)
        compiled(comp[0], g, comp[1], comp[2], step)
    for a, b in zip(eager, comp):
        assert rel(a, b) <= RTOL
    assert not torch.equal(eager[0], w)
