"""Shared test helpers: launching 2-rank CPU runs with torchrun or the deepspeed launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank (what FSDP2, a device mesh and the flat-partition mapping need)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def cpu_env(**extra) -> dict:
    """Environment for a CPU multi-process run: gloo, DeepSpeed's CPU accelerator, 1 thread/rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "CROSS_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def launch(script: str | Path, args: list[str], *, launcher: str = "python", nproc: int = 2,
           timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script args`` under ``python``, ``torchrun`` or ``deepspeed`` with ``nproc`` CPU ranks."""
    port = str(free_port())
    if launcher == "python":
        cmd = [sys.executable, str(script), *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", str(script), *args]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", port, str(script), *args]
    else:
        raise ValueError(launcher)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(**(env or {})), capture_output=True, text=True,
                              timeout=timeout)
    finally:  # a run that failed or timed out leaves DeepSpeed's /dev/shm buffers behind
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


# A tiny, fast pretraining config shared by the launcher tests.
TINY_RUN = ["model.name=llama_tiny", "data.max_bytes=400000", "data.seq_len=32", "train.batch_size=8",
            "train.micro_batch=2", "train.steps=6", "train.warmup_steps=2", "train.eval_every=3",
            "train.eval_blocks=8", "train.log_every=1", "train.progress=false", "optim.lr=3e-3"]


def check_pretrain_parity(single_dir: Path, out: Path, engine: str, rtol: float) -> float:
    """Assert that the run in ``out`` (``engine``, 2 ranks) logged the same train losses at every
    step and the same final eval loss as the one-process run in ``single_dir``, within ``rtol``;
    returns the per-rank / one-process optimizer-state-bytes ratio."""
    ref, got = train_losses(single_dir), train_losses(out)
    assert sorted(ref) == sorted(got) and ref, (sorted(ref), sorted(got))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=rtol), (engine, step, ref[step], got[step])
    s1 = json.loads((Path(single_dir) / "summary.json").read_text())
    s2 = json.loads((Path(out) / "summary.json").read_text())
    assert s2["engine"] == engine and s2["world_size"] == 2
    assert s2["final_eval_loss"] == pytest.approx(s1["final_eval_loss"], rel=rtol)
    return s2["optimizer_state_bytes"] / s1["optimizer_state_bytes"]


@pytest.fixture
def tiny_run():
    return list(TINY_RUN)


# ---------------------------------------------------------------------- kernel tests (tests/kernels)
# Every Triton kernel against its PyTorch twin.  Without a GPU the kernels run in Triton's
# interpreter (backend="triton" on CPU tensors): TRITON_INTERPRET=1 is set per kernel test (the
# opt-in optimlib.kernels._dispatch checks at call time), so nothing depends on it being set
# before triton is imported.  Where CUDA is available the same tests also run the compiled
# kernels (the ``device`` fixture).  These live here, not in tests/kernels/conftest.py: a second
# conftest module would shadow this one for the ``from conftest import ...`` of other tests.
KERNEL_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Tolerances of kernel vs twin, per dtype.  fp32: the kernels follow the twins' operation order
# and rounding (IEEE division and square root), and differ only by summation order in reductions
# and matmuls, by FMA contraction on a GPU and by our tanh; bf16: the same, plus one bf16 ulp
# (2^-8 relative) where eager PyTorch rounds an intermediate differently (CPU bf16 matmul
# accumulation, sums of bf16 tensors).
KERNEL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if request.path.parent.name == "kernels":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.delenv("OPTIMLIB_KERNELS", raising=False)


@pytest.fixture(params=KERNEL_DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def tol():
    def get(dtype, scale: float = 1.0):
        t = KERNEL_TOL[dtype]
        return dict(rtol=t["rtol"] * scale, atol=t["atol"] * scale)
    return get
