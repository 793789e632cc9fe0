"""LOST (optimlib.reparam.lost): SVD-initialised low-rank part + channel-wise sparse complement.

The expected init is recomputed here from a numpy SVD in double precision (independent of the
library's torch.linalg path)."""

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_cases import SMALL, check_exact_resume, check_merge, check_state_dict_round_trip, gradcheck_layer
from optimlib import reparam
from optimlib.models import build_model
from optimlib.reparam.lost import LOSTLinear

OPTIONS = dict(rank=8, density=0.25, gamma=0.8)


def _linear(d_in=24, d_out=18, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).double()


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_init_is_top_r_plus_top_channels_of_the_residual(norm):
    linear = _linear()
    layer = LOSTLinear.from_linear(linear, rank=5, density=0.25, gamma=0.7, score=norm)
    W0 = linear.weight.detach().numpy()
    U, s, Vh = np.linalg.svd(W0, full_matrices=False)
    top = (U[:, :5] * s[:5]) @ Vh[:5]
    residual = W0 - top
    scores = np.linalg.norm(residual, ord=2 if norm == "l2" else 1, axis=0)
    channels = np.sort(np.argsort(-scores, kind="stable")[:6])  # floor(0.25 * 24) = 6 channels
    assert layer.channels.tolist() == channels.tolist()
    np.testing.assert_allclose((layer.B @ layer.A).detach().numpy(), top, atol=1e-12)
    np.testing.assert_allclose(layer.sparse_weight.detach().numpy(), residual[:, channels], atol=1e-12)
    # The function at conversion: gamma * top-r part + (1 - gamma) * residual on the channels I.
    expected = 0.7 * top
    expected[:, channels] += 0.3 * residual[:, channels]
    x = torch.randn(4, 24, dtype=torch.float64)
    y = layer(x).detach().numpy()
    np.testing.assert_allclose(y, x.numpy() @ expected.T + linear.bias.detach().numpy(), atol=1e-12)
    # Factors split the singular values evenly: B = U sqrt(s), A = sqrt(s) Vh (up to sign).
    np.testing.assert_allclose(np.linalg.norm(layer.B.detach().numpy(), axis=0), np.sqrt(s[:5]), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(layer.A.detach().numpy(), axis=1), np.sqrt(s[:5]), rtol=1e-10)


def test_full_rank_leaves_a_zero_residual():
    layer = LOSTLinear.from_linear(_linear(d_in=6, d_out=8), rank=6, density=0.5)
    assert torch.count_nonzero(layer.sparse_weight.abs() > 1e-12) == 0


@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck(activation):
    layer = LOSTLinear.from_linear(_linear(d_in=9, d_out=7), rank=3, density=0.34, activation=activation)
    gradcheck_layer(layer)


def test_activation_cannot_merge():
    layer = LOSTLinear.from_linear(_linear().float(), rank=4, activation="silu")
    with pytest.raises(ValueError, match="activation"):
        layer.merged()


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(rank=65), "rank"), (dict(density=0.0), "density"), (dict(density=2), "density"),
    (dict(gamma=1.0), "gamma"), (dict(gamma=0.0), "gamma"), (dict(activation="tanh"), "activation"),
    (dict(score="linf"), "score"),
])
def test_bad_options_name_the_argument(kwargs, match):
    model = build_model("llama_tiny", **SMALL)
    with pytest.raises(ValueError, match=match):
        reparam.apply(model, "lost", **{**OPTIONS, **kwargs})


def test_parameter_count():
    torch.manual_seed(0)
    model = reparam.apply(build_model("llama_tiny", **SMALL), "lost", **OPTIONS)
    layer = model.layers[0].mlp.down_proj  # 96 -> 64
    assert layer.channels_kept == 24
    assert sum(p.numel() for p in layer.parameters()) == 8 * (96 + 64) + 24 * 64


def test_merge_matches():
    check_merge("lost", **OPTIONS)


def test_state_dict_round_trip():
    check_state_dict_round_trip("lost", **OPTIONS)


def test_exact_resume():
    check_exact_resume("lost", **OPTIONS)
