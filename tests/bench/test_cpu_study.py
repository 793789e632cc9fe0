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


# ----------------------------------------------------------------------------- --merge (synthetic results)
def _row(method, losses, *, step_s, state=1000, kind="optimizer", settings=""):
    """A results.json row with finished runs at ``losses`` ({lr: final eval loss})."""
    runs = [{"lr": lr, "status": "ok", "final_eval_loss": loss, "optimizer_state_bytes": state, "param_bytes": 400}
            for lr, loss in losses.items()]
    best = min(runs, key=lambda r: r["final_eval_loss"])
    return {"method": method, "kind": kind, "settings": settings, "configured": True, "lrs": list(losses),
            "runs": runs, "best_lr": best["lr"], "best_lr_at_edge": False, "eval_loss": best["final_eval_loss"],
            "optimizer_state_bytes": state, "param_bytes": 400, "tokens_per_s": 100.0, "step_time_s": step_s,
            "optimizer_time_s": step_s / 4}


def _result(rows, *, commit, base=None, load=1.0):
    """A results.json as ``collect`` writes it, with its ratios to the first row (the baseline)."""
    base_row = rows[0]
    for r in rows:
        for key, src in (("eval_loss_ratio", "eval_loss"), ("state_ratio", "optimizer_state_bytes"),
                         ("param_ratio", "param_bytes"), ("step_time_ratio", "step_time_s"),
                         ("optimizer_time_ratio", "optimizer_time_s")):
            r[key] = r[src] / base_row[src]
    timing = {"reps": 15, "warmup": 3, "threads": 1, "cpu": "cpu", "load_average_1m_start": load,
              "load_average_1m_end": load}
    return {"baseline": "adamw", "base": json.loads(json.dumps(base or TINY["base"])),
            "start": {"commit": commit, "started": "2026-01-01 00:00:00"}, "runs_finished": 0, "runs_total": 0,
            "timing": timing, "rows": rows, "command": f"python recipes/cpu_study/run.py  # {commit}"}


def _study(lrs=None):
    from optimlib.bench.study import Method, Study
    lrs = lrs or {}
    return Study(json.loads(json.dumps(TINY["base"])), "adamw",
                 [Method("adamw", "optimizer", [1e-3, 3e-3]), Method("sgdp", "optimizer", lrs.get("sgdp", [0.1])),
                  Method("galore_adamw", "optimizer", [0.03]), Method("fira_adamw", "optimizer", [0.01])])


ADAMW = {1e-3: 1.70, 3e-3: 1.62}


def test_merge_keeps_the_rows_not_run_and_names_their_timing_run():
    from optimlib.bench.study import results_markdown
    from optimlib.bench.study_merge import merge_results

    old = _result([_row("adamw", ADAMW, step_s=0.10), _row("sgdp", {0.1: 2.0}, step_s=0.12, state=500),
                   _row("galore_adamw", {0.03: 1.54}, step_s=0.11, state=400)], commit="aaaa", load=4.0)
    new = _result([_row("adamw", ADAMW, step_s=0.20), _row("galore_adamw", {0.03: 1.55}, step_s=0.26, state=400),
                   _row("fira_adamw", {0.01: 1.50}, step_s=0.30, state=410)], commit="bbbb", load=2.0)
    merged = merge_results(old, new, _study())

    rows = {r["method"]: r for r in merged["rows"]}
    assert [r["method"] for r in merged["rows"]] == ["adamw", "sgdp", "galore_adamw", "fira_adamw"]   # study order
    assert rows["sgdp"]["timing_run"] == "A" and rows["sgdp"]["step_time_ratio"] == pytest.approx(1.2)
    assert rows["sgdp"]["state_ratio"] == 0.5 and rows["sgdp"]["eval_loss"] == 2.0
    for m in ("adamw", "galore_adamw", "fira_adamw"):
        assert rows[m]["timing_run"] == "B"
    assert rows["galore_adamw"]["eval_loss"] == 1.55 and rows["galore_adamw"]["step_time_ratio"] == pytest.approx(1.3)
    assert rows["fira_adamw"]["step_time_ratio"] == pytest.approx(1.5)
    assert [(t["id"], t["start"]["commit"], t["methods"]) for t in merged["timing_runs"]] == [
        ("A", "aaaa", ["adamw", "sgdp", "galore_adamw"]), ("B", "bbbb", ["adamw", "galore_adamw", "fira_adamw"])]
    assert (merged["runs_finished"], merged["runs_total"]) == (5, 5)
    assert merged["merged"]["kept_methods"] == ["sgdp"]
    assert [c["lr"] for c in merged["merged"]["baseline_check"]["runs"]] == [1e-3, 3e-3]
    assert merged["start"]["commit"] == "bbbb" and old["rows"][1].get("timing_run") is None   # inputs untouched

    md = results_markdown(merged)
    assert "| timing run |" in md and "timing run A (the study started at commit `aaaa`" in md
    assert "timing run B (the study started at commit `bbbb`" in md and "load average 4.0 -> 4.0" in md
    assert "the rows of sgdp are kept" in md
    line = next(x for x in md.splitlines() if x.startswith("| sgdp |"))
    assert "| 0.500 | 1.20 | 1.20 | A |" in line                      # the ratios and the run they came from

    # merging the merged file again: the unused timing run (A had only sgdp kept) goes once sgdp is re-run
    third = _result([_row("adamw", ADAMW, step_s=0.30), _row("sgdp", {0.1: 1.9}, step_s=0.33, state=500)],
                    commit="cccc")
    again = merge_results(merged, third, _study())
    assert [t["id"] for t in again["timing_runs"]] == ["B", "C"]
    assert {r["method"]: r["timing_run"] for r in again["rows"]} == {
        "adamw": "C", "sgdp": "C", "galore_adamw": "B", "fira_adamw": "B"}


def test_merge_refuses_rows_that_are_not_comparable():
    from optimlib.bench.study_merge import MergeError, merge_results

    old = _result([_row("adamw", ADAMW, step_s=0.1), _row("sgdp", {0.1: 2.0}, step_s=0.1)], commit="aaaa")
    new = _result([_row("adamw", ADAMW, step_s=0.1), _row("fira_adamw", {0.01: 1.5}, step_s=0.1)], commit="bbbb")
    other = json.loads(json.dumps(old))
    other["base"]["train"]["steps"] = 500
    with pytest.raises(MergeError, match=r"base config.*train\.steps: 500 in the results, 3 now"):
        merge_results(other, new, _study())
    drift = json.loads(json.dumps(new))
    drift["rows"][0]["runs"][1]["final_eval_loss"] = 1.6201
    with pytest.raises(MergeError, match=r"baseline 'adamw' at lr=0.003 reached final eval loss 1.6201 now but 1.62"):
        merge_results(old, drift, _study())
    with pytest.raises(MergeError, match=r"'sgdp' has lrs \[0.1\].*lrs \[0.03, 0.1\]"):
        merge_results(old, new, _study({"sgdp": [0.03, 0.1]}))
    merge_results(old, new, _study())                       # the same inputs, comparable, merge


def test_run_py_merge_refuses_before_training(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    old = _result([_row("adamw", {3e-3: 1.62}, step_s=0.1)], commit="aaaa")
    old["base"]["data"]["seq_len"] = 128
    (out / "results.json").write_text(json.dumps(old))
    argv = ["--config", str(config), "--only", "lowrank", "--runs", str(runs), "--out", str(out), "--merge"]
    assert _main()(argv) == 2
    assert "data.seq_len: 128 in the results, 32 now" in capsys.readouterr().err
    assert not runs.exists()                                   # nothing trained
    (out / "results.json").unlink()
    assert _main()(argv) == 2 and "does not exist" in capsys.readouterr().err
