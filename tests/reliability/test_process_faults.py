"""Signals and killed processes: nothing is lost beyond the checkpoint interval.

Each test runs ``launch/pretrain.py`` as a real process, injects the fault once a checkpoint
exists (SIGTERM, ``kill -9`` of the run, ``kill -9`` of one torchrun rank), continues with
``resume=auto``, and compares the logged losses with an
uninterrupted run: bit-exact on one process, within 2e-5 relative on 2 FSDP2 ranks (the
tolerance of the FSDP2 parity test).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import PRETRAIN, TINY_RUN, cpu_env, free_port, launch, train_losses
from optimlib.train import checkpoint

pytestmark = pytest.mark.slow

STEPS = 24
RUN = [*TINY_RUN, f"train.steps={STEPS}", "train.checkpoint_every=4", "train.eval_every=0"]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoint.complete_checkpoints(root):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def _kill_local_rank_1(proc: subprocess.Popen) -> None:
    """``kill -9`` of the worker with ``LOCAL_RANK=1`` among the torchrun ``proc``'s children."""
    victims = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if c.environ().get("LOCAL_RANK") == "1"]
    assert victims, "rank 1 not found"
    os.kill(victims[0].pid, signal.SIGKILL)


def _assert_same_losses(reference: Path, out: Path) -> None:
    """Every step logged, each loss within 2e-5 of the uninterrupted 2-rank run's."""
    ref, got = train_losses(reference), train_losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5), (step, ref[step], got[step])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    launch(PRETRAIN, [*RUN, f"out_dir={out}"])
    return train_losses(out)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, uninterrupted):
    proc = _start([sys.executable, str(PRETRAIN), *RUN, f"out_dir={tmp_path}"])
    _wait_for_checkpoint(tmp_path / "checkpoints", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM after step" in out
    stopped_at = max(s for s, _ in checkpoint.complete_checkpoints(tmp_path / "checkpoints"))
    assert 4 <= stopped_at < STEPS                   # the checkpoint written at the signal, not the periodic one
    assert f"stopped by SIGTERM after step {stopped_at};" in out
    launch(PRETRAIN, [*RUN, f"out_dir={tmp_path}", "resume=auto"])
    assert train_losses(tmp_path) == uninterrupted


def test_kill_9_loses_at_most_the_checkpoint_interval(tmp_path, uninterrupted):
    proc = _start([sys.executable, str(PRETRAIN), *RUN, f"out_dir={tmp_path}"])
    _wait_for_checkpoint(tmp_path / "checkpoints", proc)
    proc.kill()
    proc.communicate()
    launch(PRETRAIN, [*RUN, f"out_dir={tmp_path}", "resume=auto"])
    assert train_losses(tmp_path) == uninterrupted


@pytest.mark.distributed
def test_kill_9_of_one_torchrun_rank_then_relaunch_finishes_the_same(tmp_path):
    fsdp_run = [*RUN, "train.grad_clip=0.5"]
    reference = tmp_path / "reference"
    launch(PRETRAIN, [*fsdp_run, f"out_dir={reference}"], launcher="torchrun")
    out = tmp_path / "faulty"
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", str(PRETRAIN), *fsdp_run, f"out_dir={out}"])
    _wait_for_checkpoint(out / "checkpoints", proc)
    _kill_local_rank_1(proc)
    proc.communicate(timeout=300)
    assert proc.returncode != 0                      # torchrun tears the job down
    launch(PRETRAIN, [*fsdp_run, f"out_dir={out}", "resume=auto"], launcher="torchrun")
    _assert_same_losses(reference, out)


@pytest.mark.distributed
def test_kill_9_of_one_torchrun_rank_restarts_in_place_and_finishes_the_same(tmp_path):
    """``torchrun --max-restarts=1`` with ``resume=auto`` in the command: the restarted attempt
    joins a new process group (the static rendezvous keeps one store for every attempt) and
    continues from the newest complete checkpoint."""
    fsdp_run = [*RUN, "train.grad_clip=0.5", "resume=auto"]
    reference = tmp_path / "reference"
    launch(PRETRAIN, [*fsdp_run, f"out_dir={reference}"], launcher="torchrun")
    out = tmp_path / "restarted"
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
                   f"--master_port={free_port()}", str(PRETRAIN), *fsdp_run, f"out_dir={out}"])
    _wait_for_checkpoint(out / "checkpoints", proc)
    _kill_local_rank_1(proc)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]      # the restart finished the run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and Path(summary["resumed_from"]).parent == out / "checkpoints"
    _assert_same_losses(reference, out)
