"""Atomic, resumable checkpoints for the four engines.

Layout: ``<out_dir>/checkpoints/step_00000100/`` holding the engine's files and a
``manifest.json`` written last.  A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed
into place only when every rank has finished and the manifest is on disk (temp + fsync +
rename), so a crash never leaves a directory that looks complete.  The manifest records each
file's size and SHA-256.  ``resume=auto`` tries the complete checkpoints newest first: one whose
files no longer match their checksums (bit rot, a truncated copy) or that fails to load is
skipped with a warning, and the previous good one is used.  A write that fails (a full disk)
removes its ``.tmp`` directory and raises :class:`CheckpointError`; the previous checkpoints are
untouched.

What is saved: the model, the optimizer (its state is tensors only, so single-process files load
with ``torch.load(weights_only=True)``), the step — which is also the data position and the
LR-schedule position, because batches and the schedule are pure functions of the step — and
the RNG state.

Engines: a checkpoint resumes natively (exactly) under the engine and world size that wrote it.
The DDP engine's checkpoint is the single engine's files, written by rank 0 (every rank holds the
same model and optimizer state), so single and DDP checkpoints resume under either, on any world
size, exactly (:data:`FULL_STATE_ENGINES`).
A single-process checkpoint also resumes under FSDP2 and an FSDP2 one under one process or
another number of FSDP2 ranks: the manifest names the writer and :mod:`optimlib.train.reshard`
converts at load time (``python -m optimlib.train.convert SRC DST`` writes any of them as a
single-engine checkpoint).  A DeepSpeed ZeRO-1/2/3 checkpoint resumes natively under DeepSpeed on
the same world size, and through :mod:`optimlib.train.zero_checkpoint` under DeepSpeed on another
world size, one process or FSDP2 (which also load one-process and FSDP2 checkpoints into
DeepSpeed); its files load with ``torch.load(weights_only=True)`` once
:func:`deepspeed_safe_globals` are allow-listed.

Safety: before anything of a checkpoint is loaded, every file the engine will read passes the
checks of :mod:`optimlib.train.safe_load` (no pickle may name code), unless ``resume_trusted``.

Identity: the manifest records the run that wrote the checkpoint (``run``: its config without
the keys that may change on resume, :func:`optimlib.train.config.run_identity`, and that
config's SHA-256).  :func:`load_first_good` refuses a checkpoint of another config with
:class:`ForeignCheckpointError` unless ``resume_other_config``; a checkpoint without the record
(written before it existed) is accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from optimlib.train import reshard, safe_load, zero_checkpoint
from optimlib.train.safe_load import (CheckpointError, CheckpointRefused,  # noqa: F401 (public names here)
                                      UnsafeCheckpointError, deepspeed_safe_globals)

MANIFEST = "manifest.json"
FULL_STATE_ENGINES = ("single", "ddp")
"""Engines whose checkpoint is one ``state.pt`` of full tensors, the same for any world size."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")
OTHER_CONFIG_KEY = "resume_other_config"


class ForeignCheckpointError(CheckpointRefused):
    """The checkpoint was written by a run with another config (its manifest says so)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """The manifest is there and every file it lists has its recorded size (cheap)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is not intact (sizes, then SHA-256 of every file), or None."""
    path = Path(path)
    if not _manifest_ok(path):
        return f"missing or mismatched {MANIFEST}"
    for name, digest in read_manifest(path).get("sha256", {}).items():
        if _sha256(path / name) != digest:
            return f"file '{name}' does not match its checksum"
    return None


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


def _seal(tmp: Path, final: Path, step: int, engine_name: str, world_size: int, run: dict | None,
          tp: int = 1) -> None:
    """fsync the files in ``tmp``, write their manifest (``run``: the writer's identity, see
    :func:`run_record`; ``tp``: its tensor-parallel degree, recorded when > 1), rename ``tmp`` to
    ``final`` (one process)."""
    try:
        _fsync_tree(tmp)
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        names = [str(p.relative_to(tmp)) for p in paths]
        manifest = {"step": step, "engine": engine_name, "world_size": world_size,
                    "files": {n: p.stat().st_size for n, p in zip(names, paths)},
                    "sha256": {n: _sha256(p) for n, p in zip(names, paths)}}
        if run is not None:
            manifest["run"] = run
        if tp > 1:
            manifest["tp"] = tp
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write the checkpoint of step {step} under '{final.parent}' "
                              f"({exc.strerror or exc}); the earlier checkpoints there are intact") from exc


def save(engine, root: Path, step: int, meta: dict, run: dict | None = None) -> Path:
    """Write a checkpoint of ``engine`` at ``step`` atomically; every rank must call it.
    ``run``: the writing run's identity for the manifest (:func:`run_record`)."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if engine.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    meta = {**meta, "step": step, "engine": engine.name, "world_size": engine.world_size}
    failed = None
    try:
        _SAVERS[engine.name](engine, tmp, meta)
    except OSError as exc:
        failed = exc
    if engine.any_rank(failed is not None):
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{failed.strerror or failed}" if failed is not None else "it failed on another rank"
        raise CheckpointError(f"could not write the checkpoint of step {step} under '{root}' ({reason}); "
                              f"the earlier checkpoints there are intact") from failed
    if engine.rank == 0:
        _seal(tmp, final, step, engine.name, engine.world_size, run, engine.tp)
    engine.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (rank 0 only)."""
    if keep <= 0:
        return
    for _, path in complete_checkpoints(Path(root))[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def check_files(path: Path, manifest: dict) -> None:
    """Raise :class:`UnsafeCheckpointError` unless every file the checkpoint's engine reads passes
    :mod:`optimlib.train.safe_load`'s checks (loads nothing; every rank reaches the same verdict)."""
    path = Path(path)
    if manifest["engine"] == "fsdp2":
        safe_load.check_dcp(path / "dcp")
        safe_load.check_file(path / "meta.pt")
    elif manifest["engine"] == "deepspeed":
        allow = deepspeed_safe_globals()
        for file in sorted(path.rglob("*.pt")):         # every file DeepSpeed could open, listed or not
            safe_load.check_file(file, allow=allow)
    else:
        safe_load.check_file(path / "state.pt")


def load(engine, path: Path, *, trusted: bool = False) -> dict:
    """Restore ``engine`` from the checkpoint at ``path``; returns its metadata.

    Every file is checked first (:func:`check_files`) and read the safe way, unless ``trusted``
    (``resume_trusted``).  A checkpoint of the same engine on the same world size loads natively
    (exactly).  A single or FSDP2 checkpoint loads into the other of the two, or into FSDP2 on
    another world size, through :mod:`optimlib.train.reshard`; a DeepSpeed ZeRO checkpoint into
    DeepSpeed on another world size, one process or FSDP2, and a single or FSDP2 checkpoint into
    DeepSpeed, through :mod:`optimlib.train.zero_checkpoint`."""
    path = Path(path)
    if not _manifest_ok(path):
        raise FileNotFoundError(f"'{path}' is not a complete optimlib checkpoint (missing or mismatched {MANIFEST})")
    manifest = read_manifest(path)
    _check_tensor_parallel(engine, path, manifest)
    same_files = manifest["engine"] in FULL_STATE_ENGINES and engine.name in FULL_STATE_ENGINES
    native = (manifest["engine"] == engine.name
              and (manifest["world_size"] == engine.world_size or engine.name in FULL_STATE_ENGINES))
    if not native:
        _check_convertible(engine, path, manifest)
    if not trusted:
        check_files(path, manifest)
    if native or same_files:
        return _LOADERS[engine.name](engine, path, trusted)
    if zero_checkpoint.ENGINE in (manifest["engine"], engine.name):
        return zero_checkpoint.load_converted(engine, path, manifest, trusted=trusted)
    return reshard.load_converted(engine, path, manifest, trusted=trusted)


def _check_tensor_parallel(engine, path: Path, manifest: dict) -> None:
    """A tensor-parallel checkpoint resumes only as it was written: same ``parallel.tp``, engine and
    world size (its state lies on the 2-D mesh; no converter reads it)."""
    saved, now = int(manifest.get("tp", 1)), int(getattr(engine, "tp", 1))
    if (saved > 1 or now > 1) and (saved, manifest["engine"], manifest["world_size"]) != (now, engine.name,
                                                                                          engine.world_size):
        raise ValueError(f"checkpoint '{path}' was written by engine={manifest['engine']} with parallel.tp={saved} on "
                         f"{manifest['world_size']} rank(s); this run is engine={engine.name} with parallel.tp={now} "
                         f"on {engine.world_size} rank(s).  A tensor-parallel checkpoint resumes only with the "
                         f"parallel.tp and number of ranks that wrote it")


def _check_convertible(engine, path: Path, manifest: dict) -> None:
    """Raise ``ValueError`` unless the checkpoint at ``path`` converts into ``engine``."""
    same_files = manifest["engine"] in FULL_STATE_ENGINES and engine.name in FULL_STATE_ENGINES
    convertible = (*reshard.CONVERTIBLE, zero_checkpoint.ENGINE)
    if not same_files and (manifest["engine"] not in convertible or engine.name not in convertible):
        raise ValueError(f"checkpoint '{path}' was written by engine={manifest['engine']} on "
                         f"{manifest['world_size']} rank(s); this run is engine={engine.name} on "
                         f"{engine.world_size} rank(s). Checkpoints convert between engines "
                         f"{', '.join(convertible)} (any world size), {' and '.join(FULL_STATE_ENGINES)} "
                         f"load each other's")
    if any(getattr(m, "replicated_parameters", ()) for m in engine.module.modules()):
        raise ValueError(f"checkpoint '{path}' was written by engine={manifest['engine']} on "
                         f"{manifest['world_size']} rank(s); this run is engine={engine.name} on "
                         f"{engine.world_size} rank(s), and its model has layers whose parameters change shape "
                         f"(dynamic rank), which are checkpointed beside the engine's files: resume it under the "
                         f"engine and world size that wrote it")


# ------------------------------------------------------------------ single process
def write_single(final: Path, state: dict, run: dict | None = None) -> Path:
    """Write ``state`` (``{"model", "optimizer", "meta", "rng"}``) as the single-engine checkpoint
    directory ``final`` (atomic, with its manifest recording ``run``); used by the converter's
    command line."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save(state, tmp / "state.pt")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write '{final}' ({exc.strerror or exc})") from exc
    _seal(tmp, final, int(state["meta"]["step"]), "single", 1, run)
    return final


def _save_single(engine, tmp: Path, meta: dict) -> None:
    """One ``state.pt``, written by rank 0 (DDP: every rank holds the same state)."""
    if engine.rank != 0:
        return
    state = {"model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict(),
             "meta": meta, "rng": torch.get_rng_state()}
    replicated = engine.replicated_state_dict()
    if replicated is not None:  # DDP keeps them out of the module (engine.split_replicated)
        state["replicated"] = replicated
    torch.save(state, tmp / "state.pt")


def _load_single(engine, path: Path, trusted: bool) -> dict:
    state = safe_load.load_file(path / "state.pt", map_location=engine.device, trusted=trusted)
    engine.module.load_state_dict(state["model"])
    # a checkpoint converted from DeepSpeed keeps its param groups (one per parameter): regrouped here
    engine.optimizer.load_state_dict(reshard.fit_groups(state["optimizer"], engine.module, engine.optimizer))
    engine.load_replicated_state_dict(state.get("replicated"))
    if "rng" in state:  # one converted from DeepSpeed has none
        torch.set_rng_state(state["rng"].cpu())
    return state["meta"]


# ------------------------------------------------------------------ FSDP2 (DCP)
def _save_fsdp2(engine, tmp: Path, meta: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    if engine.rank == 0:
        torch.save({"meta": meta, "rng": torch.get_rng_state(), "replicated": engine.replicated_state_dict()},
                   tmp / "meta.pt")


def _load_fsdp2(engine, path: Path, trusted: bool) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    reader = safe_load.dcp_reader(path / "dcp", trusted=trusted)
    with safe_load.guarded_loads(path / "dcp", trusted=trusted, reader=reader):
        dcp.load(state, storage_reader=reader)
    set_state_dict(engine.model, engine.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    extra = safe_load.load_file(path / "meta.pt", trusted=trusted)
    engine.load_replicated_state_dict(extra.get("replicated"))
    torch.set_rng_state(extra["rng"])
    return extra["meta"]


# ------------------------------------------------------------------ DeepSpeed
def _save_deepspeed(engine, tmp: Path, meta: dict) -> None:
    client = {"optimlib_meta": meta, "optimlib_replicated": engine.replicated_state_dict()}
    engine.model.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state=client, save_latest=False)


def _load_deepspeed(engine, path: Path, trusted: bool) -> dict:
    with safe_load.guarded_loads(path, allow=deepspeed_safe_globals(), trusted=trusted):
        _, client = engine.model.load_checkpoint(str(path.parent), tag=path.name)
    if client is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint at '{path}'")
    engine.load_replicated_state_dict(client.get("optimlib_replicated"))
    return client["optimlib_meta"]


_SAVERS = {"single": _save_single, "ddp": _save_single, "fsdp2": _save_fsdp2, "deepspeed": _save_deepspeed}
_LOADERS = {"single": _load_single, "ddp": _load_single, "fsdp2": _load_fsdp2, "deepspeed": _load_deepspeed}


def resolve_resume(resume: str | None, root: Path) -> list[Path]:
    """The checkpoints to try, best first: ``auto`` -> every ``step_XXXXXXXX`` directory under
    ``root``, newest first (none: a fresh start); a path -> that path alone."""
    if resume is None or resume == "":
        return []
    if resume == "auto":
        root = Path(root)
        found = sorted((int(m.group(1)), child) for child in (root.iterdir() if root.is_dir() else ())
                       if (m := _STEP_DIR.match(child.name)) and child.is_dir())
        return [path for _, path in reversed(found)]
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"config key 'resume': checkpoint '{path}' does not exist")
    return [path]


def run_record(identity: dict) -> dict:
    """The manifest's ``run`` entry for a run whose identity is ``identity`` (a flat mapping of
    config keys, :func:`optimlib.train.config.run_identity`): the mapping and its SHA-256."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return {"config_sha256": hashlib.sha256(text.encode()).hexdigest(), "config": json.loads(text)}


def check_run(path: Path, run: dict | None) -> None:
    """Raise :class:`ForeignCheckpointError` when the manifest of the checkpoint at ``path`` records
    a run other than ``run`` (:func:`run_record`); no record on either side passes."""
    theirs = read_manifest(path).get("run")
    if run is None or not theirs or theirs.get("config_sha256") == run["config_sha256"]:
        return
    mine, old = run["config"], theirs.get("config", {})
    diffs = [f"{k} = {old.get(k, '(unset)')!r} there, {mine.get(k, '(unset)')!r} here"
             for k in sorted(set(mine) | set(old)) if old.get(k) != mine.get(k)]
    raise ForeignCheckpointError(
        f"checkpoint '{path}' was written by a run with another config ({'; '.join(diffs[:6]) or 'a changed config'}"
        f"{'; ...' if len(diffs) > 6 else ''}); resume it with the config that wrote it, set "
        f"{OTHER_CONFIG_KEY}=true to continue it under this config, or start the new run in another out_dir")


def load_first_good(engine, candidates: list[Path], *, run: dict | None = None,
                    trusted: bool = False) -> tuple[Path, dict] | tuple[None, None]:
    """Load the first of ``candidates`` that verifies and loads; warn about each one skipped.

    Every rank checks the same files, so all ranks skip the same checkpoints.  With a single
    candidate (an explicit ``resume`` path) a bad checkpoint is an error, not a fresh start.
    A checkpoint of another run (``run``: this run's :func:`run_record`; None: not checked) or
    one that fails the safety checks (unless ``trusted``) stops the resume: a
    :class:`CheckpointRefused`, never a fallback to an older checkpoint.
    """
    problems = []
    for path in candidates:
        problem = verify(path)
        if problem is None:
            check_run(path, run)
            try:
                return path, load(engine, path, trusted=trusted)
            except CheckpointRefused:
                raise
            except Exception as exc:  # noqa: BLE001 - any unreadable file means "try the previous one"
                problem = f"loading failed: {type(exc).__name__}: {exc}"
        problems.append(f"'{path}': {problem}")
        warnings.warn(f"skipping checkpoint '{path}' ({problem})", stacklevel=2)
    if problems:
        raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(problems))
    return None, None

