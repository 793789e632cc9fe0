"""The CPU study driver (recipes/cpu_study/run.py, optimlib/bench/study.py) on a tiny grid.

Two methods (the AdamW baseline and the ``lowrank`` reparameterization, which trains with the
baseline's AdamW), one learning rate each, 3 steps: the driver's outputs are checked against the
runs' own ``summary.json`` files and the timing file (every ratio recomputed here), and a second
invocation must not rerun anything.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from optimlib.bench.study import _ordered_runs, load_study
from optimlib.optim import list_optimizers
from optimlib.reparam import list_reparams

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "recipes" / "cpu_study" / "run.py"
STUDY = REPO / "recipes" / "cpu_study" / "study.yaml"

TINY = {
    "baseline": "adamw",
    "base": {"seed": 0, "model": {"name": "llama_tiny"},
             "data": {"source": "stdlib", "seq_len": 32, "max_bytes": 400000},
             "train": {"steps": 3, "batch_size": 4, "micro_batch": 2, "warmup_steps": 1, "eval_every": 0,
                       "eval_blocks": 8, "checkpoint_every": 0, "log_every": 1, "progress": False},
             "optim": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95]}},
    "methods": {"adamw": {"lrs": [3.0e-3]}, "lowrank": {"lrs": [1.0e-2], "reparam": {"rank": 8, "alpha": 8}}},
}


def _main():
    spec = importlib.util.spec_from_file_location("cpu_study_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_driver_outputs_match_the_runs(tmp_path):
    if "lowrank" not in list_reparams():
        pytest.skip("the lowrank reparameterization is not registered")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(TINY))
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--config", str(config), "--only", "lowrank", "--runs", str(runs), "--out", str(out),
            "--timing-reps", "2", "--timing-warmup", "1"]
    assert _main()(argv) == 0

    result = json.loads((out / "results.json").read_text())
    assert (result["runs_finished"], result["runs_total"]) == (2, 2)
    assert result["start"]["commit"] and "status_short" in result["start"]
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["adamw", "lowrank"]
    summaries = {m: json.loads((runs / m / f"lr_{lr:g}" / "summary.json").read_text())
                 for m, lr in (("adamw", 3e-3), ("lowrank", 1e-2))}
    timing = json.loads((runs / "timing.json").read_text())["methods"]
    a, b = summaries["adamw"], summaries["lowrank"]
    assert a["steps"] == b["steps"] == 3 and a["tokens"] == b["tokens"] == 3 * 4 * 32   # equal steps and tokens
    assert b["config"]["optim"]["name"] == "adamw" and b["config"]["reparam"]["method"] == "lowrank"
    assert b["num_parameters"] < a["num_parameters"]

    base, low = rows["adamw"], rows["lowrank"]
    assert base["best_lr"] == 3e-3 and low["best_lr"] == 1e-2 and not low["best_lr_at_edge"]
    assert low["eval_loss"] == b["final_eval_loss"] and math.isfinite(low["eval_loss"])
    expected = {"eval_loss_ratio": b["final_eval_loss"] / a["final_eval_loss"],
                "state_ratio": b["optimizer_state_bytes"] / a["optimizer_state_bytes"],
                "param_ratio": b["param_bytes"] / a["param_bytes"],
                "run_tokens_per_s_ratio": b["tokens_per_s"] / a["tokens_per_s"],
                "step_time_ratio": timing["lowrank"]["step"]["median"] / timing["adamw"]["step"]["median"],
                "optimizer_time_ratio": (timing["lowrank"]["optimizer"]["median"]
                                         / timing["adamw"]["optimizer"]["median"])}
    for key, value in expected.items():
        assert low[key] == pytest.approx(value, rel=1e-12), key
        assert base[key] == 1.0, key
    assert low["optimizer_state_bytes"] == b["optimizer_state_bytes"] and 0 < low["state_ratio"] < 1

    md = (out / "results.md").read_text()
    assert "| adamw | optimizer |" in md and "| lowrank | reparam |" in md
    assert f"{low['eval_loss_ratio']:.3f}" in md
    assert (out / "study.png").stat().st_size > 1000

    stamp = (runs / "lowrank" / "lr_0.01" / "summary.json").stat().st_mtime_ns
    timed = (runs / "timing.json").stat().st_mtime_ns
    assert _main()(argv) == 0                                     # resumed: nothing is rerun
    assert (runs / "lowrank" / "lr_0.01" / "summary.json").stat().st_mtime_ns == stamp
    assert (runs / "timing.json").stat().st_mtime_ns == timed


def test_study_file_covers_every_registered_method():
    study = load_study(STUDY)
    names = [m.name for m in study.methods]
    assert sorted(names) == sorted(list_optimizers() + list_reparams())
    assert names[0] == study.baseline == "adamw"
    for m in study.methods:
        assert m.kind == ("optimizer" if m.name in list_optimizers() else "reparam")
        assert m.configured, f"{m.name} is registered but has no entry in {STUDY.name}"
        assert len(m.lrs) == 3 and m.lrs == sorted(m.lrs)
    order = _ordered_runs(study)
    n = len(study.methods)
    assert [lr for _, lr in order[:n]] == [m.lrs[1] for m in study.methods]     # center lr of every method first


def test_study_file_errors_name_the_method(tmp_path):
    bad = dict(TINY, methods={**TINY["methods"], "lion": {"lrs": [1e-3]}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="lion"):
        load_study(path)
    bad = dict(TINY, methods={"adamw": {"lrs": [-1.0]}})
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="methods.adamw.lrs"):
        load_study(path)
    path.write_text(yaml.safe_dump(TINY))
    partial = load_study(path)
    defaults = [m for m in partial.methods if not m.configured]
    assert {m.name for m in defaults} == (set(list_optimizers()) | set(list_reparams())) - {"adamw", "lowrank"}
