"""Benchmarks: measured memory, optimizer step time, basis-refresh time, and the memory estimator.

    python launch/bench.py memory   --model llama_60m [--optimizers adamw,galore_adamw] [--steps 2]
    python launch/bench.py step     --model llama_60m [--reps 5] [--gap 200]
    python launch/bench.py refresh  [--shape 4096x11008] [--rank 512] [--reps 3]
    python launch/bench.py estimate [--models llama_7b,llama_13b] [--setups single,fsdp2:8,fsdp2:8:tp2,zero3:8]
    python launch/bench.py kernels

Every subcommand prints a Markdown table and writes JSON + Markdown (+ a PNG chart for memory
and step) to ``--out`` (default ``runs/bench/<subcommand>``).  Timings on a shared machine are
only meaningful as the ratios of one run (the contenders are interleaved).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"invalid list {text!r}: give comma-separated names")
    return names


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _finish(args, name: str, result: dict, markdown: str, chart=None) -> None:
    from optimlib.bench.report import write_report

    out = Path(args.out or Path("runs") / "bench" / args.command)
    result["command"] = " ".join(["python launch/bench.py"] + list(args.argv))
    paths = write_report(out, name, result, markdown, chart)
    print(markdown)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))


def cmd_memory(args) -> None:
    from optimlib.bench.memory import memory_markdown, run_memory_benchmark
    from optimlib.bench.report import bar_chart

    result = run_memory_benchmark(args.model, _names(args.optimizers), steps=args.steps, grads=args.grads,
                                  device=args.device, dtype=args.dtype, micro_batch=args.micro_batch,
                                  seq_len=args.seq_len, peers=not args.no_peers, isolate=not args.in_process,
                                  seed=args.seed, threads=args.threads, progress=_say)
    rows = result["rows"]

    def chart(path):
        bar_chart(path, [r["name"] for r in rows],
                  {"optimizer state / AdamW": [r["state_ratio"] for r in rows],
                   "peak / AdamW": [r["peak_ratio"] for r in rows]},
                  ylabel="ratio to torch AdamW (same run)", title=f"Memory, {args.model}", reference=1.0)

    _finish(args, "memory", result, memory_markdown(result), chart)


def cmd_step(args) -> None:
    from optimlib.bench.report import bar_chart
    from optimlib.bench.steptime import run_step_benchmark, step_markdown

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_step_benchmark(args.model, _names(args.optimizers), reps=args.reps, warmup=args.warmup,
                                gap=args.gap, device=args.device, dtype=args.dtype, peers=not args.no_peers,
                                seed=args.seed, progress=_say)
    rows = result["rows"]

    def chart(path):
        bar_chart(path, [r["name"] for r in rows], {"amortized step / AdamW(foreach)": [r["ratio"] for r in rows]},
                  ylabel="ratio (same run, interleaved)", title=f"Optimizer step, {args.model}, gap {args.gap}",
                  reference=1.0)

    _finish(args, "step", result, step_markdown(result), chart)


def cmd_refresh(args) -> None:
    from optimlib.bench.refresh import parse_shape, refresh_markdown, run_refresh_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_refresh_benchmark(parse_shape(args.shape), args.rank, tuple(_names(args.projections)),
                                   reps=args.reps, oversample=args.oversample, power_iters=args.power_iters,
                                   decay=args.decay, noise=args.noise, seed=args.seed, device=args.device,
                                   progress=_say)
    _finish(args, "refresh", result, refresh_markdown(result))


def cmd_estimate(args) -> None:
    from optimlib.bench.fit import fit_grid, fit_markdown
    from optimlib.optim import list_optimizers

    optimizers = _names(args.optimizers) or list_optimizers() + ["galore_adamw+moments_dtype=int8",
                                                                 "galore_adamw+moments_dtype=int8+layerwise=true"]
    result = fit_grid(_names(args.models), optimizers, _names(args.setups), dtype=args.dtype,
                      micro_batch=args.micro_batch, seq_len=args.seq_len,
                      activation_checkpointing=args.activation_checkpointing, activation_dtype=args.activation_dtype,
                      gpus_gib=[int(g) for g in _names(args.gpus)])
    _finish(args, "estimate", result, fit_markdown(result))


def cmd_kernels(args) -> None:
    """Per kernel and shape: time, bytes moved, GB/s, fraction of the measured copy bandwidth
    and speed-up over the eager reference (on a CPU only the reference twins run, and each row
    says so)."""
    import torch

    from optimlib.bench.kernels import format_kernel_bench, run_kernel_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_kernel_bench(args.shapes, device, dtype=getattr(torch, args.dtype), repeats=args.repeats,
                            kernels=_names(args.kernels) or None, copy_bytes=args.copy_bytes)
    _finish(args, "kernels", {"benchmark": "kernels", "device": device, "rows": rows},
            format_kernel_bench(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, device="auto"):
        p.add_argument("--out", default=None, help="output folder (default runs/bench/<subcommand>)")
        p.add_argument("--device", default=device, help="auto (CUDA if available), cpu, cuda, cuda:N")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: torch's; the memory workers use 1, bytes do not depend on it)")

    p = sub.add_parser("memory", help="measured bytes of every optimizer (and peers) vs torch AdamW")
    common(p)
    p.add_argument("--model", default="llama_60m")
    p.add_argument("--optimizers", default=None, help="comma-separated subset (default: all registered + peers)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--grads", choices=("random", "real"), default="random")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per backward with --grads real")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence with --grads real")
    p.add_argument("--no-peers", action="store_true", help="skip galore-torch, pytorch_optimizer, adamp, ...")
    p.add_argument("--in-process", action="store_true", help="measure in this process (peaks less clean)")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("step", help="optimizer step time, interleaved, vs torch AdamW (foreach)")
    common(p)
    p.add_argument("--model", default="llama_60m")
    p.add_argument("--optimizers", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed rounds first (2: the compiled CPU twins compile, then specialise once)")
    p.add_argument("--gap", type=int, default=200, help="update_proj_gap for the amortized GaLore step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-peers", action="store_true")
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("refresh", help="GaLore basis refresh: randomized vs exact SVD (time and subspace error)")
    common(p, device="cpu")
    p.add_argument("--shape", default="4096x11008")
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--projections", default="svd,randomized,dct,random")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--power-iters", type=int, default=2)
    p.add_argument("--decay", type=float, default=1.0, help="spectrum s_i = (i+1)^-decay")
    p.add_argument("--noise", type=float, default=0.1, help="noise Frobenius norm / signal's")
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("estimate", help="analytic per-rank memory for a grid of models x methods x engines")
    p.add_argument("--out", default=None)
    p.add_argument("--models", default="llama_1b,llama_7b,llama_13b,llama_70b_mha")
    p.add_argument("--optimizers", default=None,
                   help="registered names, NAME+KEY=VALUE[+...] for a variant (layerwise=true: optimizer in "
                        "backward); default: all + GaLore with int8 moments, with and without layerwise")
    p.add_argument("--setups", default="single,fsdp2:8,zero2:8,zero3:8",
                   help="single, fsdp2:N, fsdp2:N:tpT (FSDP2 over T-way tensor parallelism, the launcher's "
                        "parallel.tp=T), zero0:N .. zero3:N (DeepSpeed), comma-separated")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--activation-dtype", default=None)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--gpus", default="24,80", help="GPU capacities in GiB")
    p.set_defaults(func=cmd_estimate)

    from optimlib.bench.kernels import DEFAULT_SHAPES, parse_shapes

    p = sub.add_parser("kernels", help="fused-kernel time, GB/s and fraction of peak bandwidth vs eager")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (reference path)")
    p.add_argument("--shapes", type=parse_shapes, default=list(DEFAULT_SHAPES), help="comma-separated MxNxR")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    p.add_argument("--kernels", default=None, help="comma-separated kernel names (default: all)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--copy-bytes", type=int, default=None, help="size of the bandwidth probe")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
