"""``engine=ddp`` and ``train.layerwise=true`` in launch/pretrain.py, against one process.

Two launches run every case (tests/distributed/pretrain_cases_worker.py): one ``python`` process
(the references and the one-process layer-wise runs) and one ``torchrun`` on 2 CPU ranks.  Each
run starts from a shipped config (``configs/<optimizer>.yaml`` or ``configs/<reparam>.yaml``) cut
to 2 steps of a tiny LLaMA, 8 sequences per step in micro-batches of 2 (4 accumulated micro-batches
on one process, 2 per rank on two), gradient clipping off (layer-wise needs it off).

* One process, layer-wise vs ordinary, every registered optimizer and reparameterization: every
  loss and every model tensor of the final checkpoint bit-identical.
* DDP on 2 ranks, every optimizer and reparameterization: every loss and the final eval loss
  within 2e-5 relative of one process (the bar of test_pretrain_parity.py; the differences are
  the order of the gradient reductions), the whole optimizer state on each rank; once with
  clipping on (the global norm).
* Layer-wise on 2 ranks (DDP and FSDP2; torch AdamW, GaLore AdamW, SMMF, AdamP, dynamic rank):
  within 2e-5 of one process; DDP layer-wise bit-identical to ordinary DDP (each gradient
  averaged by its own all-reduce instead of DDP's buckets: the same sums).
* The acceptance run, 8-bit GaLore AdamW layer-wise with one micro-batch per step (no
  accumulation): the same result on 1 process (bit for bit), DDP and FSDP2, and the gradient bytes
  alive at the peak well under those of all gradients together.
* Checkpoints: a single-process checkpoint resumes under DDP and a DDP one under one process.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, launch, read_metrics, train_losses
from optimlib.optim import list_optimizers
from optimlib.train import checkpoint
from optimlib.train.config import load_config
from optimlib.train.loop import pretrain

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = Path(__file__).with_name("pretrain_cases_worker.py")
RTOL = 2e-5
SHORT = ["data.max_bytes=200000", "data.seq_len=32", "train.batch_size=8", "train.micro_batch=2", "train.steps=2",
         "train.warmup_steps=1", "train.eval_every=0", "train.eval_blocks=4", "train.log_every=1",
         "train.progress=false", "train.grad_clip=0", "train.checkpoint_every=0"]
REPARAMS = {"compander": "compander", "dynamic_rank": "dynamic_rank", "lost": "lost", "sltrain": "sltrain",
            "nm": "nm_2of4_srste", "lowrank": "default"}
LAYERWISE_2_RANKS = ["adamw", "galore_adamw", "smmf", "adamp", "dynamic_rank"]
# Optimizers without a shipped config: the defaults, except GaLore-AdamP's rank 128 SVD basis, which
# spans whole matrices of the tiny model, where round-off turns the basis (measured: 2e-5 on the
# final eval loss between 1 and 2 ranks); a seeded random basis is the same on both.
OWN_KWARGS = {"galore_adamp": ["optim.kwargs={rank: 8, projection: random}"]}
ACCEPTANCE = ["optim.name=galore_adamw", "optim.kwargs.moments_dtype=int8", "train.micro_batch=null"]
LAYERWISE = ["train.layerwise=true"]


def base(name: str) -> tuple[str, list[str]]:
    """(config file, overrides) of the run of optimizer or reparameterization ``name``."""
    if name in REPARAMS:
        extra = ["reparam.method=lowrank", "reparam.options={rank: 8}"] if name == "lowrank" else []
        return f"configs/{REPARAMS[name]}.yaml", extra
    path = REPO / "configs" / f"{name}.yaml"
    return (str(path.relative_to(REPO)) if path.is_file() else "configs/default.yaml"), [f"optim.name={name}",
                                                                                         *OWN_KWARGS.get(name, [])]


def run_cases(root: Path, cases: dict, launcher: str) -> dict:
    """Run ``{key: (config, overrides)}`` in one launch; ``{key: out_dir}``."""
    outs = {key: root / key for key in cases}
    spec = [["--config", config, *SHORT, *extra, f"out_dir={outs[key]}"] for key, (config, extra) in cases.items()]
    (root / "cases.json").write_text(json.dumps(spec))
    launch(WORKER, [str(root / "cases.json")], launcher=launcher, timeout=900)
    return outs


def names() -> list[str]:
    return [*list_optimizers(), *REPARAMS]


def model_state(out: Path) -> dict:
    (_, ckpt), = checkpoint.complete_checkpoints(out / "checkpoints")[-1:]
    return torch.load(ckpt / "state.pt", weights_only=True)["model"]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_close_run(ref: Path, got: Path, rtol: float = RTOL) -> None:
    a, b = train_losses(ref), train_losses(got)
    assert sorted(a) == sorted(b) == [1, 2], (a, b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=rtol), (got.name, step, a[step], b[step])
    assert summary(got)["final_eval_loss"] == pytest.approx(summary(ref)["final_eval_loss"], rel=rtol), got.name


def assert_identical_run(ref: Path, got: Path) -> None:
    assert read_losses(ref) == read_losses(got), got.name
    a, b = model_state(ref), model_state(got)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def read_losses(out: Path) -> list:
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(out)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cases = {}
    for name in names():
        config, extra = base(name)
        cases[f"ref-{name}"] = (config, extra)
        cases[f"lw-{name}"] = (config, [*extra, *LAYERWISE])
    cases["clip"] = ("configs/default.yaml", ["train.grad_clip=0.5", "train.checkpoint_every=1"])
    cases["acc1-ref"] = ("configs/galore_adamw.yaml", ACCEPTANCE)
    cases["acc1-lw"] = ("configs/galore_adamw.yaml", [*ACCEPTANCE, *LAYERWISE])
    return run_cases(tmp_path_factory.mktemp("one"), cases, "python")


@pytest.fixture(scope="module")
def two_ranks(one_process, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    cases = {f"ddp-{name}": (base(name)[0], [*base(name)[1], "engine=ddp"]) for name in names()}
    for name in LAYERWISE_2_RANKS:
        config, extra = base(name)
        cases[f"ddplw-{name}"] = (config, [*extra, *LAYERWISE, "engine=ddp"])
        cases[f"fsdplw-{name}"] = (config, [*extra, *LAYERWISE, "engine=fsdp2"])
    clip = ["train.grad_clip=0.5", "train.checkpoint_every=1", "engine=ddp"]
    cases["ddp-clip"] = ("configs/default.yaml", clip)
    cases["ddp-resumed"] = ("configs/default.yaml", [*clip, "resume=auto"])
    ckpts = root / "ddp-resumed" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(checkpoint.step_dir(one_process["clip"] / "checkpoints", 1), checkpoint.step_dir(ckpts, 1))
    for engine in ("ddp", "fsdp2"):
        cases[f"acc1-{engine}"] = ("configs/galore_adamw.yaml", [*ACCEPTANCE, *LAYERWISE, f"engine={engine}"])
    return run_cases(root, cases, "torchrun")


@pytest.mark.parametrize("name", names())
def test_layerwise_one_process_is_bit_identical(one_process, name):
    assert summary(one_process[f"lw-{name}"])["layerwise"]
    assert_identical_run(one_process[f"ref-{name}"], one_process[f"lw-{name}"])


@pytest.mark.parametrize("name", names())
def test_ddp_two_ranks_match_one_process(one_process, two_ranks, name):
    ref, got = one_process[f"ref-{name}"], two_ranks[f"ddp-{name}"]
    assert_close_run(ref, got)
    s = summary(got)
    assert s["engine"] == "ddp" and s["world_size"] == 2
    assert s["optimizer_state_bytes"] == summary(ref)["optimizer_state_bytes"]   # replicated, not sharded


@pytest.mark.parametrize("name", LAYERWISE_2_RANKS)
def test_layerwise_two_ranks_match_one_process(one_process, two_ranks, name):
    for engine in ("ddplw", "fsdplw"):
        got = two_ranks[f"{engine}-{name}"]
        assert summary(got)["layerwise"] and summary(got)["world_size"] == 2
        assert_close_run(one_process[f"ref-{name}"], got)
    assert_identical_run(two_ranks[f"ddp-{name}"], two_ranks[f"ddplw-{name}"])


def test_acceptance_run_and_gradient_memory(one_process, two_ranks):
    ref, lw = one_process["acc1-ref"], one_process["acc1-lw"]
    assert_identical_run(ref, lw)
    for engine in ("ddp", "fsdp2"):
        assert_close_run(ref, two_ranks[f"acc1-{engine}"])
    s_ref, s_lw = summary(ref), summary(lw)
    assert s_ref["config"]["train"]["micro_batch"] is None                 # derived: 8 on one process
    assert s_ref["grad_bytes_peak"] == s_ref["grad_bytes_all"] == s_ref["param_bytes"]
    assert s_lw["grad_bytes_all"] == s_ref["grad_bytes_all"]
    # one layer's gradients at a time: the embedding (vocab x dim, the largest) and little more
    assert s_lw["grad_bytes_peak"] < s_lw["grad_bytes_all"] / 3, (s_lw["grad_bytes_peak"], s_lw["grad_bytes_all"])
    s_fsdp = summary(two_ranks["acc1-fsdp2"])
    assert s_fsdp["grad_bytes_peak"] < s_fsdp["grad_bytes_all"] / 3 and s_fsdp["grad_bytes_all"] < s_lw["grad_bytes_all"]


def test_clipped_ddp_and_resume_across_single_and_ddp(one_process, two_ranks, tmp_path):
    ref = one_process["clip"]
    assert_close_run(ref, two_ranks["ddp-clip"])
    resumed = summary(two_ranks["ddp-resumed"])                   # single's step-1 checkpoint, under DDP
    assert resumed["resumed_from"].endswith("step_00000001") and resumed["steps_this_run"] == 1
    assert train_losses(two_ranks["ddp-resumed"])[2] == pytest.approx(train_losses(ref)[2], rel=RTOL)
    out = tmp_path / "single-resumed"                             # DDP's step-1 checkpoint, one process
    shutil.copytree(checkpoint.step_dir(two_ranks["ddp-clip"] / "checkpoints", 1),
                    checkpoint.step_dir(out / "checkpoints", 1))
    got = pretrain(load_config(REPO / "configs/default.yaml",
                               [*SHORT, "train.grad_clip=0.5", "train.checkpoint_every=1", f"out_dir={out}",
                                "resume=auto", "engine=single"]))
    assert got["resumed_from"].endswith("step_00000001")
    assert train_losses(out)[2] == pytest.approx(train_losses(ref)[2], rel=RTOL)
