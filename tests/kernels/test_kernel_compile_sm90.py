"""Every kernel, at the launch configuration it gets on real sizes, compiles for an H100 (sm_90).

The interpreter runs a kernel's Python, not its GPU compilation; a kernel can pass in the
interpreter and still fail to compile (types the interpreter tolerates, unsupported ops) or
spill registers.  Triton compiles to a cubin without a GPU, so each launch recorded (not run)
from the public functions at a LLaMA-7B-like size goes through the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> ptxas) here, and ``ptxas -v``'s register and spill counts are checked.
"""

import os

import pytest
import torch

from optimlib import kernels
from optimlib.kernels import _dispatch
from optimlib.formats.quantize import num_blocks

E = torch.empty
HP = dict(beta1=0.9, beta2=0.999, eps=1e-6)


def _calls():
    """(name, thunk) pairs: public calls at real sizes, every constexpr branch that matters."""
    m, n, r = 4096, 11008, 128
    bf = torch.bfloat16
    yield "adam fp32", lambda: kernels.adam_lowrank_update_(E(m, r), E(m, r), E(m, r), **HP)
    yield "adam bf16 nesterov", lambda: kernels.adam_lowrank_update_(
        E(m, r, dtype=bf), E(m, r, dtype=bf), E(r, m, dtype=bf).t(), nesterov=True, bias_correction2_sqrt=0.5, **HP)
    nb = num_blocks(r, 256)
    u8 = torch.uint8
    yield "adam 8-bit stochastic", lambda: kernels.adam8bit_lowrank_update_(
        E(m, r, dtype=u8), E(m, nb), E(m, r, dtype=u8), E(m, nb), E(m, r), block=256, noise=(1, 2, 3, 0), **HP)
    for dt in (torch.float32, bf):
        for first in (False, True):
            yield f"backproject {dt} decay_first={first}", lambda dt=dt, first=first: \
                kernels.galore_backproject_update_(E(m, n), E(m, r, dtype=dt), E(r, n, dtype=dt), scale=0.25,
                                                   step_size=1e-3, lr=1e-3, weight_decay=0.1, decay_first=first)
    for rows, cols, momentum in ((6144, 7338, True), (4096, 4096, True), (m, 5504, False)):
        yield f"smmf {rows}x{cols} momentum={momentum}", lambda rows=rows, cols=cols, momentum=momentum: \
            kernels.smmf_update_(E(rows, cols), exp_avg_sq_row=E(rows), exp_avg_sq_col=E(cols), beta2=0.5, eps=1e-8,
                                 **(dict(beta1=0.9, exp_avg_row=E(rows), exp_avg_col=E(cols),
                                         exp_avg_sign=E((rows * cols + 7) // 8, dtype=u8)) if momentum else {}))
    yield "adamp", lambda: kernels.adamp_update_(E(m, 4096), E(m, 4096), E(m, 4096), E(m, 4096), step=3, lr=1e-3,
                                                 weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=True, **HP)
    nnz = int(0.03 * m * n)
    idx = torch.arange(nnz, dtype=torch.int32) * 33
    for dt in (torch.float32, bf):
        yield f"sltrain compose {dt}", lambda dt=dt: kernels.sltrain_compose(E(m, r, dtype=dt), E(r, n, dtype=dt),
                                                                              E(nnz, dtype=dt), idx)
        yield f"sltrain grads {dt}", lambda dt=dt: kernels.sltrain_grads(E(2048, m, dtype=dt), E(2048, n, dtype=dt),
                                                                          E(m, r, dtype=dt), E(r, n, dtype=dt), idx)
    for nn_, mm in ((2, 4), (1, 8)):
        yield f"nm {nn_}:{mm}", lambda nn_=nn_, mm=mm: kernels.nm_mask_apply(E(m, n, dtype=bf), nn_, mm, 0.3)
    yield "nm grad", lambda: kernels.nm_grad(E(m, n, dtype=bf), E(m, n, dtype=bf), E(m, n, dtype=torch.bool),
                                             beta=0.3, lam=2e-4, exact=True)
    theta = E(m, n, requires_grad=True)
    yield "compander", lambda: kernels.compander(theta, torch.ones(1, requires_grad=True),
                                                 torch.ones(1, requires_grad=True)).backward(E(m, n))


def _launches():
    seen = {}
    saved = {k: os.environ.get(k) for k in ("OPTIMLIB_KERNELS", "TRITON_INTERPRET")}
    os.environ.update(OPTIMLIB_KERNELS="triton", TRITON_INTERPRET="1")   # CPU tensors, kernel path, not run
    try:
        for name, call in _calls():
            with _dispatch.recording_launches(dry=True) as records:
                call()
            for kernel, grid, args, kwargs in records:
                key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
                seen.setdefault(key, (name, kernel, args, kwargs))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return list(seen.values())


LAUNCHES = _launches() if _dispatch.HAS_TRITON else []


@pytest.mark.slow
@pytest.mark.skipif(not _dispatch.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name,kernel,args,kwargs", LAUNCHES,
                         ids=[f"{rec[0]}:{rec[1].fn.__name__}" for rec in LAUNCHES])
def test_compiles_for_sm90_without_spills(name, kernel, args, kwargs):
    info = _dispatch.compile_for_cuda(kernel, args, kwargs, arch=90)
    assert info["registers"] is not None and info["registers"] <= 255
    assert info["spill_bytes"] == 0, f"{name}: {info['kernel']} spills {info['spill_bytes']} bytes"
    # Compiled without FMA contraction of a * b + c, as launch() runs them (tl.dot and tl.fma still
    # use FMAs: that is their definition).
    assert info["compiled"].metadata.enable_fp_fusion is False

