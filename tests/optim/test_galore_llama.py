"""GaLoreAdamW on the repository's LLaMA models: galore-torch parity on ``llama_tiny`` and the
optimizer-state byte count on ``llama_60m`` (closed form, per projection, and against galore-torch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimlib import GaLoreAdamW
from optimlib.models import build_model
from optimlib.optim import optimizer_state_bytes

galore_torch = pytest.importorskip("galore_torch")

# galore-torch warns that its AdamW class is deprecated on every construction.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def split(model):
    """galore-torch's recipe: attention and MLP linear weights are low-rank, the rest plain."""
    low, rest = [], []
    for name, p in model.named_parameters():
        (low if (".attn." in name or ".mlp." in name) and p.dim() == 2 else rest).append(p)
    return low, rest


@pytest.mark.parametrize("proj_type, rank", [("std", 16), ("reverse_std", 16), ("left", 16), ("right", 16),
                                             ("std", 160)])
def test_llama_tiny_parity_with_galore_torch(proj_type, rank):
    """20 steps, refreshes every 5 (rank 160 exceeds every dimension of the 128x128, 352x128 and
    128x352 weights).  Measured: bit-identical; tolerance 1e-5 relative."""
    def run(cls, **kw):
        torch.manual_seed(0)
        model = build_model("llama_tiny")
        low, rest = split(model)
        opt = cls([{"params": low, "rank": rank, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type},
                   {"params": rest}], lr=1e-2, weight_decay=0.01, **kw)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            idx = torch.randint(0, model.config.vocab_size, (4, 17), generator=g)
            logits = model(idx[:, :-1])
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return dict(model.named_parameters())

    ref = run(galore_torch.GaLoreAdamW)
    mine = run(GaLoreAdamW, projection="svd", canonical_signs=False)
    for name, a in ref.items():
        err = ((a - mine[name]).abs().max() / a.abs().max()).item()
        assert err <= 1e-5, (name, err)


@pytest.mark.slow
def test_llama_60m_state_bytes_closed_form_and_galore_torch():
    """One step on llama_60m (random gradients), rank 128, fp32: measured bytes equal
    2 r max(m, n) per low-rank weight plus its basis (svd/randomized: r min(m, n) floats; dct: r
    int32 indices; random: nothing) plus 2 N for every other parameter, and are at most
    galore-torch's (which is the svd figure)."""
    torch.manual_seed(0)
    model = build_model("llama_60m")
    low, rest = split(model)
    r = 128
    moments = sum(2 * r * max(p.shape) * 4 for p in low)
    basis = {"svd": sum(r * min(p.shape) * 4 for p in low), "randomized": sum(r * min(p.shape) * 4 for p in low),
             "dct": len(low) * r * 4, "random": 0}
    dense = sum(2 * p.numel() * 4 for p in rest)
    for p in model.parameters():
        p.grad = torch.randn(p.shape) * 1e-3
    ref = galore_torch.GaLoreAdamW([{"params": low, "rank": r, "update_proj_gap": 200, "scale": 0.25,
                                     "proj_type": "std"}, {"params": rest}], lr=0.0)
    ref.step()
    ref_bytes = 0
    for st in ref.state.values():
        tensors = [st["exp_avg"], st["exp_avg_sq"]] + ([st["projector"].ortho_matrix] if "projector" in st else [])
        ref_bytes += sum(t.numel() * t.element_size() for t in tensors)
    assert ref_bytes == moments + basis["svd"] + dense
    for projection in ("svd", "randomized", "dct", "random"):
        opt = GaLoreAdamW([{"params": low, "rank": r}, {"params": rest}], lr=0.0, projection=projection)
        opt.step()
        measured = optimizer_state_bytes(opt)
        assert measured == moments + basis[projection] + dense, projection
        assert measured <= ref_bytes
        del opt
