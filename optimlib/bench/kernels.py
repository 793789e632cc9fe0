r"""Kernel benchmark: time, bytes moved, achieved bandwidth and speed-up of every fused kernel.

    rows = run_kernel_bench([(4096, 4096, 128), (4096, 11008, 512)], "cuda")
    print(format_kernel_bench(rows))
    python -m optimlib.bench.kernels --device cuda --shapes 4096x4096x128,4096x11008x512

For each kernel family and weight shape ``(m, n)`` at GaLore/SLTrain rank ``r`` the benchmark
builds the operands a step of that method would see, times the op on the Triton path and on its
eager reference twin (the unfused PyTorch the library ran before), and reports

* ``time_ms`` -- median wall time of one call (CUDA events on a GPU);
* ``bytes`` -- the traffic the *fused* kernel needs at minimum: every operand read once and every
  result written once (formulas per case below; partial sums and index arrays included);
* ``gbps`` -- ``bytes / time``, and ``frac_copy`` -- that over the device's copy bandwidth,
  measured here with a large ``Tensor.copy_`` (read + write, ``2 x size / time``), which is what a
  memory-bound kernel can reach (the design's bar: >= 0.8 for the memory-bound kernels);
  ``frac_spec`` -- over the vendor's HBM figure, where the device is in :data:`SPEC_GBPS`;
* ``speedup`` -- eager reference time / kernel time;
* ``tflops`` for the matmul-shaped kernels (back-projection, SLTrain), which are not
  memory-bound at every shape.

On a machine without CUDA only the reference path runs (``path="reference"``) and every row
says so: there are no kernel timings, GB/s are those of the eager code on the CPU, and
``speedup`` is ``None``.  Timings on shared CPU machines are only meaningful as ratios within one
run (DESIGN.md, "Measuring").
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Iterable

import torch

from optimlib import kernels as K
from optimlib.formats.quantize import num_blocks, quantize_blockwise
from optimlib.optim.smmf import smmf_matrix_shape

__all__ = ["run_kernel_bench", "format_kernel_bench", "copy_bandwidth", "DEFAULT_SHAPES", "SPEC_GBPS", "main"]

DEFAULT_SHAPES = ((4096, 4096, 128), (4096, 4096, 512), (4096, 11008, 128), (4096, 11008, 512))

# Vendor HBM bandwidth (GB/s) by device-name fragment, most specific first.
SPEC_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
             ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0))


def _spec_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, gbps in SPEC_GBPS:
        if fragment in name:
            return gbps
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured copy bandwidth in GB/s (``2 * nbytes / time`` of ``dst.copy_(src)``)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() * 4 / seconds / 1e9


# ----------------------------------------------------------------------------- cases
class _Case:
    """One op at one shape: ``run(backend)`` returns the callable to time."""

    def __init__(self, kernel: str, shape: str, dtype: torch.dtype, nbytes: int, run: Callable[[str], Callable],
                 flops: int | None = None):
        self.kernel, self.shape, self.dtype = kernel, shape, dtype
        self.nbytes, self.run, self.flops = nbytes, run, flops


def _cases(m: int, n: int, r: int, device: torch.device, dtype: torch.dtype, tokens: int,
           density: float) -> Iterable[_Case]:
    e = torch.tensor([], dtype=dtype).element_size()
    f32 = torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=f32).to(dt)

    def rand(*shape, dt=dtype):
        return torch.rand(*shape, generator=gen, device=device, dtype=f32).to(dt)

    tag, plain = f"{m}x{n} r={r}", f"{m}x{n}"
    kept = max(m, n)                                   # GaLore "std" keeps the longer side

    # 1. Adam moments + direction on the (kept, r) projected gradient: read m, v, g; write m, v, n.
    mo, vo, go = randn(kept, r) * 0.1, rand(kept, r) * 0.01, randn(kept, r)
    yield _Case("adam_lowrank_update_", f"{kept}x{r}", dtype, 6 * kept * r * e,
                lambda b: lambda: K.adam_lowrank_update_(mo, vo, go, beta1=0.9, beta2=0.999, eps=1e-6, backend=b))

    # 1b. 8-bit moments (block 256): codes 1 B and absmax 4 B / block each, read and written; g; n.
    block = 256
    nb = num_blocks(r, block)
    cm, am = quantize_blockwise(randn(kept, r, dt=f32) * 0.1, signed=True, block=block)
    cv, av = quantize_blockwise(rand(kept, r, dt=f32) * 0.1, signed=False, block=block)
    q_bytes = 2 * 2 * (kept * r + 4 * kept * nb) + 2 * kept * r * e
    yield _Case("adam8bit_lowrank_update_", f"{kept}x{r}", dtype, q_bytes,
                lambda b: lambda: K.adam8bit_lowrank_update_(cm, am, cv, av, go, beta1=0.9, beta2=0.999, eps=1e-6,
                                                             block=block, noise=(0, 2, 3, 0), backend=b))

    # 2. GaLore back-projection + update: W read and written, the two factors read.
    W = randn(m, n, dt=f32)
    A, B = randn(m, r) * 0.01, randn(r, n) * 0.01
    yield _Case("galore_backproject_update_", tag, dtype, 2 * m * n * 4 + (m + n) * r * e,
                lambda b: lambda: K.galore_backproject_update_(W, A, B, scale=0.25, step_size=1e-3, lr=1e-3,
                                                               weight_decay=0.1, backend=b), flops=2 * m * n * r)

    # 3. SMMF on the whole (m, n) weight's square matricization: g read, direction written (fp32),
    #    sign bits read and written, row factors, one partial column-sum row per program (~N/16).
    rows, cols = smmf_matrix_shape(m * n)
    numel = rows * cols
    g_s = randn(rows, cols, dt=f32)
    fac = dict(exp_avg_sq_row=rand(rows, dt=f32), exp_avg_sq_col=rand(cols, dt=f32), exp_avg_row=rand(rows, dt=f32),
               exp_avg_col=rand(cols, dt=f32),
               exp_avg_sign=torch.randint(0, 256, ((numel + 7) // 8,), device=device, dtype=torch.uint8))
    yield _Case("smmf_update_", f"{rows}x{cols}", f32, 8 * numel + 2 * ((numel + 7) // 8) + 2 * numel // 16,
                lambda b: lambda: K.smmf_update_(g_s, beta1=0.9, beta2=0.5, eps=1e-8, backend=b, **fac))

    # 4. AdamP: stats pass reads g, m, v, w and writes m, v; apply pass reads m, v, w, writes w.
    wp, gp, mp, vp = randn(m, n, dt=f32), randn(m, n, dt=f32), randn(m, n, dt=f32) * 0.1, rand(m, n, dt=f32) * 0.01
    yield _Case("adamp_update_", plain, f32, 10 * m * n * 4,
                lambda b: lambda: K.adamp_update_(wp, gp, mp, vp, step=5, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                                  weight_decay=0.1, delta=0.1, wd_ratio=0.1, backend=b))

    # 5. SLTrain: compose W (written once; factors, values, int32 indices read) and the gradients
    #    (dy, x read; dB, dA, dvalues written; the dense dW never exists on the kernel path).
    nnz = int(density * m * n)
    idx = torch.sort(torch.randperm(m * n, generator=gen, device=device)[:nnz]).values.to(torch.int32)
    vals = randn(nnz) * 0.01
    Bs, As = randn(m, r) * 0.01, randn(r, n) * 0.01
    yield _Case("sltrain_compose", tag + f" nnz={nnz}", dtype, m * n * e + (m + n) * r * e + nnz * (e + 4),
                lambda b: lambda: K.sltrain_compose(Bs, As, vals, idx, backend=b), flops=2 * m * n * r)
    dy, x = randn(tokens, m) * 0.01, randn(tokens, n)
    yield _Case("sltrain_grads", tag + f" T={tokens}", dtype,
                tokens * (m + n) * e + (m + n) * r * e + nnz * (e + 4),
                lambda b: lambda: K.sltrain_grads(dy, x, Bs, As, idx, backend=b),
                flops=2 * tokens * m * n + 8 * tokens * r * (m + n))

    # 6. N:M (2:4): W read; W~ and the 1-byte mask written.  Backward: g, W, mask read; dW written.
    #    beta is a 0-d device tensor, as the N:M layer passes it (a float would add a fill per call).
    w_nm, g_nm, beta_nm = randn(m, n), randn(m, n), torch.zeros((), device=device)
    yield _Case("nm_mask_apply", plain, dtype, 2 * m * n * e + m * n,
                lambda b: lambda: K.nm_mask_apply(w_nm, 2, 4, beta_nm, backend=b))
    mask = K.nm_mask_apply(w_nm, 2, 4, backend="reference")[1]
    yield _Case("nm_grad", plain, dtype, 3 * m * n * e + m * n,
                lambda b: lambda: K.nm_grad(g_nm, w_nm, mask, beta=beta_nm, lam=2e-4, backend=b))

    # 7. Compander forward (theta read, W written) and backward (g, theta read; d theta written).
    theta = randn(m, n) * 0.02
    a, k = torch.full((1,), 0.05, device=device), torch.full((1,), 2.0, device=device)
    yield _Case("compander (fwd)", plain, dtype, 2 * m * n * e,
                lambda b: lambda: K.compander(theta, a, k, backend=b))
    yield _Case("compander (bwd)", plain, dtype, 3 * m * n * e,
                lambda b: lambda: torch.ops.optimlib.compander_bwd(g_nm, theta, a, k, True, b))


# ----------------------------------------------------------------------------- driver
def run_kernel_bench(shapes: Iterable[tuple[int, int, int]] = DEFAULT_SHAPES, device: torch.device | str = "cuda", *,
                     dtype: torch.dtype = torch.bfloat16, tokens: int = 2048, density: float = 0.03,
                     repeats: int | None = None, warmup: int | None = None,
                     kernels: Iterable[str] | None = None, copy_bytes: int | None = None) -> list[dict]:
    """Benchmark every kernel family at each ``(m, n, r)`` of ``shapes`` on ``device``.

    ``dtype``: the gradient/operand dtype (moments and master weights follow the library's
    choices: SMMF factors, AdamP state and the GaLore master weight are fp32).  ``tokens``: the
    batch of the SLTrain backward.  ``kernels``: names to keep (default all).  ``copy_bytes``: size
    of the bandwidth probe (default 1 GiB on CUDA, 256 MiB on CPU).  Returns one dict per
    (kernel, shape) with ``kernel, shape, dtype, device, path, time_ms, bytes, gbps, frac_copy,
    frac_spec, tflops, ref_time_ms, ref_gbps, speedup, copy_gbps, note``.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available; pass device='cpu' for the reference timings")
    on_gpu = device.type == "cuda" and K.HAS_TRITON
    repeats = repeats if repeats is not None else (20 if on_gpu else 3)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)
    copy_gbps = copy_bandwidth(device, copy_bytes)
    spec = _spec_gbps(device)
    keep = set(kernels) if kernels is not None else None
    rows, done = [], set()
    for m, n, r in shapes:
        for case in _cases(int(m), int(n), int(r), device, dtype, tokens, density):
            if (keep is not None and case.kernel not in keep) or (case.kernel, case.shape) in done:
                continue                     # (kernels without a rank run once per weight shape)
            done.add((case.kernel, case.shape))
            ref_s = _time(case.run("reference"), device, repeats, warmup)
            ker_s = _time(case.run("triton"), device, repeats, warmup) if on_gpu else None
            t = ker_s if on_gpu else ref_s
            gbps = case.nbytes / t / 1e9
            rows.append({
                "kernel": case.kernel, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "path": "triton" if on_gpu else "reference",
                "time_ms": t * 1e3, "bytes": case.nbytes, "gbps": gbps, "frac_copy": gbps / copy_gbps,
                "frac_spec": gbps / spec if spec else None,
                "tflops": case.flops / t / 1e12 if case.flops else None,
                "ref_time_ms": ref_s * 1e3, "ref_gbps": case.nbytes / ref_s / 1e9,
                "speedup": ref_s / ker_s if on_gpu else None, "copy_gbps": copy_gbps,
                "note": "" if on_gpu else "no GPU: eager reference path timed, no Triton kernel",
            })
    return rows


def format_kernel_bench(rows: list[dict]) -> str:
    """A fixed-width table of :func:`run_kernel_bench`'s rows."""
    if not rows:
        return "(no rows)"
    head = (f"{'kernel':28s} {'shape':26s} {'dtype':8s} {'path':9s} {'ms':>9s} {'MB':>9s} {'GB/s':>8s} "
            f"{'of copy':>7s} {'TFLOP/s':>8s} {'ref ms':>9s} {'speedup':>7s}")
    lines = [f"device: {rows[0]['device']}   copy bandwidth: {rows[0]['copy_gbps']:.1f} GB/s", head, "-" * len(head)]
    for row in rows:
        tf = f"{row['tflops']:8.2f}" if row["tflops"] is not None else f"{'':8s}"
        sp = f"{row['speedup']:7.2f}" if row["speedup"] is not None else f"{'-':>7s}"
        lines.append(f"{row['kernel']:28s} {row['shape']:26s} {row['dtype']:8s} {row['path']:9s} "
                     f"{row['time_ms']:9.3f} {row['bytes'] / 1e6:9.1f} {row['gbps']:8.1f} {row['frac_copy']:7.2f} "
                     f"{tf} {row['ref_time_ms']:9.3f} {sp}")
    if rows[0]["path"] == "reference":
        lines.append("note: no CUDA device -- these are timings of the eager reference path; no kernel was timed.")
    return "\n".join(lines)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        parts = [int(p) for p in item.lower().split("x")]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not MxNxR")
        out.append(tuple(parts))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m optimlib.bench.kernels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES),
                        help="comma-separated MxNxR (default: 4096x4096 and 4096x11008 at r=128 and 512)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    args = parser.parse_args(argv)
    rows = run_kernel_bench(args.shapes, args.device, dtype=getattr(torch, args.dtype), tokens=args.tokens,
                            repeats=args.repeats, kernels=args.kernels.split(",") if args.kernels else None)
    print(format_kernel_bench(rows))
    return rows



if __name__ == "__main__":
    main()
