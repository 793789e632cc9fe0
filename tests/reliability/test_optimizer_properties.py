"""Property tests (hypothesis) for every registered optimizer.

For random shapes (0-D to 4-D, empty, non-contiguous, channels-last), dtypes (fp32, and bf16
parameters) and hyper-parameters drawn from the valid range:

* finite gradients never produce non-finite parameters or state;
* a ``state_dict`` round trip mid-run (through ``torch.save`` / ``torch.load(weights_only=True)``)
  continues bit-exactly like the uninterrupted optimizer.
"""

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optimlib
import toy_optimizer
from optimlib.optim import get_optimizer_spec

SHAPES = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 7), min_size=1, max_size=1).map(tuple),
    st.lists(st.integers(1, 9), min_size=2, max_size=4).map(tuple),
    st.lists(st.integers(0, 5), min_size=2, max_size=3).map(tuple),
)
LAYOUTS = st.sampled_from(["contiguous", "transposed", "channels_last"])
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    """A toy optimizer written outside the library, registered while this module runs."""
    with toy_optimizer.registered():
        yield


def _parameter(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        data = torch.randn(shape[::-1], generator=g).permute(*reversed(range(len(shape))))
    elif layout == "channels_last" and len(shape) == 4:
        data = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    else:
        data = torch.randn(shape, generator=g)
    return torch.nn.Parameter(data.to(dtype))


def _groups(name, p, rank):
    spec = get_optimizer_spec(name)
    group = {"params": [p], "names": ["w"], "shapes": [tuple(p.shape)]}
    if spec.matrix_keys and p.dim() == 2:
        group.update({k: v for k, v in {"rank": rank, "update_proj_gap": 2, "scale": 0.25}.items()
                      if k in spec.matrix_keys})
    return [group]


def _build(name, p, lr, wd, rank):
    return get_optimizer_spec(name).build(_groups(name, p, rank), lr=lr, weight_decay=wd)


def _grads(p, steps, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for _ in range(steps)]


def _run(opt, p, grads):
    for grad in grads:
        p.grad = grad.clone()
        opt.step()


@pytest.mark.parametrize("name", sorted([*optimlib.list_optimizers(), toy_optimizer.NAME]))
@SETTINGS
@given(shape=SHAPES, layout=LAYOUTS, bf16=st.booleans(), lr=st.floats(1e-5, 1e-1), wd=st.floats(0, 0.1),
       rank=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_finite_gradients_keep_parameters_finite_and_resume_exactly(name, shape, layout, bf16, lr, wd, rank, seed):
    dtype = torch.bfloat16 if bf16 else torch.float32
    p = _parameter(shape, layout, dtype, seed)
    q = torch.nn.Parameter(p.detach().clone())
    grads = _grads(p, 6, seed)

    opt = _build(name, p, lr, wd, rank)
    _run(opt, p, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    _run(opt, p, grads[3:])
    assert p.dtype == dtype and p.shape == shape
    assert torch.isfinite(p.float()).all(), (name, shape)
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v.float()).all(), (name, shape)

    other = _build(name, q, lr, wd, rank)
    _run(other, q, grads[:3])                                   # the same first half, fresh state
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    _run(other, q, grads[3:])
    assert torch.equal(p.detach(), q.detach()), (name, shape, layout, dtype)
