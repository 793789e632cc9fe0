"""Resuming is safe, one process: a checkpoint never runs code, a re-launch never destroys or mixes
results.

* A crafted checkpoint (tests/checkpoint_tamper.py: a pickled ``os.system("touch marker")`` put
  into ``state.pt``, the manifest's checksums updated) is refused by the launcher and by
  ``convert``, naming the file and the global; the marker never appears and nothing in the run
  folder changes.  ``resume_trusted=true`` loads it (and runs it), as documented.
* The loaders DeepSpeed and DCP bring (``weights_only=False``, ``pickle.load``) are held to the
  safe reads even when the up-front check is bypassed.
* A finished run re-launched with ``resume=auto`` is a no-op: exit 0, "already at step 6", every
  file byte-identical.  A new run in a used ``out_dir`` stops before writing anything, unless
  ``overwrite=true``.  A checkpoint of another config is refused unless ``resume_other_config``.

The FSDP2 and DeepSpeed end-to-end counterparts are in tests/distributed/test_checkpoint_engines.py.
"""

import os
import pickle
import shutil

import pytest
import torch

from checkpoint_tamper import Payload, craft_dcp_item, craft_dcp_metadata, craft_torch_file, launch_refused, snapshot
from conftest import PRETRAIN, TINY_RUN, launch, read_metrics
from optimlib.train import checkpoint, convert, safe_load
from optimlib.train.config import load_config, run_identity
from optimlib.train.loop import pretrain

ARGS = [*TINY_RUN, "train.checkpoint_every=3"]


def _run(out_dir, *extra):
    return pretrain(load_config(None, [*ARGS, f"out_dir={out_dir}", *extra]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished")
    _run(out)
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_the_payload_runs_code_when_loaded_unsafely(tmp_path):
    """What the other tests refuse is live: the plain loaders run it."""
    marker = tmp_path / "marker"
    torch.save({"notes": Payload(marker)}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_crafted_state_file_is_refused_by_resume_and_convert(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    ckpt = checkpoint.step_dir(run / "checkpoints", 6)
    crafted = craft_torch_file(ckpt, "state.pt", marker)
    before = snapshot(run)
    text = launch_refused([*ARGS, f"out_dir={run}", "train.steps=9", "resume=auto"])
    assert f"checkpoint file '{crafted}' was refused: it holds the global 'posix.system'" in text
    assert "resume_trusted=true" in text
    assert not marker.exists()
    assert snapshot(run) == before                  # nothing loaded, nothing trained from step 3 instead

    assert convert.main([str(ckpt), str(tmp_path / "converted")]) == 1
    assert f"'{crafted}' was refused" in capsys.readouterr().err
    assert not (tmp_path / "converted").exists() and not marker.exists()

    summary = _run(run, "train.steps=9", "resume=auto", "resume_trusted=true")   # the escape hatch
    assert summary["resumed_from"] == str(ckpt) and summary["steps_this_run"] == 3
    assert marker.exists()                          # it loaded the file as code, as documented


def test_deepspeed_checkpoint_loader_is_held_to_weights_only(tmp_path, monkeypatch):
    """DeepSpeed's own loader (``torch.load(weights_only=False)``) inside ``guarded_loads``: the
    payload is refused; outside it, the same call runs it."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker, path = tmp_path / "marker", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"notes": Payload(marker)}}, path)
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"'.*step_x' was refused.*'posix\.system'"):
        with safe_load.guarded_loads(tmp_path / "step_x", allow=checkpoint.deepspeed_safe_globals()):
            TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert marker.exists()


def _dcp_folder(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    dcp.save({"w": torch.arange(6.0), "lr": 0.5, "names": ["a", "b"]}, checkpoint_id=str(folder), no_dist=True)
    return folder


@pytest.mark.parametrize("kind", ["metadata", "item"])
def test_dcp_files_are_read_the_safe_way(tmp_path, kind):
    """DCP's ``.metadata`` (a plain pickle) and its items (``torch.save`` streams, ``torch.load``ed
    with ``weights_only=False`` for non-tensors): a payload in either is refused by the check, and
    by DCP's own read through our reader when the check is bypassed; DCP's default reader runs it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder, marker = _dcp_folder(tmp_path), tmp_path / "marker"
    plain = pickle.loads((folder / ".metadata").read_bytes())
    checked = safe_load.read_dcp_metadata(folder / ".metadata")
    assert checked.state_dict_metadata == plain.state_dict_metadata and checked.storage_data == plain.storage_data
    safe_load.check_dcp(folder)                     # an untouched folder passes
    if kind == "metadata":
        crafted, where = craft_dcp_metadata(folder, marker), ""
    else:
        crafted, offset = craft_dcp_item(folder, "lr", marker)
        where = rf" \(its item at byte {offset}\)"
    with pytest.raises(safe_load.UnsafeCheckpointError, match=rf"'{crafted}'{where} was refused: it holds the "
                                                              rf"global 'posix\.system'"):
        safe_load.check_dcp(folder)

    def read(reader):
        _load_state_dict({}, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)

    reader = safe_load.dcp_reader(folder)
    named = crafted if kind == "metadata" else folder      # DCP's own item reads do not say which file
    with pytest.raises(safe_load.UnsafeCheckpointError, match=rf"'{named}' was refused: it holds the global 'posix"):
        with safe_load.guarded_loads(folder, reader=reader):
            read(reader)
    assert not marker.exists()
    read(FileSystemReader(folder))
    assert marker.exists()


def test_relaunching_a_finished_run_changes_nothing(run):
    before = snapshot(run)
    proc = launch(PRETRAIN, [*ARGS, f"out_dir={run}", "resume=auto"])
    assert "already at step 6 (train.steps=6)" in proc.stdout, proc.stdout
    assert snapshot(run) == before                  # summary.json, metrics, TensorBoard, checkpoints
    summary = _run(run, "resume=auto")
    assert summary["steps_this_run"] == 0 and summary["already_finished"] and summary["steps"] == 6
    assert snapshot(run) == before


def test_new_run_in_a_used_out_dir_stops_before_writing(run):
    before = snapshot(run)
    text = launch_refused([*ARGS, f"out_dir={run}"], code=2)
    assert f"out_dir '{run}' holds another run's outputs (checkpoints/step_00000003, " in text
    assert "overwrite=true" in text
    assert snapshot(run) == before

    summary = _run(run, "train.steps=4", "train.checkpoint_every=2", "overwrite=true")
    assert summary["steps"] == 4 and summary["resumed_from"] is None
    assert [s for s, _ in checkpoint.complete_checkpoints(run / "checkpoints")] == [2, 4]   # the old 3 and 6 gone
    assert max(r["step"] for r in read_metrics(run)) == 4
    assert len(list((run / "tensorboard").iterdir())) == 1


def test_resume_under_another_config_is_refused(run):
    step3 = checkpoint.step_dir(run / "checkpoints", 3)
    recorded = checkpoint.read_manifest(step3)["run"]
    assert recorded["config"]["optim.lr"] == 0.003 and "train.steps" not in recorded["config"]
    assert recorded["config_sha256"] == checkpoint.run_record(run_identity(load_config(None, ARGS)))["config_sha256"]
    refused = r"step_00000006' was written by a run with another config \(optim\.lr = 0\.003 there, 0\.001 here\)"
    with pytest.raises(checkpoint.ForeignCheckpointError, match=refused):
        _run(run, "resume=auto", "optim.lr=1e-3")   # finished, but not this config's run: no no-op either
    shutil.rmtree(checkpoint.step_dir(run / "checkpoints", 6))
    before = snapshot(run)
    with pytest.raises(checkpoint.ForeignCheckpointError, match="resume_other_config=true"):
        _run(run, "resume=auto", "optim.lr=1e-3")
    assert snapshot(run) == before
    summary = _run(run, "resume=auto", "optim.lr=1e-3", "resume_other_config=true")
    assert summary["resumed_from"] == str(step3) and summary["steps_this_run"] == 3


def test_run_identity_leaves_out_what_may_change_on_resume():
    base = run_identity(load_config(None, ARGS))
    moved = run_identity(load_config(None, [*ARGS, "out_dir=elsewhere", "train.steps=60", "resume=auto",
                                            "train.micro_batch=4", "engine=fsdp2", "deepspeed.zero_stage=2"]))
    assert moved == base
    assert run_identity(load_config(None, [*ARGS, "train.warmup_steps=3"])) != base
    assert base["optim.lr"] == 0.003 and base["data.seq_len"] == 32 and "out_dir" not in base
