"""What the integration workers (``*_worker.py``, run as scripts from this folder) share."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from optimlib.distributed.teardown import exit_process, leave_process_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from parity_common import full_params  # noqa: E402  (every parameter in full, DTensors gathered)

__all__ = ["finish", "full_params"]


def finish(results: dict, out: str) -> NoReturn:
    """Save ``results`` to ``out`` from rank 0, leave the process group together, end the process."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(results, out)
    leave_process_group()
    exit_process(0)
