"""AdamP / SGDP: parity with the reference package ``adamp`` 0.3.0, the projection itself, flat
(DeepSpeed-like) pieces, checkpoints and argument validation.

Tolerance against the oracle: 1e-6 relative (max |diff| / max |param| per tensor) after 30 steps
in fp32 (measured <= 3.8e-7).  The step runs the fused ops of ``optimlib.kernels.adamp``, whose
projection is ``u - w <w,u> / (|w| + eps)^2`` (the reference: ``u - unit <unit, u>``), equal up to
rounding; the moments, the decision and an un-projected step are the reference's bits.
"""

import io
import itertools

import adamp as oracle
import pytest
import torch
from torch import nn

import optimlib
from optimlib.distributed import FlatSlice, RowBlock
from optimlib.optim import create_optimizer
from optimlib.optim.adamp import channel_view_shape, scale_invariant_projection

RTOL = 1e-6


class ConvNet(nn.Module):
    """conv -> BatchNorm (channel-wise scale-invariant), linear -> LayerNorm (layer-wise), plain head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 12, bias=False)
        self.ln = nn.LayerNorm(12, elementwise_affine=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.ln(self.fc(h))))


def train(make_opt, steps=30, seed=0):
    torch.manual_seed(seed)
    net = ConvNet()
    opt = make_opt(net.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(5, generator=g)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g)
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dict(net.named_parameters()), opt


def assert_close(ref, got, rtol=RTOL):
    for name in ref:
        a, b = ref[name].detach(), got[name].detach()
        err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
        assert err <= rtol, (name, err)


@pytest.mark.parametrize("nesterov, weight_decay", list(itertools.product([False, True], [0.0, 1e-2])))
def test_adamp_matches_reference(nesterov, weight_decay):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay, nesterov=nesterov)
    ref, _ = train(lambda p: oracle.AdamP(p, **kw))
    got, _ = train(lambda p: optimlib.AdamP(p, **kw))
    assert_close(ref, got)


@pytest.mark.parametrize("momentum, dampening, nesterov, weight_decay", [
    (0.9, 0.0, False, 0.0), (0.9, 0.0, True, 1e-3), (0.9, 0.1, False, 1e-3), (0.0, 0.0, False, 1e-3),
    (0.5, 0.0, True, 0.0)])
def test_sgdp_matches_reference(momentum, dampening, nesterov, weight_decay):
    kw = dict(lr=5e-2, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    ref, _ = train(lambda p: oracle.SGDP(p, **kw))
    got, opt = train(lambda p: optimlib.SGDP(p, **kw))
    assert_close(ref, got)
    if momentum == 0:  # no buffer is stored when it would only hold the gradient
        assert all("momentum_buffer" not in s for s in opt.state.values())


def test_model_exercises_both_views_and_no_projection(monkeypatch):
    """The parity model takes the channel view (conv+BN), the layer view (fc+LN) and none (head);
    the decision is read off the per-row statistics the fused op hands to ``adamp_coefficients``
    with F.cosine_similarity's formula (AdamP's test)."""
    import optimlib.optim.adamp as mod

    seen = []
    real = mod.adamp_coefficients

    def spy(stats, *, num_rows, num_cols, delta, eps, project=True, **kw):
        gg, ww, gw, _ = stats.double().unbind(1)
        chan = (gw.abs() / (gg.sqrt().clamp_min(eps) * ww.sqrt().clamp_min(eps))).max()
        g2, w2, gw_all = gg.sum(), ww.sum(), gw.sum()
        layer = gw_all.abs() / (g2.sqrt().clamp_min(eps) * w2.sqrt().clamp_min(eps))
        view = ("channel" if chan < delta / num_cols ** 0.5 else
                "layer" if layer < delta / (num_rows * num_cols) ** 0.5 else "none")
        coef, decay = real(stats, num_rows=num_rows, num_cols=num_cols, delta=delta, eps=eps, project=project, **kw)
        if project:      # (0-/1-D parameters: no projection)
            assert (view == "none") == bool((coef == 0).all())      # the op projects exactly when AdamP does
            seen.append(((num_rows, num_cols), view))
        return coef, decay

    monkeypatch.setattr(mod, "adamp_coefficients", spy)
    train(lambda p: optimlib.AdamP(p, lr=1e-2), steps=3)
    views = {}
    for shape, view in seen:
        views.setdefault(shape, set()).add(view)
    assert views == {(6, 27): {"channel"}, (12, 96): {"layer"}, (5, 12): {"none"}}


def _orthogonal_rows(g, w):
    unit = w / w.norm(dim=1, keepdim=True)
    return g - unit * (unit * g).sum(1, keepdim=True)


def test_projection_channel_view_removes_radial_part_per_row():
    torch.manual_seed(0)
    w, u = torch.randn(4, 10), torch.randn(4, 10)
    g = _orthogonal_rows(torch.randn(4, 10), w)  # each output channel scale-invariant
    block = RowBlock((4, 10), FlatSlice.whole(40))
    out, wd, projected = scale_invariant_projection(g, w, u, block, delta=0.1, wd_ratio=0.1, eps=1e-8)
    assert projected and wd == 0.1
    assert (out * w).sum(1).abs().max() < 1e-5  # anchor: the update is orthogonal to every row of w
    # ... and only the radial part was removed.
    assert torch.allclose(_orthogonal_rows(u, w), out, atol=1e-6)


def test_projection_layer_view_when_channel_view_fails():
    torch.manual_seed(0)
    w, u = torch.randn(4, 10), torch.randn(4, 10)
    g = torch.randn(4, 10)
    g = g - w * (g * w).sum() / (w * w).sum()  # orthogonal to w as a whole, not per row
    block = RowBlock((4, 10), FlatSlice.whole(40))
    assert torch.nn.functional.cosine_similarity(g, w, dim=1).abs().max() > 0.1 / 10 ** 0.5
    out, wd, projected = scale_invariant_projection(g, w, u, block, delta=0.1, wd_ratio=0.25, eps=1e-8)
    assert projected and wd == 0.25
    assert abs(float((out * w).sum())) < 1e-5


def test_projection_leaves_non_scale_invariant_weights_alone():
    torch.manual_seed(0)
    w, u = torch.randn(4, 10), torch.randn(4, 10)
    g = w + 0.1 * torch.randn(4, 10)
    out, wd, projected = scale_invariant_projection(g, w, u, RowBlock((4, 10), FlatSlice.whole(40)),
                                                    delta=0.1, wd_ratio=0.1, eps=1e-8)
    assert not projected and wd == 1.0 and out is u


def test_channel_view_shape():
    assert channel_view_shape((6, 3, 3, 3)) == (6, 27)
    assert channel_view_shape((5, 12)) == (5, 12)


@pytest.mark.parametrize("cls, kw", [(optimlib.AdamP, dict(lr=1e-2, weight_decay=1e-2, nesterov=True)),
                                     (optimlib.SGDP, dict(lr=5e-2, momentum=0.9, weight_decay=1e-3))])
def test_flat_padded_pieces_match_shaped_parameters(cls, kw):
    """A DeepSpeed-like flat, padded fp32 partition (shape from the group's "shapes") gives the
    same update as the shaped parameter."""
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (12, 7), (5,)]
    shaped = [torch.randn(s, requires_grad=True) for s in shapes]
    flat = [torch.zeros(p.numel() + 3, requires_grad=True) for p in shaped]
    with torch.no_grad():
        for f, p in zip(flat, shaped):
            f[: p.numel()] = p.reshape(-1)
    opt_a = cls(shaped, **kw)
    opt_b = cls([{"params": [f], "shapes": [s]} for f, s in zip(flat, shapes)], **kw)
    for step in range(4):
        for f, p in zip(flat, shaped):
            g = torch.randn(p.shape)
            if p.dim() > 1 and step % 2 == 0:  # make the projection trigger on some steps
                g = _orthogonal_rows(g.reshape(p.shape[0], -1), p.detach().reshape(p.shape[0], -1)).view(p.shape)
            p.grad = g
            f.grad = torch.cat([g.reshape(-1), torch.zeros(3)])
        opt_a.step()
        opt_b.step()
    for f, p in zip(flat, shaped):
        assert torch.allclose(f.detach()[: p.numel()], p.detach().reshape(-1), rtol=0, atol=1e-6)
        assert torch.equal(f.detach()[p.numel():], torch.zeros(3))


@pytest.mark.parametrize("cls, kw", [(optimlib.AdamP, dict(lr=1e-2, weight_decay=1e-2)),
                                     (optimlib.SGDP, dict(lr=5e-2, momentum=0.9, nesterov=True))])
def test_checkpoint_round_trip_resumes_exactly(cls, kw):
    """Resume at step 3 (torch.load(weights_only=True)) equals an uninterrupted run to step 6."""
    ref, _ = train(lambda p: cls(p, **kw), steps=6)

    torch.manual_seed(0)
    net = ConvNet()
    opt = cls(net.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    target = torch.randn(5, generator=g)
    for step in range(6):
        if step == 3:
            buf = io.BytesIO()
            torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            torch.manual_seed(123)
            net = ConvNet()
            net.load_state_dict(saved["model"])
            opt = cls(net.parameters(), **kw)
            opt.load_state_dict(saved["opt"])
            assert all(isinstance(v, torch.Tensor) for s in opt.state.values() for v in s.values())
        x = torch.randn(8, 3, 6, 6, generator=g)
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = dict(net.named_parameters())
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_per_parameter_step_counters():
    a, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))
    opt = optimlib.AdamP([a, b])
    for i in range(3):
        a.grad = torch.randn(3, 4)
        b.grad = torch.randn(4) if i == 0 else None
        opt.step()
    assert opt.state[a]["step"].item() == 3 and opt.state[b]["step"].item() == 1


@pytest.mark.parametrize("kw, arg", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(delta=-0.1), "delta"),
    (dict(wd_ratio=1.5), "wd_ratio")])
def test_adamp_validation(kw, arg):
    with pytest.raises(ValueError, match=rf"{arg}=.*accepted range"):
        optimlib.AdamP([nn.Parameter(torch.zeros(2))], **kw)


@pytest.mark.parametrize("kw, arg", [
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(dampening=2.0), "dampening"), (dict(weight_decay=-1.0), "weight_decay"), (dict(eps=-1.0), "eps"),
    (dict(delta=-1.0), "delta"), (dict(wd_ratio=-0.1), "wd_ratio")])
def test_sgdp_validation(kw, arg):
    kw = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match=rf"{arg}=.*accepted range"):
        optimlib.SGDP([nn.Parameter(torch.zeros(2))], **kw)


def test_factory_builds_both():
    net = ConvNet()
    assert {"adamp", "sgdp"} <= set(optimlib.list_optimizers())
    opt = create_optimizer(net, "adamp", lr=1e-3, weight_decay=0.01, nesterov=True)
    assert isinstance(opt, optimlib.AdamP) and opt.param_groups[0]["nesterov"]
    opt = create_optimizer(net, "sgdp", lr=0.1, momentum=0.9, per_parameter_groups=True)
    assert isinstance(opt, optimlib.SGDP)
    assert all(len(g["params"]) == 1 and len(g["shapes"]) == 1 for g in opt.param_groups)


def test_mismatched_shapes_list_is_an_error():
    """A group's ``shapes`` must give one global shape per parameter: refused at construction."""
    flat = nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match=r"invalid shapes=.*one global shape per parameter of the group \(1\)"):
        optimlib.AdamP([{"params": [flat], "shapes": [(2, 3), (4,)]}])
