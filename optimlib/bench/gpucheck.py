"""The parts of ``launch/gpu_check.py``: every GPU figure the project needs, from one call.

Each part runs in its own process (started by the script, killed at its time limit) and writes
one JSON file into the output folder, rewritten as results come in, so that a part stopped by
the time guard leaves what it had.  Every file carries :func:`environment_info` (device, driver,
torch, Triton, CUDA, commit).  The parts, in order, with their share of the 9-minute budget
(:data:`PARTS`; ``--budget`` scales them all):

``kernel_tests`` (150 s)
    ``pytest tests/kernels -k cuda``: the compiled Triton kernels against their reference twins.
``kernel_bench`` (60 s)
    :func:`optimlib.bench.kernels.run_kernel_bench` at LLaMA-1B and 7B shapes (2048 x 2048,
    2048 x 5461 at rank 512; 4096 x 4096, 4096 x 11008 at rank 1024): time, bytes moved, GB/s,
    fraction of the copy bandwidth measured in the same run, speed-up over the eager twin.
``step_time`` (100 s)
    :func:`optimlib.bench.steptime.run_step_benchmark` on ``llama_1b`` (fp32 weights): the
    ``step()`` of every registered optimizer, torch AdamW (foreach) and the importable peers
    (bitsandbytes, torchao 8-bit), as ratios to ``torch.optim.AdamW(fused=True)``.
``pretrain`` (200 s)
    ``launch/pretrain.py`` on ``llama_350m`` (bf16 autocast, 8 x 1024 tokens a step, 30 steps)
    for each of :data:`PRETRAIN_VARIANTS`: tokens/s and MFU (over the whole run and over the
    steps after the first 5), CUDA peak memory, and
    :func:`optimlib.bench.estimate.estimate_memory`'s prediction for the same run beside it.

With ``dry_run`` every part runs at toy sizes on the CPU (reference twins, ``llama_tiny``, one
pretraining run and the others' configs checked and estimated), in seconds: that is what the
test suite runs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOTAL_BUDGET = 540.0


@dataclass(frozen=True)
class Part:
    name: str
    budget: float
    """Seconds (of :data:`TOTAL_BUDGET`)."""
    title: str


PARTS = (
    Part("kernel_tests", 150, "Kernel tests on CUDA (compiled kernels vs reference twins)"),
    Part("kernel_bench", 60, "Kernel benchmark at LLaMA-1B and 7B shapes"),
    Part("step_time", 100, "optimizer.step() at LLaMA-1B shapes vs torch AdamW(fused=True)"),
    Part("pretrain", 200, "launch/pretrain.py on llama_350m: tokens/s, MFU, CUDA peak vs estimate"),
)
KERNEL_SHAPES = ((2048, 2048, 512), (2048, 5461, 512), (4096, 4096, 1024), (4096, 11008, 1024))
STEP_MODEL = "llama_1b"
PRETRAIN_MODEL, PRETRAIN_STEPS, STEADY_FROM = "llama_350m", 30, 5
MIN_RUN = 15.0          # seconds kept for each pretraining run still to come

# name, config file, overrides ({rank}: the GaLore paper's rank for the model, {alpha}: rank / 4).
PRETRAIN_VARIANTS = (
    ("adamw", "configs/default.yaml", ()),
    ("galore_adamw", "configs/galore_adamw.yaml", ("optim.kwargs.rank={rank}",)),
    ("galore_adamw int8", "configs/galore_adamw.yaml", ("optim.kwargs.rank={rank}", "optim.kwargs.moments_dtype=int8")),
    ("galore_adamw layerwise", "configs/galore_adamw.yaml",
     ("optim.kwargs.rank={rank}", "train.layerwise=true", "train.grad_clip=0")),
    ("smmf", "configs/smmf.yaml", ()),
    ("galore_smmf", "configs/galore_smmf.yaml", ("optim.kwargs.rank={rank}",)),
    ("sltrain", "configs/sltrain.yaml", ("reparam.options.rank={rank}", "reparam.options.alpha={alpha}")),
    ("nm 2:4", "configs/nm_2of4.yaml", ()),
)
DRY_RUN_ONLY = "dry run (config loaded and estimated only)"


def allot(remaining: float, budget: float, later: float) -> float:
    """Seconds one step of a plan may take: its ``budget``, plus whatever the steps after it
    (``later`` seconds of budget) will not need; never more than ``remaining``."""
    return max(0.0, min(remaining, max(budget, remaining - later)))


# ----------------------------------------------------------------------------- environment
def _run_text(cmd: list[str], timeout: float = 10) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def commit() -> str | None:
    """The checked-out commit: ``git``, else ``.git/HEAD`` read directly, else ``$OPTIMLIB_COMMIT``
    (for a copy of the tree without its ``.git``)."""
    found = _run_text(["git", "rev-parse", "--short", "HEAD"])
    if found:
        return found
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            head = (REPO / ".git" / head[5:]).read_text().strip()
        return head[:7]
    except OSError:
        return os.environ.get("OPTIMLIB_COMMIT") or None


def environment_info() -> dict:
    """Device, driver, torch/Triton/CUDA/Python versions, commit and date of this run."""
    import torch

    from optimlib.kernels import HAS_TRITON

    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "uncommitted_changes": bool(_run_text(["git", "status", "--porcelain", "--untracked-files=no"])),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": None, "device": "cpu", "driver": None, "capability": None,
            "cpu_count": os.cpu_count(), "optimlib_from": str(Path(sys.modules["optimlib"].__file__).parent)}
    if HAS_TRITON:
        import triton

        info["triton"] = triton.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1))
        driver = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = driver.splitlines()[0] if driver else None
    return info


def write_json(out: Path, name: str, payload: dict) -> Path:
    path = Path(out) / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _record(name: str, dry_run: bool, **fields) -> dict:
    return {"part": name, "dry_run": dry_run, "environment": environment_info(), **fields}


# ----------------------------------------------------------------------------- kernel tests
def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OPTIMLIB_KERNELS")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="300", **extra)
    return env


def parse_pytest_verbose(text: str) -> dict:
    """Counts and failing tests from ``pytest -v`` output, complete or cut off."""
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED",
                                                                  "XFAIL", "XPASS"):
            counts[parts[1].lower()] = counts.get(parts[1].lower(), 0) + 1
            if parts[1] in ("FAILED", "ERROR"):
                failures.setdefault(parts[0], "")
        elif line.startswith(("FAILED ", "ERROR ")) and " - " in line:
            test, message = line.split(" ", 1)[1].split(" - ", 1)
            failures[test] = message.strip()[:300]
    return {"counts": counts, "failures": [{"test": t, "message": m} for t, m in failures.items()]}


def kernel_tests(out: Path, deadline: float, dry_run: bool) -> Path:
    name = "kernel_tests"
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return write_json(out, name, _record(name, dry_run, status="skipped: pytest is not installed (carry its "
                                                                   "wheels with --wheels, see docs/benchmarks.md)"))
    selection = (["tests/kernels/test_kernel_compander.py", "-k", "cpu"] if dry_run
                 else ["tests/kernels", "-k", "cuda"])
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=line", "-rfE", *selection]
    start = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
            status = "done"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code, status = None, "stopped by the time guard (results so far)"
        log.seek(0)
        text = log.read()
    result = parse_pytest_verbose(text)
    return write_json(out, name, _record(name, dry_run, status=status, exit_code=code, seconds=time.time() - start,
                                         command=" ".join(["python"] + cmd[1:]), **result, log_tail=text[-3000:]))


# ----------------------------------------------------------------------------- kernel bench
def kernel_bench(out: Path, deadline: float, dry_run: bool) -> Path:
    import torch

    from optimlib.bench.kernels import run_kernel_bench

    name = "kernel_bench"
    device = "cpu" if dry_run or not torch.cuda.is_available() else "cuda"
    shapes = ((64, 96, 8),) if dry_run else KERNEL_SHAPES
    kwargs = dict(repeats=1, copy_bytes=1 << 20) if dry_run else {}
    rows, skipped = [], []
    for i, shape in enumerate(shapes):
        if time.time() > deadline - 5:
            skipped = [list(s) for s in shapes[i:]]
            break
        rows += run_kernel_bench([shape], device, **kwargs)
        write_json(out, name, _record(name, dry_run, status="running", shapes=[list(s) for s in shapes], rows=rows))
    status = "done" if not skipped else "stopped by the time guard"
    return write_json(out, name, _record(name, dry_run, status=status, shapes=[list(s) for s in shapes],
                                         skipped_shapes=skipped, rows=rows))


# ----------------------------------------------------------------------------- step time
def step_time(out: Path, deadline: float, dry_run: bool) -> Path:
    import torch

    from optimlib.bench.contenders import FUSED
    from optimlib.bench.steptime import run_step_benchmark

    name = "step_time"
    cuda = torch.cuda.is_available() and not dry_run
    model = STEP_MODEL if not dry_run else "llama_tiny"
    result = run_step_benchmark(model, reps=5 if cuda else 1, warmup=1 if cuda else 0, gap=200,
                                device="cuda" if cuda else "cpu", dtype="float32", peers=cuda, baseline=FUSED)
    result.pop("samples", None)
    result["bench_environment"] = result.pop("environment")
    return write_json(out, name, _record(name, dry_run, status="done", **result))


# ----------------------------------------------------------------------------- pretraining
def pretrain_variants(model: str) -> list[tuple[str, str, list[str]]]:
    """:data:`PRETRAIN_VARIANTS` with the ranks of ``model`` filled in."""
    from optimlib.bench.contenders import paper_rank

    rank = paper_rank(model)
    return [(n, c, [o.format(rank=rank, alpha=max(1, rank // 4)) for o in extra]) for n, c, extra in PRETRAIN_VARIANTS]


def pretrain_overrides(model: str, out_dir: Path, dry_run: bool) -> list[str]:
    common = [f"model.name={model}", f"out_dir={out_dir}", "train.eval_every=0", "train.checkpoint_every=0",
              "train.keep_checkpoints=1", "train.log_every=1", "train.progress=false", "seed=0"]
    if dry_run:
        return common + ["device=cpu", "data.max_bytes=200000", "data.seq_len=32", "train.batch_size=4",
                         "train.micro_batch=2", "train.steps=2", "train.warmup_steps=1", "train.eval_blocks=4"]
    return common + ["data.seq_len=1024", "train.batch_size=8", "train.micro_batch=8",
                     f"train.steps={PRETRAIN_STEPS}", "train.warmup_steps=2", "train.eval_blocks=8"]


def estimate_for(cfg, on_gpu: bool) -> dict:
    """:func:`estimate_memory` for one pretraining config, as the launcher runs it on one device
    (fp32 weights; bf16 autocast activations on a GPU)."""
    from optimlib.bench.estimate import estimate_memory

    est = estimate_memory(cfg.model.name, cfg.optim.name, reparam=cfg.reparam.method,
                          reparam_options=dict(cfg.reparam.options) or None, dtype="float32",
                          activation_dtype="bfloat16" if on_gpu else "float32", micro_batch=cfg.train.micro_batch,
                          seq_len=cfg.data.seq_len, layerwise=bool(getattr(cfg.train, "layerwise", False)),
                          **dict(cfg.optim.kwargs))
    return est.as_dict()


def steady_rate(metrics: list[dict], tokens_per_step: int, first: int) -> float | None:
    """Tokens/s over the steps after ``first``, from the cumulative ``tokens_per_s`` the launcher
    logs at every step (``step * tokens_per_step / elapsed``)."""
    rates = {r["step"]: r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")}
    last = max(rates, default=0)
    if first not in rates or last <= first:
        return None
    elapsed = {k: k * tokens_per_step / rates[k] for k in (first, last)}
    span = elapsed[last] - elapsed[first]
    return (last - first) * tokens_per_step / span if span > 0 else None


def _steady_from(dry_run: bool) -> int:
    return 1 if dry_run else STEADY_FROM


def _one_run(name: str, config: str, extra: list[str], model: str, root: Path, timeout: float | str,
             dry_run: bool, on_gpu: bool) -> dict:
    """One pretraining run (``timeout`` seconds; a string: the reason it is not run)."""
    from optimlib.train.config import load_config

    run_dir = root / name.replace(" ", "_").replace(":", "of")
    overrides = pretrain_overrides(model, run_dir, dry_run) + list(extra)
    row = {"name": name, "config": config, "overrides": overrides}
    cfg = load_config(str(REPO / config), overrides)          # a bad key fails here, before any run
    row["estimate"] = estimate_for(cfg, on_gpu)
    if isinstance(timeout, str):
        return {**row, "status": f"not run: {timeout}"}
    cmd = [sys.executable, str(REPO / "launch" / "gpu_check.py"), "--pretrain-child", "--config", str(REPO / config),
           *overrides]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"stopped by the time guard after {timeout:.0f} s", "seconds": time.time() - start}
    row.update(seconds=time.time() - start, exit_code=proc.returncode,
               notes=[line for line in proc.stderr.splitlines() if line.startswith("gpu_check:")])
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        return {**row, "status": f"failed (exit {proc.returncode})", "stderr_tail": proc.stderr[-2500:]}
    summary = json.loads(summary_path.read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    steady = steady_rate(metrics, tokens_per_step, _steady_from(dry_run))
    tps, mfu = summary.get("tokens_per_s"), summary.get("mfu")
    peak = summary.get("peak_memory_bytes")
    row.update(status="done", tokens_per_s=tps, mfu=mfu, steady_tokens_per_s=steady,
               steady_mfu=mfu * steady / tps if mfu and steady and tps else None,
               peak_memory_bytes=peak, peak_rss_bytes=summary.get("peak_rss_bytes"),
               optimizer_state_bytes=summary.get("optimizer_state_bytes"), param_bytes=summary.get("param_bytes"),
               num_parameters=summary.get("num_parameters"), final_train_loss=summary.get("final_train_loss"),
               steps=summary.get("steps"), peak_over_estimate=peak / row["estimate"]["total"] if peak else None,
               state_over_estimate=(summary["optimizer_state_bytes"] / row["estimate"]["optimizer_states"]
                                    if row["estimate"]["optimizer_states"] else None))
    return row


def _scratch() -> Path:
    """Where the runs write (checkpoints included; each run's folder is removed after it): RAM
    (``/dev/shm``) where it has room for a 350M model's checkpoint, else the temp folder."""
    shm = Path("/dev/shm")
    try:
        roomy = shm.is_dir() and shutil.disk_usage(shm).free > 16 * 2 ** 30
    except OSError:
        roomy = False
    return Path(tempfile.mkdtemp(prefix="optimlib-gpu-check-", dir=shm if roomy else None))


def pretrain(out: Path, deadline: float, dry_run: bool) -> Path:
    """The runs in order; each may take what is left but :data:`MIN_RUN` seconds for every run
    after it, so that as many as fit complete (a run stopped midway has no figures)."""
    import torch

    name = "pretrain"
    on_gpu = torch.cuda.is_available() and not dry_run
    model = PRETRAIN_MODEL if not dry_run else "llama_tiny"
    variants = pretrain_variants(model)
    rows = []
    root = _scratch()
    try:
        for i, (variant, config, extra) in enumerate(variants):
            left = deadline - time.time() - 2
            timeout = left - MIN_RUN * (len(variants) - i - 1)
            if dry_run and i > 0:
                timeout = DRY_RUN_ONLY
            elif timeout < MIN_RUN:
                timeout = f"{max(0.0, left):.0f} s left of the part's budget"
            row = _one_run(variant, config, extra, model, root, timeout, dry_run, on_gpu)
            rows.append(row)
            shutil.rmtree(root / variant.replace(" ", "_").replace(":", "of"), ignore_errors=True)
            write_json(out, name, _record(name, dry_run, status="running", model=model, rows=rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    done = all(r["status"] in ("done", f"not run: {DRY_RUN_ONLY}") for r in rows)
    return write_json(out, name, _record(name, dry_run, status="done" if done else "incomplete", model=model,
                                         steady_from_step=_steady_from(dry_run), rows=rows))


RUNNERS = {"kernel_tests": kernel_tests, "kernel_bench": kernel_bench, "step_time": step_time, "pretrain": pretrain}


def run_part(name: str, out: Path, deadline: float, dry_run: bool) -> None:
    """Run part ``name`` in this process, writing ``<out>/<name>.json``; ``deadline``: epoch seconds."""
    if name not in RUNNERS:
        raise ValueError(f"unknown part {name!r}; parts: {', '.join(RUNNERS)}")
    if math.isfinite(deadline) and deadline < time.time():
        raise ValueError(f"part {name!r} started after its deadline")
    RUNNERS[name](Path(out), deadline, dry_run)
