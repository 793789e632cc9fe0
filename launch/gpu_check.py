"""Every GPU figure of optimlib from one call of at most 9 minutes: ``make gpu-check``.

    python launch/gpu_check.py [--out DIR] [--budget 540] [--parts kernel_tests,pretrain]
    python launch/gpu_check.py --dry-run --out /tmp/check        # CPU, toy sizes, seconds

It uses the machine's own torch and Triton, downloads nothing and needs no DeepSpeed.  optimlib
is imported from this tree: the installed copy when it is this tree (``make gpu-check`` first
tries ``pip install --no-deps --no-build-isolation --no-index -e .``), otherwise through a
temporary folder of links on ``PYTHONPATH`` (``optimlib`` -> ``optimlib/``), so nothing has to
install.  pytest, which the kernel tests need, is installed
from ``--wheels DIR`` (default ``runs/gpu-wheels``) when missing and the folder has its wheels.

Parts and their time budgets (seconds, of a 540 s = 9 min total; ``--budget`` scales them):

==============  ======  ===========================================================================
part            budget  what
==============  ======  ===========================================================================
environment     (~5)    device, driver, torch / Triton / CUDA / Python versions, commit (in every file)
kernel_tests    150     ``pytest tests/kernels -k cuda``: compiled Triton kernels vs reference twins
kernel_bench    60      kernels at LLaMA-1B (2048x2048, 2048x5461, r 512) and 7B (4096x4096,
                        4096x11008, r 1024): ms, bytes moved, GB/s, fraction of copy bandwidth,
                        speed-up over the eager twin
step_time       100     ``optimizer.step()`` on llama_1b for every registered optimizer (+ bitsandbytes
                        / torchao 8-bit Adam when importable), ratios to ``AdamW(fused=True)``
pretrain        200     ``launch/pretrain.py`` on llama_350m, 30 steps of 8 x 1024 tokens, for adamw,
                        galore_adamw (+ int8 moments, + layer-wise where the launcher has it), smmf,
                        galore_smmf, sltrain, N:M 2:4: tokens/s, MFU, CUDA peak vs the estimator
==============  ======  ===========================================================================

The time guard: each part runs in its own process, killed at its limit -- its budget plus
whatever the parts after it will not need -- and keeps what it wrote; a part that cannot get
its minimum (a quarter of its budget) is skipped, and the summary says so.  Output, under DIR
(default ``$OUT`` when set, else ``runs/gpu_check``): ``environment.json``, one JSON per part,
``gpu_check.json`` (the parts' statuses and times) and ``summary.md``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"


# ----------------------------------------------------------------------------- importing optimlib
def _tree_installed() -> bool:
    spec = importlib.util.find_spec("optimlib")
    return spec is not None and spec.origin is not None and \
        Path(spec.origin).resolve() == (REPO / "optimlib" / "__init__.py").resolve()


def ensure_importable(from_tree: bool = False) -> str:
    """Make ``import optimlib`` load this tree; returns how."""
    if not from_tree and _tree_installed():
        return "installed"
    links = Path(tempfile.mkdtemp(prefix="optimlib-tree-"))
    atexit.register(shutil.rmtree, links, ignore_errors=True)
    package = links / "optimlib"
    package.mkdir()
    for entry in (REPO / "optimlib").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    sys.path.insert(0, str(links))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(links)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    for name in [m for m in sys.modules if m == "optimlib" or m.startswith("optimlib.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return "from the tree (links on PYTHONPATH)"


def ensure_pytest(wheels: Path) -> str | None:
    """Install pytest from local wheels when it is missing; returns what was done, if anything."""
    if importlib.util.find_spec("pytest") is not None:
        return None
    if not any(wheels.glob("pytest-*.whl")):
        return f"pytest is not installed and {wheels} has no pytest wheel"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "pytest"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    importlib.invalidate_caches()
    return f"installed pytest from {wheels}" if proc.returncode == 0 else \
        f"installing pytest from {wheels} failed: {proc.stderr.strip()[-300:]}"


# ----------------------------------------------------------------------------- child processes
def pretrain_child(argv: list[str]) -> None:
    """Run ``launch/pretrain.py argv`` here; where TensorBoard or matplotlib is missing, its event
    file and loss plot are left out (the figures come from ``summary.json`` and ``metrics.jsonl``)."""
    missing = [name for name in ("tensorboard", "matplotlib") if importlib.util.find_spec(name) is None]
    if "tensorboard" in missing:
        stub = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:
            def __init__(self, *args, **kwargs):
                pass

            def add_scalar(self, *args, **kwargs):
                pass

            def close(self):
                pass

        stub.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = stub
    if "matplotlib" in missing:
        from optimlib.train import metrics

        metrics.MetricsWriter.plot = lambda self, path: None
    if missing:
        print(f"gpu_check: {' and '.join(missing)} not installed: no TensorBoard events / loss plot", file=sys.stderr)
    sys.argv = [str(PRETRAIN)] + argv
    runpy.run_path(str(PRETRAIN), run_name="__main__")


def _run_child(name: str, out: Path, limit: float, dry_run: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--out", str(out),
           "--deadline", f"{time.time() + limit - 3:.3f}"] + (["--dry-run"] if dry_run else [])
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        status = f"stopped by the time guard after {limit:.0f} s (results so far kept)"
        tail = ((exc.stdout or b"") + (exc.stderr or b"")).decode(errors="replace")[-2000:] \
            if isinstance(exc.stdout, bytes) else str(exc.stdout or "")[-2000:]
    data = _read(out / f"{name}.json")
    if data and status == "done" and data.get("status", "done") != "done":
        status = data["status"]
    return {"seconds": time.time() - start, "status": status, "output_tail": tail if status != "done" else ""}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the whole check
def run_check(out: Path, budget: float, parts: list[str], dry_run: bool, install: str, wheels: Path) -> int:
    from optimlib.bench.gpucheck import PARTS, TOTAL_BUDGET, allot, environment_info, write_json
    from optimlib.bench.gpucheck_report import summary_markdown

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    env = {**environment_info(), "optimlib_install": install, "pytest": ensure_pytest(wheels) or "present"}
    write_json(out, "environment", env)
    scale = budget / TOTAL_BUDGET
    chosen = [p for p in PARTS if p.name in parts]
    records = []
    for i, part in enumerate(chosen):
        remaining = budget - (time.time() - start) - 5 * scale      # keep a few seconds for the summary
        limit = allot(remaining, part.budget * scale, sum(p.budget for p in chosen[i + 1:]) * scale)
        record = {"name": part.name, "title": part.title, "budget": part.budget * scale, "file": f"{part.name}.json"}
        if limit < part.budget * scale / 4:
            record.update(seconds=0.0, status=f"skipped by the time guard: {max(remaining, 0):.0f} s left "
                                              f"of the {budget:.0f} s budget", file="")
        else:
            print(f"gpu_check: {part.name} (up to {limit:.0f} s) ...", file=sys.stderr, flush=True)
            record.update(_run_child(part.name, out, limit, dry_run))
            if not (out / record["file"]).exists():
                record["file"] = ""
        records.append(record)
        write_json(out, "gpu_check", {"environment": env, "budget": budget, "dry_run": dry_run, "parts": records})
    run = {"environment": env, "budget": budget, "elapsed": time.time() - start, "dry_run": dry_run,
           "parts": records, "optimlib_from": f"{env['optimlib_from']} ({install})"}
    write_json(out, "gpu_check", run)
    text = summary_markdown(out, run)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(r["status"] == "done" for r in records) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--pretrain-child"]:
        ensure_importable()
        pretrain_child(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="parts and budgets: see the module docstring / docs/benchmarks.md")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"),
                        help="output folder (default: $OUT when set, else runs/gpu_check)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (reference twins), seconds")
    parser.add_argument("--budget", type=float, default=540.0, help="total seconds (default 540 = 9 minutes)")
    parser.add_argument("--parts", default=None, help="comma-separated subset of the parts (default: all)")
    parser.add_argument("--wheels", default=str(REPO / "runs" / "gpu-wheels"),
                        help="folder of wheels to install pytest from when it is missing")
    parser.add_argument("--from-tree", action="store_true", help="import this tree through links, even if installed")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    install = ensure_importable(args.from_tree)
    from optimlib.bench.gpucheck import PARTS, run_part

    if args.part:
        run_part(args.part, Path(args.out), args.deadline, args.dry_run)
        return 0
    names = [p.name for p in PARTS]
    parts = names if args.parts is None else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in names]
    if unknown or not parts:
        parser.error(f"invalid --parts {args.parts!r}: choose from {', '.join(names)}")
    if args.budget <= 0:
        parser.error(f"invalid --budget {args.budget}: give seconds > 0")
    return run_check(Path(args.out), args.budget, parts, args.dry_run, install, Path(args.wheels))


if __name__ == "__main__":
    sys.exit(main())
