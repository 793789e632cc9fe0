"""Running compiled-mode Triton kernels in Triton's interpreter, on every supported Triton release.

:func:`optimlib.kernels._dispatch.launch` interprets a kernel's Python function directly for CPU
tensors (see its module docstring for why ``TRITON_INTERPRET`` alone is fragile).  Triton's
interpreter runs a kernel by *patching* ``triton.language`` -- its builtins (``tl.load``,
``tl.program_id``, ...), ``tl.range``, ``tl.tensor``'s dunder methods, ``tl.dtype.to_ir`` -- so that
they compute with NumPy.  Releases differ in how that is undone:

* Triton 3.6 and later return a scope from ``_patch_lang`` that restores the patches, but a
  device function's patches of modules its kernel did not patch are left in place;
* Triton 3.3 to 3.5 restore nothing: after one interpreted launch, ``tl.program_id`` and the
  other builtins stay patched, and a later GPU compilation in the same process fails
  (``'InterpreterBuilder' object has no attribute 'grid_idx'``).

:func:`interpreting` therefore snapshots the attributes of every object the interpreter patches
and restores them when the launch returns, whatever the release did -- so interpreted and
compiled launches can share a process (CPU tests next to GPU tests, or
:func:`~optimlib.kernels._dispatch.compile_for_cuda` after interpreted runs).  For the duration
of the launch it also

* routes every call of a compiled ``JITFunction`` (kernel helpers, Triton's standard library) to
  an interpreted twin of it (:func:`interpreted_twin`);
* gives interpreted scalars an ``__index__`` that NumPy 2.4 accepts: the interpreter holds a
  scalar (e.g. the ``C`` of ``range(0, C, BC)``) as a one-element array, and Triton 3.6 and
  earlier convert it with ``int(array)``, which NumPy 2.4 refuses for arrays of one dimension
  (``TypeError: only 0-dimensional arrays can be converted to Python scalars``).
"""

import contextlib
import threading
from typing import Callable

__all__ = ["interpreted_twin", "interpreting"]

_TWINS: dict = {}
_LOCK = threading.RLock()
_MISSING = object()


def interpreted_twin(fn: Callable):
    """The (cached) ``InterpretedFunction`` of a kernel's or helper's Python function."""
    from triton.runtime.interpreter import InterpretedFunction

    twin = _TWINS.get(fn)
    if twin is None:
        twin = _TWINS[fn] = InterpretedFunction(fn)
    return twin


def _scalar_index(self) -> int:
    return int(self.handle.data.item())


def _patched_objects() -> list:
    """Every object whose attributes Triton's ``_patch_lang`` may replace."""
    import triton.language as tl

    objects = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype]
    descriptor = getattr(tl.core, "tensor_descriptor_base", None)
    if descriptor is not None:
        objects.append(descriptor)
    return objects


@contextlib.contextmanager
def _restoring(objects: list):
    """Put back every attribute of ``objects`` that changes inside the block (added ones removed)."""
    saved = [(obj, dict(vars(obj))) for obj in objects]
    try:
        yield
    finally:
        for obj, before in saved:
            now = vars(obj)
            for name in [n for n in now if n not in before]:
                delattr(obj, name)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(obj, name, value)


def _with_scalar_index(patch_lang: Callable) -> Callable:
    """Triton's ``_patch_lang``, then :func:`_scalar_index` as ``tl.tensor.__index__`` (through the
    release's scope where it has one, so that the scope's own restore stays consistent)."""
    import triton.language as tl

    def patch(fn):
        scope = patch_lang(fn)
        if scope is not None and hasattr(scope, "set_attr"):
            scope.set_attr(tl.core.tensor, "__index__", _scalar_index)
        else:
            tl.core.tensor.__index__ = _scalar_index
        return scope
    return patch


def _call_interpreted(self, *args, **kwargs):
    """Run a compiled-mode JIT function's Python under the interpreter, as
    ``InterpretedFunction.__call__`` does, undoing its patches when it returns."""
    from triton.runtime import interpreter

    fn = interpreted_twin(self.fn).rewrite()
    with _restoring(_patched_objects()):
        interpreter._patch_lang(self.fn)
        return fn(*args, **kwargs)


@contextlib.contextmanager
def interpreting(route_jit: bool = True):
    """The context of one interpreted launch (see the module docstring); ``route_jit=False`` for a
    kernel decorated under ``TRITON_INTERPRET=1``, whose helpers Triton interprets itself."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    with _LOCK, _restoring(_patched_objects()):
        call, patch_lang = JITFunction.__call__, interpreter._patch_lang
        if route_jit:
            JITFunction.__call__ = _call_interpreted
        interpreter._patch_lang = _with_scalar_index(patch_lang)
        try:
            yield
        finally:
            JITFunction.__call__ = call
            interpreter._patch_lang = patch_lang
