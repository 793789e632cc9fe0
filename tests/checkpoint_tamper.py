"""Crafted checkpoints for the safety tests: a pickled object whose ``__reduce__`` would create a
marker file, placed into a file of a real checkpoint, and the manifest updated to match (sizes
and SHA-256), as whoever can write the checkpoint directory could do.

Used by tests/reliability/test_checkpoint_safety.py (one process) and
tests/distributed/test_checkpoint_safety_engines.py (FSDP2, DeepSpeed ZeRO-2/3).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import PRETRAIN, launch
from optimlib.train import checkpoint


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest's sizes and checksums for the files as they are now."""
    manifest = checkpoint.read_manifest(ckpt)
    for name in manifest["files"]:
        manifest["files"][name] = (ckpt / name).stat().st_size
        manifest["sha256"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(ckpt) is None


def _own_load(path: Path):
    with torch.serialization.safe_globals(checkpoint.deepspeed_safe_globals() if "_states.pt" in path.name else []):
        return torch.load(path, map_location="cpu", weights_only=True)


def craft_torch_file(ckpt: Path, name: str, marker: Path) -> Path:
    """Add the payload to the ``torch.save`` dict ``ckpt/name``; returns the file."""
    path = ckpt / name
    state = _own_load(path)
    state["notes"] = Payload(marker)
    torch.save(state, path)
    reseal(ckpt)
    return path


def _reseal_dcp(folder: Path) -> None:
    if (folder.parent / checkpoint.MANIFEST).exists():     # inside an FSDP2 checkpoint
        reseal(folder.parent)


def craft_dcp_metadata(folder: Path, marker: Path) -> Path:
    """Add the payload to the ``.metadata`` pickle of the DCP folder ``folder``."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())            # our own, untouched file
    metadata.planner_data["notes"] = Payload(marker)
    path.write_bytes(pickle.dumps(metadata))
    _reseal_dcp(folder)
    return path


def craft_dcp_item(folder: Path, fqn: str, marker: Path) -> tuple[Path, int]:
    """Point the item of ``fqn`` in the DCP folder ``folder`` at a ``torch.save``d payload appended
    to its ``.distcp`` file; returns that file and the payload's offset."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    meta_path = folder / ".metadata"
    metadata = pickle.loads(meta_path.read_bytes())
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save({"value": Payload(marker)}, blob)
    target = folder / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as fh:
        fh.write(blob.getvalue())
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob.getvalue()))
    meta_path.write_bytes(pickle.dumps(metadata))
    _reseal_dcp(folder)
    return target, offset


def copy_checkpoint(src: Path, out_dir: Path, step: int) -> Path:
    """``src``'s step-``step`` checkpoint copied alone into ``out_dir/checkpoints``."""
    dst = checkpoint.step_dir(out_dir / "checkpoints", step)
    shutil.copytree(src, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def launch_refused(args: list[str], launcher: str = "python", code: int = 1) -> str:
    """Run the launcher expecting it to fail (one process: with exit status ``code`` and no
    traceback); its output (stdout and stderr)."""
    with pytest.raises(AssertionError) as info:
        launch(PRETRAIN, args, launcher=launcher)
    text = str(info.value)
    if launcher == "python":
        assert f"failed with {code}\n" in text and "Traceback" not in text, text[-3000:]
    return text
