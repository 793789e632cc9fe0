"""Checkpoints under faults: corruption, truncation, a full disk, and non-finite gradients.

In-process runs of the training loop (``pretrain``), one process, the tiny config of
``conftest.TINY_RUN`` (6 steps of a tiny LLaMA).
"""

import errno
import math

import pytest
import torch

from conftest import TINY_RUN, train_losses
from optimlib.train import checkpoint
from optimlib.train.config import load_config
from optimlib.train.engine import Engine, NonFiniteGradientError
from optimlib.train.loop import pretrain


def _run(out_dir, *extra):
    return pretrain(load_config(None, [*TINY_RUN, f"out_dir={out_dir}", *extra]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run, and a run with checkpoints at steps 3 and 6."""
    full = tmp_path_factory.mktemp("full")
    _run(full)
    return train_losses(full)


def _checkpointed(tmp_path):
    _run(tmp_path, "train.checkpoint_every=3")
    root = tmp_path / "checkpoints"
    assert [s for s, _ in checkpoint.complete_checkpoints(root)] == [3, 6]
    return root


def _resume_continues_exactly(tmp_path, reference):
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000006"):
        summary = _run(tmp_path, "train.checkpoint_every=3", "resume=auto")
    assert summary["resumed_from"].endswith("step_00000003")
    got = train_losses(tmp_path)
    assert got == reference                                     # steps 4-6 rerun bit-exactly


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    root = _checkpointed(tmp_path)
    state = checkpoint.step_dir(root, 6) / "state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                  # bit rot: same size, other bytes
    state.write_bytes(bytes(raw))
    assert "checksum" in checkpoint.verify(checkpoint.step_dir(root, 6))
    _resume_continues_exactly(tmp_path, reference)


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    root = _checkpointed(tmp_path)
    state = checkpoint.step_dir(root, 6) / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    _resume_continues_exactly(tmp_path, reference)


def test_explicit_resume_of_a_corrupt_checkpoint_is_an_error(tmp_path):
    root = _checkpointed(tmp_path)
    bad = checkpoint.step_dir(root, 6)
    (bad / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"), pytest.warns(UserWarning):
        _run(tmp_path, f"resume={bad}")


def test_every_checkpoint_loads_with_weights_only(tmp_path):
    root = _checkpointed(tmp_path)
    for _, path in checkpoint.complete_checkpoints(root):
        state = torch.load(path / "state.pt", weights_only=True)
        assert set(state) == {"model", "optimizer", "meta", "rng"}


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        if "step_00000006" in str(path):
            with open(path, "wb") as fh:
                fh.write(b"\0" * 4096)                          # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(checkpoint.CheckpointError, match=r"step 6 .*No space left on device.*intact"):
        _run(tmp_path, "train.checkpoint_every=3")
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]      # no .tmp left behind
    assert checkpoint.verify(root / "step_00000003") is None


def _poison_step(monkeypatch, step: int, accum: int = 4, name: str = "layers.0.attn.q_proj.weight"):
    """Make every gradient of parameter ``name`` (the first attention projection) NaN on ``step``
    (1-based)."""
    calls = {"n": 0}
    real = Engine.forward_backward

    def poisoned(self, x, y, scale, last):
        loss = real(self, x, y, scale, last)
        calls["n"] += 1
        if calls["n"] == step * accum:
            self.module.get_parameter(name).grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Engine, "forward_backward", poisoned)


def test_nonfinite_gradient_step_is_skipped_and_counted(tmp_path, reference, monkeypatch):
    _poison_step(monkeypatch, 3)
    summary = _run(tmp_path)
    assert summary["skipped_steps"] == 1
    got = train_losses(tmp_path)
    assert [got[s] for s in (1, 2, 3)] == [reference[s] for s in (1, 2, 3)]   # the loss is taken before the step
    assert got[4] != reference[4]                                             # step 3 was not applied
    state = torch.load(checkpoint.step_dir(tmp_path / "checkpoints", 6) / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {5.0}                                                     # 6 steps, one skipped
    assert all(math.isfinite(v) for v in got.values())


def test_nonfinite_skip_keeps_the_nm_srste_term_and_counts_only_applied_steps(tmp_path, monkeypatch):
    """N:M with SR-STE through the loop, step 3 skipped: the step after it (and an ordinary one)
    still gets the SR-STE term once, its gradient being the paper's ``g + lam * (1 - m) * W`` with
    ``g`` the loss gradient of the same micro-batches replayed without the term, and the schedule
    counts the 5 applied steps only."""
    from optimlib.reparam.nm import nm_mask
    from optimlib.reparam.nm_export import nm_parametrizations

    lam, accum, checked, batches = 0.05, 4, [], []
    real_fb, real_step = Engine.forward_backward, Engine.step

    def recording(self, x, y, scale, last):
        batches.append((x, y, scale, last))
        return real_fb(self, x, y, scale, last)

    def checking(self):
        n = len(batches) // accum  # the step about to be taken (1-based)
        if n in (2, 4):
            got = {p: p.grad for p in self.module.parameters()}
            layers = nm_parametrizations(self.module)
            for p in got:
                p.grad = None
            for _, _, nm in layers:
                nm.srste_lambda = 0.0
            for args in batches[-accum:]:
                real_fb(self, *args)  # g alone
            for name, linear, nm in layers:
                w = linear.parametrizations.weight.original
                expected = w.grad + lam * ~nm_mask(w, 2, 4) * w.detach()
                torch.testing.assert_close(got[w], expected, rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"step {n}, {name}: {m}")
                nm.srste_lambda = lam
            for p, g in got.items():
                p.grad = g
            checked.append(n)
        return real_step(self)

    monkeypatch.setattr(Engine, "forward_backward", recording)
    monkeypatch.setattr(Engine, "step", checking)
    _poison_step(monkeypatch, 3, accum, name="layers.0.attn.q_proj.parametrizations.weight.original")
    summary = _run(tmp_path, "reparam.method=nm",
                   f"reparam.options={{n: 2, m: 4, recipe: srste, srste_lambda: {lam}}}")
    assert summary["skipped_steps"] == 1 and checked == [2, 4]
    state = torch.load(checkpoint.step_dir(tmp_path / "checkpoints", 6) / "state.pt", weights_only=True)
    positions = {int(v) for k, v in state["model"].items() if k.endswith("parametrizations.weight.0.step")}
    assert positions == {5}                                                   # 6 steps, one skipped


def test_nonfinite_gradient_stop_names_the_step_and_the_parameter(tmp_path, monkeypatch):
    _poison_step(monkeypatch, 2)
    with pytest.raises(NonFiniteGradientError, match=r"step 2: .*layers\.0\.attn\.q_proj\.weight"):
        _run(tmp_path, "train.on_nonfinite=stop")


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_engine_step_clips_to_the_configured_norm(clip):
    """The optimizer sees gradients of global norm ``train.grad_clip`` (Adam's first step is
    scale-invariant, so a loss comparison alone would not notice clipping switched off)."""
    from optimlib.models import build_model
    from optimlib.train.engine import SingleEngine

    cfg = load_config(None, [f"train.grad_clip={clip}"])
    engine = SingleEngine(cfg, torch.device("cpu"), 0, 1)
    engine.setup(build_model("llama_tiny"))
    torch.manual_seed(0)
    for p in engine.model.parameters():
        p.grad = torch.randn_like(p)
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in engine.model.parameters()])).item()
    seen = {}
    real_step = engine.optimizer.step

    def record(*args, **kwargs):
        seen["norm"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in engine.model.parameters()])).item()
        return real_step(*args, **kwargs)

    engine.optimizer.step = record
    result = engine.step()
    assert result.grad_norm == pytest.approx(before, rel=1e-5)
    assert seen["norm"] == pytest.approx(clip if clip else before, rel=1e-4)
