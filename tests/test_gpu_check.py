"""launch/gpu_check.py: its CPU dry run end to end, the time guard, and the pieces it computes with.

The GPU run itself needs a GPU; the dry run goes through the same processes, files and summary
at toy sizes, so the check is ready whenever a GPU is."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from optimlib.bench.gpucheck import PARTS, TOTAL_BUDGET, allot, parse_pytest_verbose, steady_rate
from optimlib.optim import list_optimizers

SCRIPT = REPO / "launch" / "gpu_check.py"
PART_FILES = {"kernel_tests.json", "kernel_bench.json", "step_time.json", "pretrain.json"}
KERNELS = {"adam_lowrank_update_", "adam8bit_lowrank_update_", "galore_backproject_update_", "smmf_update_",
           "adamp_update_", "sltrain_compose", "sltrain_grads", "nm_mask_apply", "nm_grad", "compander (fwd)",
           "compander (bwd)"}


def _check(out, *args, timeout=300):
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _commit():
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.slow
def test_dry_run_writes_every_part_and_the_summary(tmp_path):
    proc = _check(tmp_path, "--from-tree")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files == PART_FILES | {"environment.json", "gpu_check.json", "summary.md"}
    assert len([f for f in files if f.endswith(".json")]) <= 8

    import triton

    data = {name: json.loads((tmp_path / name).read_text()) for name in files if name.endswith(".json")}
    for name, payload in data.items():   # every file says where and on what it ran
        env = payload if name == "environment.json" else payload["environment"]
        assert env["torch"] == torch.__version__ and env["triton"] == triton.__version__, name
        assert env["commit"] == _commit() and env["device"] == "cpu", name
    assert data["environment.json"]["optimlib_install"].startswith("from the tree")

    run = data["gpu_check.json"]
    assert [p["name"] for p in run["parts"]] == [p.name for p in PARTS]
    assert all(p["status"] == "done" and p["seconds"] > 0 for p in run["parts"]), run["parts"]
    assert run["elapsed"] < run["budget"] == TOTAL_BUDGET

    tests = data["kernel_tests.json"]
    assert tests["counts"] == {"passed": 8} and tests["failures"] == [] and tests["exit_code"] == 0

    bench = data["kernel_bench.json"]
    assert {r["kernel"] for r in bench["rows"]} == KERNELS
    for row in bench["rows"]:
        assert row["path"] == "reference" and row["speedup"] is None
        assert row["bytes"] > 0 and row["time_ms"] > 0 and row["copy_gbps"] > 0
        assert row["gbps"] == pytest.approx(row["bytes"] / row["time_ms"] / 1e6)

    step = data["step_time.json"]
    rows = {r["name"]: r for r in step["rows"]}
    assert step["baseline"] == "torch_adamw_fused" and step["model"] == "llama_tiny"
    assert set(rows) == {"torch_adamw_foreach", "torch_adamw_fused", *list_optimizers()}
    assert rows["torch_adamw_fused"]["ratio"] == 1.0
    for r in rows.values():
        assert r["ratio"] == pytest.approx(r["amortized"] / rows["torch_adamw_fused"]["amortized"])

    pre = {r["name"]: r for r in data["pretrain.json"]["rows"]}
    assert {"adamw", "galore_adamw", "galore_adamw int8", "smmf", "galore_smmf", "sltrain", "nm 2:4"} <= set(pre)
    ran = pre["adamw"]
    assert ran["status"] == "done" and ran["steps"] == 2 and ran["tokens_per_s"] > 0
    assert math.isfinite(ran["final_train_loss"]) and ran["peak_memory_bytes"] is None   # no CUDA here
    # the estimator's state bytes are the measured ones; the full total is above the states
    assert ran["optimizer_state_bytes"] == ran["estimate"]["optimizer_states"] > 0
    assert ran["estimate"]["total"] > ran["estimate"]["optimizer_states"]
    for name, r in pre.items():
        if name != "adamw":
            assert r["status"].startswith("not run: dry run"), (name, r["status"])
            assert r["estimate"]["total"] > 0 and "model.name=llama_tiny" in r["overrides"]
    states = {n: r["estimate"]["optimizer_states"] for n, r in pre.items()}
    assert states["smmf"] < states["galore_adamw int8"] < states["galore_adamw"] < states["adamw"]
    assert "optim.kwargs.rank=32" in pre["galore_adamw"]["overrides"]     # the paper's rank for the model

    summary = (tmp_path / "summary.md").read_text()
    for text in ("# GPU check: cpu", f"torch {torch.__version__}", f"Triton {triton.__version__}", _commit(),
                 "## Kernel tests", "8 passed", "## Kernel benchmark", "sltrain_compose", "## optimizer.step() time",
                 "ratio to AdamW(fused)", "## Pretraining", "| adamw | done |", "| kernel_tests | 150 |",
                 "dry run: toy sizes on the CPU"):
        assert text in summary, text


def test_time_guard_skips_what_does_not_fit_and_says_so(tmp_path):
    proc = _check(tmp_path, "--budget", "0.001", timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    run = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [p["name"] for p in run["parts"]] == [p.name for p in PARTS]
    for part in run["parts"]:
        assert part["status"].startswith("skipped by the time guard") and part["file"] == ""
    assert not PART_FILES & {p.name for p in tmp_path.iterdir()}
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("skipped by the time guard") == 2 * len(PARTS)    # parts table + each section


def test_arguments_are_checked(tmp_path):
    proc = _check(tmp_path, "--parts", "kernel_tests,warp_drive", timeout=120)
    assert proc.returncode == 2 and "invalid --parts 'kernel_tests,warp_drive'" in proc.stderr


def test_allot_gives_slack_to_a_part_but_keeps_the_later_budgets():
    assert sum(p.budget for p in PARTS) <= TOTAL_BUDGET - 10
    assert allot(540, 150, 360) == 180          # 30 s of slack
    assert allot(400, 150, 360) == 150          # no slack: its own budget
    assert allot(100, 150, 360) == 100          # never past what is left
    assert allot(-5, 150, 0) == 0


def test_parse_pytest_verbose_counts_a_cut_off_run():
    text = "\n".join([
        "tests/kernels/test_a.py::test_x[cuda-dtype0] PASSED                [  1%]",
        "tests/kernels/test_a.py::test_x[cuda-dtype1] FAILED                [  2%]",
        "tests/kernels/test_b.py::test_y[cuda] SKIPPED (no bf16)            [  3%]",
        "tests/kernels/test_b.py::test_y[cuda-2] PASSED                     [  4%]",
        "FAILED tests/kernels/test_a.py::test_x[cuda-dtype1] - AssertionError: Tensor-likes are not close!",
    ])
    parsed = parse_pytest_verbose(text)
    assert parsed["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert parsed["failures"] == [{"test": "tests/kernels/test_a.py::test_x[cuda-dtype1]",
                                   "message": "AssertionError: Tensor-likes are not close!"}]
    assert parse_pytest_verbose(text.rsplit("\n", 1)[0])["failures"][0]["message"] == ""   # killed before the summary


def test_steady_rate_leaves_out_the_first_steps():
    # step 1 takes 10 s (compilation), every later step 0.5 s; 1000 tokens a step
    elapsed = {k: 10 + 0.5 * (k - 1) for k in range(1, 11)}
    metrics = [{"step": k, "loss": 1.0, "tokens_per_s": k * 1000 / t} for k, t in elapsed.items()]
    metrics.append({"step": 10, "eval_loss": 1.0})
    assert steady_rate(metrics, 1000, 5) == pytest.approx(2000)
    assert steady_rate(metrics, 1000, 10) is None
    assert steady_rate(metrics[:1], 1000, 1) is None
