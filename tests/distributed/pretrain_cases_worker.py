"""Run ``launch/pretrain.py`` several times, one command line after another, in one process under
``python``, ``torchrun`` or ``deepspeed`` (one launch instead of one per run):
``WORKER CASES.json``, where the file holds a list of argument lists, each what would follow
``launch/pretrain.py`` (``["--config", "configs/default.yaml", "out_dir=...", ...]``); the
deepspeed launcher's ``--local_rank=N`` is passed on to each.  A run that exits non-zero stops
the worker with its code.  The runs share one process group: a run's engine only waits for the
other ranks when it closes, and the group is left once, after the last run (joining a second
default group through the same torchrun store does not complete)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch.distributed as dist

from optimlib.distributed.teardown import exit_process, launched_distributed, leave_process_group
from optimlib.train import engine

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"


def main(cases: Path, launcher_args: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    engine.leave_process_group = lambda: dist.barrier() if dist.is_initialized() else None
    for argv in json.loads(cases.read_text()):
        code = script.main([*launcher_args, *argv])
        if code:
            print(f"launch/pretrain.py {' '.join(argv)}: exit code {code}", file=sys.stderr)
            return code
    leave_process_group()
    return 0


if __name__ == "__main__":
    local = [a for a in sys.argv[1:] if a.startswith("--local")]   # the deepspeed launcher puts it first
    code = main(Path(next(a for a in sys.argv[1:] if a not in local)), local)
    if launched_distributed():
        exit_process(code)
    sys.exit(code)
