"""Adding methods to a CPU study's results without re-running the others (``run.py --merge``).

A study's ``results.json`` holds one row per method.  :func:`merge_results` keeps the rows of an
earlier ``results.json`` for the methods not run now and takes the rest from the current run, on
three conditions, each a :class:`MergeError` when it fails:

* the two studies share the baseline and the whole ``base`` config (model, data, steps, batch,
  sequence length, schedule, the baseline's optimizer settings): equal steps and tokens;
* a kept method's learning rates and settings still equal the study file's entry for it;
* the baseline, which every invocation runs, reproduces the earlier results: at every learning
  rate both have, the same final eval loss (within ``tol``), optimizer-state and parameter bytes.
  The study is deterministic, so a difference means the code or the environment changed the
  training and the kept rows' ratios are no longer ratios to this baseline.

Eval-loss and memory ratios then stay valid for every row.  Step-time ratios do not mix that
well: each comes from an interleaved timing run in one process (see :mod:`optimlib.bench.study`)
and is a ratio to the baseline *as timed in that run*.  The merged result lists its timing runs
(``timing_runs``: an id, the study start and the timing's settings and load) and every row names
the one its step-time ratios came from (``timing_run``); ``results.md`` shows both.
"""

from __future__ import annotations

import math
import string

__all__ = ["MergeError", "BASELINE_TOL", "check_compatible", "timing_runs", "merge_results"]

BASELINE_TOL = 1e-6
"""Largest accepted difference of the baseline's final eval loss (the study is deterministic)."""


class MergeError(ValueError):
    """The earlier results cannot be merged with the current ones (the message says why)."""


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys where two config trees differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(f"{where}: {old.get(key, '<absent>')!r} in the results, {new.get(key, '<absent>')!r} now")
            else:
                out += _differences(old[key], new[key], where)
        return out
    return [] if old == new else [f"{prefix}: {old!r} in the results, {new!r} now"]


def check_compatible(previous: dict, study, rerun: list[str] | None = None) -> None:
    """What can be checked before any training: the baseline, the ``base`` config, and that every
    row kept from ``previous`` (methods not in ``rerun``) matches ``study``'s entry for it."""
    if previous.get("baseline") != study.baseline:
        raise MergeError(f"cannot merge: the results' baseline is {previous.get('baseline')!r}, "
                         f"the study's is {study.baseline!r}")
    diffs = _differences(previous.get("base"), study.base)
    if diffs:
        raise MergeError("cannot merge: the results were made with another base config (budget, model, data "
                         "or baseline settings), so their rows are not comparable; differences: " + "; ".join(diffs))
    rerun = set(rerun or [])
    known = {m.name: m for m in study.methods}
    for row in previous.get("rows", []):
        m = known.get(row["method"])
        if row["method"] in rerun or m is None:
            continue
        if [float(x) for x in row["lrs"]] != m.lrs or row["settings"] != m.settings():
            raise MergeError(f"cannot merge: method {row['method']!r} has lrs {row['lrs']} and settings "
                             f"{row['settings']!r} in the results but lrs {m.lrs} and settings {m.settings()!r} "
                             "in the study file; re-run it (add it to --only)")


def _check_baseline(previous: dict, current: dict, tol: float) -> dict:
    name = current["baseline"]
    old = next((r for r in previous["rows"] if r["method"] == name), None)
    new = next((r for r in current["rows"] if r["method"] == name), None)
    if old is None or new is None:
        raise MergeError(f"cannot merge: the baseline {name!r} has no row in the "
                         f"{'results' if old is None else 'current run'}")
    new_runs = {run["lr"]: run for run in new["runs"] if run["status"] == "ok"}
    compared = []
    for run in old["runs"]:
        if run["status"] != "ok" or run["lr"] not in new_runs:
            continue
        now = new_runs[run["lr"]]
        a, b = run.get("final_eval_loss"), now.get("final_eval_loss")
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > tol:
            raise MergeError(f"cannot merge: the baseline {name!r} at lr={run['lr']:g} reached final eval loss "
                             f"{b!r} now but {a!r} in the results (tolerance {tol:g}); the study is deterministic, "
                             "so training changed and the kept rows are not comparable: re-run the whole study")
        for key in ("optimizer_state_bytes", "param_bytes"):
            if run.get(key) != now.get(key):
                raise MergeError(f"cannot merge: the baseline {name!r} at lr={run['lr']:g} has {key} "
                                 f"{now.get(key)} now but {run.get(key)} in the results")
        compared.append({"lr": run["lr"], "final_eval_loss_results": a, "final_eval_loss_now": b})
    if old["best_lr"] not in new_runs or new["best_lr"] != old["best_lr"]:
        raise MergeError(f"cannot merge: the baseline {name!r}'s best lr is {new['best_lr']} now but "
                         f"{old['best_lr']} in the results")
    return {"method": name, "tolerance": tol, "runs": compared}


def timing_runs(result: dict) -> list[dict]:
    """The timing runs a result's step-time ratios come from; a result written by one invocation
    (no ``timing_runs`` key) has one, ``A``, made of its ``start`` and ``timing``."""
    if result.get("timing_runs"):
        return [dict(t) for t in result["timing_runs"]]
    if not result.get("timing"):
        return []
    return [{"id": "A", "start": result.get("start"), "command": result.get("command"), "timing": result["timing"],
             "methods": [r["method"] for r in result["rows"] if r.get("step_time_s") is not None]}]


def merge_results(previous: dict, current: dict, study=None, tol: float = BASELINE_TOL) -> dict:
    """``current`` plus ``previous``'s rows for the methods ``current`` lacks (see the module docstring).

    ``study`` (the whole study file, :func:`optimlib.bench.study.load_study` without ``only``)
    orders the rows and lets :func:`check_compatible` check the kept ones; raises
    :class:`MergeError` when the two are not comparable."""
    now = {r["method"] for r in current["rows"]}
    if study is not None:
        check_compatible(previous, study, rerun=sorted(now))
    else:
        if previous.get("baseline") != current["baseline"]:
            raise MergeError(f"cannot merge: baselines {previous.get('baseline')!r} and {current['baseline']!r}")
        diffs = _differences(previous.get("base"), current["base"])
        if diffs:
            raise MergeError("cannot merge: another base config: " + "; ".join(diffs))
    baseline_check = _check_baseline(previous, current, tol)
    kept = [dict(r) for r in previous["rows"] if r["method"] not in now]

    old_runs = {t["id"]: t for t in timing_runs(previous)}
    for r in kept:
        if r.get("step_time_s") is not None:
            r["timing_run"] = r.get("timing_run", "A")
    used = [i for i in old_runs if any(r.get("timing_run") == i for r in kept)]
    runs = [old_runs[i] for i in used]
    new_id = next(c for c in string.ascii_uppercase if c not in old_runs)
    rows = [dict(r) for r in current["rows"]]
    if current.get("timing"):
        runs.append({"id": new_id, "start": current.get("start"), "command": current.get("command"),
                     "timing": current["timing"], "methods": [r["method"] for r in rows if r.get("step_time_s")
                                                              is not None]})
        for r in rows:
            if r.get("step_time_s") is not None:
                r["timing_run"] = new_id
    rows += kept
    if study is not None:
        order = {m.name: i for i, m in enumerate(study.methods)}
        rows.sort(key=lambda r: order.get(r["method"], len(order)))
    return {**current, "rows": rows,
            "runs_finished": sum(1 for r in rows for run in r["runs"] if run["status"] == "ok"),
            "runs_total": sum(len(r["runs"]) for r in rows),
            "timing_runs": runs,
            "merged": {"kept_methods": [r["method"] for r in kept], "run_methods": sorted(now),
                       "kept_from": {"start": previous.get("start"), "command": previous.get("command")},
                       "baseline_check": baseline_check}}
