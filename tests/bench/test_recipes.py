"""Every recipe config loads through launch/pretrain.py's config loader, and its optimizer (and
reparameterization, when registered) can be built on one layer of the recipe's model (on the meta
device)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimlib.models import build_model
from optimlib.optim import create_optimizer
from optimlib.train.config import load_config

# cpu_study/study.yaml is a study spec (a base config and a method grid), checked by test_cpu_study.py.
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*/*.yaml")
                 if p.parent.name != "cpu_study")


def test_every_recipe_folder_has_a_readme_and_configs():
    folders = {p.parent for p in RECIPES}
    assert {f.name for f in folders} >= {"galore", "sltrain", "nm_progressive", "smmf"}
    for folder in folders:
        assert (folder / "README.md").stat().st_size > 1000, folder


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_config_builds(path):
    from optimlib.reparam import apply, list_reparams

    cfg = load_config(path)
    # One layer of the recipe's model: every shape the reparameterization and the optimizer see,
    # without drawing 7B worth of sparse supports.
    model = build_model(cfg.model.name, device="meta", vocab_size=cfg.model.vocab_size, n_layers=1)
    if cfg.reparam.method is not None:
        if cfg.reparam.method not in list_reparams():
            pytest.skip(f"reparameterization {cfg.reparam.method!r} is not registered in this checkout")
        apply(model, cfg.reparam.method, cfg.reparam.targets, **cfg.reparam.options)
    kwargs = dict(cfg.optim.kwargs)
    if cfg.optim.betas is not None:
        kwargs["betas"] = tuple(cfg.optim.betas)
    if cfg.optim.eps is not None:
        kwargs["eps"] = cfg.optim.eps
    create_optimizer(model, cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **kwargs)
    t = cfg.train
    assert t.batch_size == 512 and t.batch_size % t.micro_batch == 0
    assert cfg.data.seq_len == 256 and 0 < cfg.data.eval_fraction < 0.01
