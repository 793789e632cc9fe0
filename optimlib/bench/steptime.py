"""The step-time benchmark: optimizer ``step()`` alone, interleaved, as ratios to torch AdamW (foreach).

One model, one set of seeded random gradients (kept for every step), and every contender built
over the same parameters (a tiny learning rate keeps them put).  Each contender's ``step()`` is
timed with :func:`optimlib.bench.timing.interleaved`; the median is compared with that of
``torch.optim.AdamW(foreach=True)`` in the same run.

Projected (GaLore-style) contenders refresh their basis every ``gap`` steps, so one number per
contender would be wrong either way.  Each one is built twice: with ``update_proj_gap=1`` (every
step is a refresh step) and with the real gap (after the untimed first step, which refreshes,
every timed step is an ordinary one).  Their medians combine into the amortized step::

    amortized = (refresh + (gap - 1) * ordinary) / gap

Every row also gets its memory-traffic floor (:mod:`optimlib.bench.traffic`: the bytes its rule
must read and write at least once per step, from the optimizer's state declarations; a peer
takes the floor of the rule it runs) and the fraction of it the step reaches at the copy
bandwidth measured in the same run, before and after the timing (the higher of the two is used):
``floor / bandwidth / amortized``.  The floor counts no arithmetic (a refresh's SVD, GaLore's
projections), so a compute-bound step shows a small fraction.

The targets on a CPU: the amortized ``galore_adamw`` step no slower than galore-torch's,
and within 1.3x of torch AdamW (foreach).
"""

from __future__ import annotations

import torch

from optimlib.bench.contenders import BASELINE, FUSED, contenders, get_contender
from optimlib.bench.memory import resolve_device
from optimlib.bench.report import environment, markdown_table
from optimlib.bench.timing import interleaved, summarize
from optimlib.bench.traffic import copy_bandwidth, traffic_floor

__all__ = ["run_step_benchmark", "step_markdown", "TARGETS"]

TARGETS = {"vs_galore_torch": 1.0, "vs_adamw_foreach": 1.3}
OURS, PEER = "galore_adamw", "galore_torch.GaLoreAdamW"


def run_step_benchmark(model_name: str = "llama_60m", names: list[str] | None = None, *, reps: int = 5,
                       warmup: int = 2, gap: int = 200, device: str = "auto", dtype: str = "float32",
                       peers: bool = True, seed: int = 0, progress=None, baseline: str = BASELINE) -> dict:
    """Time every contender's step on ``model_name`` (see the module docstring).

    ``baseline``: the denominator of the ``ratio`` column -- :data:`BASELINE` (AdamW foreach) or
    :data:`~optimlib.bench.contenders.FUSED` (``AdamW(fused=True)``, which is then timed too).
    """
    from optimlib.bench.memory import DTYPES, _build, _random_grads

    if not isinstance(gap, int) or gap < 2:
        raise ValueError(f"invalid gap={gap!r}: accepted range is an integer >= 2")
    if baseline not in (BASELINE, FUSED):
        raise ValueError(f"invalid baseline={baseline!r}: accepted values are {BASELINE}, {FUSED}")
    dev = resolve_device(device)
    model = _build(model_name, dev, DTYPES[dtype], seed)
    _random_grads(model, seed)
    numel = sum(p.numel() for p in model.parameters())
    if names is not None and baseline not in names:
        names = [baseline] + list(names)
    chosen = contenders(model_name, dev, names=names, peers=peers, fused=baseline == FUSED)
    tasks, floors = {}, {}
    for c in chosen:
        if progress:
            progress(f"building {c.name} ...")
        opt = c.build(model, update_proj_gap=gap) if c.low_rank else c.build(model)
        floors[c.name] = _floor(opt, c, model, model_name, dev)
        for group in opt.param_groups:
            group["lr"] = 1e-12
        tasks[c.name] = opt.step
        if c.low_rank:
            fresh = c.build(model, update_proj_gap=1)
            for group in fresh.param_groups:
                group["lr"] = 1e-12
            tasks[c.name + " [refresh]"] = fresh.step
    if progress:
        progress(f"timing {len(tasks)} steps x {reps} interleaved rounds ...")
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    bandwidth = [copy_bandwidth(dev)]
    samples = interleaved(tasks, reps=reps, warmup=warmup, sync=sync)
    bandwidth.append(copy_bandwidth(dev))
    best = max(bandwidth)

    rows = []
    for c in chosen:
        s = summarize(samples[c.name])
        row = {"name": c.name, "kind": c.kind, "note": c.note, "ordinary": s["median"], "ordinary_q1": s["q1"],
               "ordinary_q3": s["q3"], "refresh": None, "amortized": s["median"]}
        if c.low_rank:
            r = summarize(samples[c.name + " [refresh]"])
            row.update(refresh=r["median"], refresh_q1=r["q1"], refresh_q3=r["q3"],
                       amortized=(r["median"] + (gap - 1) * s["median"]) / gap)
        floor = floors[c.name]
        row.update(floor_bytes=floor, floor_bytes_per_param=None if floor is None else floor / numel,
                   of_floor=None if floor is None else floor / best / row["amortized"])
        rows.append(row)
    base = next(r for r in rows if r["name"] == baseline)["amortized"]
    for r in rows:
        r["ratio"] = r["amortized"] / base
    by = {r["name"]: r for r in rows}
    targets = {}
    if OURS in by:
        vs_foreach = by[OURS]["amortized"] / by[BASELINE]["amortized"]
        targets["galore_adamw_amortized_vs_adamw_foreach"] = vs_foreach
        targets["meets_1.3x_adamw_foreach"] = vs_foreach <= TARGETS["vs_adamw_foreach"]
        if PEER in by:
            ratio = by[OURS]["amortized"] / by[PEER]["amortized"]
            targets["galore_adamw_amortized_vs_galore_torch"] = ratio
            targets["no_slower_than_galore_torch"] = ratio <= TARGETS["vs_galore_torch"]
    return {"benchmark": "step", "model": model_name, "dtype": dtype, "gap": gap, "reps": reps, "warmup": warmup,
            "baseline": baseline, "environment": environment(dev), "rows": rows, "targets": targets,
            "bandwidth_bytes_per_s": bandwidth, "samples": samples}


def _floor(opt, contender, model, model_name: str, device) -> int | None:
    """The traffic floor of ``contender``'s step (its rule's, for a peer; ``None`` without one)."""
    if contender.kind != "peer":
        return traffic_floor(opt)
    if contender.rule is None:
        return None
    return traffic_floor(get_contender(model_name, contender.rule, device).build(model))


def _ms(x) -> str:
    return "" if x is None else f"{x * 1e3:,.1f}"


def step_markdown(result: dict) -> str:
    env = result["environment"]
    columns = [("name", "optimizer", None), ("kind", "kind", None), ("ordinary", "ordinary step ms", _ms),
               ("refresh", "refresh step ms", _ms), ("amortized", f"amortized ms (gap {result['gap']})", _ms),
               ("ratio", "amortized / AdamW(fused)" if result.get("baseline") == FUSED else "amortized / AdamW(foreach)",
                lambda x: f"{x:.2f}"),
               ("floor_bytes_per_param", "traffic floor B/param", lambda x: "–" if x is None else f"{x:.2f}"),
               ("of_floor", "of the floor", lambda x: "–" if x is None else f"{x:.0%}"), ("note", "settings", None)]
    head = (f"Optimizer step time on {result['model']} ({result['dtype']}), {env['device_name']}, "
            f"{env['torch_threads']} threads, torch {env['torch']}; medians of {result['reps']} interleaved rounds "
            f"(load average {env.get('load_average_1m')}).  Only the ratios of one run are meaningful on a shared "
            "machine.  Copy bandwidth measured before and after the timing: "
            + ", ".join(f"{b / 1e9:.1f}" for b in result.get("bandwidth_bytes_per_s", [])) + " GB/s; \"of the "
            "floor\" is the floor's bytes at the higher one over the amortized step.")
    lines = [head, "", markdown_table(result["rows"], columns)]
    t = result["targets"]
    if t:
        lines += ["", "Targets: " + ", ".join(
            f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in t.items())]
    return "\n".join(lines)
