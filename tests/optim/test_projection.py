"""The projection piece (optimlib.optim.galore.projection) and 8-bit moments (optimlib.formats.quantize),
single process.  Multi-rank behaviour is covered by tests/distributed/test_galore_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from optimlib.distributed import FlatSlice, RowBlock
from optimlib.formats import quantize as q
from optimlib.optim.galore.projection import ProjectionConfig, Projector
from optimlib.optim.galore.bases import (
    canonicalize_signs,
    choose_rank,
    dct,
    dct_basis,
    random_orthogonal,
    resolve_side,
)


def block(m, n):
    return RowBlock((m, n), FlatSlice.whole(m * n))


def projector(m, n, **kw):
    return Projector(ProjectionConfig(**kw).validate(), block(m, n))


def known_spectrum(m, n, s, seed=0):
    """A matrix with singular values ``s`` (and random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.t(), u, v


def subspace_error(a, b):
    """Sine of the largest principal angle between the column spans of ``a`` and ``b``."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return torch.linalg.matrix_norm(qa - qb @ (qb.t() @ qa), ord=2).item()


@pytest.mark.parametrize("m, n, proj_type, side", [
    (7, 5, "std", "right"), (5, 7, "std", "left"), (6, 6, "std", "right"),
    (7, 5, "reverse_std", "left"), (5, 7, "reverse_std", "right"), (6, 6, "reverse_std", "left"),
    (7, 5, "left", "left"), (5, 7, "right", "right"),
])
def test_side_is_decided_from_the_matrix_shape(m, n, proj_type, side):
    assert resolve_side(m, n, proj_type) == side
    # ... also when the rank reaches or exceeds a dimension (galore-torch's reverse_std bug).
    assert projector(m, n, rank=50, proj_type=proj_type).side == side


def test_dct_by_fft_matches_the_closed_form_and_is_orthonormal():
    for d in (1, 2, 7, 16, 37):
        c = dct_basis(d, torch.arange(d), dtype=torch.float64)
        assert torch.allclose(c @ c.t(), torch.eye(d, dtype=torch.float64), atol=1e-12)
        x = torch.randn(5, d, dtype=torch.float64)
        assert torch.allclose(dct(x, dim=-1), x @ c.t(), atol=1e-12)
        assert torch.allclose(dct(x.t().contiguous(), dim=0), c @ x.t(), atol=1e-12)
    idx = torch.tensor([3, 0, 5])
    part = dct_basis(9, idx, positions=(2, 7), dtype=torch.float64)
    assert torch.equal(part, dct_basis(9, idx, dtype=torch.float64)[:, 2:7])


def test_random_orthogonal_is_a_function_of_the_seed():
    a, b = random_orthogonal(13, 4, 123), random_orthogonal(13, 4, 123)
    assert torch.equal(a, b)
    assert torch.allclose(a.t() @ a, torch.eye(4), atol=1e-6)
    assert not torch.equal(a, random_orthogonal(13, 4, 124))


def test_canonicalize_signs_makes_the_largest_entry_positive():
    v = torch.tensor([[1.0, -3.0], [-2.0, 1.0], [0.5, 2.0]])
    out = canonicalize_signs(v.clone(), dim=0)
    assert torch.equal(out, torch.tensor([[-1.0, 3.0], [2.0, -1.0], [-0.5, -2.0]]))
    rows = canonicalize_signs(v.t().clone(), dim=1)
    assert torch.equal(rows, out.t())


@pytest.mark.parametrize("shape", [(11, 6), (6, 11)])
def test_svd_basis_is_torch_svd(shape):
    g = torch.randn(*shape)
    proj = projector(*shape, rank=3, projection="svd", canonical_signs=False)
    state = {"step": 0}
    assert proj.refresh(state, g)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    expect = vh[:3] if proj.side == "right" else u[:, :3]
    assert torch.equal(state["basis"], expect)


@pytest.mark.parametrize("projection", ["svd", "randomized"])
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_stored_basis_holds_only_its_own_bytes(projection, proj_type):
    """The stored basis owns a storage of exactly m r (left) or r n (right) elements: not a view
    that keeps the whole decomposition (``U`` or ``Vh``) alive."""
    m, n, r = 12, 40, 3
    proj = projector(m, n, rank=r, projection=projection, proj_type=proj_type)
    state = {"step": 0}
    assert proj.refresh(state, torch.randn(m, n, dtype=torch.float64))
    basis = state["basis"]
    assert basis.shape == ((m, r) if proj_type == "left" else (r, n))
    assert basis.untyped_storage().nbytes() == (m * r * 8 if proj_type == "left" else r * n * 8)


def test_stored_basis_of_the_optimizer_holds_only_its_own_bytes():
    """Through GaLoreAdamW's step (the left projection of a wide weight, the exact SVD)."""
    from optimlib.optim.galore import GaLoreAdamW

    w = torch.nn.Parameter(torch.randn(12, 40))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "projection": "svd", "proj_type": "left"}])
    w.grad = torch.randn(12, 40)
    opt.step()
    basis = opt.state[w]["basis"]
    assert basis.shape == (12, 3) and basis.untyped_storage().nbytes() == 12 * 3 * basis.element_size()


@pytest.mark.parametrize("projection", ["svd", "randomized", "dct", "random"])
@pytest.mark.parametrize("shape", [(13, 8), (8, 13)])
def test_full_rank_projection_round_trips(projection, shape):
    """With r = min(m, n) every basis is orthogonal: up(down(G)) == G."""
    g = torch.randn(*shape, dtype=torch.float64)
    proj = projector(*shape, rank=100, projection=projection)
    state = {"step": 0, "seed": 5}
    proj.refresh(state, g)
    assert proj.rank(state) == min(shape)
    low = proj.down(state, g)
    assert low.shape == proj.low_shape(min(shape))
    assert torch.allclose(proj.up(state, low), g, atol=1e-5)


@pytest.mark.parametrize("projection", ["svd", "randomized", "dct", "random"])
def test_low_rank_projection_is_an_orthogonal_projector(projection):
    g = torch.randn(20, 12, dtype=torch.float64)
    proj = projector(20, 12, rank=4, projection=projection)
    state = {"step": 0, "seed": 1}
    proj.refresh(state, g)
    p = proj.basis(state, dtype=torch.float64)             # right: (r, n)
    assert torch.allclose(p @ p.t(), torch.eye(4, dtype=torch.float64), atol=1e-5)
    back = proj.up(state, proj.down(state, g))
    assert torch.allclose(back, g @ p.t() @ p, atol=1e-10)


@pytest.mark.parametrize("shape", [(300, 80), (80, 300)])
def test_randomized_finds_the_top_singular_subspace(shape):
    s = [100.0 * 0.7 ** i for i in range(40)]
    g, u, v = known_spectrum(*shape, s)
    g = g.float()
    proj = projector(*shape, rank=6, projection="randomized", power_iters=2, oversample=8)
    state = {"step": 0, "seed": 3}
    proj.refresh(state, g)
    p = proj.basis(state, dtype=torch.float64)
    top = v[:, :6] if proj.side == "right" else u[:, :6]
    vectors = p.t() if proj.side == "right" else p
    assert subspace_error(vectors, top) < 1e-3
    # orthonormal, and signs canonical (largest-magnitude entry positive)
    assert torch.allclose(vectors.t() @ vectors, torch.eye(6, dtype=torch.float64), atol=1e-5)
    picked = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    assert (picked > 0).all()


def test_randomized_with_k_equal_to_the_dimension_is_exact():
    g, u, v = known_spectrum(40, 9, [9, 8, 7, 6, 5, 4, 3, 2, 1])
    proj = projector(40, 9, rank=5, projection="randomized", oversample=100)
    state = {"step": 0, "seed": 0}
    proj.refresh(state, g.float())
    assert subspace_error(proj.basis(state, dtype=torch.float64).t(), v[:, :5]) < 1e-5


def test_dct_picks_the_columns_aligned_with_the_gradient():
    n = 24
    c = dct_basis(n, torch.arange(n), dtype=torch.float64)
    coef = torch.zeros(30, n, dtype=torch.float64)
    coef[:, 17] = 5 * torch.randn(30, dtype=torch.float64)
    coef[:, 3] = 3 * torch.randn(30, dtype=torch.float64)
    coef[:, 9] = 1 * torch.randn(30, dtype=torch.float64)
    g = coef @ c + 1e-3 * torch.randn(30, n, dtype=torch.float64)      # rows mix DCT vectors 17, 3, 9
    proj = projector(30, n, rank=3, projection="dct")
    state = {"step": 0}
    proj.refresh(state, g)
    assert state["indices"].dtype == torch.int32
    assert state["indices"].tolist() == [17, 3, 9]
    assert "basis" not in state                                        # only indices are stored


@pytest.mark.parametrize("projection", ["svd", "randomized"])
@pytest.mark.parametrize("energy, expect", [(0.5, 1), (0.8, 2), (0.95, 3), (0.999, 4)])
def test_adaptive_rank_from_a_known_spectrum(projection, energy, expect):
    # energies 100, 36, 9, 1, 0.01, ... (fractions .68, .92, .98, .997, ...)
    s = [10.0, 6.0, 3.0, 1.0, 0.1, 0.05, 0.02]
    g, _, _ = known_spectrum(50, 30, s)
    proj = projector(50, 30, rank="auto", energy=energy, projection=projection)
    state = {"step": 0, "seed": 0}
    proj.refresh(state, g.float())
    assert proj.rank(state) == expect
    bounded = projector(50, 30, rank=12, energy=energy, min_rank=2, max_rank=3, projection=projection)
    state = {"step": 0, "seed": 0}
    bounded.refresh(state, g.float())
    assert bounded.rank(state) == min(max(expect, 2), 3)


def test_adaptive_rank_with_dct_uses_coefficient_energies():
    n = 16
    c = dct_basis(n, torch.arange(n), dtype=torch.float64)
    coef = torch.zeros(40, n, dtype=torch.float64)
    for j, scale in ((2, 10.0), (7, 6.0), (11, 3.0)):
        coef[:, j] = scale * torch.sign(torch.randn(40, dtype=torch.float64))
    g = coef @ c
    proj = projector(40, n, rank="auto", energy=0.9, projection="dct", dct_norm=2)
    state = {"step": 0}
    proj.refresh(state, g)
    assert proj.rank(state) == 2 and sorted(state["indices"].tolist()) == [2, 7]


def test_choose_rank_edge_cases():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert choose_rank(s, 14.0, 1.0, 1, 3) == 3
    assert choose_rank(s, 0.0, 0.9, 2, 3) == 2
    assert choose_rank(s, 100.0, 0.9, 1, 3) == 3          # the sketch holds too little energy


def test_guard_keeps_the_previous_basis_on_non_finite_gradients():
    proj = projector(9, 6, rank=2, projection="svd")
    state = {"step": 0}
    g = torch.randn(9, 6)
    proj.refresh(state, g)
    before = state["basis"].clone()
    bad = g.clone()
    bad[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="keeping the previous projection basis"):
        assert not proj.refresh(state, bad)
    assert torch.equal(state["basis"], before)


@pytest.mark.parametrize("projection", ["svd", "randomized", "dct"])
def test_guard_without_a_previous_basis_uses_a_seeded_fallback(projection):
    proj = projector(9, 6, rank=2, projection=projection)
    bad = torch.full((9, 6), float("inf"))
    states = []
    for _ in range(2):
        state = {"step": 0, "seed": 11}
        with pytest.warns(RuntimeWarning, match="no previous basis"):
            assert proj.refresh(state, bad)
        states.append(state)
    p = proj.basis(states[0], dtype=torch.float64)
    assert torch.allclose(p @ p.t(), torch.eye(2, dtype=torch.float64), atol=1e-6)
    assert torch.equal(p, proj.basis(states[1], dtype=torch.float64))


def test_guard_catches_a_failing_decomposition(monkeypatch):
    proj = projector(9, 6, rank=2, projection="svd")
    state = {"step": 0}
    proj.refresh(state, torch.randn(9, 6))
    before = state["basis"].clone()

    def boom(*a, **k):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", boom)
    with pytest.warns(RuntimeWarning, match="decomposition failed"):
        assert not proj.refresh(state, torch.randn(9, 6))
    assert torch.equal(state["basis"], before)


def test_overlap_of_dct_bases_is_the_index_permutation():
    proj = projector(10, 8, rank=3, projection="dct")
    old = {"rank": 3, "indices": torch.tensor([4, 1, 6], dtype=torch.int32)}
    new = {"rank": 3, "indices": torch.tensor([1, 6, 2], dtype=torch.int32)}
    o = proj.overlap(old, new)
    expect = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert torch.allclose(o, expect, atol=1e-6)


def test_config_validation_names_the_argument():
    for kw, name in [(dict(rank=0), "rank"), (dict(rank="big"), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
                     (dict(proj_type="full"), "proj_type"), (dict(projection="qr"), "projection"),
                     (dict(energy=1.5), "energy"), (dict(min_rank=0), "min_rank"),
                     (dict(min_rank=4, max_rank=2), "max_rank"), (dict(oversample=-1), "oversample"),
                     (dict(power_iters=-1), "power_iters"), (dict(dct_norm=3), "dct_norm"),
                     (dict(rank="auto", projection="random"), "projection")]:
        with pytest.raises(ValueError, match=name):
            ProjectionConfig(**kw).validate()


# ----------------------------------------------------------------------------- 8-bit moments
@pytest.mark.parametrize("signed", [True, False])
def test_quantization_error_is_bounded(signed):
    torch.manual_seed(0)
    x = torch.randn(9, 70) * torch.logspace(-4, 0, 70)
    x = x if signed else x.abs()
    ratio, tmin = (q.SIGNED_RATIO, q.SIGNED_MIN) if signed else (q.UNSIGNED_RATIO, q.UNSIGNED_MIN)
    for noise in (None, q.hash_uniform(tuple(x.shape), 0, seed=1, step=0)):
        codes, absmax = q.quantize_blockwise(x, signed=signed, block=16, noise=noise)
        assert codes.dtype == torch.uint8 and absmax.shape == (9, 5)
        y = q.dequantize_blockwise(codes, absmax, signed=signed, block=16)
        amax = absmax.repeat_interleave(16, dim=1)[:, :70]
        bound = torch.maximum((ratio - 1) * x.abs(), amax * tmin) * (0.5 if noise is None else 1.0)
        assert ((y - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
        # block maxima are exact
        assert torch.allclose(y.abs().reshape(9, -1).amax(1), x.abs().amax(1))


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(4, 64) * torch.logspace(-3, 0, 64)
    acc = torch.zeros_like(x)
    n = 2000
    for step in range(n):
        noise = q.hash_uniform(tuple(x.shape), 0, seed=7, step=step)
        acc += q.dequantize_blockwise(*q.quantize_blockwise(x, signed=True, block=64, noise=noise),
                                      signed=True, block=64)
    rel = ((acc / n - x).abs() / x.abs()).mean().item()
    assert rel < 0.01


def test_quantization_is_invariant_to_row_sharding():
    """Blocks lie within rows and the noise hashes global indices: any split of the rows
    encodes exactly as the whole."""
    x = torch.randn(13, 10)
    noise = q.hash_uniform((13, 10), 0, seed=3, step=4)
    codes, absmax = q.quantize_blockwise(x, signed=True, block=4, noise=noise)
    for a, b in ((0, 7), (7, 13), (5, 6)):
        part_noise = q.hash_uniform((b - a, 10), a, seed=3, step=4)
        assert torch.equal(part_noise, noise[a:b])
        c, m = q.quantize_blockwise(x[a:b], signed=True, block=4, noise=part_noise)
        assert torch.equal(c, codes[a:b]) and torch.equal(m, absmax[a:b])


def test_hash_uniform_is_uniform_and_reproducible():
    u = q.hash_uniform((300, 100), 0, seed=1, step=2)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - math.sqrt(1 / 12)) < 0.01
    assert torch.equal(u, q.hash_uniform((300, 100), 0, seed=1, step=2))
    assert not torch.equal(u, q.hash_uniform((300, 100), 0, seed=1, step=3))
    assert q.quantized_bytes(10, 300, 256) == 10 * 300 + 4 * 10 * 2
