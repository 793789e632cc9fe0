"""The torch.optim contracts, checked for every registered optimizer (``optimlib.list_optimizers()``).

What a user of ``torch.optim`` relies on, in the spirit of torch's OptimizerInfo battery and
torchao's optimizer tests: state-dict round trips mid-run (through ``torch.load(weights_only=True)``)
that continue bit-exactly, Python-number and tensor step counters, older state dicts, deepcopy,
step / state-dict hooks, ``zero_grad``, closures, ``add_param_group`` after steps, per-group lr and
weight-decay changes, LR schedulers (OneCycleLR cycling ``betas`` / ``momentum`` too), tensor
learning rates, 0-d / empty / non-contiguous / channels-last parameters, fp32 / bf16 / fp64,
parameters without gradients, and complex parameters (refused by name, or exact as
``view_as_real``).  A new registration is covered by every test here without being listed.

Tolerances: bit-exact unless stated.  Against a float64 run of the same steps, fp32 within 1e-5
and bf16 within 2**-3 relative (max |diff| / max |param| per tensor; measured <= 2.1e-7, and
<= 7.1e-2 as torch's AdamW: Adam normalises the rounding of small bf16 gradients).  torch's own
optimizers with a tensor lr against the float lr: 1e-6 relative (measured 1.0e-7).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import optimlib
import toy_optimizer
from optimlib.optim import create_optimizer, get_optimizer_spec
from optimlib.optim._common import OptimizerBase

# Every registered optimizer, and a toy written outside the library (registered while this module runs).
NAMES = sorted([*optimlib.list_optimizers(), toy_optimizer.NAME])


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    with toy_optimizer.registered():
        yield
MATRIX_OPTIONS = {"rank": 2, "update_proj_gap": 2}   # low-rank groups refresh inside every test run
DATA = [torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(8)]


class Net(nn.Module):
    """A conv (4-D), two targeted linears (``mlp``), a LayerNorm (1-D) and a 0-d scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.mlp = nn.Sequential(nn.Linear(12, 6), nn.Linear(6, 4))
        self.norm = nn.LayerNorm(6)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.conv(x.to(self.conv.weight.dtype)).flatten(1)
        return self.mlp[1](torch.tanh(self.norm(self.mlp[0](h)))) * self.scale


def make(name, dtype=torch.float32):
    torch.manual_seed(0)
    net = Net().to(dtype)
    return net, create_optimizer(net, name, lr=1e-2, weight_decay=0.01, **matrix_options(name))


def matrix_options(name):
    return {k: v for k, v in MATRIX_OPTIONS.items() if k in get_optimizer_spec(name).matrix_keys}


def train(net, opt, xs, before_step=None):
    for x in xs:
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        if before_step is not None:
            before_step(opt)
        opt.step()


def snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30)).item()


def saved(opt) -> bytes:
    torch.save(opt.state_dict(), buf := io.BytesIO())
    return buf.getvalue()


def loaded(data: bytes) -> dict:  # a fresh copy: a loaded optimizer steps its tensors in place, as torch's do
    return torch.load(io.BytesIO(data), weights_only=True)


def state_values(state_dict):
    """``((param id, key), value)`` of every entry of the per-parameter states."""
    return [((i, k), v) for i, st in sorted(state_dict["state"].items()) for k, v in sorted(st.items())]


def resumed(name, state_dict, xs=DATA[3:6]):
    net, opt = make(name)
    train(net, opt, DATA[:3])   # the model's weights at the save; the optimizer's come from state_dict
    net2, opt2 = make(name)
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(state_dict)
    train(net2, opt2, xs)
    return net2, opt2


@pytest.fixture(scope="module")
def reference():
    """Per name: the parameters after DATA[:6] uninterrupted, and the saved state dict after DATA[:3]."""
    out = {}
    for name in NAMES:
        net, opt = make(name)
        train(net, opt, DATA[:3])
        mid = saved(opt)
        train(net, opt, DATA[3:6])
        out[name] = snapshot(net), mid
    return out


# ----------------------------------------------------------------------------- coverage
def test_suite_covers_every_registered_optimizer_and_class():
    assert NAMES == optimlib.list_optimizers() and NAMES
    built = {type(make(name)[1]) for name in NAMES}

    def subclasses(cls):
        return {cls} | {s for c in cls.__subclasses__() for s in subclasses(c)}
    leaves = {c for c in subclasses(OptimizerBase) if not c.__subclasses__() and c.__module__.startswith("optimlib.")}
    assert leaves <= built, f"optimizer classes no registered name builds: {leaves - built}"


# ----------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_mid_run_continues_bit_exactly(name, reference):
    full, data = reference[name]
    net, opt = resumed(name, loaded(data))
    assert_same(full, snapshot(net))
    # Loading gives back what was saved: every value, every tensor's dtype.
    net, opt = make(name)
    mid = loaded(data)
    opt.load_state_dict(loaded(data))
    again = opt.state_dict()
    assert [k for k, _ in state_values(again)] == [k for k, _ in state_values(mid)]
    for (_, a), (_, b) in zip(state_values(again), state_values(mid)):
        assert (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(a, torch.Tensor) else a == b
    assert again["param_groups"] == mid["param_groups"]


@pytest.mark.parametrize("kind", ["int", "float", "int64 tensor"])
@pytest.mark.parametrize("name", NAMES)
def test_step_counters_load_as_numbers_or_tensors_and_keep_counting(name, kind, reference):
    full, data = reference[name]
    convert = {"int": int, "float": float, "int64 tensor": lambda s: torch.tensor(int(s))}[kind]
    edited = loaded(data)
    for state in edited["state"].values():   # every parameter of Net has a step counter
        state["step"] = convert(state["step"])
    net, opt = resumed(name, edited)
    assert_same(full, snapshot(net))
    assert [int(s["step"]) for s in opt.state.values()] == [6] * len(list(net.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_older_state_dict_without_group_keys_takes_the_optimizers_values(name, reference):
    full, data = reference[name]
    net, opt = make(name)
    older = loaded(data)
    # optimlib's optimizers fill every key; torch's own fill those their versions added.
    added = opt.defaults if isinstance(opt, OptimizerBase) else ("foreach", "maximize", "capturable",
                                                                  "differentiable", "fused")
    for group in older["param_groups"]:
        for key in added:
            group.pop(key, None)
    net, opt = resumed(name, older)
    assert_same(full, snapshot(net))
    assert [set(g) for g in opt.param_groups] == [set(g) for g in make(name)[1].param_groups]


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_continues_like_the_original(name):
    net, opt = make(name)
    train(net, opt, DATA[:3])
    net2, opt2 = copy.deepcopy((net, opt))
    assert {id(t) for s in opt2.state.values() for t in s.values() if isinstance(t, torch.Tensor)}.isdisjoint(
        {id(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)})
    train(net, opt, DATA[3:6])
    train(net2, opt2, DATA[3:6])
    assert_same(snapshot(net), snapshot(net2))


# ----------------------------------------------------------------------------- hooks, zero_grad, closures
@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks_run(name):
    net, opt = make(name)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", snapshot(net))))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", snapshot(net))))
    train(net, opt, DATA[:2])
    assert [c for c, _ in calls] == ["pre", "post", "pre", "post"]
    for (_, before), (_, after) in zip(calls[::2], calls[1::2]):
        assert any(not torch.equal(a, b) for a, b in zip(before, after))   # the hooks bracket the update
    pre.remove()
    post.remove()
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 7})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load pre", sd.get("extra"))))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    train(net, opt, DATA[2:3])
    opt.load_state_dict(opt.state_dict())
    assert calls[4:] == ["sd pre", ("load pre", 7), "load post"]


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_and_a_step_without_gradients(name):
    net, opt = make(name)
    train(net, opt, DATA[:1])
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    before = snapshot(net)
    opt.step()
    assert_same(before, snapshot(net))


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_once_and_its_loss_returned(name):
    net, opt = make(name)
    train(net, opt, DATA[:2])
    net2, opt2 = make(name)
    losses = []
    for x in DATA[:2]:
        def closure(x=x):
            assert torch.is_grad_enabled()
            opt2.zero_grad()
            loss = net2(x).pow(2).mean()
            loss.backward()
            losses.append(loss)
            return loss
        assert opt2.step(closure) is losses[-1]
    assert len(losses) == 2
    assert_same(snapshot(net), snapshot(net2))


# ----------------------------------------------------------------------------- groups and schedules
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_steps(name):
    net, opt = make(name)
    train(net, opt, DATA[:4])
    net2, opt2 = make(name)
    extra = nn.Parameter(torch.randn(3, 4))
    start = extra.detach().clone()
    train(net2, opt2, DATA[:2])
    opt2.add_param_group({"params": [extra]})
    assert opt2.param_groups[-1]["lr"] == opt2.defaults["lr"]
    grads = iter(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(9)))
    train(net2, opt2, DATA[2:4], before_step=lambda o: setattr(extra, "grad", next(grads)))
    assert_same(snapshot(net), snapshot(net2))   # the other parameters do not notice
    assert not torch.equal(extra.detach(), start) and torch.isfinite(extra).all()


@pytest.mark.parametrize("name", NAMES)
def test_per_group_lr_and_weight_decay_changes_apply_to_that_group_only(name):
    net, opt = make(name)
    train(net, opt, DATA[:2])
    assert len(opt.param_groups) >= 2
    before = snapshot(net)
    runs = {}
    for change in ("none", "lr=0 on the first group", "weight_decay=0.5 on the last group"):
        net2, opt2 = copy.deepcopy((net, opt))
        if change.startswith("lr"):
            opt2.param_groups[0].update(lr=0.0, weight_decay=0.0)
        elif change.startswith("weight_decay"):
            opt2.param_groups[-1]["weight_decay"] = 0.5
        train(net2, opt2, DATA[2:3])
        runs[change] = snapshot(net2)
    position = {id(p): i for i, p in enumerate(net.parameters())}
    first = {position[id(p)] for p in opt.param_groups[0]["params"]}
    last = {position[id(p)] for p in opt.param_groups[-1]["params"]}
    for i, (b, base, frozen, decayed) in enumerate(zip(before, *runs.values())):
        assert torch.equal(frozen, b) == (i in first)          # lr 0: that group stands still ...
        assert torch.equal(frozen, base) == (i not in first)   # ... and the others step as usual
        assert torch.equal(decayed, base) == (i not in last)


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=8, pct_start=0.5,
                                                                cycle_momentum=True),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_values_are_what_the_step_uses(name, scheduler):
    """Stepping under the scheduler == setting its values by hand before every step; OneCycleLR
    with ``cycle_momentum`` also cycles ``betas[0]`` / ``momentum``, and the step reads them."""
    net, opt = make(name)
    if scheduler == "onecycle" and not {"betas", "momentum"} & set(opt.defaults):
        # SMMF has neither betas nor momentum: OneCycleLR refuses cycle_momentum, as for torch's optimizers
        with pytest.raises(ValueError, match="momentum"):
            SCHEDULERS[scheduler](opt)
        return
    sched = SCHEDULERS[scheduler](opt)
    keys = ["lr"] + ([k for k in ("betas", "momentum") if k in opt.defaults] if scheduler == "onecycle" else [])
    values = []
    for x in DATA[:5]:
        values.append([{k: copy.deepcopy(g[k]) for k in keys} for g in opt.param_groups])
        train(net, opt, [x])
        sched.step()
    assert len({str(v) for v in values}) > 2
    for manual_keys, equal in ((keys, True), (["lr"], len(keys) == 1)):
        net2, opt2 = make(name)
        for x, groups in zip(DATA[:5], values):
            for g, v in zip(opt2.param_groups, groups):
                g.update({k: copy.deepcopy(v[k]) for k in manual_keys})
            train(net2, opt2, [x])
        assert all(map(torch.equal, snapshot(net), snapshot(net2))) == equal, manual_keys


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_steps_like_the_float_lr(name, shape):
    """A 0-d or one-element tensor lr (kept a tensor by LambdaLR) gives the float lr's steps:
    bit-exact for optimlib, 1e-6 relative for torch's own."""
    runs = []
    for lr in (torch.full(shape, 1e-2), float(torch.tensor(1e-2))):
        net, opt = make(name)
        for g in opt.param_groups:
            g["lr"] = lr.clone() if isinstance(lr, torch.Tensor) else lr
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        for x in DATA[:4]:
            train(net, opt, [x])
            sched.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == isinstance(lr, torch.Tensor)
        runs.append(snapshot(net))
    exact = isinstance(opt, OptimizerBase)
    for a, b in zip(*runs):
        assert torch.equal(a, b) if exact else rel(b, a) <= 1e-6


# ----------------------------------------------------------------------------- parameters
KINDS = {"0-d": lambda g: torch.randn((), generator=g), "empty": lambda g: torch.randn(0, 3, generator=g),
         "non-contiguous": lambda g: torch.randn(7, 5, generator=g).t(),
         "channels-last": lambda g: torch.randn(4, 3, 2, 3, generator=g).contiguous(memory_format=torch.channels_last)}


def _kind(kind):
    return KINDS[kind](torch.Generator().manual_seed(0))


def _build(name, p):
    group = {"params": [p], "names": ["w"], "shapes": [tuple(p.shape)]}
    if p.dim() >= 2:
        group.update(matrix_options(name))
    return get_optimizer_spec(name).build([group], lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_parameter_kinds_step_in_place_like_a_contiguous_twin(name, kind):
    p = nn.Parameter(_kind(kind))
    q = nn.Parameter(p.detach().contiguous().clone())
    stride, data_ptr = p.stride(), p.data_ptr()
    opt_p, opt_q = _build(name, p), _build(name, q)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = torch.empty_like(p).copy_(grad), grad.clone()   # the gradient in the parameter's layout
        opt_p.step()
        opt_q.step()
    assert p.stride() == stride and p.data_ptr() == data_ptr   # updated in place, layout kept
    assert torch.equal(p.detach(), q.detach()) and torch.equal(p.detach(), _kind(kind)) == (kind == "empty")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_track_a_float64_run(name, dtype):
    runs = {}
    for dt in (torch.float64, dtype):
        net, opt = make(name, dtype=dt)
        train(net, opt, DATA[:4])
        runs[dt] = snapshot(net)
        assert all(p.dtype == dt and torch.isfinite(p).all() for p in net.parameters())
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -3
    for ref, got in zip(runs[torch.float64], runs[dtype]):
        assert rel(ref, got) <= tolerance


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_gradients_are_untouched(name):
    net, opt = make(name)
    idle = [net.mlp[1].weight, net.norm.bias]
    before = [p.detach().clone() for p in idle]
    train(net, opt, DATA[:3], before_step=lambda o: [setattr(p, "grad", None) for p in idle])
    assert_same(before, [p.detach() for p in idle])
    assert all(not opt.state.get(p) for p in idle)
    assert not torch.equal(net.mlp[0].weight, make(name)[0].mlp[0].weight)


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_are_refused_by_name_or_stepped_as_view_as_real(name):
    z = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z = get_optimizer_spec(name).build([{"params": [z], "names": ["z"], "shapes": [(3, 4)]}], lr=1e-2)
    opt_r = get_optimizer_spec(name).build([{"params": [r], "names": ["r"], "shapes": [(3, 4, 2)]}], lr=1e-2)
    grad = torch.randn(3, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    z.grad, r.grad = grad, torch.view_as_real(grad).clone()
    try:  # torch's own optimizers step a complex parameter as its view_as_real
        opt_z.step()
    except (TypeError, ValueError, RuntimeError) as err:
        assert isinstance(opt_z, OptimizerBase) and "parameter z is complex" in str(err)
        return
    opt_r.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())


# ----------------------------------------------------------------------------- regressions
def _twins(build, build_second=None, shapes=((4, 3), ())):
    """Two optimizers (``build(params)``, ``build_second(params)``) over equal parameters, and a
    ``step()`` giving both the same gradients."""
    ps = [[nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
          for _ in range(2)]
    opts = [build(ps[0]), (build_second or build)(ps[1])]
    g = torch.Generator().manual_seed(7)

    def step():
        grads = [torch.randn(s, generator=g) for s in shapes]
        for params, opt in zip(ps, opts):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
    return ps, opts, step


@pytest.mark.parametrize("cls, kw", [(optimlib.AdamP, {}), (optimlib.SMMF, {}), (optimlib.SGDP, {"momentum": 0.9})])
def test_regression_python_number_step_loads_and_keeps_counting(cls, kw):
    """``adamp.AdamP`` 0.3.0 (and many others) store ``state["step"]`` as a Python int: AdamP and
    SMMF crashed on it at the next step, SGDP stopped counting."""
    ps, opts, step = _twins(lambda params: cls(params, **kw))
    for _ in range(2):
        step()
    state_dict = copy.deepcopy(opts[0].state_dict())
    for s in state_dict["state"].values():
        s["step"] = int(s["step"])
    opts[1].load_state_dict(state_dict)
    for _ in range(2):
        step()
    assert_same(ps[0], ps[1])
    assert [float(s["step"]) for s in opts[1].state.values()] == [4.0, 4.0]


@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("cls, kw", [(optimlib.SGDP, {"momentum": 0.9, "weight_decay": 0.1}),
                                     (optimlib.SMMF, {"weight_decay": 0.1})])
def test_regression_tensor_lr_steps(cls, kw, shape):
    """SGDP and SMMF accepted a tensor lr, then failed in ``add_(alpha=tensor)``."""
    lr = torch.full(shape, 1e-2)
    ps, _, step = _twins(lambda params: cls(params, lr=lr, **kw), lambda params: cls(params, lr=float(lr), **kw))
    for _ in range(3):
        step()
    assert_same(ps[0], ps[1])


def test_regression_sgdp_takes_torch_sgds_lr_semantics():
    """``SGDP([{"params": [w], "lr": 0.1}])`` raised TypeError for the missing constructor lr."""
    w = nn.Parameter(torch.randn(5))
    assert optimlib.SGDP([w]).defaults["lr"] == torch.optim.SGD([w]).defaults["lr"]
    ps, opts, step = _twins(lambda params: optimlib.SGDP([{"params": params, "lr": 0.1}], momentum=0.9),
                            lambda params: torch.optim.SGD([{"params": params, "lr": 0.1}], momentum=0.9),
                            shapes=((5,), ()))
    for _ in range(3):   # parameters of at most one dimension are never projected: SGDP is SGD
        step()
    assert opts[0].param_groups[0]["lr"] == 0.1
    assert_same(ps[0], ps[1])


def test_regression_galore_older_state_dict_gets_the_newer_group_keys():
    """A GaLoreAdamW state dict from before ``inner``, ``delta``, ``wd_ratio``, ``nesterov``,
    ``decay_rate``, ``growth_rate`` existed loaded, then the step failed with KeyError 'inner'."""
    ps, opts, step = _twins(lambda params: optimlib.GaLoreAdamW(
        [{"params": params[:1], "rank": 2, "update_proj_gap": 2}, {"params": params[1:]}]), shapes=((6, 4), (4,)))
    step()
    older = copy.deepcopy(opts[0].state_dict())
    for group in older["param_groups"]:
        for key in ("inner", "delta", "wd_ratio", "nesterov", "decay_rate", "growth_rate"):
            del group[key]
    opts[1].load_state_dict(older)
    for _ in range(3):
        step()
    assert_same(ps[0], ps[1])
    assert opts[1].param_groups[0]["inner"] == "adamw" and opts[1].param_groups[1]["growth_rate"] == 0.999


@pytest.mark.parametrize("cls", [optimlib.AdamP, optimlib.SGDP, optimlib.SMMF, optimlib.GaLoreAdamW])
def test_regression_complex_parameters_are_refused_by_name(cls):
    """AdamP, SMMF and GaLore stepped complex parameters wrongly (a complex ``exp_avg_sq``); SGDP
    raised an unrelated error."""
    z = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    z.grad = torch.randn(3, 4, dtype=torch.complex64)
    before = z.detach().clone()
    opt = cls([{"params": [z], "names": ["blocks.0.attn"]}])
    with pytest.raises(TypeError, match=r"parameter blocks\.0\.attn is complex \(torch\.complex64\)"):
        opt.step()
    assert torch.equal(z.detach(), before) and not opt.state
