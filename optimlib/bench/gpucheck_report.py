"""The Markdown summary of a ``launch/gpu_check.py`` run, from the JSON files its parts wrote."""

from __future__ import annotations

import json
from pathlib import Path

from optimlib.bench.report import markdown_table

__all__ = ["summary_markdown", "load_part"]


def load_part(out: Path, name: str) -> dict | None:
    path = Path(out) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(fmt: str):
    return lambda x: "" if x is None else format(x, fmt)


def _gib(x) -> str:
    return "" if x is None else f"{x / 2 ** 30:.2f}"


def _environment(env: dict, run: dict) -> list[str]:
    lines = [f"- device: **{env.get('device')}** (compute capability {env.get('capability')}, "
             f"{env.get('memory_gib')} GiB), driver {env.get('driver')}",
             f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), Triton {env.get('triton')}, "
             f"Python {env.get('python')}, {env.get('cpu_count')} CPUs",
             f"- commit {env.get('commit')}{' with uncommitted changes' if env.get('uncommitted_changes') else ''}, "
             f"{env.get('date')}; optimlib imported from {run.get('optimlib_from', env.get('optimlib_from'))}",
             f"- time: {run['elapsed']:.0f} s of a {run['budget']:.0f} s budget"
             + (" (dry run: toy sizes on the CPU)" if run.get("dry_run") else "")]
    return lines


def _parts(run: dict) -> list[str]:
    columns = [("name", "part", None), ("budget", "budget s", _num(".0f")), ("seconds", "used s", _num(".1f")),
               ("status", "status", None), ("file", "file", None)]
    return [markdown_table(run["parts"], columns)]


def _kernel_tests(data: dict) -> list[str]:
    c = data.get("counts", {})
    lines = [f"`{data.get('command', '')}`: " + (", ".join(f"{n} {k}" for k, n in sorted(c.items())) or "no results")
             + f" ({data.get('status')})"]
    for f in data.get("failures", [])[:25]:
        lines.append(f"- FAILED `{f['test']}` {f['message']}")
    return lines


def _kernel_bench(data: dict) -> list[str]:
    rows = data.get("rows", [])
    if not rows:
        return ["no rows"]
    columns = [("kernel", "kernel", None), ("shape", "shape", None), ("dtype", "dtype", None), ("path", "path", None),
               ("time_ms", "ms", _num(".3f")), ("bytes", "MB moved", lambda b: f"{b / 1e6:.1f}"),
               ("gbps", "GB/s", _num(".0f")), ("frac_copy", "of copy", _num(".2f")),
               ("frac_spec", "of spec", _num(".2f")), ("tflops", "TFLOP/s", _num(".1f")),
               ("speedup", "vs eager", _num(".2f"))]
    return [f"Copy bandwidth measured in the same run: {rows[0]['copy_gbps']:.0f} GB/s "
            f"({rows[0]['device']}).", "", markdown_table(rows, columns)]


def _step_time(data: dict) -> list[str]:
    ms = _num(",.2f")
    columns = [("name", "optimizer", None), ("kind", "kind", None), ("ordinary", "ordinary ms", lambda x: ms(x * 1e3)),
               ("refresh", "refresh ms", lambda x: "" if x is None else ms(x * 1e3)),
               ("amortized", f"amortized ms (gap {data.get('gap')})", lambda x: ms(x * 1e3)),
               ("ratio", "ratio to AdamW(fused)", _num(".2f")), ("note", "settings", None)]
    return [f"{data.get('model')} ({data.get('dtype')}), medians of {data.get('reps')} interleaved rounds.", "",
            markdown_table(data.get("rows", []), columns)]


def _pretrain(data: dict) -> list[str]:
    rows = []
    for r in data.get("rows", []):
        est = r.get("estimate") or {}
        rows.append({**r, "est_total": est.get("total"), "est_states": est.get("optimizer_states")})
    columns = [("name", "run", None), ("status", "status", None), ("tokens_per_s", "tokens/s", _num(",.0f")),
               ("steady_tokens_per_s", f"tokens/s after step {data.get('steady_from_step')}", _num(",.0f")),
               ("mfu", "MFU", _num(".3f")), ("steady_mfu", "MFU (steady)", _num(".3f")),
               ("peak_memory_bytes", "CUDA peak GiB", _gib), ("est_total", "estimate GiB", _gib),
               ("peak_over_estimate", "peak / estimate", _num(".2f")),
               ("optimizer_state_bytes", "state GiB", _gib), ("est_states", "estimated state GiB", _gib),
               ("final_train_loss", "final loss", _num(".3f"))]
    lines = [f"`launch/pretrain.py` on {data.get('model')}; the estimate is "
             "`estimate_memory` for the same model, optimizer, reparameterization, micro-batch and sequence "
             "length (weights + gradients + states + activations; no CUDA context, allocator slack or "
             "transient workspaces).", "", markdown_table(rows, columns)]
    for r in data.get("rows", []):
        for note in r.get("notes", []):
            lines.append(f"- {r['name']}: {note}")
        if r.get("stderr_tail"):
            lines.append(f"- {r['name']} failed:\n\n```\n{r['stderr_tail'][-1500:]}\n```")
    return lines


SECTIONS = (("kernel_tests", "Kernel tests", _kernel_tests), ("kernel_bench", "Kernel benchmark", _kernel_bench),
            ("step_time", "optimizer.step() time", _step_time), ("pretrain", "Pretraining", _pretrain))


def summary_markdown(out: Path, run: dict) -> str:
    """``run``: ``budget``, ``elapsed``, ``dry_run``, ``environment`` and ``parts`` (one dict per
    part: ``name, budget, seconds, status, file``)."""
    env = run["environment"]
    lines = [f"# GPU check: {env.get('device')}, {env.get('date', '')[:10]}", ""]
    lines += _environment(env, run) + ["", "## Parts", ""] + _parts(run)
    titles = {p["name"]: p for p in run["parts"]}
    for name, title, render in SECTIONS:
        if name not in titles:
            continue
        data = load_part(out, name)
        lines += ["", f"## {title}", ""]
        if data is None:
            lines.append(f"No results: {titles[name]['status']}.")
        else:
            lines += render(data)
    return "\n".join(lines) + "\n"
