"""The CPU study behind ``recipes/cpu_study/run.py``: every method, one small model, a short lr sweep.

A study file (``recipes/cpu_study/study.yaml``) holds a ``base`` launch/pretrain.py config
shared by every run (model, data, steps, batch: equal steps and tokens for every method), the
``baseline`` method and, per method, its learning rates and settings.  The methods are read from
the registries at run time -- every :func:`optimlib.optim.list_optimizers` name and every
:func:`optimlib.reparam.list_reparams` name (reparameterizations train with the baseline's
optimizer settings) -- so a method registered after the study file was written still runs (with
its defaults and ``default_lrs``, flagged in the report).

Three phases, each resumable:

1. **sweep** -- one ``launch/pretrain.py`` run (:func:`optimlib.train.loop.pretrain`, in process)
   per (method, lr) into ``<runs>/<method>/lr_<lr>/``; a run whose ``summary.json`` exists is
   skipped.  Runs go center learning rate first for every method, then the neighbours, so a
   study cut short still has one run per method.  Each run's config (``config.yaml``), the git
   commit it ran at and its wall time (``study_run.json``) are kept next to its summary.
2. **timing** -- the whole training step (forward, backward, clipping, ``optimizer.step()``,
   ``reparam.after_step``) of every method, built exactly as the runs build it
   (:class:`optimlib.train.engine.SingleEngine`), timed in interleaved rounds
   (:func:`optimlib.bench.timing.interleaved`) on one fixed batch; medians, and the optimizer
   part (clip + step + after_step) on its own.  Ratios to the baseline from one process are what
   survive a shared machine; the runs' own tokens/s are reported too, but they come from
   different minutes of the machine's load.
3. **report** -- per method the best lr by final eval loss, and at that lr: eval loss and its
   ratio to the baseline's best, optimizer-state and parameter bytes (from the run's summary)
   and their ratios, step-time ratios; written as ``results.json``, ``results.md`` and
   ``study.png``.

Methods added later join existing results without re-running the others: ``run.py --merge``,
:mod:`optimlib.bench.study_merge` (each row then names the timing run of its step-time ratios).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from optimlib.bench.report import cpu_model, markdown_table, mib
from optimlib.bench.timing import interleaved, summarize
from optimlib.train.config import config_from_mapping, merge_overrides, read_yaml

__all__ = ["Method", "Study", "load_study", "run_sweep", "time_train_steps", "collect", "write_outputs",
           "git_state"]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Method:
    """One study row: a registered optimizer or reparameterization and its lr grid."""

    name: str
    kind: str                     # "optimizer" or "reparam"
    lrs: list[float]
    optim: dict = field(default_factory=dict)
    """Overrides of the base ``optim`` section (optimizers only)."""
    reparam_options: dict = field(default_factory=dict)
    configured: bool = True
    """False: registered but absent from the study file (defaults and ``default_lrs`` used)."""

    def settings(self) -> str:
        items = {**self.optim.get("kwargs", {}), **{k: v for k, v in self.optim.items() if k != "kwargs"},
                 **self.reparam_options}
        return ", ".join(f"{k}={v}" for k, v in items.items())


@dataclass
class Study:
    base: dict
    baseline: str
    methods: list[Method]
    path: str | None = None

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def run_tree(self, method: Method, lr: float, out_dir: Path) -> dict:
        """The launch/pretrain.py config (as a mapping) of one run."""
        tree = json.loads(json.dumps(self.base))
        optim = {**tree.get("optim", {}), **method.optim, "lr": float(lr)}
        if method.kind == "optimizer":
            optim["name"] = method.name
        else:
            optim["name"] = self.base.get("optim", {}).get("name", self.baseline)
            tree["reparam"] = {"method": method.name, "options": dict(method.reparam_options)}
        tree["optim"] = optim
        tree["out_dir"] = str(out_dir)
        return tree


def _lr_list(value, where: str) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"{where} must be a non-empty list of positive learning rates, got {value!r}")
    return [float(v) for v in value]


def load_study(path: str | Path, overrides: list[str] | None = None, only: list[str] | None = None) -> Study:
    """Read a study file; ``overrides`` are dotted ``key=value`` pairs applied to ``base``
    (``train.steps=20``); ``only`` keeps those methods (the baseline is always kept)."""
    from optimlib.optim import list_optimizers
    from optimlib.reparam import list_reparams
    path = Path(path)
    tree = read_yaml(path)
    unknown = set(tree) - {"base", "baseline", "methods", "default_lrs"}
    if unknown:
        raise ValueError(f"study file {path}: unknown top-level key(s) {sorted(unknown)}; "
                         "known: base, baseline, default_lrs, methods")
    base = merge_overrides(tree.get("base") or {}, overrides)
    optimizers, reparams = list_optimizers(), list_reparams()
    baseline = tree.get("baseline", "adamw")
    if baseline not in optimizers:
        raise ValueError(f"study file {path}: baseline {baseline!r} is not a registered optimizer")
    entries = tree.get("methods") or {}
    stale = [n for n in entries if n not in optimizers and n not in reparams]
    if stale:
        raise ValueError(f"study file {path}: method(s) {stale} are neither registered optimizers nor "
                         f"reparameterizations (optimizers: {optimizers}; reparams: {reparams})")
    default_lrs = _lr_list(tree.get("default_lrs", [1e-3, 3e-3, 1e-2]), f"study file {path}: default_lrs")
    names = [baseline] + [n for n in optimizers if n != baseline] + reparams
    if only is not None:
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"--only: {missing} not registered; known: {names}")
        names = [n for n in names if n == baseline or n in only]
    methods = []
    for name in names:
        entry = entries.get(name)
        kind = "optimizer" if name in optimizers else "reparam"
        extra = set(entry or {}) - {"lrs", "optim", "reparam"}
        if extra or (kind == "optimizer" and entry and "reparam" in entry) or (
                kind == "reparam" and entry and "optim" in entry):
            raise ValueError(f"study file {path}: method {name!r} ({kind}) has unexpected key(s) "
                             f"{sorted(extra | ({'reparam'} if kind == 'optimizer' else {'optim'}) & set(entry))}")
        entry = entry or {}
        lrs = _lr_list(entry["lrs"], f"study file {path}: methods.{name}.lrs") if "lrs" in entry else default_lrs
        methods.append(Method(name, kind, lrs, optim=dict(entry.get("optim") or {}),
                              reparam_options=dict(entry.get("reparam") or {}), configured=name in entries))
    return Study(base, baseline, methods, str(path))


def git_state() -> dict:
    """``git rev-parse HEAD`` and ``git status --short`` of the repository (None outside git)."""
    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "status_short": git("status", "--short")}


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (what the results record, so that
    they hold no machine's absolute paths), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def run_dir(runs_dir: Path, method: str, lr: float) -> Path:
    return Path(runs_dir) / method / f"lr_{lr:g}"


def _ordered_runs(study: Study) -> list[tuple[Method, float]]:
    """Center learning rate of every method first, then outwards (a cut-short study is usable)."""
    order = []
    for m in study.methods:
        center = (len(m.lrs) - 1) / 2
        for rank_, i in enumerate(sorted(range(len(m.lrs)), key=lambda i: (abs(i - center), i))):
            order.append((rank_, m, m.lrs[i]))
    order.sort(key=lambda t: t[0])
    return [(m, lr) for _, m, lr in order]


def run_sweep(study: Study, runs_dir: str | Path, log: Callable[[str], None] = print) -> list[dict]:
    """Phase 1: every (method, lr) run whose ``summary.json`` is missing (see the module docstring)."""
    from optimlib.train.loop import pretrain

    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    start = runs_dir / "study_start.json"
    if not start.exists():
        start.write_text(json.dumps({**git_state(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}, indent=2))
    done = []
    todo = _ordered_runs(study)
    for k, (method, lr) in enumerate(todo, 1):
        out = run_dir(runs_dir, method.name, lr)
        if (out / "summary.json").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(study.run_tree(method, lr, out), sort_keys=False))
        log(f"[{k}/{len(todo)}] {method.name} lr={lr:g} -> {out}")
        record = {**git_state(), "method": method.name, "lr": lr,
                  "load_average_1m_start": os.getloadavg()[0], "threads": torch.get_num_threads()}
        tic = time.perf_counter()
        try:
            pretrain(config_from_mapping(read_yaml(out / "config.yaml")))
            record["status"] = "ok"
        except Exception as exc:  # a diverged or broken run is a study result, not the end of the study
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log(f"    failed: {record['error']}")
        record["wall_s"] = time.perf_counter() - tic
        record["load_average_1m_end"] = os.getloadavg()[0]
        (out / "study_run.json").write_text(json.dumps(record, indent=2))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)   # the summary and metrics are what we keep
        done.append(record)
    return done


def _build_engine(study: Study, method: Method):
    """The model and optimizer of ``method``'s center-lr run, as the training loop builds them."""
    from optimlib import reparam
    from optimlib.models import build_model
    from optimlib.train.engines import ENGINES
    from optimlib.train.loop import seed_everything

    cfg = config_from_mapping(study.run_tree(method, method.lrs[(len(method.lrs) - 1) // 2], Path("unused")))
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, max_seq_len=cfg.data.seq_len)
    if cfg.reparam.method:
        model = reparam.apply(model, cfg.reparam.method, targets=cfg.reparam.targets, **cfg.reparam.options)
    engine = ENGINES["single"](cfg, torch.device("cpu"), 0, 1)
    engine.setup(model)
    return cfg, engine


def time_train_steps(study: Study, reps: int = 15, warmup: int = 3, log: Callable[[str], None] = print) -> dict:
    """Phase 2: interleaved medians of the whole training step and of its optimizer part."""
    from optimlib import reparam
    from optimlib.data import PackedBlocks, global_batch_indices, load_corpus

    engines, opt_times, tasks = {}, {}, {}
    corpus = blocks = None
    for method in study.methods:
        cfg, engine = _build_engine(study, method)
        engines[method.name] = engine
        if corpus is None:
            corpus = load_corpus(cfg.data)
            blocks = PackedBlocks(corpus.train, cfg.data.seq_len)
            t = cfg.train
            batch = blocks.get(global_batch_indices(0, t.batch_size, len(blocks), cfg.seed))
            micro = [batch[i:i + t.micro_batch] for i in range(0, t.batch_size, t.micro_batch)]
        opt_times[method.name] = []

        def step(engine=engine, name=method.name, has_reparam=method.kind == "reparam"):
            for k, mb in enumerate(micro):
                engine.forward_backward(mb[:, :-1], mb[:, 1:], 1.0 / len(micro), last=k == len(micro) - 1)
            tic = time.perf_counter()
            engine.step()
            if has_reparam:
                reparam.after_step(engine.module, engine.client_optimizer())
            opt_times[name].append(time.perf_counter() - tic)

        tasks[method.name] = step
    log(f"timing {len(tasks)} training steps x {reps} interleaved rounds (+{warmup} warm-up) ...")
    load = os.getloadavg()[0]
    samples = interleaved(tasks, reps=reps, warmup=warmup)
    rows = {}
    for name in tasks:
        rows[name] = {"step": summarize(samples[name]), "optimizer": summarize(opt_times[name][warmup:])}
    return {"reps": reps, "warmup": warmup, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "measured": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "load_average_1m_start": load, "load_average_1m_end": os.getloadavg()[0], "torch": torch.__version__,
            "methods": rows, "samples": samples}


def _loss(summary: dict | None) -> float:
    v = None if summary is None else summary.get("final_eval_loss")
    return float("inf") if v is None or not math.isfinite(v) else float(v)


def collect(study: Study, runs_dir: str | Path, timing: dict | None = None) -> dict:
    """Phase 3: per-method best lr and its numbers, as ratios to the baseline's best run."""
    runs_dir = Path(runs_dir)
    rows = []
    for method in study.methods:
        runs = []
        for lr in method.lrs:
            out = run_dir(runs_dir, method.name, lr)
            summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
            meta = json.loads((out / "study_run.json").read_text()) if (out / "study_run.json").exists() else {}
            status = "ok" if summary else meta.get("status", "missing")
            run = {"lr": lr, "status": status, "error": meta.get("error"), "commit": meta.get("commit"),
                   "wall_s": meta.get("wall_s"), "dir": repo_relative(out)}
            if summary:
                run.update({k: summary.get(k) for k in ("final_eval_loss", "final_train_loss", "first_eval_loss",
                                                         "tokens_per_s", "optimizer_state_bytes", "param_bytes",
                                                         "num_parameters", "steps", "tokens", "skipped_steps")})
            runs.append(run)
        finished = [r for r in runs if r["status"] == "ok"]
        best = min(finished, key=lambda r: (_loss(r), r["lr"])) if finished else None
        row = {"method": method.name, "kind": method.kind, "settings": method.settings(),
               "configured": method.configured, "lrs": method.lrs, "runs": runs,
               "best_lr": best["lr"] if best else None,
               "best_lr_at_edge": bool(best and len(method.lrs) > 1 and best["lr"] in (min(method.lrs),
                                                                                       max(method.lrs))),
               "eval_loss": best.get("final_eval_loss") if best else None}
        for key in ("optimizer_state_bytes", "param_bytes", "num_parameters", "tokens_per_s", "steps", "tokens"):
            row[key] = best.get(key) if best else None
        if timing and method.name in timing["methods"]:
            t = timing["methods"][method.name]
            row["step_time_s"], row["optimizer_time_s"] = t["step"]["median"], t["optimizer"]["median"]
        rows.append(row)
    base = next(r for r in rows if r["method"] == study.baseline)

    def ratio(r, key):
        a, b = r.get(key), base.get(key)
        if a is None or b is None or b == 0 or (isinstance(a, float) and not math.isfinite(a)):
            return None
        return a / b

    for r in rows:
        r["eval_loss_ratio"] = ratio(r, "eval_loss")
        r["state_ratio"] = ratio(r, "optimizer_state_bytes")
        r["param_ratio"] = ratio(r, "param_bytes")
        r["step_time_ratio"] = ratio(r, "step_time_s")
        r["optimizer_time_ratio"] = ratio(r, "optimizer_time_s")
        r["run_tokens_per_s_ratio"] = ratio(r, "tokens_per_s")
    start = runs_dir / "study_start.json"
    n_runs = sum(len(m.lrs) for m in study.methods)
    n_done = sum(1 for r in rows for run in r["runs"] if run["status"] == "ok")
    return {"study": repo_relative(study.path), "baseline": study.baseline, "base": study.base,
            "start": json.loads(start.read_text()) if start.exists() else None,
            "runs_finished": n_done, "runs_total": n_runs, "runs_dir": repo_relative(runs_dir),
            "timing": {k: v for k, v in (timing or {}).items() if k not in ("methods", "samples")} or None,
            "rows": rows}


# ----------------------------------------------------------------------------- outputs
def _f(fmt: str):
    return lambda x: "–" if x is None else format(x, fmt)


def results_markdown(result: dict) -> str:
    b = result["base"]
    t = b.get("train", {})
    steps, batch, seq = t.get("steps"), t.get("batch_size"), b.get("data", {}).get("seq_len")
    start = result.get("start") or {}
    timing = result.get("timing") or {}
    head = [f"CPU study: `{b.get('model', {}).get('name')}` on `{b.get('data', {}).get('source')}`, "
            f"{steps} steps x {batch} sequences x {seq} tokens ({steps * batch * seq:,} tokens) for every run; "
            f"best of each method's lr grid by final eval loss; ratios to `{result['baseline']}`'s best run.  "
            f"{result['runs_finished']} of {result['runs_total']} runs finished; study started at commit "
            f"`{(start.get('commit') or '?')[:12]}`."]
    merged = result.get("merged")
    if merged:
        kept = merged["kept_from"].get("start") or {}
        check = merged["baseline_check"]
        head.append(f"Merged (`run.py --merge`): the rows of {', '.join(merged['kept_methods'])} are kept from the "
                    f"study started at commit `{(kept.get('commit') or '?')[:12]}`; the baseline `{check['method']}` "
                    f"was run again and reproduced its final eval loss at lr "
                    f"{', '.join(format(c['lr'], 'g') for c in check['runs'])} (tolerance {check['tolerance']:g}).")
    runs = result.get("timing_runs") or ([{"id": "A", "timing": timing}] if timing else [])
    for t in runs:
        tm, st = t["timing"], t.get("start") or {}
        which = (f"Step times, timing run {t['id']} (the study started at commit `{(st.get('commit') or '?')[:12]}`"
                 f" on {(st.get('started') or '?')[:10]}; its rows' step-time ratios are to `{result['baseline']}` "
                 "as timed in that run)" if len(runs) > 1 else "Step times")
        head.append(f"{which}: medians of {tm['reps']} interleaved rounds in one process "
                    f"({tm['threads']} thread(s), {tm['cpu']}, load average "
                    f"{tm['load_average_1m_start']:.1f} -> {tm['load_average_1m_end']:.1f}).")
    if runs:
        head.append("\"train step\" is forward + backward + clipping + step (+ reparam after_step), "
                    "\"optimizer\" the last three.  The runs' own tokens/s ratio comes from different minutes of a "
                    "shared machine and is shown only as a cross-check.")
    columns = [("method", "method", None), ("kind", "kind", None), ("best_lr", "best lr", _f("g")),
               ("eval_loss", "eval loss", _f(".4f")), ("eval_loss_ratio", "/ AdamW", _f(".3f")),
               ("param_bytes", "params MiB", mib), ("param_ratio", "/ AdamW", _f(".2f")),
               ("optimizer_state_bytes", "opt. state MiB", mib), ("state_ratio", "/ AdamW", _f(".3f")),
               ("step_time_ratio", "train step / AdamW", _f(".2f")),
               ("optimizer_time_ratio", "optimizer part / AdamW", _f(".2f")),
               ("run_tokens_per_s_ratio", "run tokens/s / AdamW (noisy)", _f(".2f")),
               ("settings", "settings", None)]
    if len(runs) > 1:
        columns.insert(11, ("timing_run", "timing run", None))
    rows = [{**r, "best_lr": r["best_lr"], "method": r["method"] + ("" if r["configured"] else " (defaults)")
             + (" *" if r["best_lr_at_edge"] else "")} for r in result["rows"]]
    lines = head + ["", markdown_table(rows, columns), "",
                    "`*`: the best lr is at the edge of the grid (the optimum may lie outside it)."]
    sweep_cols = max(len(r["lrs"]) for r in result["rows"])
    sweep = []
    for r in result["rows"]:
        cells = []
        for run in r["runs"]:
            loss = run.get("final_eval_loss")
            text = (f"{run['lr']:g}: {loss:.4f}" if run["status"] == "ok" and loss is not None
                    else f"{run['lr']:g}: {run['status']}")
            cells.append(text)
        sweep.append({"method": r["method"], **{f"c{i}": c for i, c in enumerate(cells)}})
    lines += ["", "Final eval loss per learning rate:", "",
              markdown_table(sweep, [("method", "method", None)] + [(f"c{i}", f"lr {i + 1}", None)
                                                                   for i in range(sweep_cols)])]
    return "\n".join(lines)


def study_plot(result: dict, path: str | Path) -> Path:
    """Four panels: the lr sweeps, eval-loss ratio, memory ratios, step-time ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for r in rows:
        pts = [(run["lr"], run["final_eval_loss"]) for run in r["runs"]
               if run["status"] == "ok" and run.get("final_eval_loss") is not None
               and math.isfinite(run["final_eval_loss"])]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=r["method"],
                    linewidth=2.5 if r["method"] == result["baseline"] else 1.0)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final eval loss")
    ax.set_title("learning-rate sweeps", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)

    def bars(ax, series: dict, title: str, ylabel: str):
        n = len(series)
        width = 0.8 / n
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, [0 if v is None else v for v in values], width, label=label)
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        if n > 1:
            ax.legend(fontsize=8)

    ratios = [r["eval_loss_ratio"] for r in rows]
    bars(axes[0][1], {"best eval loss / AdamW": ratios}, "eval loss at each method's best lr", "ratio to AdamW")
    finite = [v for v in ratios if v is not None]
    if finite:
        axes[0][1].set_ylim(min(0.95, min(finite) - 0.02), max(finite) + 0.03)
    bars(axes[1][0], {"optimizer state / AdamW": [r["state_ratio"] for r in rows],
                      "parameters / AdamW": [r["param_ratio"] for r in rows]}, "memory (bytes from the runs)",
         "ratio to AdamW")
    bars(axes[1][1], {"train step / AdamW": [r.get("step_time_ratio") for r in rows],
                      "optimizer part / AdamW": [r.get("optimizer_time_ratio") for r in rows]},
         "step time (interleaved medians, one process)", "ratio to AdamW")
    if len(result.get("timing_runs") or []) > 1:   # ratios from several timing runs: name each row's
        axes[1][1].set_title("step time (interleaved medians; [timing run] of each ratio)", fontsize=10)
        axes[1][1].set_xticklabels([f"{r['method']} [{r.get('timing_run', '-')}]" for r in rows], rotation=35,
                                   ha="right", fontsize=8)
    b = result["base"]
    fig.suptitle(f"CPU study: {b.get('model', {}).get('name')}, {b.get('train', {}).get('steps')} steps, "
                 f"{result['runs_finished']}/{result['runs_total']} runs", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``study.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "study.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths["md"].write_text(results_markdown(result) + "\n")
    study_plot(result, paths["png"])
    return paths
