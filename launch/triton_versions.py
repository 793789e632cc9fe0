"""Run the kernel tests (``tests/kernels``) under other Triton releases, each in a side venv.

    python launch/triton_versions.py 3.6.0 3.9.0 3.2.0
    python launch/triton_versions.py 3.6.0 --markdown runs/triton-versions.md -- -k smmf

For every version ``X`` given, a virtual environment ``<root>/py3XX-triton-X`` is created (kept
and reused with ``--reuse``) with

* torch, pinned to the running interpreter's torch: the local wheel from ``/opt/wheels`` (or
  ``--find-links``) when there is one, else ``torch==<version>`` from the index.  A CPU wheel of
  torch declares no dependency on triton, so any ``triton==X`` installs beside it;
* ``triton==X``, and what the kernel tests import: numpy, pytest, pytest-timeout and the
  ``adamp`` package (the oracle of the AdamP twin);
* optimlib itself with ``pip install --no-deps -e .`` (its other dependencies are not needed by
  the kernel tests).

Then ``python -m pytest tests/kernels`` runs there (with ``TRITON_INTERPRET`` and
``OPTIMLIB_KERNELS`` removed from the environment: the tests set them per test), and a table of
pass/fail counts per version is printed -- and written as Markdown with ``--markdown FILE``,
with the command, date and commit.

Only ``triton.language`` and Triton's interpreter run in these tests, plus Triton's compiler
(frontend, LLVM and its bundled ``ptxas``) in the sm_90 compile test; torch's own use of triton
(inductor, ``torch.compile``) is not exercised, so a torch/triton pair that torch does not
support for ``torch.compile`` can still be tested here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_REQUIREMENTS = ["numpy>=1.24", "pytest>=8", "pytest-timeout>=2.3", "adamp==0.3.0"]
SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


def _torch_version() -> str:
    import torch

    return torch.__version__


def torch_requirement(find_links: list[str]) -> str:
    """The local torch wheel matching this interpreter's torch and Python, else ``torch==V``."""
    version = _torch_version()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in find_links:
        hits = sorted(glob.glob(os.path.join(folder, f"torch-{version.replace('+', '*')}-{tag}-*.whl")))
        if hits:
            return hits[0]
    return f"torch=={version.split('+')[0]}"


def _run(cmd: list[str], log, timeout: float, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log.write(proc.stdout + proc.stderr)
    log.flush()
    return proc


def build_venv(version: str, root: Path, torch_req: str, find_links: list[str], reuse: bool, log,
               timeout: float) -> Path:
    """Create (or reuse) the venv for ``triton==version``; returns its python."""
    venv = root / f"py{sys.version_info.major}{sys.version_info.minor}-triton-{version}"
    python = venv / "bin" / "python"
    stamp = venv / ".ready"
    if reuse and stamp.exists():
        return python
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], log, timeout)
    links = [arg for folder in find_links for arg in ("--find-links", folder)]
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "-q", *links]
    for step in ([torch_req, f"triton=={version}", *TEST_REQUIREMENTS], ["--no-deps", "-e", str(REPO)]):
        proc = _run(pip + step, log, timeout)
        if proc.returncode:
            raise RuntimeError(f"pip install {' '.join(step)} failed in {venv} (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-2000:]}")
    stamp.write_text(torch_req + "\n")
    return python


def run_kernel_tests(python: Path, pytest_args: list[str], log, timeout: float) -> dict:
    """``pytest tests/kernels`` in the venv of ``python``: counts, seconds, first failures."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OPTIMLIB_KERNELS", "PYTHONPATH")}
    env["COLUMNS"] = "400"          # pytest's short summary keeps the failure messages
    probe = _run([str(python), "-c", "import torch, triton; print(torch.__version__, triton.__version__)"],
                 log, 300, env=env)
    versions = probe.stdout.split() if probe.returncode == 0 else ["?", "?"]
    start = time.perf_counter()
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "tests/kernels", *pytest_args]
    try:
        proc = _run(cmd, log, timeout, env=env)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        text, code = f"timed out after {timeout:.0f} s", None
    seconds = time.perf_counter() - start
    counts = {}
    tail = [line for line in text.splitlines() if SUMMARY.search(line) and (" in " in line or "no tests" in line)]
    for n, kind in SUMMARY.findall(tail[-1] if tail else ""):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    failures = [line[len("FAILED "):] for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"torch": versions[0], "triton": versions[-1], "exit": code, "seconds": seconds, "counts": counts,
            "failures": failures}


def _reason(failures: list[str]) -> str:
    """The distinct failure reasons (pytest's ``-r`` lines carry ``test - message``)."""
    reasons = []
    for line in failures:
        msg = line.split(" - ", 1)[1] if " - " in line else line
        msg = msg.strip()[:120]
        if msg not in reasons:
            reasons.append(msg)
    return "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")


def results_table(results: list[dict]) -> str:
    head = "| triton | torch | passed | failed | errors | skipped | seconds | result | failures |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["counts"]
        ok = r["exit"] == 0 and not c.get("failed") and not c.get("errors") and c.get("passed", 0) > 0
        lines.append(f"| {r['triton']} | {r['torch']} | {c.get('passed', 0)} | {c.get('failed', 0)} | "
                     f"{c.get('errors', 0)} | {c.get('skipped', 0)} | {r['seconds']:.0f} | "
                     f"{'pass' if ok else 'FAIL'} | {_reason(r['failures']).replace('|', '/') or r.get('error', '')} |")
    return "\n".join(lines)


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="arguments after -- go to pytest")
    parser.add_argument("versions", nargs="+", help="Triton releases, e.g. 3.6.0 3.9.0")
    parser.add_argument("--root", default=str(REPO / "runs" / "triton-venvs"), help="where the venvs live")
    parser.add_argument("--find-links", action="append", default=None,
                        help="folder of local wheels (default /opt/wheels when it exists)")
    parser.add_argument("--torch", default=None, help="torch requirement or wheel (default: this torch, pinned)")
    parser.add_argument("--reuse", action="store_true", help="reuse a venv that was completed before")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pip step and per test run")
    parser.add_argument("--markdown", default=None, help="also write the results as Markdown here")
    args = parser.parse_args(own)
    links = args.find_links if args.find_links is not None else [p for p in ["/opt/wheels"] if os.path.isdir(p)]
    torch_req = args.torch or torch_requirement(links)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for version in args.versions:
        log_path = root / f"triton-{version}.log"
        print(f"triton {version}: building the venv and running tests/kernels (log: {log_path}) ...", flush=True)
        with open(log_path, "w") as log:
            try:
                python = build_venv(version, root, torch_req, links, args.reuse, log, args.timeout)
                result = run_kernel_tests(python, pytest_args, log, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result = {"torch": "?", "triton": version, "exit": None, "seconds": 0.0, "counts": {},
                          "failures": [], "error": str(exc).splitlines()[0]}
        results.append(result)
        print(results_table([result]).splitlines()[-1], flush=True)
    table = results_table(results)
    command = " ".join(["python launch/triton_versions.py"] + argv)
    print("\n" + table)
    if args.markdown:
        text = (f"`{command}` on {dt.date.today().isoformat()}, commit {_commit()}, Python "
                f"{sys.version.split()[0]}, torch requirement `{Path(torch_req).name}`:\n\n{table}\n")
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    bad = [r for r in results if r["exit"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
