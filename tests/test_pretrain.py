"""launch/pretrain.py on one process: summary, checkpoints, exact resume, errors."""

import json
import shutil

import pytest
import torch

from conftest import PRETRAIN, TINY_RUN, launch, read_metrics, train_losses
from optimlib.train import checkpoint
from optimlib.train.config import load_config
from optimlib.train.loop import pretrain


def _run(out_dir, *extra):
    return pretrain(load_config(None, [*TINY_RUN, f"out_dir={out_dir}", *extra]))


def test_summary_and_outputs(tmp_path):
    summary = _run(tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("steps", "tokens", "final_train_loss", "final_eval_loss", "tokens_per_s", "param_bytes",
                "optimizer_state_bytes", "world_size", "engine", "optimizer", "config"):
        assert key in on_disk, key
    assert on_disk["engine"] == "single" and on_disk["world_size"] == 1 and on_disk["optimizer"] == "adamw"
    assert on_disk["steps"] == 6 and on_disk["tokens"] == 6 * 8 * 32
    n = summary["num_parameters"]
    assert summary["param_bytes"] == 4 * n
    # AdamW keeps exp_avg and exp_avg_sq (fp32) per element, plus a 4-byte step per tensor (< 100 tensors).
    assert 8 * n < summary["optimizer_state_bytes"] < 8 * n + 4 * 100
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = checkpoint.complete_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in ckpts] == [6]
    state = torch.load(ckpts[-1][1] / "state.pt", weights_only=True)
    assert state["meta"]["step"] == 6


def test_exact_resume_single_process(tmp_path):
    full = tmp_path / "full"
    _run(full)
    part = tmp_path / "part"
    _run(part, "train.checkpoint_every=3")
    root = part / "checkpoints"
    assert [s for s, _ in checkpoint.complete_checkpoints(root)] == [3, 6]
    shutil.rmtree(checkpoint.step_dir(root, 6))          # as if the run died after step 3's checkpoint
    _run(part, "train.checkpoint_every=3", "resume=auto")
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[s] == b[s] for s in a), (a, b)          # bit-exact, not approximately equal
    evals = [r for r in read_metrics(part) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]


def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path):
    _run(tmp_path, "train.checkpoint_every=3")
    root = tmp_path / "checkpoints"
    (checkpoint.step_dir(root, 6) / checkpoint.MANIFEST).unlink()   # a crash before the manifest landed
    candidates = checkpoint.resolve_resume("auto", root)
    assert candidates == [checkpoint.step_dir(root, 6), checkpoint.step_dir(root, 3)]
    assert checkpoint.verify(candidates[0]) is not None and checkpoint.verify(candidates[1]) is None


def test_cli_config_error_is_one_clear_line(tmp_path):
    with pytest.raises(AssertionError) as info:
        launch(PRETRAIN, ["optim.lrr=1", f"out_dir={tmp_path}"], timeout=120)
    assert "unknown config key 'optim.lrr'" in str(info.value)
    assert "Traceback" not in str(info.value)
