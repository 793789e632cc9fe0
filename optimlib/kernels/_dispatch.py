"""Which implementation of an ``optimlib`` kernel runs: the Triton kernel or its PyTorch twin.

Every op in :mod:`optimlib.kernels` has two implementations of the same math:

* the **Triton kernel**, compiled for the GPU at its first launch (no build step);
* its **reference twin**, plain PyTorch, written with the same expressions as the optimizer or
  reparameterization that calls it, so that on the reference path the op is bit-for-bit what the
  library computed before the op existed.

Backends (the ``backend=`` argument of every public function, else the environment variable
``OPTIMLIB_KERNELS``, else ``auto``):

``auto``
    CUDA tensors take the Triton kernel (when ``triton`` imports), everything else the twin.
``reference``
    always the twin.
``triton``
    always the kernel.  On CPU tensors that means Triton's interpreter, which runs the kernel with
    NumPy; it is opt-in: ``TRITON_INTERPRET=1`` must be set (at call time; see below), otherwise
    the call raises.  This is how the test suite checks every kernel on a machine without a GPU.

Interpreter, robustly.  Triton decides at *decoration* time whether ``@triton.jit`` builds a
compiled or an interpreted function (``TRITON_INTERPRET`` read when ``triton.language`` and a
kernel's module are imported), and its own library functions (``tl.sum``, ``tl.max``, ...) are
decorated when ``triton`` is first imported -- which ``import torch._dynamo`` already does.  So
an environment variable set "before importing triton" is fragile.  :func:`launch` does not rely
on it: for CPU tensors it interprets the kernel's Python function directly and, for the duration
of the launch, routes every call of a compiled ``JITFunction`` (helpers and Triton's standard
library) to an interpreted twin of it.  ``TRITON_INTERPRET=1`` is then only the user's opt-in
(and it makes Triton's own code take its interpreter branches), and may be set at any time.
Every patch is undone when the launch returns, so interpreted and compiled launches can share a
process (CPU tests next to GPU tests, or :func:`compile_for_cuda` after interpreted runs); how,
and what differs between Triton releases: :mod:`optimlib.kernels._interpreter`.

Also here: device helpers the kernels share (:func:`round_through`, :func:`cast_rn`: rounding
through bf16/fp16 exactly as the GPU and eager PyTorch do), launch recording and ahead-of-time
compilation for sm_90 without a GPU (:func:`recording_launches`, :func:`compile_for_cuda`).
"""

import contextlib
import io
import math
import os
import re
from typing import Callable, Iterable

import torch

from optimlib.kernels._interpreter import interpreted_twin, interpreting

ENV_VAR = "OPTIMLIB_KERNELS"
BACKENDS = ("auto", "triton", "reference")

try:  # triton is a Linux-only dependency; everything but the kernels works without it
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
    triton = None
    InterpretedFunction = JITFunction = None

    class _ConstexprStub:
        """Stands in for ``tl.constexpr`` in kernel signatures when triton is absent."""

    class _TLStub:
        constexpr = _ConstexprStub

    tl = _TLStub()

__all__ = ["ENV_VAR", "BACKENDS", "HAS_TRITON", "triton", "tl", "jit", "resolve_backend", "use_triton", "launch",
           "recording_launches", "compile_for_cuda", "interpreted", "round_through", "cast_rn", "dot_precision",
           "tile_indices", "tile_matmul",
           "interpreter_enabled", "next_pow2", "cdiv", "as_2d", "index_dtype", "KernelUnavailable"]


class KernelUnavailable(RuntimeError):
    """The Triton backend was requested where it cannot run."""


def jit(fn: Callable) -> Callable:
    """``triton.jit`` when triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def resolve_backend(backend: str | None = None) -> str:
    """``backend``, or ``$OPTIMLIB_KERNELS``, or ``"auto"``; validated."""
    value = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    value = (value or "auto").strip().lower()
    if value not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"invalid {source}={value!r}: choose one of {', '.join(BACKENDS)}")
    return value


def interpreter_enabled() -> bool:
    """Whether the user opted into Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(backend: str, tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether an op called with ``tensors`` runs its Triton kernel under ``backend``."""
    backend = resolve_backend(backend)
    if backend == "reference":
        return False
    devices = {t.device.type for t in tensors if t is not None}
    on_cuda = devices == {"cuda"}
    if backend == "auto":
        return on_cuda and HAS_TRITON
    if not HAS_TRITON:
        raise KernelUnavailable("backend='triton' needs the triton package, which is not installed")
    if not on_cuda:
        if devices - {"cpu", "cuda"}:
            raise KernelUnavailable(f"backend='triton' runs on CUDA tensors (or CPU tensors in Triton's "
                                    f"interpreter), got devices {sorted(devices)}")
        if not interpreter_enabled():
            raise KernelUnavailable("backend='triton' on CPU tensors runs Triton's interpreter: set "
                                    "TRITON_INTERPRET=1 to opt in (or use backend='reference')")
    return True


# ----------------------------------------------------------------------------- launching
_LAUNCH_ONLY = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")

# Compiled launches do not contract ``a * b + c`` into one FMA: eager PyTorch rounds the product
# and the sum separately, and the kernels are written to round like their twins.  Explicit, also
# because Triton 3.10 changes the default (3.9 warns when it is left unset).
_COMPILE_OPTIONS = {"enable_fp_fusion": False}


_RECORDERS: list = []


def interpreted(kernel, tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether launching ``kernel`` on ``tensors`` runs Triton's interpreter (CPU tensors, or a
    kernel decorated while ``TRITON_INTERPRET=1``).  Kernels use it to work around interpreter
    gaps: its ``tl.dot`` multiplies the raw bits of bf16 operands, so those are widened to fp32
    first (products of bf16 values are exact in fp32, as on tensor cores)."""
    if InterpretedFunction is not None and isinstance(kernel, InterpretedFunction):
        return True
    return not any(t is not None and t.is_cuda for t in tensors)


@contextlib.contextmanager
def recording_launches(dry: bool = False):
    """Collect ``(kernel, grid, args, kwargs)`` of every launch inside the block into the yielded
    list; with ``dry=True`` nothing runs (to compile the exact launches ahead of time with
    :func:`compile_for_cuda`, or inspect them, without a GPU; the ops then return garbage)."""
    records: list = []
    entry = (records, dry)
    _RECORDERS.append(entry)
    try:
        yield records
    finally:
        _RECORDERS.remove(entry)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``: compiled on CUDA tensors, interpreted on CPU ones."""
    dry = False
    for records, skip in _RECORDERS:
        records.append((kernel, grid, args, kwargs))
        dry = dry or skip
    if dry:
        return
    meta = {k: v for k, v in kwargs.items() if k not in _LAUNCH_ONLY}
    if InterpretedFunction is not None and isinstance(kernel, InterpretedFunction):
        with interpreting(route_jit=False):    # decorated under TRITON_INTERPRET=1: triton interprets everything
            kernel[grid](*args, **meta)
    elif not interpreted(kernel, [a for a in args if isinstance(a, torch.Tensor)]):
        kernel[grid](*args, **{**_COMPILE_OPTIONS, **kwargs})
    else:
        with interpreting():
            interpreted_twin(kernel.fn)[grid](*args, **meta)


# ----------------------------------------------------------------------------- small helpers
def next_pow2(n: int) -> int:
    """The smallest power of two ``>= max(n, 1)``."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def index_dtype(*tensors: torch.Tensor | None):
    """``tl.int32`` for kernel offsets unless some tensor reaches an element offset of 2^31 (then
    ``tl.int64``).  32-bit offsets halve the registers that index tensors take (a 128 x 128 tile of
    64-bit offsets is 128 registers per thread at 8 warps) and keep big tiles from spilling."""
    for t in tensors:
        if t is not None and t.numel():
            extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
            if max(extent, t.numel()) >= 2 ** 31 - 1:
                return tl.int64
    return tl.int32


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """A 2-D *view* of ``t`` (0-/1-D: one row; N-D: rows of the last dimension), sharing storage
    so that kernels can write through it; raises if no such view exists."""
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        return t.reshape(1, t.numel())  # a view for any 1-D stride
    return t.view(math.prod(t.shape[:-1]), t.shape[-1])


@jit
def round_through(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to the nearest ``DTYPE`` value (ties to even) and return it as fp32.

    Kernels call it wherever eager PyTorch would store an intermediate in a half dtype, so the
    kernel rounds like its twin.  bf16 is done with integer arithmetic (``x + 0x7fff + lsb``, then
    drop the low 16 bits) because Triton's interpreter truncates on ``.to(tl.bfloat16)``, while
    the GPU rounds to nearest; this way both give the GPU's answer (finite inputs).
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@jit
def tile_indices(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row, column) tile of an M x N output that program ``pid`` computes, in groups of
    ``GROUP_M`` tile rows so that neighbouring programs reuse the same input tiles (L2 reuse)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@jit
def tile_matmul(x_ptr, y_ptr, rm, rn, M, N, K, sx0, sx1, sy0, sy1, PRECISION: tl.constexpr,
                DOT_UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The fp32 ``(BM, BN)`` tile ``X[rm, :] @ Y[:, rn]`` of an ``(M, K) @ (K, N)`` product
    (strides ``sx*``, ``sy*``; out-of-range rows, columns and ``k`` read as zero)."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sx0 + kk[None, :] * sx1, mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        y = tl.load(y_ptr + kk[:, None] * sy0 + rn[None, :] * sy1, mask=(kk[:, None] < K) & (rn[None, :] < N),
                    other=0.0)
        if DOT_UPCAST:  # interpreter: its tl.dot does not decode bf16
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@jit
def cast_rn(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest-even on the GPU and in the interpreter alike (use it
    for every store of an fp32 value into a half-precision tensor)."""
    return round_through(x, DTYPE).to(DTYPE)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` that mirrors torch's own fp32 matmul setting (TF32 only
    where ``torch.backends.cuda.matmul.allow_tf32`` allows it); half types use tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------- ahead-of-time compiling
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                 torch.bool: "i1"}


def compile_for_cuda(kernel, args: tuple, kwargs: dict, arch: int = 90) -> dict:
    """Compile one recorded launch (:func:`recording_launches`) for an NVIDIA GPU of compute
    capability ``arch`` (90: H100/H200) down to a cubin, without a GPU (Triton's frontend, LLVM
    and its bundled ``ptxas``).  Returns ``{"kernel", "registers", "spill_bytes", "shared_bytes",
    "compiled"}`` (registers and spills as ``ptxas -v`` reports them).

    The signature is derived as Triton's launcher does: tensors become typed pointers, ints fit
    ``i32`` or ``i64`` (an int equal to 1 is specialised to the constant 1, as Triton does at run
    time), floats ``fp32``.  Pointer-alignment hints are not derived (they only enable wider
    vector loads).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, JITFunction):
        raise RuntimeError("compile_for_cuda needs a compiled-mode kernel: the kernels were decorated while "
                           "TRITON_INTERPRET=1 was set (import optimlib.kernels without it)")
    fn, jitted = kernel.fn, kernel
    names = jitted.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_ONLY})
    signature, constexprs = {}, {}
    for p in jitted.params:
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            # A launch recorded on CPU tensors widened bf16 dot operands for the interpreter;
            # on the GPU they go to the tensor cores as they are.
            constexprs[p.name] = False if p.name == "DOT_UPCAST" else value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not p.do_not_specialize:
                signature[p.name] = "constexpr"
                constexprs[p.name] = 1
            else:
                signature[p.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {p.name}={value!r}")
    options = {**_COMPILE_OPTIONS, **{k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}}
    src = ASTSource(fn=jitted, signature=signature, constexprs=constexprs)
    log = io.StringIO()
    with _always_compile(), contextlib.redirect_stdout(log):   # a cache hit would skip ptxas and its report
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    if "Used " not in text:          # Triton before 3.5 does not print ptxas' report: ask ptxas again
        text = _ptxas_report(compiled.asm["ptx"], arch)
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    return {"kernel": fn.__name__, "registers": int(regs[-1]) if regs else None,
            "spill_bytes": int(spills[-1]) if spills else None, "shared_bytes": compiled.metadata.shared,
            "compiled": compiled}


@contextlib.contextmanager
def _always_compile():
    """Triton compiles (no cache hit) and prints ptxas' report where it can (``triton.knobs``,
    Triton 3.4 and later; the ``TRITON_ALWAYS_COMPILE`` variable before)."""
    try:
        from triton import knobs
    except ImportError:
        saved = os.environ.get("TRITON_ALWAYS_COMPILE")
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TRITON_ALWAYS_COMPILE", None)
            else:
                os.environ["TRITON_ALWAYS_COMPILE"] = saved
        return
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        yield


def _ptxas_report(ptx: str, arch: int) -> str:
    """``ptxas -v`` on ``ptx`` with the flags Triton compiles with (line info, no FMA contraction,
    its ``--gpu-name``), through the ptxas Triton uses."""
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler

    try:
        from triton import knobs
        ptxas = knobs.nvidia.ptxas.path
    except ImportError:
        ptxas = compiler.get_ptxas(arch)[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [ptxas, "-lineinfo", "--fmad=false", "-v",
               f"--gpu-name={compiler.sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr
