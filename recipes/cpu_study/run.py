"""The CPU study: every registered optimizer and reparameterization on llama_tiny, equal steps and
tokens, a 3-point learning-rate sweep each (see README.md here and ``optimlib/bench/study.py``).

    nice -n 10 .venv/bin/python recipes/cpu_study/run.py                 # sweep, timing, report
    .venv/bin/python recipes/cpu_study/run.py --report-only              # rebuild the report from the runs
    .venv/bin/python recipes/cpu_study/run.py --only smmf,sltrain --set train.steps=50 \\
        --runs runs/cpu_study_small --out /tmp/study_small                # a subset, shorter
    nice -n 10 .venv/bin/python recipes/cpu_study/run.py --only fira_adamw --merge   # add to results.json

``--merge`` keeps the rows of the existing ``<out>/results.json`` for the methods not run now
(``optimlib/bench/study_merge.py``): it refuses, before training, when that file's base config or
a kept method's settings differ from the study file's, and after the sweep when the re-run
baseline does not reproduce its final eval loss; each row names the timing run its step-time
ratios came from.

Resumable: a run whose ``summary.json`` exists is skipped, and the step timing is kept in
``<runs>/timing.json`` (``--retime`` measures it again).  Writes ``results.json``,
``results.md`` and ``study.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import torch

    from optimlib.bench.study import collect, load_study, run_sweep, time_train_steps, write_outputs
    from optimlib.bench.study_merge import MergeError, check_compatible, merge_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "study.yaml"), help="the study file")
    parser.add_argument("--runs", default=str(REPO / "runs" / "cpu_study"), help="where the runs go")
    parser.add_argument("--out", default=str(HERE), help="where results.json/.md and study.png go")
    parser.add_argument("--only", default=None, help="comma-separated methods (the baseline is always kept)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the base config (train.steps=50)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    parser.add_argument("--timing-reps", type=int, default=15)
    parser.add_argument("--timing-warmup", type=int, default=3)
    parser.add_argument("--retime", action="store_true", help="measure the step times again")
    parser.add_argument("--no-timing", action="store_true", help="skip the step-time measurement")
    parser.add_argument("--report-only", action="store_true", help="no runs, no timing: report what exists")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of <out>/results.json for the methods not run now (same base config; "
                             "the baseline must reproduce its loss)")
    args = parser.parse_args(argv)
    previous = full = None
    try:
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        study = load_study(args.config, args.set, only=only)
        if args.merge:
            existing = Path(args.out) / "results.json"
            if not existing.exists():
                raise ValueError(f"--merge: {existing} does not exist")
            previous = json.loads(existing.read_text())
            full = load_study(args.config, args.set)
            check_compatible(previous, full, rerun=[m.name for m in study.methods])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if not args.report_only:
        run_sweep(study, runs, log=log)
    timing_path = runs / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    if timing is not None and set(timing["methods"]) != {m.name for m in study.methods}:
        timing = None if not args.report_only else timing
    if not (args.report_only or args.no_timing) and (timing is None or args.retime):
        timing = time_train_steps(study, reps=args.timing_reps, warmup=args.timing_warmup, log=log)
        runs.mkdir(parents=True, exist_ok=True)
        timing_path.write_text(json.dumps(timing, indent=2))
    result = collect(study, runs, timing)
    result["command"] = "python recipes/cpu_study/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if previous is not None:
        try:
            result = merge_results(previous, result, full)
        except MergeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
    paths = write_outputs(result, args.out)
    print((Path(args.out) / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
