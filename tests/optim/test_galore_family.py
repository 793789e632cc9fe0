"""GaLore's successors in one process: Fira against the ``fira`` package; APOLLO / APOLLO-Mini and
COAP against float64 transcriptions of their update rules; their arguments."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimlib.optim import create_optimizer
from optimlib.optim.galore import ApolloAdamW, COAPAdamW, FiraAdamW, QGaLoreAdamW
from optimlib.optim.galore.bases import gaussian, mix_seed

SHAPES = [(13, 7), (7, 13), (9, 9)]     # tall, wide, square
STEPS, GAP = 25, 7


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _grads(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in SHAPES + [(5,)]] for _ in range(STEPS)]


def _init():
    torch.manual_seed(0)
    return [torch.randn(*s) for s in SHAPES] + [torch.randn(5)]


def _train(opt_cls, groups, grads, **kw):
    params = [nn.Parameter(t.clone()) for t in _init()]
    opt = opt_cls(groups(params), **kw)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params, opt


# ----------------------------------------------------------------------------- Fira vs fira
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_fira_matches_the_fira_package(proj_type):
    """25 steps, refreshes at 0, 7, 14, 21, weight decay, the limiter active; measured <= 4.5e-7."""
    fira = pytest.importorskip("fira")

    def groups(key):
        return lambda ps: [{"params": ps[:-1], "rank": 3, "update_proj_gap": GAP, key: 0.5, "proj_type": proj_type},
                           {"params": ps[-1:]}]

    kw = dict(lr=1e-2, weight_decay=1e-2, betas=(0.9, 0.99), eps=1e-6)
    grads = _grads()
    ref, _ = _train(fira.FiraAdamW, groups("alpha"), grads, **kw)
    mine, opt = _train(FiraAdamW, groups("scale"), grads, projection="svd", canonical_signs=False, **kw)
    for a, b in zip(ref, mine):
        assert _rel(a.detach(), b.detach()) <= 1e-5
    assert all("limiter_norm" in opt.state[p] for p in mine[:-1])


# ----------------------------------------------------------------------------- APOLLO, float64
def _canonical(vectors):
    """Flip each column so that its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=0)
    return vectors * torch.sign(vectors[idx, torch.arange(vectors.shape[1])])


def _apollo_reference(grads, opt, params, *, rank, scale, scale_type, proj, scale_front, disable_nl, lr,
                      betas, eps, wd, gamma=1.01):
    """The paper's Algorithm 1 in float64 (W = m x n, std side: channels along the larger dimension),
    the bias correction in the step size; P for proj="random" is regenerated from the seed the
    optimizer stored (the matrix is an input, drawn N(0, 1/r))."""
    b1, b2 = betas
    out = []
    for i, shape in enumerate(SHAPES):
        m, n = shape
        right = m >= n
        r = min(rank, m, n)
        w = _init()[i].double()
        mom = var = prev = p = None
        for t, step in enumerate(grads):
            g = step[i].double()
            if t % GAP == 0:
                if proj == "random":
                    seed = opt.seed_log[i][t // GAP]
                    q = gaussian(n if right else m, r, seed).double() / math.sqrt(r)
                else:
                    u, _, vh = torch.linalg.svd(g, full_matrices=False)
                    q = _canonical(vh[:r].t() if right else u[:, :r])
                p = q                                  # (n, r) right, (m, r) left
            low = g @ p if right else p.t() @ g        # (m, r) or (r, n)
            if mom is None:
                mom, var = torch.zeros_like(low), torch.zeros_like(low)
            mom = b1 * mom + (1 - b1) * low
            var = b2 * var + (1 - b2) * low * low
            nrm = mom / (var.sqrt() + eps)
            if scale_type == "channel":
                dim = 1 if right else 0
                s = nrm.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)
            else:
                s = nrm.norm() / (low.norm() + 1e-8)
            u = g * s
            root = math.sqrt(scale)
            if scale_front:
                u = u * root
            if not disable_nl:
                norm = u.norm()
                if prev is not None:
                    lim = max(norm / (prev + 1e-8), gamma) / gamma
                    u, norm = u / lim, norm / lim
                prev = norm
            if not scale_front:
                u = u * root
            k = t + 1
            w = w - lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k) * u
            w = w - lr * wd * w
        out.append(w)
    return out


class _SeedLog(ApolloAdamW):
    """Records every projected parameter's projection seed as it is drawn."""

    def step(self, closure=None):
        super().step(closure)
        log = self.__dict__.setdefault("seed_log", {})
        for i, p in enumerate(self.param_groups[0]["params"]):
            seeds = log.setdefault(i, [])
            seed = self.state[p].get("basis_seed")
            if seed is not None and (not seeds or seeds[-1] != seed):
                seeds.append(seed)


APOLLO_CASES = {
    "channel": dict(rank=3, scale=2.0, scale_type="channel", proj="random", scale_front=False, disable_nl=False),
    "mini": dict(rank=1, scale=128.0, scale_type="tensor", proj="random", scale_front=False, disable_nl=False),
    "svd_front": dict(rank=3, scale=1.0, scale_type="channel", proj="svd", scale_front=True, disable_nl=False),
    "tensor_no_limiter": dict(rank=2, scale=4.0, scale_type="tensor", proj="random", scale_front=False,
                              disable_nl=True),
}


@pytest.mark.parametrize("case", sorted(APOLLO_CASES))
def test_apollo_matches_the_paper_equations_in_float64(case):
    """25 steps, fresh projections at 0, 7, 14, 21 (moments kept), weight decay; measured <= 3.5e-7."""
    c = APOLLO_CASES[case]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)
    grads = _grads()
    groups = lambda ps: [{"params": ps[:-1], "rank": c["rank"], "update_proj_gap": GAP},  # noqa: E731
                         {"params": ps[-1:]}]
    params, opt = _train(_SeedLog, groups, grads, scale=c["scale"], scale_type=c["scale_type"], proj=c["proj"],
                         scale_front=c["scale_front"], disable_nl=c["disable_nl"], **kw)
    ref = _apollo_reference(grads, opt, params, **c, lr=kw["lr"], betas=kw["betas"], eps=kw["eps"],
                            wd=kw["weight_decay"])
    for a, b in zip(ref, params):
        assert _rel(a, b.detach().double()) <= 1e-6, case


# ----------------------------------------------------------------------------- COAP, float64
def _rsvd(a, omega):
    """One-pass randomized SVD: the top right singular vectors of Q^T A, Q = qr(A Omega), as columns."""
    q = torch.linalg.qr(a @ omega).Q
    return _canonical(torch.linalg.svd(q.t() @ a, full_matrices=False).Vh.t())


def _coap_reference(grads, opt, *, rank, interval, factor, scale, lr, betas, eps, wd, proj_type, norms):
    """COAP in float64: GaLore AdamW whose basis is re-factorized (one-pass randomized SVD,
    warm-started from the previous basis) every interval * factor steps and otherwise moved every
    interval steps by one gradient step (lr 0.1, gradient norm clipped to 1, autograd) on
    mse(back-projected G, G) * (1 - mean row cosine(back-projected first moment, G))."""
    b1, b2 = betas
    out = []
    for i, (m, n) in enumerate(SHAPES):
        right = {"std": m >= n, "reverse_std": m < n}[proj_type]
        r = min(rank, m, n)
        w = _init()[i].double()
        seed = mix_seed(opt.state[opt.param_groups[0]["params"][i]]["seed"], 0)
        p = mom = var = None                       # p: (n, r) right, (m, r) left -- basis vectors as columns
        for t, step in enumerate(grads):
            g = step[i].double()
            a = g if right else g.t()              # the factorized matrix: its right singular vectors
            if t == 0:
                p = _rsvd(a, gaussian(a.shape[1], r, seed).double())
            elif t % (interval * factor) == 0:
                p = _rsvd(a, p)
            elif t % interval == 0:
                q = p.clone().requires_grad_(True)
                with torch.enable_grad():
                    if right:
                        back_g, back_m = g @ q @ q.t(), mom @ q.t()
                    else:
                        back_g, back_m = q @ q.t() @ g, q @ mom
                    loss = F.mse_loss(back_g, g) * (1 - F.cosine_similarity(back_m, g, dim=1).mean())
                    grad, = torch.autograd.grad(loss, q)
                norms.append(float(grad.norm()))
                p = p - 0.1 * grad * min(1.0, 1.0 / (grad.norm() + 1e-6))
            low = g @ p if right else p.t() @ g
            if mom is None:
                mom, var = torch.zeros_like(low), torch.zeros_like(low)
            mom = b1 * mom + (1 - b1) * low
            var = b2 * var + (1 - b2) * low * low
            k = t + 1
            nrm = mom / (var.sqrt() + eps)
            w = w - lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k) * scale * (nrm @ p.t() if right else p @ nrm)
            w = w - lr * wd * w
        out.append(w)
    return out


@pytest.mark.parametrize("proj_type, size", [("std", 1.0), ("reverse_std", 1.0), ("std", 20.0)])
def test_coap_matches_its_equations_in_float64(proj_type, size):
    """25 steps with update_interval 3 and reproject_factor 3: a randomized factorization at 0, 9,
    18 (warm-started after 0), descent steps at 3, 6, 12, 15, 21, 24 -- unclipped with unit
    gradients, clipped with gradients 20 times larger; measured <= 4.2e-7."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)
    grads = [[g * size for g in step] for step in _grads()]
    groups = lambda ps: [{"params": ps[:-1], "rank": 3, "proj_type": proj_type}, {"params": ps[-1:]}]  # noqa: E731
    params, opt = _train(COAPAdamW, groups, grads, update_interval=3, reproject_factor=3, scale=0.5, **kw)
    norms = []
    ref = _coap_reference(grads, opt, rank=3, interval=3, factor=3, scale=0.5, lr=kw["lr"], betas=kw["betas"],
                          eps=kw["eps"], wd=kw["weight_decay"], proj_type=proj_type, norms=norms)
    assert (max(norms) < 1.0) == (size == 1.0) and min(norms) > 1e-3    # the clip acts exactly when meant to
    for a, b in zip(ref, params):
        assert _rel(a, b.detach().double()) <= 1e-6


# ----------------------------------------------------------------------------- Q-GaLore vs q-galore-torch
def _q_galore_reference(projector_cls, grads, *, rank, gap, scale, group, bits, lr, betas, eps, weight_decay,
                        **lazy):
    """galore-torch's AdamW (fp32 moments) around q-galore-torch's projector (INT4 basis, lazy refresh)."""
    b1, b2 = betas
    out, gaps = [], []
    for i, _ in enumerate(SHAPES):
        w = _init()[i].clone()
        proj = projector_cls(rank, update_proj_gap=gap, scale=scale, proj_type="std", quant=True, group_size=group,
                             n_bit=bits, **lazy)
        mom = var = None
        for t, step in enumerate(grads):
            low = proj.project(step[i], t)
            if mom is None:
                mom, var = torch.zeros_like(low), torch.zeros_like(low)
            mom.mul_(b1).add_(low, alpha=1 - b1)
            var.mul_(b2).addcmul_(low, low, value=1 - b2)
            k = t + 1
            w.add_(proj.project_back(mom / (var.sqrt() + eps)), alpha=-lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k))
            w.add_(w, alpha=-lr * weight_decay)
        out.append(w)
        gaps.append((proj.update_proj_gap, proj.svd_count))
    return out, gaps


@pytest.mark.parametrize("group", [-1, 3])
def test_q_galore_matches_q_galore_torch_projector(group):
    """Gradients that keep their leading direction (a fixed matrix plus noise), so the gap grows
    from 2 to 16 within 25 steps; the INT4 basis in row groups and in groups of 3 that cross rows.
    Measured: the same refresh schedule, and the same parameters to the bit (once 4e-8)."""
    qgp = pytest.importorskip("q_galore_torch.q_galore_projector")
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[b + 0.3 * torch.randn(b.shape, generator=g) for b in base] + [torch.randn(5, generator=g)]
             for _ in range(STEPS)]
    lazy = dict(cos_threshold=0.4, gamma_proj=2, queue_size=2)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)
    groups = lambda ps: [{"params": ps[:-1], "rank": 3}, {"params": ps[-1:]}]  # noqa: E731
    params, opt = _train(QGaLoreAdamW, groups, grads, update_proj_gap=2, scale=0.5, proj_bits=4, proj_group_size=group,
                         moments_dtype=None, canonical_signs=False, **lazy, **kw)
    ref, gaps = _q_galore_reference(qgp.GaLoreProjector, grads, rank=3, gap=2, scale=0.5, group=group, bits=4,
                                    **lazy, **kw)
    for p, w, (gap, count) in zip(params, ref, gaps):
        state = opt.state[p]
        assert (state["update_proj_gap"], state["refreshes"]) == (gap, count) and gap > 4
        assert state["basis_codes"].dtype == torch.uint8 and int(state["basis_codes"].max()) <= 15
        assert _rel(w, p.detach()) <= 1e-5


# ----------------------------------------------------------------------------- every member
MEMBERS = {"fira": (FiraAdamW, {}), "apollo": (ApolloAdamW, dict(scale_type="tensor")),
           "coap": (COAPAdamW, dict(update_interval=2, reproject_factor=2)),
           "q_galore": (QGaLoreAdamW, dict(proj_group_size=8, queue_size=1, cos_threshold=-1.0))}


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_layerwise_stepping_matches_step(member):
    """Optimizer-in-backward gives the parameters of ``step()`` to the bit (6 steps, refreshes at 0,
    2, 4) and a state that ``torch.load(weights_only=True)`` reads."""
    cls, kw = MEMBERS[member]

    def run(layerwise):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 17), nn.Tanh(), nn.Linear(17, 3))
        mats = [p for p in model.parameters() if p.dim() == 2]
        opt = cls([{"params": mats, "rank": 2, "update_proj_gap": 2},
                   {"params": [p for p in model.parameters() if p.dim() < 2]}], lr=1e-2, weight_decay=0.01, **kw)
        stepper = opt.layerwise() if layerwise else None
        g = torch.Generator().manual_seed(7)
        for _ in range(6):
            x, y = torch.randn(6, 10, generator=g), torch.randn(6, 3, generator=g)
            (model(x) - y).pow(2).mean().backward()
            if layerwise:
                stepper.step()
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()], opt

    normal, opt = run(False)
    layerwise, _ = run(True)
    for a, b in zip(normal, layerwise):
        assert torch.equal(a, b)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls, kw, arg", [
    (FiraAdamW, dict(gamma=0.5), "gamma"), (ApolloAdamW, dict(scale_type="row"), "scale_type"),
    (ApolloAdamW, dict(proj="qr"), "proj"), (ApolloAdamW, dict(scale_front=1), "scale_front"),
    (ApolloAdamW, dict(scale=0.0), "scale"), (COAPAdamW, dict(reproject_factor=0), "reproject_factor"),
    (COAPAdamW, dict(projection="dct"), "projection"), (COAPAdamW, dict(moments_dtype="int8"), "moments_dtype"),
    (QGaLoreAdamW, dict(proj_bits=9), "proj_bits"), (QGaLoreAdamW, dict(proj_group_size=0), "proj_group_size"),
    (QGaLoreAdamW, dict(cos_threshold=2.0), "cos_threshold"), (QGaLoreAdamW, dict(queue_size=0), "queue_size"),
    (QGaLoreAdamW, dict(projection="random"), "projection")])
def test_bad_arguments_name_the_argument(cls, kw, arg):
    weight = nn.Parameter(torch.randn(5, 4))
    with pytest.raises((ValueError, TypeError), match=rf"invalid {arg}="):
        cls([{"params": [weight], "rank": 2}], lr=1e-3, **kw)


def test_factory_defaults_and_apollo_mini_state_is_linear_in_the_sides():
    """``apollo_mini``: rank 1, tensor scaling, scale 128; its state on a 64 x 96 matrix is the two
    96-vectors of moments and one limiter scalar besides the step counters (AdamW's: two 64 x 96
    matrices); the projection is a seed."""
    model = nn.Sequential(nn.Linear(96, 64))
    opt = create_optimizer(model, "apollo_mini", lr=1e-3, target_modules=["0"])
    group = opt.param_groups[0]
    assert (group["rank"], group["scale_type"], group["scale"], group["projection"]) == (1, "tensor", 128.0, "gaussian")
    model[0].weight.grad = torch.randn(64, 96)
    opt.step()
    state = opt.state[model[0].weight]
    tensors = {k: v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and "step" not in k}
    assert sum(tensors.values()) == 2 * 96 * 4 + 8, tensors
    assert "basis" not in state and isinstance(state["basis_seed"], int)


def test_q_galore_state_is_what_it_declares():
    """Every tensor of a projected parameter's state is declared with its shape, dtype and element
    count, and nothing else is: ``cos_history`` (float64, ``queue_size``) from the second refresh
    on, and in the upper bound (no ``state``) from the start."""
    from optimlib.optim.state_spec import Placement, state_specs

    params = [nn.Parameter(t.clone()) for t in _init()]
    opt = QGaLoreAdamW([{"params": params[:-1], "rank": 3, "update_proj_gap": 2}, {"params": params[-1:]}],
                       lr=1e-2, proj_group_size=8, queue_size=3)
    group = opt.param_groups[0]
    grads = _grads()
    for step in range(4):                    # refreshes at steps 0 and 2
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        for p in params[:-1]:
            state = opt.state[p]
            tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            declared = {s.key: s for s in state_specs(opt, group, Placement.whole(p.shape), state)}
            assert set(declared) == set(tensors), (step, sorted(declared), sorted(tensors))
            for key, spec in declared.items():
                assert (tuple(tensors[key].shape), tensors[key].numel()) == (spec.shape, spec.local_numel), key
                assert spec.dtype is None or tensors[key].dtype == spec.dtype, key
            assert ("cos_history" in tensors) == (step >= 2)
            bound = {s.key: s for s in state_specs(opt, group, Placement.whole(p.shape))}
            assert bound["cos_history"].local_bytes(torch.float32) == 3 * 8
            assert set(bound) == set(tensors) | {"cos_history"}
    assert state["cos_count"] == 1 and state["cos_history"].dtype == torch.float64
