"""Opening checkpoint files without running code from them.

A pickle can name any importable function and call it while it is read (``__reduce__``), so a
checkpoint from a shared disk, a colleague's bucket or a download is only as trustworthy as the
person who last wrote it; the manifest's SHA-256 sums guard against corruption, not against
whoever writes the directory.  Every file of a checkpoint is therefore read here first, the safe
way, before anything of it is loaded:

* ``torch.save`` files (``state.pt``, ``meta.pt``, DeepSpeed's ``*_model_states.pt`` and
  ``*_optim_states.pt``, every item inside FSDP2's ``*.distcp`` files):
  ``torch.load(weights_only=True)``, which admits tensors, containers and plain values, plus an
  explicit allow-list: for DeepSpeed's files the three classes :func:`deepspeed_safe_globals`
  names, for the others nothing.  The check maps tensors to the ``meta`` device, so it reads the
  pickles and not the tensor data of whole files.
* ``torch.distributed.checkpoint``'s ``.metadata`` (a plain pickle): :class:`DCPMetadataUnpickler`,
  which admits DCP's own metadata classes and the few torch and ``pathlib`` types they hold.

Anything else raises :class:`UnsafeCheckpointError` naming the file and the global it asked
for, and nothing of the checkpoint is loaded.  Where DeepSpeed or DCP then read the files
themselves, they read them inside :func:`guarded_loads` (every ``torch.load`` of the process
forced to ``weights_only=True`` with the same allow-list, through torch's
``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), and DCP's metadata through :class:`CheckedFileSystemReader`;
a file swapped between the check and the load is refused too.

``resume_trusted=true`` (and ``convert --trusted``) skips all of this and loads the files as the
engines do by themselves (``weights_only=False``, ``pickle.load``): for checkpoints one trusts
like code, in formats the check does not admit.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from pathlib import Path

import torch

TRUSTED_KEY = "resume_trusted"
_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no usable checkpoint could be read."""


class CheckpointRefused(CheckpointError):
    """A checkpoint is intact but must not be loaded; the resume stops (no fallback to an older
    checkpoint, which would hide the problem)."""


class UnsafeCheckpointError(CheckpointRefused):
    """A checkpoint file holds something a weights-only read does not admit (code could run)."""

    def __init__(self, path: Path | str, what: str, part: str = ""):
        self.path, self.what, self.part = str(path), what, part
        kind = "checkpoint folder" if Path(path).is_dir() else "checkpoint file"
        super().__init__(f"{kind} '{path}'{part} was refused: it holds {what}; loading it could run "
                         f"code, so it was not loaded. Use a checkpoint you wrote, or, only if you trust whoever "
                         f"wrote this one like code, set {TRUSTED_KEY}=true (convert: --trusted)")

    def __reduce__(self):  # DCP pickles each rank's exception to gather them
        return type(self), (self.path, self.what, self.part)


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its ZeRO optimizer files pickle (besides tensors and builtins).

    DeepSpeed writes ``zero_pp_rank_*_optim_states.pt`` itself, with its ``LossScaler``, the
    ``ZeroStageEnum`` and ``fragment_address`` tuples inside; its ``mp_rank_*_model_states.pt``
    needs nothing extra.  Load them without arbitrary unpickling by allow-listing these::

        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            torch.load(path, weights_only=True)
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


# ------------------------------------------------------------------ torch.save files
def _refusal(message: str) -> str:
    """What a weights-only unpickling error refused, from torch's message."""
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return f"the global '{found.group(1)}'"
    found = re.search(r"(Unsupported [^\n]*)", message)
    return f"an object a weights-only read does not admit ({found.group(1) if found else message.strip()[:200]})"


def load_file(path: Path | str, *, allow: tuple | list = (), map_location="cpu", trusted: bool = False,
              source=None, part: str = ""):
    """``torch.load(path, weights_only=True)`` with only ``allow`` added to torch's own list;
    :class:`UnsafeCheckpointError` naming ``path`` for anything else.  ``source``: read from this
    file object instead (``path`` and ``part`` then name it).  ``trusted``: ``weights_only=False``."""
    if trusted:
        return torch.load(source or path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(source or path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(path, _refusal(str(exc)), part) from None


def check_file(path: Path | str, *, allow: tuple | list = (), source=None, part: str = "") -> None:
    """Raise :class:`UnsafeCheckpointError` unless ``path`` reads with :func:`load_file`
    (tensors go to the ``meta`` device: the pickle is checked, the tensor data not read)."""
    load_file(path, allow=allow, map_location="meta", source=source, part=part)


def _refusal_in(exc: BaseException) -> BaseException | None:
    """The refusal ``exc`` is or carries: DCP reports each rank's error inside a
    ``CheckpointException`` (``failures``: rank -> (exception, traceback)), and a failed metadata
    read as another exception raised while handling it."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (pickle.UnpicklingError, UnsafeCheckpointError)):
            return e
        failures = getattr(e, "failures", None)
        todo += [pair[0] for pair in failures.values()] if isinstance(failures, dict) else []
        todo += [e.__cause__, e.__context__]
    return None


@contextlib.contextmanager
def guarded_loads(where: Path | str, *, allow: tuple | list = (), trusted: bool = False, reader=None):
    """Around an engine's own reading of the checkpoint at ``where``: every ``torch.load`` of this
    process is ``weights_only=True`` whatever its caller asks (DeepSpeed's checkpoint engine and
    DCP's planner ask for ``weights_only=False``), with only ``allow`` allow-listed, through torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``; a refusal raises :class:`UnsafeCheckpointError` naming
    ``where`` (or the file ``reader``, a :func:`dcp_reader`, refused).  ``trusted``: nothing is
    changed."""
    if trusted:
        yield
        return
    before = os.environ.get(_FORCE_ENV)
    os.environ[_FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(list(allow)):
            yield
    except BaseException as exc:  # noqa: BLE001 - DCP wraps each rank's error in a BaseException
        refused = getattr(reader, "refusal", None) or _refusal_in(exc)
        if refused is None:
            raise
        if isinstance(refused, UnsafeCheckpointError):
            raise refused from None
        raise UnsafeCheckpointError(where, _refusal(str(refused))) from None
    finally:
        if before is None:
            os.environ.pop(_FORCE_ENV, None)
        else:
            os.environ[_FORCE_ENV] = before


# ------------------------------------------------------------------ torch.distributed.checkpoint
def _dcp_allowed() -> dict:
    """``(module, name) -> object`` the metadata unpickler admits."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
               ("torch", "Size"): torch.Size,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout}
    for name, value in vars(metadata).items():   # DCP's own metadata classes (and enums)
        if isinstance(value, type) and value.__module__ == metadata.__name__:
            allowed[(metadata.__name__, name)] = value
    for name, value in vars(torch).items():      # dtypes (torch.float32 pickles as a global)
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls   # StorageMeta.checkpoint_id
    return allowed


class DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file admitting only DCP's metadata types (see
    :func:`_dcp_allowed`); any other global raises :class:`UnsafeCheckpointError`."""

    def __init__(self, file, path: Path | str):
        super().__init__(file)
        self.path = path
        self.allowed = _dcp_allowed()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(self.path, f"the global '{module}.{name}'")
        return found

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(self.path, f"a persistent id ({str(pid)[:80]})")


def read_dcp_metadata(path: Path | str):
    """The ``Metadata`` in the DCP ``.metadata`` file ``path``, read by :class:`DCPMetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as fh:
        try:
            metadata = DCPMetadataUnpickler(fh, path).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise UnsafeCheckpointError(path, f"no readable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(path, f"a {type(metadata).__name__} instead of DCP's Metadata")
    return metadata


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class CheckedFileSystemReader(FileSystemReader):
        """DCP's ``FileSystemReader`` reading ``.metadata`` through :func:`read_dcp_metadata`; a
        refusal is also kept as ``refusal`` (DCP reports a failed metadata read by its message)."""

        refusal: UnsafeCheckpointError | None = None

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            try:
                metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
            except UnsafeCheckpointError as exc:
                self.refusal = self.refusal or exc
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedFileSystemReader


def dcp_reader(path: Path | str, *, trusted: bool = False):
    """The storage reader for the DCP checkpoint folder ``path``: checked unless ``trusted``."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path) if trusted else _reader_class()(path)


def check_dcp(folder: Path | str) -> None:
    """Check a DCP checkpoint folder: its ``.metadata``, then every item its metadata points to
    (each a ``torch.save`` stream inside a ``*.distcp`` file) with :func:`check_file`."""
    folder = Path(folder)
    metadata = read_dcp_metadata(folder / ".metadata")
    items = sorted(((str(getattr(info, "relative_path", "")), info) for info in (metadata.storage_data or {}).values()),
                   key=lambda pair: (pair[0], int(pair[1].offset)))
    opened, fh = None, None
    try:
        for name, info in items:
            if not name or Path(name).name != name or name in (".", ".."):
                raise UnsafeCheckpointError(folder / ".metadata", f"a storage path outside its folder ({name!r})")
            part = f" (its item at byte {info.offset})"
            if getattr(info, "transform_descriptors", None):
                raise UnsafeCheckpointError(folder / name, f"stream transforms {list(info.transform_descriptors)}, "
                                                           f"which the check does not read", part)
            if name != opened:
                if fh is not None:
                    fh.close()
                fh, opened = open(folder / name, "rb"), name
            fh.seek(int(info.offset))
            check_file(folder / name, source=io.BytesIO(fh.read(int(info.length))), part=part)
    finally:
        if fh is not None:
            fh.close()
