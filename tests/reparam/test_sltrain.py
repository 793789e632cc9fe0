"""SLTrain (optimlib.reparam.sltrain) and the plain low-rank baseline.

Expected parameter counts are computed here from the paper's formula and the model's shapes,
not with the library's helpers; the gradient reference is plain autograd through the dense
``(alpha/r) B A + S``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from lowrank_cases import SMALL, check_exact_resume, check_merge, check_state_dict_round_trip, gradcheck_layer
from optimlib import reparam
from optimlib.models import build_model, get_config
from optimlib.reparam.sltrain import (SparseLowRankLinear, sample_support, sltrain_parameter_count,
                                     sparse_lowrank_linear)

OPTIONS = {"sltrain": dict(rank=8, density=0.05, alpha=16), "lowrank": dict(rank=8, alpha=16)}


def trained_layer(d_in=13, d_out=11, rank=3, density=0.2, bias=True, dtype=torch.float64, seed=0):
    layer = SparseLowRankLinear(d_in, d_out, rank, density, alpha=6.0, bias=bias, seed=seed, dtype=dtype)
    with torch.no_grad():  # B starts at zero: give it values so every path is exercised
        layer.B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


# ---------------------------------------------------------------------- construction
def test_init_follows_the_paper():
    layer = SparseLowRankLinear(200, 150, rank=16, density=0.03, alpha=32, seed=3)
    bound = 1 / math.sqrt(200)
    assert layer.scale == 2.0
    assert torch.count_nonzero(layer.B) == 0
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    assert layer.values.abs().max() <= bound and layer.values.abs().max() > 0.9 * bound
    assert layer.nnz == 900 and layer.values.shape == (900,)  # floor(0.03 * 30000), exactly
    idx = layer.indices
    assert idx.dtype == torch.int32 and idx.shape == (900,)
    assert torch.all(idx[1:] > idx[:-1]) and idx[0] >= 0 and idx[-1] < 30000  # sorted, distinct
    # At step 0, W = S: the dense weight holds the values at the support and zeros elsewhere.
    W = layer.dense_weight().detach().reshape(-1)
    assert torch.equal(W[idx.long()], layer.values.detach())
    assert torch.count_nonzero(W) == 900


def test_density_rounds_down_on_the_decimal():
    assert SparseLowRankLinear(40, 50, 2, density=0.05, seed=0).nnz == 100  # 0.05 * 2000, not 99
    assert SparseLowRankLinear(7, 9, 2, density=0.1, seed=0).nnz == 6       # floor(6.3)


def test_support_is_uniform_and_seeded():
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(400):
        s = sample_support(50, 10, gen)
        assert s.unique().numel() == 10
        counts[s.long()] += 1
    # each position is chosen with probability 1/5: 80 expected per position, sd ~ 8
    assert counts.min() > 45 and counts.max() < 115
    a = SparseLowRankLinear(30, 20, 2, 0.1, seed=5).indices
    b = SparseLowRankLinear(30, 20, 2, 0.1, seed=5).indices
    c = SparseLowRankLinear(30, 20, 2, 0.1, seed=6).indices
    assert torch.equal(a, b) and not torch.equal(a, c)
    dense = sample_support(10, 9, gen)  # the randperm branch
    assert dense.numel() == 9 and dense.unique().numel() == 9


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(density=-0.1), "density"), (dict(alpha=0), "alpha"), (dict(rank=2.5), "rank"),
    (dict(b_init="normal"), "b_init"),
])
def test_bad_options_name_the_argument(kwargs, match):
    model = build_model("llama_tiny", **SMALL)
    with pytest.raises(ValueError, match=match):
        reparam.apply(model, "sltrain", **{"rank": 4, "density": 0.05, **kwargs})


def test_bias_is_kept():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    layer = SparseLowRankLinear.from_linear(linear, rank=3, density=0.1)
    assert torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.merged().bias, linear.bias)


# ---------------------------------------------------------------------- gradients
def test_function_matches_autograd_of_dense_weight():
    layer = trained_layer()
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    y_ref = F.linear(x, layer.dense_weight(), layer.bias)
    grads_ref = torch.autograd.grad(y_ref, [x, *layer.parameters()], dy)
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("density, bias", [(0.2, True), (0.0, False)])
def test_gradcheck(density, bias):
    gradcheck_layer(trained_layer(density=density, bias=bias))


def test_gradcheck_of_the_function_itself():
    layer = trained_layer(d_in=6, d_out=5, rank=2, density=0.3)
    args = [t.detach().clone().requires_grad_() for t in (layer.B, layer.A * layer.scale, layer.values, layer.bias)]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, B, A, v, b: sparse_lowrank_linear(x, B, A, v, layer.indices, b), (x, *args))


# ---------------------------------------------------------------------- model-level protocol
@pytest.mark.parametrize("method", ["sltrain", "lowrank"])
def test_merge_matches(method):
    check_merge(method, **OPTIONS[method])


@pytest.mark.parametrize("method", ["sltrain", "lowrank"])
def test_state_dict_round_trip(method):
    check_state_dict_round_trip(method, **OPTIONS[method])


@pytest.mark.parametrize("method", ["sltrain", "lowrank"])
def test_exact_resume(method):
    check_exact_resume(method, **OPTIONS[method])


def test_lowrank_is_sltrain_without_the_sparse_part():
    torch.manual_seed(0)
    model = reparam.apply(build_model("llama_tiny", **SMALL), "lowrank", rank=4)
    layer = model.layers[0].mlp.up_proj
    assert isinstance(layer, SparseLowRankLinear) and layer.values is None and layer.indices is None
    assert {n for n, _ in layer.named_parameters()} == {"A", "B"}
    # Without S, B starts Kaiming-uniform (U(+-1/sqrt(r))): W = 0 would trap q = k = 0 at a saddle.
    assert layer.b_init == "kaiming" and 0.4 < layer.B.abs().max() <= 0.5
    assert torch.count_nonzero(layer.dense_weight()) > 0


def test_zero_weights_are_a_saddle():
    """Why the low-rank baseline does not start from B = 0: every targeted W is then zero, and
    each pair of zero layers that multiply (q and k, v and o, gate/up and down) gives each other
    zero gradient, step after step: only the embeddings and the head train."""
    torch.manual_seed(0)
    model = reparam.apply(build_model("llama_tiny", **SMALL), "lowrank", rank=4, b_init="zero")
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    layers = [m for m in model.modules() if isinstance(m, SparseLowRankLinear)]
    for _ in range(3):
        model(tokens).logsumexp(-1).mean().backward()
        assert all(torch.count_nonzero(m.B.grad) == 0 and torch.count_nonzero(m.A.grad) == 0 for m in layers)
        assert torch.count_nonzero(model.embed.weight.grad) > 0
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------- accounting
def test_llama_60m_parameters_and_bytes_follow_the_formula():
    rank, density = 128, 0.03
    cfg = get_config("llama_60m")
    dense = build_model("llama_60m", device="meta")
    model = reparam.apply(build_model("llama_60m", device="meta"), "sltrain", rank=rank, density=density)
    shapes = ([(cfg.dim, cfg.dim)] * 4 + [(cfg.dim, cfg.hidden_dim)] * 2 + [(cfg.hidden_dim, cfg.dim)]) * cfg.n_layers
    nnz = [math.floor(3 * d_in * d_out / 100) for d_in, d_out in shapes]  # floor(0.03 d_in d_out), exact
    low_rank = sum(rank * (d_in + d_out) for d_in, d_out in shapes)
    untouched = sum(p.numel() for p in dense.parameters()) - sum(d_in * d_out for d_in, d_out in shapes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert low_rank + sum(nnz) == 10_753_128
    assert sum(sltrain_parameter_count(d_in, d_out, rank, density) for d_in, d_out in shapes) == 10_753_128
    assert trainable == untouched + low_rank + sum(nnz) == 43_529_832
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == 4 * trainable
    index_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("indices"))
    assert index_bytes == 4 * sum(nnz)  # int32: 4 bytes per non-zero


class _SavedBytes:
    """Bytes autograd keeps from forward to backward: every tensor packed by a saved-tensor
    hook, counted once per storage (parameters excluded: they live anyway)."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}
        self.shapes = set()

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.param_ptrs:
            self.storages[ptr] = t.untyped_storage().nbytes()
            self.shapes.add(tuple(t.shape))
        return t

    @property
    def total(self):
        return sum(self.storages.values())


def _peak_profiled_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes during ``fn()``, from torch.profiler's memory
    accounting: each event's *self* allocations minus frees (frees outside any op are their
    own ``[memory]`` events), summed in time order.  A temporary allocated and freed inside one
    leaf op does not show; the dense ``W`` and ``dW`` are outputs of their own ops, so they do."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


class _Naive(nn.Module):
    """The plain parametrization: ``F.linear(x, W(θ))`` with W composed by autograd."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return F.linear(x, self.layer.dense_weight(), self.layer.bias)


def measure_memory(model_name="llama_tiny", batch=1, seq=32, rank=32, density=0.03, **overrides):
    """Per variant (SLTrain, naive): bytes saved for backward, the profiled peak of one
    forward+backward, and whether a tensor of a layer's weight shape was saved; plus the bytes
    of all dense weights of the reparameterized layers."""
    torch.manual_seed(0)
    model = reparam.apply(build_model(model_name, **overrides), "sltrain", rank=rank, density=density)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)]
    dense_w_bytes = sum(4 * m.in_features * m.out_features for _, m in layers)

    def run():
        model(tokens).sum().backward()
        model.zero_grad(set_to_none=True)

    weight_shapes = {(m.out_features, m.in_features) for _, m in layers}
    results = {}
    for variant in ("sltrain", "naive"):
        if variant == "naive":
            for name, layer in layers:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, _Naive(layer))
        run()  # warm-up (rotary tables, allocator)
        saved = _SavedBytes(model.parameters())
        with saved_tensors_hooks(saved.pack, lambda t: t):
            out = model(tokens).sum()
        out.backward()
        model.zero_grad(set_to_none=True)
        del out
        results[variant] = (saved.total, _peak_profiled_bytes(run), bool(saved.shapes & weight_shapes))
    return results, dense_w_bytes


def test_forward_backward_memory_below_the_naive_parametrization():
    results, dense_w = measure_memory(dim=256, hidden_dim=704, n_layers=2, n_heads=4, max_seq_len=32)
    (sl_saved, sl_peak, sl_keeps_w), (naive_saved, naive_peak, naive_keeps_w) = results["sltrain"], results["naive"]
    assert naive_keeps_w and not sl_keeps_w  # no (d_out, d_in) tensor is saved for backward
    # The naive form keeps every dense W (and B A before the scatter) until backward.
    assert naive_saved - sl_saved >= dense_w, (sl_saved, naive_saved, dense_w)
    assert sl_peak < naive_peak - dense_w // 2, (sl_peak, naive_peak, dense_w)


# ----------------------------------------------------------------------------- tensor-parallel form
# (the 4-rank parity with one process: tests/distributed/test_tensor_parallel.py)
def test_parallelize_places_the_factors_and_keeps_the_function(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    x = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    placed = {}
    for style in ("colwise", "rowwise"):
        layer = SparseLowRankLinear(20, 12, rank=3, density=0.2, seed=5).double()
        nn.init.normal_(layer.B)
        want = layer(x)
        layer.parallelize(mesh, style)
        placed[style] = {n: str(p.placements[0]) for n, p in layer.named_parameters()}
        torch.testing.assert_close(layer(x), want, rtol=1e-14, atol=0)
        torch.testing.assert_close(layer.merged().weight, layer.dense_weight(), rtol=1e-14, atol=0)
        with pytest.raises(RuntimeError, match=f"already tensor parallel \\({style}\\)"):
            layer.parallelize(mesh, style)
    assert placed["colwise"] == {"A": "R", "B": "S(0)", "values": "R", "bias": "S(0)"}
    assert placed["rowwise"] == {"A": "S(1)", "B": "R", "values": "R", "bias": "R"}
    with pytest.raises(ValueError, match="style must be 'colwise' or 'rowwise', got 'diagonal'"):
        SparseLowRankLinear(20, 12, rank=3).parallelize(mesh, "diagonal")


def test_a_plan_names_the_layer_without_a_tensor_parallel_form(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from optimlib.models.tensor_parallel import parallelize_linears

    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 1))
    with pytest.raises(TypeError, match="'1' is a Conv1d, which has no tensor-parallel form"):
        parallelize_linears(model, init_device_mesh("cpu", (1,)), {"0": "colwise", "1": "rowwise"})
