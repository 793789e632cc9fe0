"""The run folder (``out_dir``) across launches: a finished run is not redone, and a new run does
not land on another run's outputs.

* ``resume=auto`` when the newest intact checkpoint in ``out_dir`` (complete, checksums
  matching) is at or past ``train.steps`` (a cluster scheduler re-queuing a job that finished): nothing is built, run or
  written; the launcher prints "already at step N" and exits 0.  The checkpoint must come from
  the same config (:func:`optimlib.train.checkpoint.check_run`), like any resume.
* A run that does not continue ``out_dir``'s own checkpoints (no ``resume``, ``resume=auto``
  finding none, or ``resume`` naming a checkpoint elsewhere) stops before writing anything when
  ``out_dir`` holds another run's checkpoints (``checkpoints/step_*``) or ``summary.json``:
  its pruning would delete the new checkpoints and keep the old ones, and a later
  ``resume=auto`` would continue the old run under the new run's logs.  ``overwrite=true``
  deletes that run's outputs (:data:`OUTPUTS` and its checkpoints) first.

Every rank reaches the same decision from the same files, before the process group is joined.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from optimlib.train import checkpoint
from optimlib.train.config import ConfigError, RunConfig

OVERWRITE_KEY = "overwrite"
OUTPUTS = ("summary.json", "metrics.jsonl", "loss.png", "tensorboard")
"""What a run writes into ``out_dir`` besides ``checkpoints/``."""
_RUN_CHECKPOINT = re.compile(r"^step_\d{8}(\.tmp)?$")


def _launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def finished(cfg: RunConfig, candidates: list[Path], run: dict | None) -> dict | None:
    """With ``resume=auto``: when ``out_dir``'s newest intact checkpoint is at or past
    ``train.steps``, say so (rank 0) and return the run's summary as it stands (with
    ``steps_this_run = 0``); else None.  ``run``: this run's identity record, checked against the
    checkpoint's (None: not checked)."""
    if cfg.resume != "auto" or not candidates:
        return None
    intact = (found for found in reversed(checkpoint.complete_checkpoints(candidates[0].parent))
              if checkpoint.verify(found[1]) is None)
    step, path = next(intact, (0, None))
    if path is None or step < cfg.train.steps:
        return None                                  # resume (or fall back past a damaged checkpoint)
    checkpoint.check_run(path, run)
    out_dir = Path(cfg.out_dir)
    summary_path = out_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        summary = {"steps": step, "resumed_from": str(path)}
    if _launch_rank() == 0:
        print(f"already at step {step} (train.steps={cfg.train.steps}): the run in '{out_dir}' is finished "
              f"(checkpoint '{path}'{', summary ' + repr(str(summary_path)) if summary_path.is_file() else ''}); "
              f"nothing was run or written. Raise train.steps to train it further.")
    return {**summary, "steps_this_run": 0, "already_finished": True}


def previous_outputs(out_dir: Path) -> list[str]:
    """What of another run ``out_dir`` holds: its checkpoint folders and ``summary.json``."""
    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    found = sorted(p.name for p in root.iterdir() if _RUN_CHECKPOINT.match(p.name)) if root.is_dir() else []
    found = [f"checkpoints/{name}" for name in found]
    return found + (["summary.json"] if (out_dir / "summary.json").exists() else [])


def claim(cfg: RunConfig, candidates: list[Path]) -> None:
    """Before a run that does not continue ``out_dir``'s own checkpoints writes anything: stop
    with a :class:`ConfigError` naming ``out_dir`` and ``overwrite`` when it holds another run's
    outputs; with ``overwrite=true``, delete them (rank 0)."""
    out_dir = Path(cfg.out_dir)
    root = (out_dir / "checkpoints").resolve()
    if candidates and all(Path(p).resolve().parent == root for p in candidates):
        return                                       # continuing this folder's own run
    found = previous_outputs(out_dir)
    if not found:
        return
    if not cfg.overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(f"out_dir '{out_dir}' holds another run's outputs ({shown}); this run would start "
                          f"beside them, and pruning or a later resume=auto would mix the two. Continue that run "
                          f"with resume=auto, choose another out_dir, or set {OVERWRITE_KEY}=true to delete its "
                          f"outputs first")
    if _launch_rank() == 0:
        for name in found:
            if name.startswith("checkpoints/"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in OUTPUTS:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
