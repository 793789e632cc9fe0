"""Atomic, resumable checkpoints for the three engines.

Layout: ``<out_dir>/checkpoints/step_00000100/`` holding the engine's files and a
``manifest.json`` written last.  A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed
into place only when every rank has finished and the manifest is on disk (temp + fsync +
rename), so a crash never leaves a directory that looks complete.  ``resume=auto`` takes the
newest directory with a manifest whose files all have the recorded sizes.

What is saved: the model, the optimizer (its state is tensors only, so single-process files load
with ``torch.load(weights_only=True)``), the step — which is also the data position and the
LR-schedule position, because batches and the schedule are pure functions of the step — and
the RNG state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _manifest_ok(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and _manifest_ok(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def save(engine, root: Path, step: int, meta: dict) -> Path:
    """Write a checkpoint of ``engine`` at ``step`` atomically; every rank must call it."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if engine.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    meta = {**meta, "step": step, "engine": engine.name, "world_size": engine.world_size}
    _SAVERS[engine.name](engine, tmp, meta)
    engine.barrier()
    if engine.rank == 0:
        _fsync_tree(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = tmp / MANIFEST
        with open(manifest, "w") as fh:
            json.dump({"step": step, "engine": engine.name, "world_size": engine.world_size, "files": files},
                      fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(root)
    engine.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (rank 0 only)."""
    if keep <= 0:
        return
    for _, path in complete_checkpoints(Path(root))[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load(engine, path: Path) -> dict:
    """Restore ``engine`` from the checkpoint at ``path``; returns its metadata."""
    path = Path(path)
    if not _manifest_ok(path):
        raise FileNotFoundError(f"'{path}' is not a complete optimlib checkpoint (missing or mismatched {MANIFEST})")
    manifest = read_manifest(path)
    if manifest["engine"] != engine.name or manifest["world_size"] != engine.world_size:
        raise ValueError(f"checkpoint '{path}' was written by engine={manifest['engine']} on "
                         f"{manifest['world_size']} rank(s); this run is engine={engine.name} on "
                         f"{engine.world_size} rank(s)")
    return _LOADERS[engine.name](engine, path)


# ------------------------------------------------------------------ single process
def _save_single(engine, tmp: Path, meta: dict) -> None:
    state = {"model": engine.model.state_dict(), "optimizer": engine.optimizer.state_dict(),
             "meta": meta, "rng": torch.get_rng_state()}
    torch.save(state, tmp / "state.pt")


def _load_single(engine, path: Path) -> dict:
    state = torch.load(path / "state.pt", map_location=engine.device, weights_only=True)
    engine.model.load_state_dict(state["model"])
    engine.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    return state["meta"]


# ------------------------------------------------------------------ FSDP2 (DCP)
def _save_fsdp2(engine, tmp: Path, meta: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    if engine.rank == 0:
        torch.save({"meta": meta, "rng": torch.get_rng_state()}, tmp / "meta.pt")


def _load_fsdp2(engine, path: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(engine.model, engine.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    extra = torch.load(path / "meta.pt", weights_only=True)
    torch.set_rng_state(extra["rng"])
    return extra["meta"]


# ------------------------------------------------------------------ DeepSpeed
def _save_deepspeed(engine, tmp: Path, meta: dict) -> None:
    engine.model.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state={"optimlib_meta": meta},
                                 save_latest=False)


def _load_deepspeed(engine, path: Path) -> dict:
    _, client = engine.model.load_checkpoint(str(path.parent), tag=path.name)
    if client is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint at '{path}'")
    return client["optimlib_meta"]


_SAVERS = {"single": _save_single, "fsdp2": _save_fsdp2, "deepspeed": _save_deepspeed}
_LOADERS = {"single": _load_single, "fsdp2": _load_fsdp2, "deepspeed": _load_deepspeed}


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """``auto`` -> newest complete checkpoint under ``root`` (or None); a path -> that path."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        found = complete_checkpoints(Path(root))
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"config key 'resume': checkpoint '{path}' does not exist")
    return path

