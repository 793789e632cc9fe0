"""Target selection with Hugging Face's ``optim_target_modules`` rules, GPT-2's ``Conv1D`` as a
transposed linear, and the Trainer factory's arguments (one process, no model download)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import check_target_module_exists

import optimlib
from optimlib.integrations.transformers import OptimlibFactory, optimizer_cls_and_kwargs
from optimlib.optim.factory import is_conv1d, match_target, param_groups, target_linears

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.10.mlp.up_proj",
         "model.layers.1.mlp.down_proj", "lm_head", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
         "model.embed_tokens", "q_proj"]
TARGETS = [r".*\.self_attn\..*", r".*attn.*", "q_proj", r"model\.layers\.1\..*", ["q_proj", "v_proj"],
           ["mlp"], [r".*\.layers\.1\d*\.mlp\..*"], ["attn", r"lm_h.ad"], ["layers.1"], ["c_fc", "lm_head"]]


@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_matching_is_the_trainers_own(targets):
    """Every name, every target form: the same answer as transformers' check_target_module_exists."""
    for name in NAMES:
        assert match_target(targets, name) == check_target_module_exists(targets, name), (targets, name)


def make(kind: str, n_in: int, n_out: int) -> nn.Module:
    return Conv1D(n_out, n_in) if kind == "conv1d" else nn.Linear(n_in, n_out)


class Toy(nn.Module):
    """attn.c_proj (square), mlp.c_fc, mlp.c_proj, an untargeted head; as Conv1D or nn.Linear."""

    def __init__(self, kind: str):
        super().__init__()
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.c_proj = make(kind, 12, 12)
        self.mlp.c_fc, self.mlp.c_proj = make(kind, 12, 20), make(kind, 20, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.mlp.c_proj(torch.tanh(self.mlp.c_fc(self.attn.c_proj(x)))))


def twins() -> tuple[Toy, Toy]:
    """A Conv1D model and the nn.Linear model with the same function (weights transposed)."""
    torch.manual_seed(0)
    conv, lin = Toy("conv1d"), Toy("linear")
    with torch.no_grad():
        for c in (conv.attn.c_proj, conv.mlp.c_fc, conv.mlp.c_proj):
            nn.init.normal_(c.weight, std=0.3)
        for (name, c), l in zip(conv.named_modules(), lin.modules()):
            if is_conv1d(c):
                l.weight.copy_(c.weight.T)
                l.bias.copy_(c.bias)
        lin.head.load_state_dict(conv.head.state_dict())
    return conv, lin


def train(model: nn.Module, opt, steps: int = 7) -> None:
    data = torch.randn(steps, 8, 12, generator=torch.Generator().manual_seed(1))
    target = torch.randn(steps, 8, 5, generator=torch.Generator().manual_seed(2))
    for x, y in zip(data, target):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def conv_weights(model):
    return {n: m.weight for n, m in model.named_modules() if is_conv1d(m)}


def max_rel_transposed(conv: Toy, lin: Toy) -> float:
    lins = dict(lin.named_modules())
    return max(((w - lins[n].weight.T).abs().max() / w.abs().max()).item() for n, w in conv_weights(conv).items())


GALORE = {"lr": 1e-2, "rank": 4, "update_proj_gap": 2, "scale": 0.5}


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_on_conv1d_is_galore_on_the_linear_it_stands_for(proj_type):
    """GaLore (SVD bases, refreshed every 2 steps) on the Conv1D weights equals GaLore on the
    nn.Linear twin, transposed: observed at most 2e-7 relative (tolerance 2e-6), ``proj_type``
    meaning the same side of the ``(out, in)`` matrix for both."""
    conv, lin = twins()
    before = max_rel_transposed(conv, lin)
    for model in (conv, lin):
        train(model, optimlib.create_optimizer(model, "galore_adamw", proj_type=proj_type, **GALORE))
    assert before == 0.0 and max_rel_transposed(conv, lin) <= 2e-6
    assert torch.allclose(conv.head.weight, lin.head.weight, rtol=0, atol=1e-6)
    assert all((w - twins()[0].get_submodule(n).weight).abs().max() > 1e-2 for n, w in conv_weights(conv).items())


def test_without_the_orientation_the_square_conv1d_weight_trains_differently():
    """The control: the stored (in, out) weights given the raw ``proj_type`` -- square matrices
    are then projected on the other side -- no longer match the nn.Linear twin."""
    conv, lin = twins()
    raw = [dict(g, proj_type="std") if "rank" in g else g
           for g in param_groups(conv, matrix_options={"rank": 4, "update_proj_gap": 2, "scale": 0.5})]
    train(conv, optimlib.GaLoreAdamW(raw, lr=1e-2))
    train(lin, optimlib.create_optimizer(lin, "galore_adamw", **GALORE))
    assert max_rel_transposed(conv, lin) > 1e-2


def test_groups_orientation_tied_heads_and_all_linear():
    conv = twins()[0]
    groups = param_groups(conv, matrix_options={"rank": 4, "proj_type": "std"})
    sides = {n: g["proj_type"] for g in groups if "rank" in g for n in g["names"]}
    # nn.Linear's std on (out, in): (12, 12) -> right, (20, 12) -> right, (12, 20) -> left; Conv1D flips
    assert sides == {"attn.c_proj.weight": "left", "mlp.c_fc.weight": "left", "mlp.c_proj.weight": "right"}
    names = [n for g in param_groups(conv, matrix_options={"rank": 4}, target_modules="all-linear")
             if "rank" in g for n in g["names"]]
    assert names == ["attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "head.weight"]

    tied = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False))
    tied[2].weight = tied[0].weight
    groups = param_groups(tied, matrix_options={"rank": 2}, target_modules="all_linear", weight_decay=0.1)
    assert [(g["names"], g["weight_decay"], "rank" in g) for g in groups] == [
        (["1.weight"], 0.1, True), (["0.weight", "1.bias"], 0.0, False)]


def test_reparameterizations_take_nn_linear_only():
    """The reparameterizations replace nn.Linear modules: they are not handed Conv1D layers."""
    conv = twins()[0]
    with pytest.raises(ValueError, match="matched only transformers Conv1D layers"):
        target_linears(conv)
    assert [n for n, _ in target_linears(conv, conv1d=True)] == ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert [n for n, _ in target_linears(conv, "all-linear")] == ["head"]


@pytest.mark.parametrize("targets, error, text", [
    (5, TypeError, "target_modules must be a string"),
    ([], TypeError, "non-empty list"),
    (["q_proj", 3], TypeError, "target_modules must be"),
    ("(", ValueError, r"target_modules entry '\(' is not a valid regular expression"),
    (["nothing_here"], ValueError, r"target_modules \['nothing_here'\] matched no trainable 2-D nn.Linear or "
                                   "transformers Conv1D"),
])
def test_bad_targets_are_refused_naming_the_argument(targets, error, text):
    with pytest.raises(error, match=text):
        optimlib.create_optimizer(twins()[0], "galore_adamw", target_modules=targets, rank=2)


def test_trainer_factory_arguments():
    assert is_optimizer_factory(OptimlibFactory)
    cls, kwargs = optimizer_cls_and_kwargs("galore_adamw", rank=4)
    assert cls is OptimlibFactory and kwargs == {"name": "galore_adamw", "rank": 4}
    opt = cls()(twins()[0], **kwargs)
    assert isinstance(opt, optimlib.GaLoreAdamW) and opt.defaults["lr"] == 1e-3

    args = SimpleNamespace(learning_rate=3e-4, weight_decay=0.05, optim_target_modules=["c_fc"])
    _, kwargs = optimizer_cls_and_kwargs("galore_adamw", args, rank=4)
    assert kwargs == {"name": "galore_adamw", "rank": 4, "lr": 3e-4, "weight_decay": 0.05, "target_modules": ["c_fc"]}
    _, kwargs = optimizer_cls_and_kwargs("adamp", args, lr=1e-2)  # no targeted group: targets not passed
    assert kwargs == {"name": "adamp", "lr": 1e-2, "weight_decay": 0.05}
    with pytest.raises(ValueError, match="unknown optimizer 'galore'; known: adamp, adamw"):
        optimizer_cls_and_kwargs("galore")
    with pytest.raises(ValueError, match="invalid name=None"):
        OptimlibFactory()(twins()[0], lr=1e-3)

