"""What a shape-aware optimizer does when something other than DeepSpeed or FSDP2 stands between it
and its parameters: exact where the parameters are the ones it was built with, else a ``ValueError``
at the first step naming the optimizer, the parameter and the way out -- never a step on a layout
it would have to guess.  (The DeepSpeed and FSDP2 layouts themselves: tests/distributed/
test_user_scripts.py.)"""

import pytest
import torch
from torch import nn

import optimlib

SHAPE_AWARE = {
    "adamp": lambda params: optimlib.AdamP(params, lr=1e-2),
    "sgdp": lambda params: optimlib.SGDP(params, lr=1e-2, momentum=0.9),
    "smmf": lambda params: optimlib.SMMF(params, lr=1e-2),
    "galore_adamw": lambda params: optimlib.GaLoreAdamW(
        [{"params": list(params), "rank": 2, "update_proj_gap": 2}], lr=1e-2),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def _backward(model):
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()


@pytest.mark.parametrize("name", ["adamp", "smmf"])
def test_fsdp1_flat_parameters_are_refused(name):
    """FSDP1 marks its flat parameters (and, with ``use_orig_params=True``, the flattened originals)
    ``_fsdp_flattened``; their shards do not keep the parameter's shape.  FSDP1 needs an
    accelerator, so the parameter is marked with torch's own helper."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    model = _model()
    _set_fsdp_flattened(model[2].weight)
    opt = SHAPE_AWARE[name](model.named_parameters())
    _backward(model)
    with pytest.raises(ValueError, match=r"parameter 2\.weight is an FSDP1 flat parameter.*FSDP2"):
        opt.step()


@pytest.mark.parametrize("name", sorted(SHAPE_AWARE))
def test_a_flat_tensor_from_an_unknown_wrapper_is_refused(name):
    """A wrapper that swaps a group's parameters for a flat tensor, outside DeepSpeed: refused at the
    step with the optimizer, the group and the parameters it was built with named; nothing moves."""
    model = _model()
    params = dict(model.named_parameters())
    opt = SHAPE_AWARE[name](params.items() if name != "galore_adamw" else params.values())
    flat = torch.zeros(sum(p.numel() for p in params.values()), requires_grad=True)
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    first = "group0.param0" if name == "galore_adamw" else "0.weight"
    with pytest.raises(ValueError, match=rf"{type(opt).__name__}, param group 0: .*\({first}, .*outside a process group"):
        opt.step()
    assert torch.equal(flat, torch.zeros_like(flat)) and not opt.state


def test_a_flat_tensor_that_is_not_a_deepspeed_partition_is_refused(one_rank_group):
    """Inside a process group, a flat tensor whose parameters are not views of one flat buffer (as
    DeepSpeed ZeRO-1/2 leaves them) cannot be mapped: refused, naming the first such parameter."""
    model = _model()
    opt = optimlib.AdamP(model.named_parameters(), lr=1e-2)
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), requires_grad=True)
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match=r"AdamP, param group 0: parameter 0\.bias is not where DeepSpeed ZeRO-1/2 "
                                         r"puts it.*Build the optimizer over the parameters the wrapper trains"):
        opt.step()


@pytest.mark.parametrize("name", sorted(SHAPE_AWARE))
def test_optimizer_built_before_fully_shard_is_refused(one_rank_group, name):
    """``fully_shard`` re-creates the parameters; an optimizer built before it holds the old ones,
    which never get a gradient again.  The first step says so instead of training nothing."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    opt = SHAPE_AWARE[name](model.parameters())
    fully_shard(model)
    _backward(model)
    with pytest.raises(ValueError, match=r"found no gradient on any of the 4 trainable parameters it was built "
                                         r"with \(group0\.param0, .*build the optimizer after wrapping"):
        opt.step()


@pytest.mark.parametrize("name", sorted(SHAPE_AWARE))
def test_optimizer_built_after_fully_shard_with_kept_unsharded_parameters_is_exact(one_rank_group, name):
    """FSDP2 with ``reshard_after_forward=False`` on one rank: the same updates as the plain model."""
    from torch.distributed.fsdp import fully_shard

    plain, sharded = _model(), _model()
    fully_shard(sharded, reshard_after_forward=False)
    opts = [SHAPE_AWARE[name](m.parameters()) for m in (plain, sharded)]
    for _ in range(3):
        for m, opt in zip((plain, sharded), opts):
            _backward(m)
            opt.step()
            opt.zero_grad()
    for a, b in zip(plain.parameters(), sharded.parameters()):
        torch.testing.assert_close(b.full_tensor(), a.detach(), rtol=1e-6, atol=1e-7)


def test_a_compiled_model_trains_exactly_like_the_eager_one():
    """``torch.compile(model)`` keeps the module's parameter objects: the optimizer built over them
    (before or after compiling) steps exactly as on the eager model."""
    eager, compiled_model = _model(), _model()
    opts = [optimlib.AdamP(eager.parameters(), lr=1e-2), optimlib.AdamP(compiled_model.parameters(), lr=1e-2)]
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for _ in range(3):
        for m, opt in zip((eager, compiled), opts):
            _backward(m)
            opt.step()
            opt.zero_grad()
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_step_with_no_gradient_after_one_with_gradients_is_a_no_op():
    """Only until gradients have been seen does a gradient-less step mean replaced parameters;
    after that it is torch's no-op (e.g. a skipped micro-batch)."""
    model = _model()
    opt = optimlib.AdamP(model.parameters(), lr=1e-2)
    _backward(model)
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
