"""GaLore back-projection + fused weight update: kernel vs twin, and the twin vs GaLoreAdamW itself."""

import math

import pytest
import torch

from optimlib.kernels import adam8bit_lowrank_update_, adam_lowrank_update_, galore_backproject_update_
from optimlib.optim.galore import GaLoreAdamW


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,r", [(37, 45, 5), (20, 7, 16), (130, 3, 1), (1, 1, 1), (0, 4, 2)])
@pytest.mark.parametrize("decay_first,wd", [(False, 0.1), (True, 0.1), (False, 0.0)])
def test_matches_twin(device, dtype, m, n, r, decay_first, wd, tol):
    torch.manual_seed(0)
    W = torch.randn(n, m, device=device).to(dtype).t()             # non-contiguous weight, written in place
    A = torch.randn(m, r, device=device).to(dtype)
    B = torch.randn(n, r, device=device).to(dtype).t()             # non-contiguous operand
    W_r = W.clone()
    kw = dict(scale=0.25, step_size=0.01, lr=0.02, weight_decay=wd, wd_factor=0.5, decay_first=decay_first)
    galore_backproject_update_(W, A, B, backend="triton", **kw)
    galore_backproject_update_(W_r, A, B, backend="reference", **kw)
    torch.testing.assert_close(W, W_r, **tol(dtype))


def test_mixed_dtypes(device, tol):
    """fp32 master weight, bf16 gradient-side operands (GaLore back-projects in the grad's dtype)."""
    torch.manual_seed(1)
    W = torch.randn(33, 40, device=device)
    A, B = torch.randn(33, 8, device=device).bfloat16(), torch.randn(8, 40, device=device).bfloat16()
    W_r = W.clone()
    galore_backproject_update_(W, A, B, scale=0.25, step_size=1e-2, lr=1e-2, weight_decay=0.1, backend="triton")
    galore_backproject_update_(W_r, A, B, scale=0.25, step_size=1e-2, lr=1e-2, weight_decay=0.1,
                               backend="reference")
    torch.testing.assert_close(W, W_r, **tol(torch.float32))


def test_shape_errors():
    with pytest.raises(ValueError, match="do not chain"):
        galore_backproject_update_(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(3, 4), scale=1, step_size=1,
                                   lr=1)


def _galore(W, side, moments_dtype=None, wd=0.1):
    m, n = W.shape
    return GaLoreAdamW([{"params": [W], "rank": 3, "update_proj_gap": 200, "scale": 0.25, "proj_type": side,
                         "projection": "svd", "moments_dtype": moments_dtype, "quant_block": 4}],
                       lr=1e-2, weight_decay=wd)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("moments", [None, "int8"])
def test_reference_path_is_galore_adamw_bitwise(side, moments):
    """Second step of GaLoreAdamW (same basis, non-zero moments) recomputed from its own state with
    the ops on the reference path: the weight is bit-identical."""
    torch.manual_seed(2)
    W = torch.nn.Parameter(torch.randn(11, 9))
    opt = _galore(W, side, moments)
    W.grad = torch.randn(11, 9)
    opt.step()
    st = opt.state[W]
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    W1 = W.detach().clone()
    G = torch.randn(11, 9)
    W.grad = G
    opt.step()

    P = before["basis"]
    low = G @ P.t() if side == "right" else P.t() @ G                # projector.down
    t = before["moment_step"] + 1
    step_size = 1e-2 * math.sqrt(1.0 - 0.999 ** t) / (1.0 - 0.9 ** t)
    if moments is None:
        direction = adam_lowrank_update_(before["exp_avg"], before["exp_avg_sq"], low, beta1=0.9, beta2=0.999,
                                         eps=1e-6, backend="reference")
    else:
        kr = low if side == "right" else low.t()                    # codes live in the (K, r) layout
        step = st["step"] + 7919 * st["refreshes"]
        d = adam8bit_lowrank_update_(before["exp_avg_codes"], before["exp_avg_absmax"], before["exp_avg_sq_codes"],
                                     before["exp_avg_sq_absmax"], kr, beta1=0.9, beta2=0.999, eps=1e-6, block=4,
                                     noise=(st["seed"], 2 * step, 2 * step + 1, 0), backend="reference")
        direction = d if side == "right" else d.t()
        for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
            assert torch.equal(before[key], st[key]), key
    A, B = (direction, P) if side == "right" else (P, direction)
    galore_backproject_update_(W1, A, B, scale=0.25, step_size=step_size, lr=1e-2, weight_decay=0.1,
                               backend="reference")
    assert torch.equal(W1, W.detach())


def test_opcheck():
    torch.manual_seed(3)
    args = (torch.randn(6, 5), torch.randn(6, 2), torch.randn(2, 5), 0.25, 0.01, 0.01, 0.1, 1.0, False, "triton")
    torch.library.opcheck(torch.ops.optimlib.galore_backproject_update_.default, args)
